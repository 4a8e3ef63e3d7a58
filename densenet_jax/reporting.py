"""What a run shows and writes: log lines, progress bar, TensorBoard, metrics.jsonl, curves.png."""

import json
import time
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging


def log(message: str) -> None:
  """A timestamped line on stdout, from process 0 only (absl logging carries the details)."""
  logging.info('%s', message)
  if jax.process_index() == 0:
    bar = Reporter.active_bar
    line = f'{time.strftime("%H:%M:%S")} {message}'
    if bar is not None:
      bar.write(line)
    else:
      print(line, flush=True)


if TYPE_CHECKING:
  from densenet_jax.train_lib import Setup


class Reporter:
  """Progress bar, log lines, TensorBoard, metrics.jsonl and the curves PNG (process 0 writes)."""

  active_bar = None  # The tqdm bar log lines must be written above, if one is shown.

  def __init__(self, s: 'Setup', start_step: int):
    self.s = s
    self.is_writer = jax.process_index() == 0
    self.history_path = s.workdir / 'metrics.jsonl'
    self.history = []
    if self.is_writer and self.history_path.exists():
      # After a resume, drop what the interrupted run logged beyond its checkpoint.
      for line in self.history_path.read_text().splitlines():
        record = json.loads(line)
        if record['step'] <= start_step:
          self.history.append(record)
      self.history_path.write_text(''.join(json.dumps(r) + '\n' for r in self.history))
    self.tensorboard = None
    self.bar = None
    if self.is_writer:
      from flax.metrics import tensorboard

      self.tensorboard = tensorboard.SummaryWriter(str(s.workdir / 'tensorboard'))
      if s.config.progress_bar:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs then carry the progress).
        self.bar = tqdm(
          total=s.total_steps, initial=start_step, unit='step', disable=None, dynamic_ncols=True
        )
        Reporter.active_bar = None if self.bar.disable else self.bar
    self.window_start = (start_step, time.perf_counter())
    self.step_seconds = None

  def progress(self, step: int) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def train(self, step: int, metrics: dict[str, float]) -> None:
    first_step, started = self.window_start
    now = time.perf_counter()
    if step > first_step:
      self.step_seconds = (now - started) / (step - first_step)
    self.window_start = (step, now)
    images_per_second = self.s.config.batch_size / self.step_seconds if self.step_seconds else 0.0
    eta = (self.s.total_steps - step) * (self.step_seconds or 0.0)
    record = {'step': step, 'epoch': step / self.s.spec.steps_per_epoch, **metrics}
    message = (
      f'step {step}/{self.s.total_steps} (epoch {record["epoch"]:.2f}) '
      f'| train loss {metrics["train_loss"]:.4f} '
      f'| top-1 {100 * metrics["train_top1"]:.2f}% | lr {metrics["learning_rate"]:.4g} '
      f'| {images_per_second:.1f} img/s | ETA {duration(eta)}'
    )
    self._write(record, message, images_per_second=images_per_second)
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{metrics["train_loss"]:.4f}', img_s=f'{images_per_second:.0f}')

  def eval(self, step: int, metrics: dict[str, float]) -> None:
    record = {'step': step, 'epoch': step / self.s.spec.steps_per_epoch, **metrics}
    message = (
      f'eval at step {step} on {self.s.config.dataset}:{self.s.config.eval_split} '
      f'({metrics["test_examples"]} images) | loss {metrics["test_loss"]:.4f} | '
      f'top-1 {100 * metrics["test_top1"]:.2f}% | top-5 {100 * metrics["test_top5"]:.2f}%'
    )
    self._write(record, message)
    self.plot()
    self.window_start = (step, time.perf_counter())  # Eval time is not training time.

  def _write(self, record: dict, message: str, **extra_scalars: float) -> None:
    if not self.is_writer:
      return
    log(message)
    self.history.append(record)
    with self.history_path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in {**record, **extra_scalars}.items():
      if key not in ('step', 'epoch', 'test_examples'):
        self.tensorboard.scalar(key, value, record['step'])
    self.tensorboard.flush()

  def plot(self) -> None:
    """WORKDIR/curves.png: train and test loss, and top-1, against epochs."""
    if not self.is_writer:
      return
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (
      ('train_loss', loss_ax, 'train'),
      ('test_loss', loss_ax, 'test'),
      ('train_top1', acc_ax, 'train'),
      ('test_top1', acc_ax, 'test'),
    ):
      points = [(r['epoch'], r[key]) for r in self.history if key in r]
      if points:
        ax.plot(*zip(*points, strict=True), marker='.' if key.startswith('test') else None, label=label)
    loss_ax.set(xlabel='epoch', ylabel='cross-entropy loss', yscale='log')
    acc_ax.set(xlabel='epoch', ylabel='top-1 accuracy')
    for ax in (loss_ax, acc_ax):
      ax.grid(alpha=0.3)
      ax.legend()
    fig.suptitle(f'{self.s.config.model} on {self.s.config.dataset} ({self.s.workdir.name})')
    fig.tight_layout()
    fig.savefig(self.s.workdir / 'curves.png', dpi=100)
    plt.close(fig)

  def close(self) -> None:
    Reporter.active_bar = None
    if self.bar is not None:
      self.bar.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def print_summary(s: 'Setup') -> None:
  """`nn.tabulate` of the model (blocks and transitions), on process 0."""
  if jax.process_index() != 0:
    return
  image = jnp.zeros((1, s.config.image_size, s.config.image_size, s.spec.channels), s.model.dtype)
  table = nn.tabulate(
    s.model,
    jax.random.key(0),
    depth=1,
    console_kwargs={'width': 120, 'force_terminal': False, 'no_color': True},
  )(image, train=False)
  print(table, flush=True)
