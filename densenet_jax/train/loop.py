"""The training loop behind `train.py`: `train_and_evaluate` and `evaluate`.

One `jax.jit`-ed step runs over a `jax.sharding.Mesh` of every device of every process: the
batch is sharded along the mesh's 'data' axis, parameters, optimizer and BatchNorm state are
replicated, and the state's buffers are donated. XLA turns the batch means of BatchNorm and
of the loss into all-reduces, so BatchNorm statistics are those of the global batch and the
result does not depend on the number of devices (up to float summation order).

A run is a function of its config: the data order follows the step (`input_pipeline`),
dropout keys are folded from the step, and the running training metrics live in the state,
so a run resumed from any checkpoint continues exactly as if it had never stopped.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from densenet_jax import convert, weights
from densenet_jax.train import input_pipeline, plateau
from densenet_jax.train.checkpoints import Checkpoints, PreemptionWatcher
from densenet_jax.train.registry import ConfigError, learning_rate_scale, plateau_scheduler
from densenet_jax.train.reporting import Reporter, log, print_summary
from densenet_jax.train.setup import Setup, as_published, load_init_from, setup
from densenet_jax.train.sharding import StepPacer, param_checksum, prefetch_to_device, replicate, to_host
from densenet_jax.train.steps import TrainState, zero_train_metrics
from densenet_jax.train.traced_step import jit_eval_step, jit_train_step


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); checkpoints already saved are kept."""


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  Writes WORKDIR/checkpoints, metrics.jsonl, tensorboard/, curves.png and final_metrics.json.

  Raises:
    ConfigError, input_pipeline.DataError: the config or data cannot run, or the workdir's
      checkpoint does not fit the config (nothing is written).
    TrainingError: a non-finite loss; the checkpoints saved before it are kept.
    Preempted: SIGTERM or Ctrl-C arrived; the state was saved first.
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
  print_summary(s.model, (config.image_size, config.image_size, s.spec.channels))
  if checkpoints is None:
    checkpoints = new_checkpoints(s)
  start_step = int(to_host(state.step))

  # The learning rate schedule depends on the data's size, which is not in the config.
  step_fn = jit_train_step(config, s.replicated, s.data_sharding, (s.spec, s.total_steps))
  eval_fn = jit_eval_step(config, s.replicated, s.data_sharding)
  reset_metrics = jax.jit(
    lambda state: state.replace(train_metrics=zero_train_metrics()),
    out_shardings=s.replicated,
    donate_argnums=0,
  )
  scheduler = plateau_scheduler(config) if config.schedule == 'plateau' else None

  def advance_plateau(state: TrainState, metric: float) -> TrainState:
    """The plateau state stepped by one evaluation, on the host as PyTorch's (every process alike)."""
    stepped = scheduler.step(to_host(plateau.find_state(state.opt_state)), metric)
    return state.replace(opt_state=plateau.replace_state(state.opt_state, replicate(stepped, s.replicated)))

  def evaluate_splits(state: TrainState) -> dict[str, float]:
    """The test split's metrics, and the validation split's when one is held out."""
    metrics = evaluate_state(s, eval_fn, state)
    if s.spec.num_validation_examples:
      metrics.update(evaluate_state(s, eval_fn, state, validation=True))
    return metrics

  reporter = Reporter(config, s.workdir, s.total_steps, s.spec.steps_per_epoch, start_step)
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
    reporter.wait_clock,
  )
  pacer = StepPacer()
  eval_metrics = None
  try:
    for step in range(start_step + 1, s.total_steps + 1):
      state = step_fn(state, next(batches))
      pacer.stepped(state.step)
      if step == start_step + 1:
        reporter.restart_window(step)  # Speed and data wait from here: the first step compiled.
      reporter.progress(step)
      if watcher.reached(step):
        save(state)
        checkpoints.close()
        raise watcher.preempted(step)
      is_last = step == s.total_steps
      if step % config.log_every_steps == 0 or is_last:
        state, last_train_metrics = report_train(state)
        reporter.train(step, last_train_metrics)
      epoch_end = step % s.spec.steps_per_epoch == 0
      if (epoch_end and (step // s.spec.steps_per_epoch) % config.eval_every_epochs == 0) or is_last:
        eval_metrics = evaluate_splits(state)
        if config.schedule == 'plateau':
          state = advance_plateau(state, eval_metrics[config.plateau_metric])
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
    if config.eval_as_published and config.init_from in weights.PRETRAINED:
      s = setup(as_published(config), workdir)
      config = s.config
    state = load_init_from(s, s.create_state())
  eval_fn = jit_eval_step(config, s.replicated, s.data_sharding)
  metrics = {'step': int(to_host(state.step)), **evaluate_state(s, eval_fn, state)}
  log(f'Eval of step {metrics["step"]} on {config.dataset}:{config.eval_split}: {metrics}')
  if jax.process_index() == 0:
    s.workdir.mkdir(parents=True, exist_ok=True)
    (s.workdir / 'eval_metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
  return metrics
