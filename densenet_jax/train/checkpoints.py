"""Checkpoints of the train state (Orbax), unreadable ones set aside, and preemption (SIGTERM, Ctrl-C)."""

import os
import signal
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from densenet_jax.train.registry import ConfigError
from densenet_jax.train.reporting import log
from densenet_jax.train.sharding import to_host
from densenet_jax.train.steps import TrainState

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
SIGINT_EXIT_CODE = 128 + signal.SIGINT  # what a shell reports for a Ctrl-C


class Preempted(Exception):  # noqa: N818  (not an error: the run saved and will resume)
  """SIGTERM or SIGINT (Ctrl-C) arrived; the state was saved at `step`."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    super().__init__(step)
    self.step = step
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  def message(self, workdir: str) -> str:
    cause = 'Ctrl-C' if self.signum == signal.SIGINT else signal.Signals(self.signum).name
    return f'{cause}: saved a checkpoint at step {self.step} in {workdir}; run the same command to resume.'


class Checkpoints:
  """Orbax checkpoints of the train state in WORKDIR/checkpoints, skipping unreadable ones.

  Each step's directory holds `state` (the whole TrainState) and `model_config` (JSON), so
  `densenet_jax.convert.load_checkpoint` (and `python -m densenet_jax.convert to-torch`) read
  it too. A checkpoint that fails to restore is moved to WORKDIR/corrupt_checkpoints (kept,
  not deleted) and the one before it is used; a half-written one is never listed. A readable
  checkpoint whose variables do not fit the train state (another model or optimizer) is an
  error: it is never set aside, so a mistyped flag cannot restart a run from step 0.
  """

  def __init__(self, workdir: epath.Path, keep: int, model_config: dict, best_metric: str = ''):
    """Keeps the newest `keep` checkpoints, and with `best_metric` (e.g. 'test_top1', or 'val_loss':
    lower is better for losses) also the best one of those saved with metrics (orbax's BestN)."""
    self.directory = workdir / 'checkpoints'
    self.quarantine = workdir / 'corrupt_checkpoints'
    self.model_config = model_config
    self.best_metric = best_metric
    if best_metric:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
          ocp.checkpoint_managers.LatestN(n=keep),
          ocp.checkpoint_managers.BestN(
            get_metric_fn=self._score,
            n=1,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      )
      # best_fn makes orbax write each save's metrics; the policy keeps the newest and the best.
      options = ocp.CheckpointManagerOptions(
        best_fn=self._score,
        best_mode='max',
        preservation_policy=policy,
        create=True,
        cleanup_tmp_directories=True,
      )
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=('state', 'model_config')
    )
    # Orbax removes the half-written directories of a killed run in a background thread and
    # waits for it only at the first save. Wait now, so that nothing else touches the filesystem
    # while it runs (under tfds.testing.mock_data, the input pipeline's patched filesystem did).
    # The method is private: on an Orbax without it, the first save still waits.
    getattr(self.manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()

  def save(self, state: TrainState, metrics: dict[str, float] | None = None) -> int:
    """Saves `state` (in the background) unless its step is saved; `metrics` rank it for `best_metric`."""
    step = int(to_host(state.step))
    if step not in self.manager.all_steps():
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), model_config=ocp.args.JsonSave(self.model_config)
        ),
        metrics=metrics if self.best_metric else None,
      )
    return step

  def best_step(self) -> int | None:
    """The saved step with the best `best_metric` (None without one, or before any evaluation)."""
    if not self.best_metric:
      return None
    self.manager.wait_until_finished()
    scored = []
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and self.best_metric in metrics:
        scored.append((self._score(metrics), step))  # Of equals the latest, as BestN keeps.
    return max(scored)[1] if scored else None

  def _score(self, metrics: dict[str, float]) -> float:
    """Higher is better: the metric, or minus a loss."""
    value = metrics[self.best_metric]
    return -value if self.best_metric.endswith('loss') else value

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (after waiting for saves in flight)."""
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: TrainState) -> TrainState | None:
    """The newest readable checkpoint, or None if there is none.

    Raises:
      ConfigError: the newest readable checkpoint does not fit `abstract_state`.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / 'state')
      except Exception as error:  # noqa: BLE001  (any unreadable file: fall back, keep it)
        self._set_aside(step, error)
        continue
      self._check_fits(step, saved, abstract_state)
      target = abstract_state
      saved_fields = set(getattr(saved, 'tree', None) or {})
      if saved_fields and 'ema' not in saved_fields and not jax.tree.leaves(abstract_state.ema):
        # Saved before TrainState had `ema` (empty without ema_decay): restore the fields it has.
        target = {name: getattr(abstract_state, name) for name in saved_fields}
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        state = restored.state
        return abstract_state.replace(**state) if isinstance(state, dict) else state
      except Exception as error:  # noqa: BLE001
        self._set_aside(step, error)
    return None

  def _check_fits(self, step: int, saved: Any, abstract_state: TrainState) -> None:
    """Raises a one-line ConfigError naming the first difference between the checkpoint and the state."""
    problems = tree_differences(shapes_by_path(saved), shapes_by_path(abstract_state))
    if not problems:
      return
    more = f' (and {len(problems) - 1} more differences)' if len(problems) > 1 else ''
    raise ConfigError(
      f'the checkpoint at step {step} in {self.directory} does not fit this config: {problems[0]}{more}. '
      f'Nothing was changed. Run with the config it was trained with ({self.directory.parent}/config.json) '
      'to resume it, or use a new --workdir (with --config.init_from='
      f'{self.directory / str(step)} to start from its weights).'
    )

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint to WORKDIR/corrupt_checkpoints (every process agrees first)."""
    destination = self.quarantine / f'{step}.{int(time.time())}'
    reason = str(error).splitlines()[0][:200] if str(error) else ''
    log(
      f'warning: the checkpoint at step {step} ({self.directory / str(step)}) is unreadable '
      f'({type(error).__name__}: {reason}); moving it to {destination} and resuming from the one before.'
    )
    multihost_utils.sync_global_devices(f'corrupt checkpoint {step}')
    if jax.process_index() == 0:
      destination.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(destination)
    multihost_utils.sync_global_devices(f'moved corrupt checkpoint {step}')
    self.manager.reload()

  def close(self) -> None:
    """Waits for saves in flight and closes (again: a no-op)."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """Each array leaf's shape, keyed 'params/denseblock1/denselayer1/conv1/kernel'-style.

  Attribute, dict and sequence keys all become plain names, so a TrainState and the nested
  dicts and lists of Orbax's metadata give the same keys.
  """

  def name(entry) -> str:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        return str(getattr(entry, attribute))
    return str(entry)

  return {
    '/'.join(name(entry) for entry in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def tree_differences(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """What differs between a checkpoint's arrays and the train state's, each as a short phrase.

  A missing or extra subtree is named once, at its shortest distinguishing prefix (e.g.
  `params/denseblock1/denselayer7`, not each of its kernels).
  """

  def prefixes(keys) -> set[str]:
    return {key.rsplit('/', n)[0] for key in keys for n in range(key.count('/') + 1)}

  def first_unshared_prefix(key: str, other_prefixes: set[str]) -> str:
    parts = key.split('/')
    return next(
      '/'.join(parts[:i]) for i in range(1, len(parts) + 1) if '/'.join(parts[:i]) not in other_prefixes
    )

  def where(key: str) -> str:
    return 'the model' if key.split('/')[0] in ('params', 'batch_stats') else 'the optimizer state'

  def order(key: str, kind: int) -> tuple:
    """The model's variables first (what a user set), missing layers before shapes that follow from them."""
    section = ['params', 'batch_stats'].index(key.split('/')[0]) if where(key) == 'the model' else 2
    return (section, kind, key)

  problems = []
  saved_prefixes, expected_prefixes = prefixes(saved), prefixes(expected)
  for key in saved.keys() - expected.keys():
    prefix = first_unshared_prefix(key, expected_prefixes)
    problems.append((order(key, 0), f'{prefix} is in the checkpoint but not in {where(key)}'))
  for key in expected.keys() - saved.keys():
    prefix = first_unshared_prefix(key, saved_prefixes)
    problems.append((order(key, 0), f'{prefix} is in {where(key)} but not in the checkpoint'))
  for key in saved.keys() & expected.keys():
    if saved[key] != expected[key]:
      problems.append(
        (order(key, 1), f'{key} has shape {saved[key]} in the checkpoint and {expected[key]} in {where(key)}')
      )
  return list(dict.fromkeys(phrase for _, phrase in sorted(problems)))  # Each subtree once.


class PreemptionWatcher:
  """Notices SIGTERM and Ctrl-C (SIGINT) so that the loop saves at the next step boundary.

  On one process via signal handlers; across processes via JAX's preemption sync point (which
  makes every process stop at the same step), to which a Ctrl-C is handed on as SIGTERM. A second
  Ctrl-C stops the process at once (the checkpoints already committed are kept: orbax commits a
  checkpoint by renaming it into place).
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.signum: int | None = None
    self.previous: dict[int, Any] = {}
    if jax.process_count() == 1:
      self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ignored (nohup, `&`): leave it so.
      self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

  def _handler(self, signum, frame):
    del frame
    self.signum = signum

  def _interrupt(self, signum, frame):
    if self.signum == signal.SIGINT:
      print('error: Ctrl-C twice: stopped at once, without saving this step.', file=sys.stderr, flush=True)
      os._exit(SIGINT_EXIT_CODE)
    print('Ctrl-C: saving after this step (press again to stop at once).', file=sys.stderr, flush=True)
    self._handler(signum, frame)
    if jax.process_count() > 1:  # JAX's preemption service listens for SIGTERM.
      signal.raise_signal(signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signum is not None
    return self.manager.reached_preemption(step)

  def preempted(self, step: int) -> Preempted:
    """The exception that ends the run after the save at `step`."""
    return Preempted(step, self.signum if self.signum is not None else signal.SIGTERM)

  def close(self) -> None:
    for signum, previous in self.previous.items():
      signal.signal(signum, previous)
    self.previous = {}
