"""Checkpoints of the train state (Orbax), unreadable ones set aside, and preemption (SIGTERM)."""

import pathlib
import shutil
import signal
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from densenet_jax.reporting import log
from densenet_jax.sharding import to_host
from densenet_jax.steps import TrainState

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):  # noqa: N818  (not an error: the run saved and will resume)
  """SIGTERM arrived; the state was saved at `step`."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


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


class PreemptionWatcher:
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
