"""Training survives SIGKILL, SIGTERM, NaNs and corrupt checkpoints, in a local or a gs:// workdir,
as one process or several, and is deterministic: each run is the digits config with a shallower
DenseNet-BC, shortened to 50 steps (2.3 epochs), with the defaults a user gets (the XLA cache in the
session's directory)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, XLA_CACHE, free_port, optional_module, read_metrics, run_train, start_train

from densenet_jax import convert

# Every test here runs train.py processes end to end: the full suite (`pytest -m ''`).
# One pytest-xdist worker runs them all: they share the uninterrupted runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('train_runs')]

STEPS = 50  # 22 steps per epoch: checkpoints at 15 and 30 (mid-epoch), 45 and 50.
# DenseNet-BC-16 (2 layers per block) for digits' BC-40: what is tested is the run, not the model
# (a 50-step train.py run with a warm XLA cache takes 17 s instead of 26 s on 2 cores).
DEPTH = 16
# Bounds on waits for something to happen, generous for a busy 2-core machine: a test asserts what
# happened (the step saved, the processes agreed), never how fast.
WAIT_TIMEOUT = 900
PROCESS_EXIT_TIMEOUT = 600


def digits_args(workdir, data_dir, *extra):
  return [
    '--config=configs/digits.py',
    f'--workdir={workdir}',
    f'--config.data_dir={data_dir}',
    f'--config.model_kwargs.depth={DEPTH}',
    f'--config.total_steps={STEPS}',
    '--config.checkpoint_every_steps=15',
    '--config.log_every_steps=5',
    '--config.progress_bar=False',
    f'--config.compilation_cache_dir={XLA_CACHE}',
    *extra,
  ]


def final_metrics(workdir) -> dict:
  return json.loads((workdir / 'final_metrics.json').read_text())


@pytest.fixture(scope='module')
def uninterrupted_workdir(tmp_path_factory, digits_data_dir):
  """The workdir of the run that nothing interrupts (tests copy it, never change it)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run_train(*digits_args(workdir, digits_data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_workdir) -> dict:
  """final_metrics.json of the run that nothing interrupts."""
  return final_metrics(uninterrupted_workdir)


def wait_for_step(
  process, workdir, step: int, checkpoint: int | None = None, timeout: float = WAIT_TIMEOUT
) -> int:
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


def kill_then_rerun(args: list[str], workdir, step: int, checkpoint: int) -> int:
  """Starts `train.py ARGS`, SIGKILLs it once it logged `step` with `checkpoint` committed, reruns
  it to the end; returns the step the rerun resumed from."""
  process = start_train(args, workdir.parent / f'{workdir.name}_killed.log')
  killed_after = wait_for_step(process, workdir, step, checkpoint=checkpoint)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=PROCESS_EXIT_TIMEOUT)
  assert killed_after < STEPS
  result = run_train(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  return int(result.stdout.split('Resuming from the checkpoint at step ')[1].split()[0])


def test_sigkill_mid_epoch_then_restart_ends_bit_for_bit_as_uninterrupted(
  tmp_path, digits_data_dir, uninterrupted
):
  args = digits_args(tmp_path, digits_data_dir)
  # Past the mid-epoch checkpoint at 30, and that checkpoint committed.
  resumed_from = kill_then_rerun(args, tmp_path, step=35, checkpoint=30)
  assert resumed_from in (30, 45) and resumed_from % 22 != 0  # mid-epoch
  assert final_metrics(tmp_path) == uninterrupted  # every field, bit for bit
  # The metrics history is the uninterrupted one too: nothing logged twice.
  steps = [r['step'] for r in read_metrics(tmp_path) if 'train_loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS


# Every recipe of configs/default.py at once (issue: exact resume holds with all of them on).
EVERY_RECIPE = (
  '--config.optimizer=adamw',
  '--config.learning_rate=0.003',
  '--config.weight_decay=0.01',
  '--config.schedule=plateau',
  '--config.validation_fraction=0.1',  # 20 steps per epoch
  # Every evaluation after the first stalls (an improvement is a 90% drop) and patience 0 reduces at
  # once: the lr drops at the second evaluation (step 40), which a resumed run sees only if the
  # plateau state (the best loss so far) came back from the checkpoint.
  '--config.plateau_patience=0',
  '--config.plateau_threshold=0.9',
  '--config.label_smoothing=0.1',
  '--config.mixup_alpha=0.2',
  '--config.cutmix_alpha=1.0',
  '--config.ema_decay=0.9',
  '--config.grad_accum_steps=2',
  '--config.grad_clip_norm=1.0',
  '--config.best_checkpoint_metric=test_top1',
  '--config.randaugment=(2, 9)',
)


def test_with_every_recipe_on_a_sigkill_mid_accumulation_then_restart_ends_as_uninterrupted(
  tmp_path, digits_data_dir
):
  torch = optional_module('torch')
  reference = tmp_path / 'uninterrupted'
  result = run_train(*digits_args(reference, digits_data_dir, *EVERY_RECIPE))
  assert result.returncode == 0, result.stderr[-3000:]
  uninterrupted = final_metrics(reference)
  workdir = tmp_path / 'killed'
  args = digits_args(workdir, digits_data_dir, *EVERY_RECIPE)
  # Past the checkpoint at 15: half of an update's two micro-batches are in it.
  assert kill_then_rerun(args, workdir, step=20, checkpoint=15) in (15, 20, 30)
  assert final_metrics(workdir) == uninterrupted  # every field, bit for bit
  steps = [r['step'] for r in read_metrics(workdir) if 'train_loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS
  evals = [r for r in read_metrics(workdir) if 'val_loss' in r]
  assert [r['step'] for r in evals] == [20, 40, 50]
  rates = {r['step']: r['learning_rate'] for r in read_metrics(workdir) if 'learning_rate' in r}
  assert rates[45] == pytest.approx(0.1 * rates[40]) and rates[40] == rates[20]
  # The best checkpoint by test top-1 is kept and named; the EMA weights export to torch.
  best = uninterrupted['best_step']
  assert uninterrupted['best_test_top1'] == max(r['test_top1'] for r in evals if r['step'] == best)
  assert (workdir / 'checkpoints' / str(best)).is_dir()
  for flag in ([], ['--ema']):
    pth = tmp_path / f'final{"_ema" if flag else ""}.pth'
    assert convert.main(['to-torch', *flag, str(workdir / 'checkpoints' / str(STEPS)), str(pth)]) == 0
  weights = torch.load(tmp_path / 'final.pth')['features.conv0.weight']
  ema_weights = torch.load(tmp_path / 'final_ema.pth')['features.conv0.weight']
  assert not torch.equal(weights, ema_weights)


@pytest.mark.parametrize(
  ('signum', 'name'), [(signal.SIGTERM, 'SIGTERM'), (signal.SIGINT, 'Ctrl-C')], ids=['SIGTERM', 'Ctrl-C']
)
def test_sigterm_or_ctrl_c_saves_the_current_step_and_the_next_start_resumes_there(
  tmp_path, digits_data_dir, uninterrupted, signum, name
):
  args = digits_args(tmp_path, digits_data_dir)
  process = start_train(args, tmp_path / 'terminated.log')
  wait_for_step(process, tmp_path, 20)
  process.send_signal(signum)
  returncode = process.wait(timeout=PROCESS_EXIT_TIMEOUT)
  log = (tmp_path / 'terminated.log').read_text()
  assert returncode == 128 + signum, log[-3000:]
  assert 'Traceback' not in log, log[-3000:]
  last_line = log.strip().splitlines()[-1]
  assert last_line.startswith(f'{name}: saved a checkpoint at step ') and last_line.endswith(
    'run the same command to resume.'
  )
  saved_step = int(last_line.split('saved a checkpoint at step ')[1].split()[0])
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
def trained_to_45(tmp_path_factory, uninterrupted_workdir):
  """A workdir trained to step 45, with checkpoints at 30 and 45: the uninterrupted run's, less step 50.

  Its metrics.jsonl goes on to step 50, as an interrupted run's may: a resumed run drops what lies
  beyond its checkpoint.
  """
  workdir = tmp_path_factory.mktemp('trained_to_45') / 'run'
  shutil.copytree(uninterrupted_workdir, workdir)
  shutil.rmtree(workdir / 'checkpoints' / str(STEPS))
  (workdir / 'final_metrics.json').unlink()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['30', '45']
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


def files_and_contents(directory) -> dict[str, bytes]:
  return {
    str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob('*') if path.is_file()
  }


@pytest.mark.parametrize(
  'override, difference',
  [
    (
      '--config.model_kwargs.depth=10',  # 1 layer per block instead of 2
      'params/denseblock1/denselayer2 is in the checkpoint but not in the model',
    ),
    ('--config.momentum=0.0', 'opt_state/1/0 is in the checkpoint but not in the optimizer state'),
  ],
)
def test_a_checkpoint_that_does_not_fit_the_config_stops_the_run_and_changes_nothing(
  tmp_path, digits_data_dir, trained_to_45, override, difference
):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_to_45, workdir)
  before = files_and_contents(workdir)
  result = run_train(*digits_args(workdir, digits_data_dir, override))
  assert result.returncode == 1
  (line,) = result.stderr.strip().splitlines()[-1:]
  assert line.startswith(
    f'error: the checkpoint at step 45 in {workdir}/checkpoints does not fit this config: '
  )
  assert difference in line
  assert '--workdir' in line and f'--config.init_from={workdir}/checkpoints/45' in line
  assert files_and_contents(workdir) == before  # nothing moved aside, rewritten or added


def test_a_gs_workdir_killed_and_rerun_ends_as_the_uninterrupted_run_with_nothing_local(
  tmp_path, digits_data_dir, uninterrupted, gcs_bucket
):
  args = digits_args(f'gs://{gcs_bucket.name}/run', digits_data_dir)
  process = start_train(args, tmp_path / 'killed.log', env=gcs_bucket.env)
  deadline = time.monotonic() + WAIT_TIMEOUT
  while not (
    gcs_bucket.exists('run/checkpoints/30/commit_success.txt')
    and max(json.loads(line)['step'] for line in gcs_bucket.read('run/metrics.jsonl').splitlines()) >= 35
  ):
    assert process.poll() is None, (tmp_path / 'killed.log').read_text()[-3000:]
    assert time.monotonic() < deadline, f'checkpoint 30 not committed in {WAIT_TIMEOUT} s'
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=PROCESS_EXIT_TIMEOUT)
  result = run_train(*args, env=gcs_bucket.env)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed_from = int(result.stdout.split('Resuming from the checkpoint at step ')[1].split()[0])
  assert resumed_from in (30, 45)
  assert json.loads(gcs_bucket.read('run/final_metrics.json')) == uninterrupted  # bit for bit
  for name in ('config.json', 'metrics.jsonl', 'curves.png', f'checkpoints/{STEPS}/commit_success.txt'):
    assert gcs_bucket.exists(f'run/{name}'), name
  assert gcs_bucket.fs.glob(f'{gcs_bucket.name}/run/tensorboard/events.out.tfevents.*')
  # The converter reads and writes the bucket too: the last checkpoint to a torchvision .pth there.
  converted = subprocess.run(
    [
      sys.executable,
      '-m',
      'densenet_jax.convert',
      'to-torch',
      f'gs://{gcs_bucket.name}/run/checkpoints/{STEPS}',
    ]
    + [f'gs://{gcs_bucket.name}/run/digits.pth'],
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', **gcs_bucket.env},
    capture_output=True,
    text=True,
  )
  assert converted.returncode == 0, converted.stderr[-3000:]
  torch = optional_module('torch')
  with gcs_bucket.fs.open(f'{gcs_bucket.name}/run/digits.pth', 'rb') as f:
    state_dict = torch.load(f, weights_only=True)
  assert state_dict['classifier.weight'].shape == (10, 48)  # BC-16, growth 12: 24 + 2 x 12 features
  # Nothing went to a local folder named after the URI (what pathlib makes of gs://...).
  assert not (REPO / 'gs:').exists() and not (tmp_path / 'gs:').exists()


TWO_PROCESSES = ['--config.num_data_shards=2']  # The same data order for 1 and 2 processes.


def start_two_processes(workdir, data_dir, log_dir) -> list[subprocess.Popen]:
  """A 2-process run over localhost, told only by JAX's environment variables (config defaults)."""
  address = f'localhost:{free_port()}'
  return [
    start_train(
      digits_args(workdir, data_dir, *TWO_PROCESSES),
      log_dir / f'process{index}.log',
      env={'JAX_COORDINATOR_ADDRESS': address, 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(index)},
    )
    for index in range(2)
  ]


def wait_all(processes, timeout: float = WAIT_TIMEOUT) -> list[int]:
  return [process.wait(timeout=timeout) for process in processes]


@pytest.fixture(scope='module')
def two_processes_uninterrupted(tmp_path_factory, digits_data_dir) -> tuple[dict, str]:
  """(final_metrics.json, process 0's log) of a 2-process run that nothing interrupts."""
  directory = tmp_path_factory.mktemp('two_processes')
  processes = start_two_processes(directory / 'run', digits_data_dir, directory)
  codes = wait_all(processes)
  assert codes == [0, 0], (directory / 'process0.log').read_text()[-3000:]
  return final_metrics(directory / 'run'), (directory / 'process0.log').read_text()


def test_two_processes_told_by_the_environment_train_like_one_process_with_two_devices(
  tmp_path, digits_data_dir, two_processes_uninterrupted
):
  """jax.distributed over localhost (no distributed flag), one CPU device each, vs one process with two."""
  two, log = two_processes_uninterrupted
  assert 'over 2 devices (2 processes)' in log
  result = run_train(*digits_args(tmp_path, digits_data_dir, *TWO_PROCESSES), devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'over 2 devices (1 processes)' in result.stdout
  one = final_metrics(tmp_path)
  assert two['param_checksum'] == pytest.approx(one['param_checksum'], rel=1e-6)
  assert two['train_loss'] == pytest.approx(one['train_loss'], rel=1e-6)
  assert two['test_examples'] == one['test_examples'] == 359


def test_sigterm_to_every_process_saves_the_same_step_and_the_rerun_ends_as_uninterrupted(
  tmp_path, digits_data_dir, two_processes_uninterrupted
):
  workdir = tmp_path / 'run'
  processes = start_two_processes(workdir, digits_data_dir, tmp_path)
  wait_for_step(processes[0], workdir, 15)
  for process in processes:
    process.send_signal(signal.SIGTERM)
  # Both stop by themselves (a bound, not a speed: a process that hung would never exit).
  codes = wait_all(processes, timeout=PROCESS_EXIT_TIMEOUT)
  logs = [(tmp_path / f'process{index}.log').read_text() for index in range(2)]
  assert codes == [128 + signal.SIGTERM] * 2, logs[0][-3000:] + logs[1][-3000:]
  saved = [int(log.split('SIGTERM: saved a checkpoint at step ')[1].split()[0]) for log in logs]
  assert saved[0] == saved[1] and 15 <= saved[0] < STEPS
  assert (workdir / 'checkpoints' / str(saved[0])).is_dir()
  processes = start_two_processes(workdir, digits_data_dir, tmp_path)
  assert wait_all(processes) == [0, 0], (tmp_path / 'process0.log').read_text()[-3000:]
  assert f'Resuming from the checkpoint at step {saved[0]} ' in (tmp_path / 'process0.log').read_text()
  assert final_metrics(workdir) == two_processes_uninterrupted[0]
