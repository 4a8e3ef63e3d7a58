"""Training and evaluation: state, sharded steps, checkpoints and the loop behind `train.py`.

One `jax.jit`-ed step runs over a `jax.sharding.Mesh` of every device of every process: the
batch is sharded along the mesh's 'data' axis, parameters, optimizer and BatchNorm state are
replicated, and the state's buffers are donated. XLA turns the batch means of BatchNorm and
of the loss into all-reduces, so BatchNorm statistics are those of the global batch and the
result does not depend on the number of devices (up to float summation order).

A run is a function of its config: the data order follows the step (`input_pipeline`),
dropout keys are folded from the step, and the running training metrics live in the state,
so a run resumed from any checkpoint continues exactly as if it had never stopped.

The pieces live by concern: `registry` (config -> model, schedule, optimizer), `steps` (train and eval
steps, `TrainState`), `traced_step` (the jitted step and its kept trace), `checkpoints` (Orbax,
preemption), `reporting` (logs, TensorBoard, metrics.jsonl, curves) and `sharding` (host <-> mesh).
"""

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from densenet_jax import convert, input_pipeline, models, weights
from densenet_jax.checkpoints import SIGTERM_EXIT_CODE, Checkpoints, Preempted, PreemptionWatcher
from densenet_jax.paths import as_path
from densenet_jax.registry import (
  ConfigError,
  create_model,
  create_optimizer,
  learning_rate_scale,
  learning_rate_schedule,
  update_plateau,
  validate_config,
)
from densenet_jax.reporting import Reporter, log, print_summary
from densenet_jax.sharding import global_batch, param_checksum, replicate, to_host
from densenet_jax.steps import TrainState, create_train_state, eval_step, train_step, zero_train_metrics
from densenet_jax.torchvision_port import from_torchvision
from densenet_jax.traced_step import TracedStep, jit_train_step


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); checkpoints already saved are kept."""


@dataclasses.dataclass
class Setup:
  """Everything `train_and_evaluate` and `evaluate` build from a config."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
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


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Setup:
  """Validates the config and builds the mesh, data spec, model and (abstract) train state.

  `workdir` may be local or in an object store (gs://...): every file goes through `etils.epath`.
  """
  if config.per_device_batch_size:
    config = config.copy_and_resolve_references()
    config.batch_size = config.eval_batch_size = config.per_device_batch_size * jax.device_count()
  validate_config(config)
  workdir = as_path(workdir)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  data_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  shards = input_pipeline.num_data_shards(config, jax.process_count())
  builder = input_pipeline.get_builder(config, prepare=jax.process_count() == 1)
  spec = input_pipeline.data_spec(config, builder, shards)
  model = create_model(config, spec.num_classes)
  if config.image_size < model.min_input_size():
    raise ConfigError(
      f'config.image_size={config.image_size} is too small for {config.model}: it needs at least '
      f'{model.min_input_size()}x{model.min_input_size()} images.'
    )
  total_steps = config.total_steps or config.num_epochs * spec.steps_per_epoch
  # The schedule counts optimizer updates: one per grad_accum_steps steps.
  accumulation = config.grad_accum_steps
  schedule = learning_rate_schedule(config, spec.steps_per_epoch / accumulation, total_steps // accumulation)
  tx = create_optimizer(config, schedule)
  image_shape = (1, config.image_size, config.image_size, spec.channels)

  def init() -> TrainState:
    return with_ema(config, create_train_state(model, tx, image_shape, config.seed))

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


def with_ema(config: ml_collections.ConfigDict, state: TrainState) -> TrainState:
  """`state` whose EMA (with config.ema_decay) starts at its weights, as timm's ModelEmaV2."""
  if not config.ema_decay:
    return state
  return state.replace(ema=jax.tree.map(jnp.copy, {'params': state.params, 'batch_stats': state.batch_stats}))


def init_from_variables(init_from: str) -> tuple[str, dict]:
  """(what it is, variables) of `config.init_from`.

  It is a pretrained name ('densenet121', 'hf-hub:OWNER/REPO': `densenet_jax.pretrained`), a
  torchvision state dict file (.safetensors, or .pth with torch), or an Orbax checkpoint directory
  (`python -m densenet_jax.convert to-jax`, or a step of a training run's checkpoints).
  """
  if init_from in weights.PRETRAINED or init_from.startswith(weights.HUB_PREFIX):
    _, variables = weights.pretrained(init_from)
    return f'the pretrained {init_from} ({weights.repo_of(init_from)})', variables
  path = as_path(init_from)
  if not path.exists():
    raise ConfigError(
      f'config.init_from={init_from!r} is neither a pretrained name ({", ".join(weights.PRETRAINED)}, '
      "'hf-hub:OWNER/REPO') nor an existing state dict file or checkpoint directory."
    )
  if path.suffix in ('.safetensors', '.pth', '.pt', '.bin'):
    return str(path), from_torchvision(path)
  return str(path), convert.load_checkpoint(path)[1]


def load_init_from(s: Setup, state: TrainState) -> TrainState:
  """`state` with the params and batch_stats of `config.init_from` (see `init_from_variables`)."""
  path, variables = init_from_variables(s.config.init_from)
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
      f'config.init_from={s.config.init_from!r} does not fit config.model={s.config.model!r} '
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
  state = state.replace(params=restored['params'], batch_stats=restored['batch_stats'])
  return jax.jit(partial(with_ema, s.config), out_shardings=s.replicated)(state)


@jax.jit
def _add_sums(totals: dict[str, jax.Array], sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return jax.tree.map(jnp.add, totals, sums)


def evaluate_state(
  s: Setup, eval_fn: Callable, state: TrainState, validation: bool = False
) -> dict[str, float]:
  """Loss, top-1 and top-5 on the whole eval split (each example once): test_loss, ...

  With `validation`, on the validation split held out of the train split instead: val_loss, ...
  The sums stay on the devices until the last batch: one host round-trip per evaluation.
  """
  batches = input_pipeline.eval_iterator(
    s.config, s.builder, s.spec, jax.process_index(), jax.process_count(), validation=validation
  )
  steps = s.spec.validation_steps if validation else s.spec.eval_steps
  totals = None
  for batch in prefetch_to_device(batches, s.data_sharding, s.config.prefetch_to_device, steps):
    sums = eval_fn(state, batch)
    totals = sums if totals is None else _add_sums(totals, sums)
  totals = {key: float(value) for key, value in to_host(totals).items()}
  count = max(totals['count'], 1.0)
  prefix = 'val' if validation else 'test'
  return {
    f'{prefix}_loss': totals['loss'] / count,
    f'{prefix}_top1': totals['top1'] / count,
    f'{prefix}_top5': totals['top5'] / count,
    f'{prefix}_examples': int(totals['count']),
  }


def prefetch_to_device(
  host_batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int, count: int
) -> Iterator[dict[str, jax.Array]]:
  """`count` global batches on the devices, `size` of them in flight ahead of the one in use.

  `jax.make_array_from_process_local_data` copies asynchronously, so the copies of the next
  batches overlap the step that runs (`flax.jax_utils.prefetch_to_device` does this for pmap).
  """
  queue = collections.deque()
  fetched = 0
  for _ in range(count):
    while fetched < count and len(queue) <= size:
      queue.append(global_batch(next(host_batches), sharding))
      fetched += 1
    yield queue.popleft()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  Writes WORKDIR/checkpoints, metrics.jsonl, tensorboard/, curves.png and final_metrics.json.

  Raises:
    ConfigError, input_pipeline.DataError: the config or data cannot run, or the workdir's
      checkpoint does not fit the config (nothing is written).
    TrainingError: a non-finite loss; the checkpoints saved before it are kept.
    Preempted: SIGTERM arrived; the state was saved first.
  """
  s = setup(config, workdir)
  config = s.config  # With the batch sizes resolved.
  # Before anything is written: a checkpoint or init_from that does not fit fails the run cleanly.
  checkpoints, state = restore(s)
  if state is not None:
    log(f'Resuming from the checkpoint at step {int(to_host(state.step))} in {checkpoints.directory}.')
  else:
    state = load_init_from(s, s.create_state()) if config.init_from else s.create_state()
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
  if checkpoints is None:
    checkpoints = new_checkpoints(s)
  start_step = int(to_host(state.step))

  # The learning rate schedule depends on the data's size, which is not in the config.
  step_fn = jit_train_step(config, s.replicated, s.data_sharding, (s.spec, s.total_steps))
  eval_fn = jax.jit(eval_step, in_shardings=(s.replicated, s.data_sharding), out_shardings=s.replicated)
  reset_metrics = jax.jit(
    lambda state: state.replace(train_metrics=zero_train_metrics()),
    out_shardings=s.replicated,
    donate_argnums=0,
  )
  advance_plateau = jax.jit(
    lambda state, loss: state.replace(opt_state=update_plateau(config, state.opt_state, loss)),
    out_shardings=s.replicated,
    donate_argnums=0,
  )

  def evaluate_splits(state: TrainState) -> dict[str, float]:
    """The test split's metrics, and the validation split's when one is held out."""
    metrics = evaluate_state(s, eval_fn, state)
    if s.spec.num_validation_examples:
      metrics.update(evaluate_state(s, eval_fn, state, validation=True))
    return metrics

  reporter = Reporter(s, start_step)
  watcher = PreemptionWatcher(checkpoints.manager)
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
      'learning_rate': float(s.schedule((step - 1) // config.grad_accum_steps))
      * float(to_host(learning_rate_scale(state.opt_state))),
    }
    return reset_metrics(state), metrics

  def save(state: TrainState, metrics: dict[str, float] | None = None) -> TrainState:
    """Checks the steps since the last report for non-finite losses, then saves."""
    if int(to_host(state.train_metrics['first_nonfinite_step'])) >= 0:
      report_train(state)  # Raises: never save a state that went non-finite.
    checkpoints.save(state, metrics)
    return state

  batches = prefetch_to_device(
    input_pipeline.train_iterator(
      config, s.builder, s.spec, start_step, jax.process_index(), jax.process_count(), end_step=s.total_steps
    ),
    s.data_sharding,
    config.prefetch_to_device,
    s.total_steps - start_step,
  )
  eval_metrics = None
  try:
    for step in range(start_step + 1, s.total_steps + 1):
      state = step_fn(state, next(batches))
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
        eval_metrics = evaluate_splits(state)
        if config.schedule == 'plateau':
          state = advance_plateau(state, eval_metrics['val_loss'])
        reporter.eval(step, eval_metrics)
        if config.best_checkpoint_metric:  # Every evaluated state is a candidate for the best.
          save(state, eval_metrics)
      if step % config.checkpoint_every_steps == 0 or is_last:
        save(state)
    if start_step >= s.total_steps:  # Nothing left to train: report the finished state.
      eval_metrics = evaluate_splits(state)
    best_step = checkpoints.best_step()
    best = {}
    if best_step is not None:
      best = {
        'best_step': best_step,
        f'best_{config.best_checkpoint_metric}': checkpoints.manager.metrics(best_step)[
          config.best_checkpoint_metric
        ],
      }
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
    **best,
  }
  if jax.process_index() == 0:
    (s.workdir / 'final_metrics.json').write_text(json.dumps(final, indent=2) + '\n')
    reporter.plot()
  log(
    f'Done: step {final["step"]}, test top-1 {100 * final["test_top1"]:.2f}%, top-5 '
    f'{100 * final["test_top5"]:.2f}%, loss {final["test_loss"]:.4f}; {s.workdir / "final_metrics.json"}.'
  )
  return final


def new_checkpoints(s: Setup) -> Checkpoints:
  return Checkpoints(
    s.workdir, s.config.keep_checkpoints, convert.model_config(s.model), s.config.best_checkpoint_metric
  )


def restore(s: Setup) -> tuple[Checkpoints | None, TrainState | None]:
  """The workdir's checkpoints (None if it has none yet) and the newest readable one's state.

  Raises:
    ConfigError: the newest readable checkpoint does not fit the config; nothing was changed.
  """
  if not (s.workdir / 'checkpoints').exists():
    return None, None
  checkpoints = new_checkpoints(s)
  try:
    return checkpoints, checkpoints.restore_latest(s.abstract_state)
  except ConfigError:
    checkpoints.close()
    raise


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Evaluates WORKDIR's latest checkpoint (or config.init_from) on config.eval_split."""
  s = setup(config, workdir)
  config = s.config
  checkpoints, state = restore(s)
  if checkpoints is not None:
    checkpoints.close()
  if state is None:
    if not config.init_from:
      raise ConfigError(
        f'nothing to evaluate: {s.workdir / "checkpoints"} has no checkpoint; train first or set '
        'config.init_from.'
      )
    state = load_init_from(s, s.create_state())
  eval_fn = jax.jit(eval_step, in_shardings=(s.replicated, s.data_sharding), out_shardings=s.replicated)
  metrics = {'step': int(to_host(state.step)), **evaluate_state(s, eval_fn, state)}
  log(f'Eval of step {metrics["step"]} on {config.dataset}:{config.eval_split}: {metrics}')
  if jax.process_index() == 0:
    s.workdir.mkdir(parents=True, exist_ok=True)
    (s.workdir / 'eval_metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
  return metrics


DISTRIBUTED_ENVIRONMENT = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
  """`jax.distributed.initialize` as `config.distributed` says; call before any other JAX call.

  'auto' (the default) initializes wherever there is more than this process to reach: when any
  of DISTRIBUTED_ENVIRONMENT is set, or when JAX detects a cluster (Cloud TPU VM or pod slice,
  SLURM, Open MPI, Kubernetes); a lone process runs as one. '' (or 'none') never initializes;
  'host:port' is the coordinator's address. Returns whether it initialized.
  """
  setting = config.distributed
  if setting in ('', 'none'):
    return False
  coordinator = None if setting == 'auto' else setting
  num_processes = config.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0))
  process_id = config.process_id if config.process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', -1))
  told = coordinator or num_processes > 0 or process_id >= 0 or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not told:
    try:
      jax.distributed.initialize()  # JAX's cluster detection.
    except ValueError as error:
      if 'coordinator_address' not in str(error):
        raise
      return False  # No cluster detected: one process.
    return True
  coordinator = coordinator or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not coordinator or num_processes <= 0 or process_id < 0:
    raise ConfigError(
      "a multi-process run needs the coordinator's address, the process count and this process's id: "
      'set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or --config.distributed=HOST:PORT, '
      '--config.num_processes and --config.process_id), or none of them on a single process or a detected '
      f'cluster (got address {coordinator!r}, {num_processes} processes, process id {process_id}).'
    )
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  return True


__all__ = [
  'SIGTERM_EXIT_CODE',
  'ConfigError',
  'Preempted',
  'TracedStep',
  'TrainState',
  'TrainingError',
  'create_model',
  'create_optimizer',
  'evaluate',
  'initialize_distributed',
  'jit_train_step',
  'learning_rate_schedule',
  'load_init_from',
  'prefetch_to_device',
  'restore',
  'param_checksum',
  'setup',
  'train_and_evaluate',
  'train_step',
  'zero_train_metrics',
]
