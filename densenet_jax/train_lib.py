"""Training and evaluation: state, sharded steps, checkpoints and the loop behind `train.py`.

One `jax.jit`-ed step runs over a `jax.sharding.Mesh` of every device of every process: the
batch is sharded along the mesh's 'data' axis, parameters, optimizer and BatchNorm state are
replicated, and the state's buffers are donated. XLA turns the batch means of BatchNorm and
of the loss into all-reduces, so BatchNorm statistics are those of the global batch and the
result does not depend on the number of devices (up to float summation order).

A run is a function of its config: the data order follows the step (`input_pipeline`),
dropout keys are folded from the step, and the running training metrics live in the state,
so a run resumed from any checkpoint continues exactly as if it had never stopped.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax import export
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from densenet_jax import convert, input_pipeline, models

MODELS: dict[str, Callable[..., models.DenseNet]] = {
  'densenet121': models.DenseNet121,
  'densenet161': models.DenseNet161,
  'densenet169': models.DenseNet169,
  'densenet201': models.DenseNet201,
  'densenet264': models.DenseNet264,
  'densenet_cifar': models.densenet_cifar,
  'densenet': models.DenseNet,
}
# Accepted values of the config's enumerated fields.
CHOICES = {
  'mode': ('train', 'eval'),
  'train_augment': ('inception_crop', 'pad_crop', 'none'),
  'eval_preprocess': ('center_crop', 'none'),
  'schedule': ('step', 'cosine'),
}
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class ConfigError(ValueError):
  """The config cannot run as given; the message names the field and the fix."""


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); checkpoints already saved are kept."""


class Preempted(Exception):  # noqa: N818  (not an error: the run saved and will resume)
  """SIGTERM arrived; the state was saved at `step`."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def log(message: str) -> None:
  """A timestamped line on stdout, from process 0 only (absl logging carries the details)."""
  logging.info('%s', message)
  if jax.process_index() == 0:
    bar = _Reporter.active_bar
    line = f'{time.strftime("%H:%M:%S")} {message}'
    if bar is not None:
      bar.write(line)
    else:
      print(line, flush=True)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked before touching devices or data."""
  for field, choices in CHOICES.items():
    if config[field] not in choices:
      raise ConfigError(f'config.{field}={config[field]!r} is not one of {", ".join(map(repr, choices))}.')
  if config.model not in MODELS:
    raise ConfigError(f'unknown model {config.model!r}: config.model must be one of {", ".join(MODELS)}.')
  for field in (
    'batch_size',
    'eval_batch_size',
    'log_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
  ):
    if not isinstance(config[field], int) or config[field] <= 0:
      raise ConfigError(f'config.{field} must be a positive integer, got {config[field]!r}.')
  for field in ('dtype', 'param_dtype'):
    if config[field] not in ('float32', 'bfloat16', 'float64'):
      raise ConfigError(f"config.{field}={config[field]!r} is not one of 'float32', 'bfloat16', 'float64'.")
    if config[field] == 'float64' and not jax.config.jax_enable_x64:
      raise ConfigError(f'config.{field}=float64 needs 64-bit JAX: run with JAX_ENABLE_X64=1.')
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ConfigError(
        f'config.{field}={config[field]} is not divisible by the {devices} devices the batch is '
        f'sharded over; use a multiple of {devices} (e.g. --config.{field}='
        f'{max(devices, config[field] // devices * devices)}).'
      )


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.DenseNet:
  """The `DenseNet` named by `config.model` with `config.model_kwargs`."""
  kwargs = dict(config.model_kwargs)
  kwargs['dtype'] = jnp.bfloat16 if config.half_precision else jnp.dtype(config.dtype)
  kwargs['param_dtype'] = jnp.dtype(config.param_dtype)
  try:
    return MODELS[config.model](num_classes=num_classes, **kwargs)
  except TypeError as error:  # An unknown keyword.
    raise ConfigError(f'config.model_kwargs do not fit {config.model!r}: {error}.') from error


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """The learning rate per step: base lr scaled by batch size, warmup, then step or cosine decay."""
  base = config.learning_rate * config.batch_size / config.lr_reference_batch
  warmup_steps = round(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup_steps, max(total_steps, warmup_steps + 1))
  decay = optax.piecewise_constant_schedule(
    base, {round(epoch * steps_per_epoch): config.lr_decay_factor for epoch in config.lr_decay_epochs}
  )
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  return optax.join_schedules([warmup, lambda step: decay(step + warmup_steps)], [warmup_steps])


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """PyTorch's SGD: weight decay added to the gradient, then (Nesterov) momentum."""
  mask = None
  if not config.weight_decay_norm_and_bias:
    mask = partial(jax.tree_util.tree_map_with_path, lambda path, _: path[-1].key == 'kernel')
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask),
    optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
  )


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the running training metrics.

  `train_metrics` holds sums over the steps since the last report, and the first step with a
  non-finite loss or parameter (-1 if none): kept on device, checked when reporting or saving, and saved
  in checkpoints so that a resumed run reports what an uninterrupted one does.
  """

  batch_stats: Any
  train_metrics: dict[str, jax.Array]


def zero_train_metrics() -> dict[str, jax.Array]:
  return {
    'loss_sum': jnp.zeros((), jnp.float32),
    'top1_sum': jnp.zeros((), jnp.float32),
    'steps': jnp.zeros((), jnp.int32),
    'first_nonfinite_step': jnp.full((), -1, jnp.int32),
  }


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the `k` highest logits."""
  _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(
  state: TrainState, batch: dict[str, jax.Array], *, dropout_key: jax.Array, label_smoothing: float
) -> TrainState:
  """One SGD step on the global batch; metrics accumulate in `state.train_metrics`."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.fold_in(dropout_key, state.step)},
    )
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, batch['label'], label_smoothing))
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = state.train_metrics
  # A non-finite loss, or an update that made a parameter non-finite, marks the step (cheap
  # next to the step itself), so that no such state is ever checkpointed. One reduction over all
  # parameters at once: a reduction per parameter shape cost ~4 s of XLA compile for DenseNet-121.
  all_params = jnp.concatenate([jnp.ravel(p) for p in jax.tree.leaves(state.params)])
  finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(all_params))
  return state.replace(
    train_metrics={
      'loss_sum': metrics['loss_sum'] + loss,
      'top1_sum': metrics['top1_sum'] + jnp.mean(top_k_correct(logits, batch['label'], 1)),
      'steps': metrics['steps'] + 1,
      'first_nonfinite_step': jnp.where(
        finite | (metrics['first_nonfinite_step'] >= 0), metrics['first_nonfinite_step'], state.step
      ),
    }
  )


def jit_train_step(
  config: ml_collections.ConfigDict,
  replicated: NamedSharding,
  data_sharding: NamedSharding,
  key_parts: tuple[Any, ...] = (),
) -> Callable[[TrainState, dict[str, jax.Array]], TrainState]:
  """`train_step` jitted over the mesh, the state donated: what `train_and_evaluate` runs.

  With `config.compilation_cache_dir` set, in a single process, the traced step is kept there
  too (`jax.export`), so that a restart loads it instead of tracing the model again, and gets the
  compiled code from XLA's cache: a DenseNet-121 step is ready in about 2 s instead of 3 (README).
  `key_parts` are what else the step depends on (e.g. the data's size, which sets the learning
  rate schedule); see `TracedStep`.
  """
  step = partial(
    train_step, dropout_key=jax.random.key(config.seed + 1), label_smoothing=config.label_smoothing
  )
  if not config.compilation_cache_dir or jax.process_count() > 1:
    return jax.jit(step, in_shardings=(replicated, data_sharding), out_shardings=replicated, donate_argnums=0)
  directory = pathlib.Path(os.path.expanduser(config.compilation_cache_dir)) / 'traced_steps'
  return TracedStep(step, replicated, data_sharding, directory, (config.to_json_best_effort(), *key_parts))


class TracedStep:
  """A train step, jitted, whose trace is kept on disk between runs (`jax.export`).

  Called as the jitted step, `(state, batch) -> state`. The trace is found again only under the
  same key: a hash of `key_parts`, the arguments' shapes, dtypes and shardings, the source of
  this package, the versions of JAX, jaxlib, Flax and optax, and JAX's settings. Anything else
  the step depends on must be in `key_parts`. An unreadable file is traced again and replaced.
  """

  def __init__(self, step, replicated, data_sharding, directory: pathlib.Path, key_parts: tuple[Any, ...]):
    self._step = step
    self._shardings = (replicated, data_sharding)
    self._directory = directory
    self._key_parts = key_parts
    self._call = None
    self._treedef = None

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]) -> TrainState:
    if self._call is None:
      self._prepare(state, batch)
    return jax.tree.unflatten(self._treedef, self._call(*jax.tree.leaves((state, batch))))

  def lower(self, state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
    """Loads or traces the step for arguments like these (abstract ones will do) and lowers it."""
    self._prepare(state, batch)
    return self._call.lower(*jax.tree.leaves((state, batch)))

  def _prepare(self, state, batch) -> None:
    leaves, treedef = jax.tree.flatten((state, batch))
    state_leaves = len(jax.tree.leaves(state))
    shardings = [self._shardings[0]] * state_leaves + [self._shardings[1]] * (len(leaves) - state_leaves)
    avals = [
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings, strict=True)
    ]
    path = self._directory / f'train_step-{self._key(avals)}.jax_exported'
    exported = None
    if path.exists():
      try:
        exported = export.deserialize(bytearray(path.read_bytes()))
      except Exception as error:  # noqa: BLE001  (any unreadable file is traced again)
        logging.warning('Tracing the train step again: %s could not be read (%s).', path, error)
    if exported is None:
      step = self._step

      def flat_step(*leaves):
        return jax.tree.leaves(step(*jax.tree.unflatten(treedef, leaves)))

      traced = jax.jit(flat_step, in_shardings=tuple(shardings), out_shardings=self._shardings[0])
      exported = export.export(traced)(*avals)
      try:
        self._directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f'.{os.getpid()}.tmp')
        temporary.write_bytes(exported.serialize())
        temporary.replace(path)  # Atomic: a reader sees the whole file or none.
      except OSError as error:  # Not kept: the next run traces again, this one goes on.
        logging.warning('The traced train step could not be kept in %s (%s).', self._directory, error)
    self._treedef = jax.tree.structure(state)
    self._call = jax.jit(
      exported.call,
      in_shardings=tuple(shardings),
      out_shardings=self._shardings[0],
      donate_argnums=tuple(range(state_leaves)),
    )

  def _key(self, avals) -> str:
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parent
    for source in sorted(package.glob('*.py')):
      digest.update(source.name.encode() + source.read_bytes())
    versions = [importlib.metadata.version(name) for name in ('jax', 'jaxlib', 'flax', 'optax')]
    devices = [(device.platform, device.device_kind) for device in jax.devices()]
    settings = sorted(
      (name, value)
      for name, value in jax.config.values.items()
      if isinstance(value, bool | int | float | str | type(None))
    )
    for part in (
      *self._key_parts,
      versions,
      devices,
      settings,
      [(a.shape, str(a.dtype), str(a.sharding)) for a in avals],
    ):
      digest.update(repr(part).encode())
    return digest.hexdigest()[:32]


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and the example count over the real (mask=1) examples."""
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  logits = logits.astype(jnp.float32)
  mask = batch['mask'].astype(jnp.float32)
  return {
    'loss': jnp.sum(cross_entropy(logits, batch['label'], 0.0) * mask),
    'top1': jnp.sum(top_k_correct(logits, batch['label'], 1) * mask),
    'top5': jnp.sum(top_k_correct(logits, batch['label'], 5) * mask),
    'count': jnp.sum(mask),
  }


def to_host(tree: Any) -> Any:
  """Replicated (or single-device) arrays as numpy, on every process."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def param_checksum(params: Any) -> float:
  """The float64 sum of all parameter values plus the sum of their squares: a run's fingerprint."""
  leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(to_host(params))]
  return float(sum(leaf.sum() + np.square(leaf).sum() for leaf in leaves))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> one array sharded over all devices."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Host values (the same on every process) as arrays replicated over all devices."""
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree
  )


class Checkpoints:
  """Orbax checkpoints of the train state in WORKDIR/checkpoints, skipping unreadable ones.

  Each step's directory holds `state` (the whole TrainState) and `model_config` (JSON), so
  `densenet_jax.convert.load_checkpoint` (and `python -m densenet_jax.convert to-torch`) read
  it too. A checkpoint that fails to restore is moved to WORKDIR/corrupt_checkpoints (kept,
  not deleted) and the one before it is used; a half-written one is never listed.
  """

  def __init__(self, workdir: pathlib.Path, keep: int, model_config: dict):
    self.directory = workdir / 'checkpoints'
    self.quarantine = workdir / 'corrupt_checkpoints'
    self.model_config = model_config
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
      item_names=('state', 'model_config'),
    )
    # Orbax removes the half-written directories of a killed run in a background thread and
    # waits for it only at the first save. Wait now, so that nothing else touches the filesystem
    # while it runs (under tfds.testing.mock_data, the input pipeline's patched filesystem did).
    # The method is private: on an Orbax without it, the first save still waits.
    getattr(self.manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()

  def save(self, state: TrainState) -> int:
    step = int(to_host(state.step))
    if step not in self.manager.all_steps():
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), model_config=ocp.args.JsonSave(self.model_config)
        ),
      )
    return step

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (after waiting for saves in flight)."""
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: TrainState) -> TrainState | None:
    """The newest readable checkpoint, or None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state
      except Exception as error:  # noqa: BLE001  (any unreadable file: fall back, keep it)
        destination = self.quarantine / f'{step}.{int(time.time())}'
        reason = str(error).splitlines()[0][:200] if str(error) else ''
        log(
          f'warning: the checkpoint at step {step} ({self.directory / str(step)}) is unreadable '
          f'({type(error).__name__}: {reason}); moving it to {destination} and resuming from the one before.'
        )
        multihost_utils.sync_global_devices(f'corrupt checkpoint {step}')
        if jax.process_index() == 0:
          destination.parent.mkdir(parents=True, exist_ok=True)
          shutil.move(str(self.directory / str(step)), destination)
        multihost_utils.sync_global_devices(f'moved corrupt checkpoint {step}')
        self.manager.reload()
    return None

  def close(self) -> None:
    """Waits for saves in flight and closes (again: a no-op)."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


@dataclasses.dataclass
class Setup:
  """Everything `train_and_evaluate` and `evaluate` build from a config."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: Mesh
  data_sharding: NamedSharding
  replicated: NamedSharding
  builder: Any
  spec: input_pipeline.DataSpec
  model: models.DenseNet
  total_steps: int
  schedule: optax.Schedule
  abstract_state: TrainState
  create_state: Callable[[], TrainState]


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Setup:
  """Validates the config and builds the mesh, data spec, model and (abstract) train state."""
  validate_config(config)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  data_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  shards = input_pipeline.num_data_shards(config, jax.process_count())
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.data_spec(config, builder, shards)
  model = create_model(config, spec.num_classes)
  if config.image_size < model.min_input_size():
    raise ConfigError(
      f'config.image_size={config.image_size} is too small for {config.model}: it needs at least '
      f'{model.min_input_size()}x{model.min_input_size()} images.'
    )
  total_steps = config.total_steps or config.num_epochs * spec.steps_per_epoch
  schedule = learning_rate_schedule(config, spec.steps_per_epoch, total_steps)
  tx = create_optimizer(config, schedule)
  image_shape = (1, config.image_size, config.image_size, spec.channels)

  def init() -> TrainState:
    variables = model.init(jax.random.key(config.seed), jnp.zeros(image_shape, model.dtype), train=False)
    return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      train_metrics=zero_train_metrics(),
      tx=tx,
    )

  abstract_state = jax.eval_shape(init)
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state
  )
  create_state = jax.jit(init, out_shardings=replicated)
  return Setup(
    config,
    workdir,
    mesh,
    data_sharding,
    replicated,
    builder,
    spec,
    model,
    total_steps,
    schedule,
    abstract_state,
    create_state,
  )


def load_init_from(s: Setup, state: TrainState) -> TrainState:
  """`state` with the params and batch_stats of `config.init_from` (a converted checkpoint)."""
  path = pathlib.Path(s.config.init_from).expanduser()
  if not path.exists():
    raise ConfigError(f'config.init_from={s.config.init_from!r} does not exist.')
  _, variables = convert.load_checkpoint(path)
  ours = {'params': state.params, 'batch_stats': state.batch_stats}
  theirs_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  ours_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ours)}
  mismatched = [
    key
    for key in ours_flat
    if key not in theirs_flat or tuple(theirs_flat[key].shape) != ours_flat[key].shape
  ]
  extra = sorted(set(theirs_flat) - set(ours_flat))
  if extra or any('classifier' not in key for key in mismatched):
    problems = [k for k in mismatched if 'classifier' not in k] + extra
    raise ConfigError(
      f'config.init_from={str(path)!r} does not fit config.model={s.config.model!r} '
      f'({len(problems)} variables differ, e.g. {", ".join(problems[:3])}); set config.model and '
      f"config.model_kwargs to the checkpoint's architecture."
    )
  if mismatched:
    log(f'init_from: the classifier of {path} has another class count; it is re-initialized.')
  loaded = {
    key: (ours_flat[key] if key in mismatched else np.asarray(theirs_flat[key], ours_flat[key].dtype))
    for key in ours_flat
  }
  treedef = jax.tree.structure(ours)
  leaves = [loaded[jax.tree_util.keystr(k)] for k, _ in jax.tree_util.tree_leaves_with_path(ours)]
  restored = replicate(
    jax.tree.map(
      lambda x: to_host(x) if isinstance(x, jax.Array) else x, jax.tree.unflatten(treedef, leaves)
    ),
    s.replicated,
  )
  log(f'Initialized from {path}.')
  return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


def evaluate_state(s: Setup, eval_fn: Callable, state: TrainState) -> dict[str, float]:
  """Loss, top-1 and top-5 on the whole eval split (each example once)."""
  totals = {'loss': 0.0, 'top1': 0.0, 'top5': 0.0, 'count': 0.0}
  batches = input_pipeline.eval_iterator(
    s.config, s.builder, s.spec, jax.process_index(), jax.process_count()
  )
  for _ in range(s.spec.eval_steps):
    sums = to_host(eval_fn(state, global_batch(next(batches), s.data_sharding)))
    for key in totals:
      totals[key] += float(sums[key])
  count = max(totals['count'], 1.0)
  return {
    'test_loss': totals['loss'] / count,
    'test_top1': totals['top1'] / count,
    'test_top5': totals['top5'] / count,
    'test_examples': int(totals['count']),
  }


class _Reporter:
  """Progress bar, log lines, TensorBoard, metrics.jsonl and the curves PNG (process 0 writes)."""

  active_bar = None  # The tqdm bar log lines must be written above, if one is shown.

  def __init__(self, s: Setup, start_step: int):
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
        _Reporter.active_bar = None if self.bar.disable else self.bar
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
      f'| {images_per_second:.1f} img/s | ETA {_duration(eta)}'
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
    _Reporter.active_bar = None
    if self.bar is not None:
      self.bar.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class _PreemptionWatcher:
  """Notices SIGTERM: on one process via a signal handler, across processes via JAX's
  preemption sync point (which makes every process stop at the same step)."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.signalled = False
    self.previous = None
    if jax.process_count() == 1:
      self.previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def print_summary(s: Setup) -> None:
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  Writes WORKDIR/checkpoints, metrics.jsonl, tensorboard/, curves.png and final_metrics.json.

  Raises:
    ConfigError, input_pipeline.DataError: the config or data cannot run (nothing is written).
    TrainingError: a non-finite loss; the checkpoints saved before it are kept.
    Preempted: SIGTERM arrived; the state was saved first.
  """
  s = setup(config, workdir)
  checkpoints_dir = s.workdir / 'checkpoints'
  initial_state = None
  if config.init_from and not (
    checkpoints_dir.exists() and any(p.name.isdigit() for p in checkpoints_dir.iterdir())
  ):
    # Before anything is written: a checkpoint that does not fit fails the run cleanly.
    initial_state = load_init_from(s, s.create_state())
  s.workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (s.workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  log(
    f'Training {config.model} on {config.dataset}: {s.spec.num_train_examples} train / '
    f'{s.spec.num_eval_examples} eval images, global batch {config.batch_size} over '
    f'{jax.device_count()} devices ({jax.process_count()} processes), {s.spec.steps_per_epoch} steps '
    f'per epoch, {s.total_steps} steps; workdir {s.workdir}.'
  )
  print_summary(s)
  checkpoints = Checkpoints(s.workdir, config.keep_checkpoints, convert.model_config(s.model))
  state = checkpoints.restore_latest(s.abstract_state)
  if state is not None:
    log(f'Resuming from the checkpoint at step {int(to_host(state.step))} in {checkpoints.directory}.')
  elif initial_state is not None:
    state = initial_state
  else:
    state = load_init_from(s, s.create_state()) if config.init_from else s.create_state()
  start_step = int(to_host(state.step))

  # The learning rate schedule depends on the data's size, which is not in the config.
  step_fn = jit_train_step(config, s.replicated, s.data_sharding, (s.spec, s.total_steps))
  eval_fn = jax.jit(eval_step, in_shardings=(s.replicated, s.data_sharding), out_shardings=s.replicated)
  reset_metrics = jax.jit(
    lambda state: state.replace(train_metrics=zero_train_metrics()),
    out_shardings=s.replicated,
    donate_argnums=0,
  )
  reporter = _Reporter(s, start_step)
  watcher = _PreemptionWatcher(checkpoints.manager)
  last_train_metrics = None

  def report_train(state: TrainState) -> tuple[TrainState, dict[str, float]]:
    """Reads (and resets) the metrics accumulated since the last report; stops on a non-finite loss."""
    sums = to_host(state.train_metrics)
    step = int(to_host(state.step))
    if int(sums['first_nonfinite_step']) >= 0:
      bad_step = int(sums['first_nonfinite_step'])  # 1-based: state.step after the update
      kept = checkpoints.latest_step()
      raise TrainingError(
        f'the training loss or the parameters became non-finite (NaN or inf) at step {bad_step}; stopped. '
        + (
          f'The last good checkpoint, step {kept}, is kept in {checkpoints.directory}. '
          if kept is not None
          else 'No checkpoint had been saved yet. '
        )
        + 'Lower config.learning_rate'
        + (' or set config.half_precision=False' if config.half_precision else '')
        + ' and run again: it resumes from the last good checkpoint.'
      )
    metrics = {
      'train_loss': float(sums['loss_sum']) / max(int(sums['steps']), 1),
      'train_top1': float(sums['top1_sum']) / max(int(sums['steps']), 1),
      'learning_rate': float(s.schedule(step - 1)),
    }
    return reset_metrics(state), metrics

  def save(state: TrainState) -> TrainState:
    """Checks the steps since the last report for non-finite losses, then saves."""
    if int(to_host(state.train_metrics['first_nonfinite_step'])) >= 0:
      report_train(state)  # Raises: never save a state that went non-finite.
    checkpoints.save(state)
    return state

  batches = input_pipeline.train_iterator(
    config, s.builder, s.spec, start_step, jax.process_index(), jax.process_count(), end_step=s.total_steps
  )
  eval_metrics = None
  try:
    for step in range(start_step + 1, s.total_steps + 1):
      state = step_fn(state, global_batch(next(batches), s.data_sharding))
      reporter.progress(step)
      if watcher.reached(step):
        save(state)
        checkpoints.close()
        raise Preempted(step)
      is_last = step == s.total_steps
      if step % config.log_every_steps == 0 or is_last:
        state, last_train_metrics = report_train(state)
        reporter.train(step, last_train_metrics)
      epoch_end = step % s.spec.steps_per_epoch == 0
      if (epoch_end and (step // s.spec.steps_per_epoch) % config.eval_every_epochs == 0) or is_last:
        eval_metrics = evaluate_state(s, eval_fn, state)
        reporter.eval(step, eval_metrics)
      if step % config.checkpoint_every_steps == 0 or is_last:
        save(state)
    if start_step >= s.total_steps:  # Nothing left to train: report the finished state.
      eval_metrics = evaluate_state(s, eval_fn, state)
    checkpoints.close()
  finally:
    checkpoints.close()  # Also on errors: what was saved is complete on disk.
    watcher.close()
    reporter.close()

  if last_train_metrics is None:  # Resumed after the last step: read the restored metrics.
    sums = to_host(state.train_metrics)
    last_train_metrics = {
      'train_loss': float(sums['loss_sum']) / max(int(sums['steps']), 1),
      'train_top1': float(sums['top1_sum']) / max(int(sums['steps']), 1),
    }
  final = {
    'step': int(to_host(state.step)),
    'epoch': int(to_host(state.step)) / s.spec.steps_per_epoch,
    'train_loss': last_train_metrics['train_loss'],
    'train_top1': last_train_metrics['train_top1'],
    **eval_metrics,
    'param_checksum': param_checksum(state.params),
    'num_params': int(sum(np.size(x) for x in jax.tree.leaves(s.abstract_state.params))),
  }
  if jax.process_index() == 0:
    (s.workdir / 'final_metrics.json').write_text(json.dumps(final, indent=2) + '\n')
    reporter.plot()
  log(
    f'Done: step {final["step"]}, test top-1 {100 * final["test_top1"]:.2f}%, top-5 '
    f'{100 * final["test_top5"]:.2f}%, loss {final["test_loss"]:.4f}; {s.workdir / "final_metrics.json"}.'
  )
  return final


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Evaluates WORKDIR's latest checkpoint (or config.init_from) on config.eval_split."""
  s = setup(config, workdir)
  checkpoints_dir = s.workdir / 'checkpoints'
  state = None
  if checkpoints_dir.exists():
    checkpoints = Checkpoints(s.workdir, config.keep_checkpoints, convert.model_config(s.model))
    state = checkpoints.restore_latest(s.abstract_state)
    checkpoints.close()
  if state is None:
    if not config.init_from:
      raise ConfigError(
        f'nothing to evaluate: {checkpoints_dir} has no checkpoint; train first or set config.init_from.'
      )
    state = load_init_from(s, s.create_state())
  eval_fn = jax.jit(eval_step, in_shardings=(s.replicated, s.data_sharding), out_shardings=s.replicated)
  metrics = {'step': int(to_host(state.step)), **evaluate_state(s, eval_fn, state)}
  log(f'Eval of step {metrics["step"]} on {config.dataset}:{config.eval_split}: {metrics}')
  if jax.process_index() == 0:
    s.workdir.mkdir(parents=True, exist_ok=True)
    (s.workdir / 'eval_metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
  return metrics


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` as `config.distributed` says; call before any other JAX call."""
  import os

  if not config.distributed:
    return
  if config.distributed == 'auto':
    jax.distributed.initialize()
    return
  num_processes = config.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0))
  process_id = config.process_id if config.process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', -1))
  if num_processes <= 0 or process_id < 0:
    raise ConfigError(
      f"config.distributed={config.distributed!r} needs the process count and this process's id: set "
      '--config.num_processes and --config.process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID).'
    )
  jax.distributed.initialize(config.distributed, num_processes=num_processes, process_id=process_id)


__all__ = [
  'ConfigError',
  'Preempted',
  'TrainState',
  'TrainingError',
  'create_model',
  'create_optimizer',
  'evaluate',
  'initialize_distributed',
  'learning_rate_schedule',
  'param_checksum',
  'train_and_evaluate',
  'train_step',
]
