"""What a run shows and writes: log lines, progress bar, TensorBoard, metrics.jsonl, curves.png.

Every file goes through `etils.epath`, so a gs:// workdir works as a local one. Object stores
cannot append, so metrics.jsonl and the TensorBoard events are written whole each time (small:
one record per log line).
"""

import contextlib
import io
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from densenet_jax.train.sharding import WaitClock

# Above this share of a reporting window spent waiting for the next batch, a run is input-bound.
INPUT_BOUND_FRACTION = 0.1

# What TensorFlow's C++ side writes to stderr on import, whatever TF_CPP_MIN_LOG_LEVEL says: absl's
# notice that logging is not initialized yet, and INFO lines (oneDNN is on), once per library.
NATIVE_STARTUP_NOISE = re.compile(
  r'WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$'
  r'|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] '
)


@contextlib.contextmanager
def quiet_native_startup() -> Iterator[None]:
  """Hides native libraries' start-up INFO lines written to stderr (file descriptor 2) in the block.

  Everything else written there (warnings, errors, Python's own) reaches stderr when the block ends.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not NATIVE_STARTUP_NOISE.match(line):
          sys.stderr.write(line)
      sys.stderr.flush()


def log(message: str, level: int = logging.INFO) -> None:
  """A timestamped line on stdout, from process 0 only (absl logging carries the details)."""
  logging.log(level, '%s', message)
  if jax.process_index() == 0:
    bar = Reporter.active_bar
    line = f'{time.strftime("%H:%M:%S")} {message}'
    if bar is not None:
      bar.write(line)
    else:
      print(line, flush=True)


class Reporter:
  """Progress bar, log lines, TensorBoard, metrics.jsonl and the curves PNG (process 0 writes)."""

  active_bar = None  # The tqdm bar log lines must be written above, if one is shown.

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    total_steps: int,
    steps_per_epoch: int,
    start_step: int,
  ):
    """Reports a run of `config` in `workdir` from `start_step` (a resumed run keeps its history)."""
    self.config = config
    self.workdir = workdir
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.is_writer = jax.process_index() == 0
    self.history_path = workdir / 'metrics.jsonl'
    self.history = []
    if self.is_writer and self.history_path.exists():
      # After a resume, drop what the interrupted run logged beyond its checkpoint.
      for line in self.history_path.read_text().splitlines():
        record = json.loads(line)
        if record['step'] <= start_step:
          self.history.append(record)
      self._write_history()
    self.tensorboard = None
    self.bar = None
    if self.is_writer:
      self.tensorboard = TensorBoardScalars(workdir / 'tensorboard', start_step)
      if config.progress_bar:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs then carry the progress).
        self.bar = tqdm(total=total_steps, initial=start_step, unit='step', disable=None, dynamic_ncols=True)
        Reporter.active_bar = None if self.bar.disable else self.bar
    self.window_start = (start_step, time.perf_counter())
    self.step_seconds = None
    self.wait_clock = WaitClock()  # Fed by the train batches' prefetcher.
    self.warned_input_bound = False

  def restart_window(self, step: int) -> None:
    """Starts the timing window anew at `step` (after the first step: its compilation is not training)."""
    self.window_start = (step, time.perf_counter())
    self.wait_clock.lap()

  def progress(self, step: int) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def train(self, step: int, metrics: dict[str, float]) -> None:
    """Logs the training metrics of the window since the last report, with its speed and data wait."""
    first_step, started = self.window_start
    now = time.perf_counter()
    window_seconds = now - started
    if step > first_step:
      self.step_seconds = window_seconds / (step - first_step)
    self.window_start = (step, now)
    # The share of the window the loop waited for the input pipeline (the devices idled for data).
    data_wait = min(self.wait_clock.lap() / window_seconds, 1.0) if window_seconds > 0 else 0.0
    images_per_second = self.config.batch_size / self.step_seconds if self.step_seconds else 0.0
    eta = (self.total_steps - step) * (self.step_seconds or 0.0)
    record = {'step': step, 'epoch': step / self.steps_per_epoch, **metrics, 'data_wait': 100 * data_wait}
    message = (
      f'step {step}/{self.total_steps} (epoch {record["epoch"]:.2f}) '
      f'| train loss {metrics["train_loss"]:.4f} '
      f'| top-1 {100 * metrics["train_top1"]:.2f}% | lr {metrics["learning_rate"]:.4g} '
      f'| {images_per_second:.1f} img/s | data wait {100 * data_wait:.0f}% | ETA {duration(eta)}'
    )
    self._write(record, message, images_per_second=images_per_second)
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{metrics["train_loss"]:.4f}', img_s=f'{images_per_second:.0f}')
    if data_wait > INPUT_BOUND_FRACTION and step > first_step and not self.warned_input_bound:
      self.warned_input_bound = True
      log(
        f'warning: the run is input-bound: it waited for the input pipeline {100 * data_wait:.0f}% of the '
        f'time of steps {first_step + 1}-{step} (the data_wait metric). What helps: more host CPU cores per '
        'accelerator chip (docs/performance.md), the dataset on a local disk or in the same region as the '
        'hosts, lighter augmentation (config.randaugment).',
        logging.WARNING,
      )

  def eval(self, step: int, metrics: dict[str, float]) -> None:
    record = {'step': step, 'epoch': step / self.steps_per_epoch, **metrics}
    message = (
      f'eval at step {step} on {self.config.dataset}:{self.config.eval_split} '
      f'({metrics["test_examples"]} images) | loss {metrics["test_loss"]:.4f} | '
      f'top-1 {100 * metrics["test_top1"]:.2f}% | top-5 {100 * metrics["test_top5"]:.2f}%'
    )
    if 'val_loss' in metrics:
      message += (
        f' | validation ({metrics["val_examples"]} images) loss {metrics["val_loss"]:.4f}, '
        f'top-1 {100 * metrics["val_top1"]:.2f}%'
      )
    self._write(record, message)
    self.plot()
    self.restart_window(step)  # Eval time is not training time.

  def _write(self, record: dict, message: str, **extra_scalars: float) -> None:
    if not self.is_writer:
      return
    log(message)
    self.history.append(record)
    self._write_history()
    for key, value in {**record, **extra_scalars}.items():
      if key not in ('step', 'epoch', 'test_examples', 'val_examples'):
        self.tensorboard.scalar(key, value, record['step'])
    self.tensorboard.flush()

  def _write_history(self) -> None:
    self.history_path.write_text(''.join(json.dumps(r) + '\n' for r in self.history))

  def plot(self) -> None:
    """WORKDIR/curves.png: train, validation (if held out) and test loss, and top-1, against epochs."""
    if not self.is_writer:
      return
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (
      ('train_loss', loss_ax, 'train'),
      ('val_loss', loss_ax, 'validation'),
      ('test_loss', loss_ax, 'test'),
      ('train_top1', acc_ax, 'train'),
      ('val_top1', acc_ax, 'validation'),
      ('test_top1', acc_ax, 'test'),
    ):
      points = [(r['epoch'], r[key]) for r in self.history if key in r]
      if points:
        ax.plot(*zip(*points, strict=True), marker=None if key.startswith('train') else '.', label=label)
    loss_ax.set(xlabel='epoch', ylabel='cross-entropy loss', yscale='log')
    acc_ax.set(xlabel='epoch', ylabel='top-1 accuracy')
    for ax in (loss_ax, acc_ax):
      ax.grid(alpha=0.3)
      ax.legend()
    fig.suptitle(f'{self.config.model} on {self.config.dataset} ({self.workdir.name})')
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format='png', dpi=100)
    plt.close(fig)
    (self.workdir / 'curves.png').write_bytes(png.getvalue())

  def close(self) -> None:
    Reporter.active_bar = None
    if self.bar is not None:
      self.bar.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


class TensorBoardScalars:
  """Scalars in a TensorBoard event file, written through `epath` (so to gs:// as to a local folder).

  `flax.metrics.tensorboard` writes through `tf.io.gfile`, whose GCS client has its endpoint
  built in; through `epath` every file of a run takes one path, the one the tests run against a
  GCS emulator. The file is kept in memory and written whole at each flush, as an object
  store cannot append.
  """

  def __init__(self, directory: epath.Path, start_step: int):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    self._event_pb2 = event_pb2
    directory.mkdir(parents=True, exist_ok=True)
    self.path = directory / f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._buffer = io.BytesIO()
    self._records = RecordWriter(self._buffer)
    self._add(event_pb2.Event(file_version='brain.Event:2'))
    # A resumed run: TensorBoard drops what an earlier file logged after the checkpoint (steps
    # from start_step + 1 on, which this run logs again).
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    self._add(event_pb2.Event(step=start_step + 1, session_log=start))

  def _add(self, event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())

  def scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboard.compat.proto import summary_pb2

    value = summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
    self._add(self._event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value])))

  def flush(self) -> None:
    self.path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def print_summary(model: nn.Module, image_shape: tuple[int, ...]) -> None:
  """`nn.tabulate` of the model (blocks and transitions) for one image of `image_shape`, on process 0."""
  if jax.process_index() != 0:
    return
  image = jnp.zeros((1, *image_shape), model.dtype)
  table = nn.tabulate(
    model,
    jax.random.key(0),
    depth=1,
    console_kwargs={'width': 120, 'force_terminal': False, 'no_color': True},
  )(image, train=False)
  print(table, flush=True)
