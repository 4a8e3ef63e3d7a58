"""Training survives SIGKILL, SIGTERM, NaNs and corrupt checkpoints, runs as several processes,
and is deterministic: each run is the digits config shortened to 50 steps (2.3 epochs)."""

import json
import os
import shutil
import signal
import socket
import time

import jax
import numpy as np
import pytest
from conftest import read_metrics, run_train, start_train

from densenet_jax import convert

STEPS = 50  # 22 steps per epoch: checkpoints at 15 and 30 (mid-epoch), 45 and 50.


def digits_args(workdir, data_dir, *extra):
  return [
    '--config=configs/digits.py',
    f'--workdir={workdir}',
    f'--config.data_dir={data_dir}',
    f'--config.total_steps={STEPS}',
    '--config.checkpoint_every_steps=15',
    '--config.log_every_steps=5',
    '--config.progress_bar=False',
    '--config.compilation_cache_dir=',
    *extra,
  ]


def final_metrics(workdir) -> dict:
  return json.loads((workdir / 'final_metrics.json').read_text())


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, digits_data_dir) -> dict:
  """final_metrics.json of the run that nothing interrupts."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run_train(*digits_args(workdir, digits_data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  return final_metrics(workdir)


def wait_for_step(process, workdir, step: int, checkpoint: int | None = None, timeout: float = 300) -> int:
  """Waits until the run has logged `step` (or beyond) and, if given, committed the checkpoint
  at step `checkpoint`; returns the last step logged.

  Checkpoints are written in the background, so a logged step says nothing about the save
  before it: a SIGKILL may land while that save is in flight, and the restart then rightly
  resumes from the one before. Orbax commits a checkpoint by renaming its temporary directory
  to the step number.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, 'the run ended before it could be interrupted'
    path = workdir / 'metrics.jsonl'
    committed = checkpoint is None or (workdir / 'checkpoints' / str(checkpoint)).is_dir()
    if path.exists() and committed:
      steps = [r['step'] for r in read_metrics(workdir) if 'train_loss' in r]
      if steps and steps[-1] >= step:
        return steps[-1]
    time.sleep(0.05)
  raise TimeoutError(f'step {step} (checkpoint {checkpoint}) not reached in {timeout} s')


def test_two_runs_with_the_same_seed_give_identical_final_metrics(tmp_path, digits_data_dir, uninterrupted):
  result = run_train(*digits_args(tmp_path, digits_data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'final_metrics.json').read_text() == json.dumps(uninterrupted, indent=2) + '\n'


def test_sigkill_mid_epoch_then_restart_ends_bit_for_bit_as_uninterrupted(
  tmp_path, digits_data_dir, uninterrupted
):
  args = digits_args(tmp_path, digits_data_dir)
  process = start_train(args, tmp_path / 'killed.log')
  # Past the mid-epoch checkpoint at 30, and that checkpoint committed.
  killed_after = wait_for_step(process, tmp_path, 35, checkpoint=30)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert killed_after < STEPS
  result = run_train(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed_from = int(result.stdout.split('Resuming from the checkpoint at step ')[1].split()[0])
  assert resumed_from in (30, 45) and resumed_from % 22 != 0  # mid-epoch
  assert final_metrics(tmp_path) == uninterrupted  # every field, bit for bit
  # The metrics history is the uninterrupted one too: nothing logged twice.
  steps = [r['step'] for r in read_metrics(tmp_path) if 'train_loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_sigterm_saves_the_current_step_and_the_next_start_resumes_there(
  tmp_path, digits_data_dir, uninterrupted
):
  args = digits_args(tmp_path, digits_data_dir)
  process = start_train(args, tmp_path / 'terminated.log')
  wait_for_step(process, tmp_path, 20)
  signalled = time.monotonic()
  process.send_signal(signal.SIGTERM)
  returncode = process.wait(timeout=60)
  log = (tmp_path / 'terminated.log').read_text()
  assert returncode == 128 + signal.SIGTERM, log[-3000:]
  saved_step = int(log.split('SIGTERM: saved a checkpoint at step ')[1].split()[0])
  print(f'SIGTERM -> exit in {time.monotonic() - signalled:.1f} s, saved step {saved_step}')
  assert 20 <= saved_step < STEPS and (tmp_path / 'checkpoints' / str(saved_step)).is_dir()
  result = run_train(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {saved_step} ' in result.stdout
  assert final_metrics(tmp_path) == uninterrupted


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, digits_data_dir):
  # A learning rate of 1e30 after a one-epoch warmup from 0: step 1 updates nothing, step 2's
  # update is ~1e28 and the run goes non-finite at step 3.
  result = run_train(
    *digits_args(
      tmp_path,
      digits_data_dir,
      '--config.learning_rate=1e30',
      '--config.warmup_epochs=1',
      '--config.checkpoint_every_steps=2',
    )
  )
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith(
    'error: the training loss or the parameters became non-finite (NaN or inf) at step 3'
  )
  assert 'The last good checkpoint, step 2, is kept' in last_line
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  _, variables = convert.load_checkpoint(tmp_path / 'checkpoints' / '2')
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))


@pytest.fixture(scope='module')
def trained_to_45(tmp_path_factory, digits_data_dir):
  """A workdir trained to step 45, with checkpoints at 15, 30 and 45."""
  workdir = tmp_path_factory.mktemp('trained_to_45')
  assert (
    run_train(*digits_args(workdir, digits_data_dir, f'--config.total_steps={STEPS - 5}')).returncode == 0
  )
  return workdir


@pytest.mark.parametrize('corruption', ['truncated data files', 'missing metadata', 'half-written directory'])
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_one_before_used(
  tmp_path, digits_data_dir, uninterrupted, trained_to_45, corruption
):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_to_45, workdir)
  latest = workdir / 'checkpoints' / '45'
  if corruption == 'truncated data files':
    for path in latest.glob('state/**/d/*'):
      path.write_bytes(path.read_bytes()[:100])
  elif corruption == 'missing metadata':
    (latest / 'state' / '_METADATA').unlink()
  else:  # what a crash in the middle of writing step 45 would leave, if it were listed
    shutil.rmtree(latest / 'state' / 'ocdbt.process_0')
  result = run_train(*digits_args(workdir, digits_data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'warning: the checkpoint at step 45' in result.stdout and 'is unreadable' in result.stdout
  assert 'Resuming from the checkpoint at step 30 ' in result.stdout
  (kept,) = (workdir / 'corrupt_checkpoints').iterdir()  # set aside, not deleted
  assert kept.name.startswith('45.')
  assert final_metrics(workdir) == uninterrupted


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def test_two_processes_train_like_one_process_with_two_devices(tmp_path, digits_data_dir):
  """jax.distributed over localhost, one CPU device per process, vs one process with two."""
  shared = ['--config.num_data_shards=2', '--config.total_steps=30']
  address = f'localhost:{free_port()}'
  runs = {
    f'process{index}': start_train(
      digits_args(
        tmp_path / 'two',
        digits_data_dir,
        *shared,
        f'--config.distributed={address}',
        '--config.num_processes=2',
        f'--config.process_id={index}',
      ),
      tmp_path / f'process{index}.log',
    )
    for index in range(2)
  }
  runs['one'] = start_train(
    digits_args(tmp_path / 'one', digits_data_dir, *shared), tmp_path / 'one.log', devices=2
  )
  for name, process in runs.items():
    assert process.wait(timeout=600) == 0, (tmp_path / f'{name}.log').read_text()[-3000:]
  assert 'over 2 devices (2 processes)' in (tmp_path / 'process0.log').read_text()
  two, one = final_metrics(tmp_path / 'two'), final_metrics(tmp_path / 'one')
  assert two['param_checksum'] == pytest.approx(one['param_checksum'], rel=1e-6)
  assert two['train_loss'] == pytest.approx(one['train_loss'], rel=1e-6)
  assert two['test_examples'] == one['test_examples'] == 359
