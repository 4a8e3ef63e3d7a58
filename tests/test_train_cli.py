"""`python train.py` refuses bad input with one line that names the fix: no traceback, non-zero exit."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import PYTHON_WITH_SIGINT, REPO, free_port, run_train, train_env

from densenet_jax.train import reporting

CASES = {
  'unknown config key': ([], ['--config.batch_sise=64'], 1, "unknown config key 'batch_sise'"),
  'unknown model': ([], ['--config.model=densenet122'], 1, 'config.model must be one of densenet121'),
  'unknown dataset': ([], ['--config.dataset=cifar11'], 1, "unknown dataset 'cifar11'"),
  'batch size vs devices': ([], ['--config.batch_size=60'], 8, 'not divisible by the 8 devices'),
  'mean of another channel count': (
    [],
    ['--config.mean=(125.3, 123.0, 113.9)'],
    1,
    'config.mean has 3 values and the images of sklearn_digits have 1 channel',
  ),
  'plateau without a validation split': (
    [],
    ['--config.schedule=plateau'],
    1,
    'set config.validation_fraction',
  ),
  'imagenet2012 without its files': (
    ['--config=configs/densenet121.py'],
    [],
    1,
    'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar',
  ),
}


# More of the same, each its own process: the full suite (`pytest -m ''`).
MORE_CASES = {
  'missing config file': (
    ['--config=configs/nope.py'],
    [],
    1,
    "cannot load the config file 'configs/nope.py': no such",
  ),
  'wrong type': ([], ['--config.batch_size=abc'], 1, '--config.batch_size=abc: invalid literal for int()'),
  'zero batch size': (
    [],
    ['--config.batch_size=0'],
    1,
    'config.batch_size must be a positive integer, got 0',
  ),
  'fraction out of range': (
    [],
    ['--config.validation_fraction=1.5'],
    1,
    'validation_fraction=1.5 must be in [0, 1)',
  ),
  'unknown dtype': ([], ['--config.dtype=float16'], 1, "config.dtype='float16' is not one of"),
  'unknown optimizer': ([], ['--config.optimizer=lamb'], 1, "config.optimizer='lamb' is not one of"),
  'unknown mode': ([], ['--config.mode=predict'], 1, "config.mode='predict' is not one of 'train', 'eval'"),
  'randaugment out of range': ([], ['--config.randaugment=(2, 20)'], 1, 'must be (layers, magnitude)'),
  'depth off the CIFAR rule': ([], ['--config.model_kwargs.depth=41'], 1, 'depth 41 does not fit the CIFAR'),
  'plateau factor above 1': (
    [],
    ['--config.schedule=plateau', '--config.validation_fraction=0.1', '--config.plateau_factor=2.0'],
    1,
    'config.plateau_factor=2.0 must be in (0, 1)',
  ),
  'best metric without its split': (
    [],
    ['--config.best_checkpoint_metric=val_top1'],
    1,
    'needs a validation split',
  ),
  'missing init_from file': (
    [],
    ['--config.init_from=/nonexistent/w.safetensors'],
    1,
    'is neither a pretrained',
  ),
  'eval with nothing to evaluate': ([], ['--config.mode=eval'], 1, 'nothing to evaluate'),
  'a positional argument': (
    [],
    ['extra'],
    1,
    "unexpected arguments ['extra']; settings go in --config.NAME=VALUE",
  ),
}


def error_line(result: subprocess.CompletedProcess, returncode: int | None = 1) -> str:
  """The last line of a refusing train.py: it exited `returncode` (None: not 0), with no traceback."""
  assert result.returncode != 0 if returncode is None else result.returncode == returncode, result.stderr[
    -3000:
  ]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  'case', [*CASES, *(pytest.param(case, marks=pytest.mark.slow) for case in MORE_CASES)]
)
def test_bad_input_is_one_clear_line(tmp_path, digits_data_dir, case):
  config_args, overrides, devices, expected = {**CASES, **MORE_CASES}[case]
  data_dir = digits_data_dir if not config_args else tmp_path / 'empty_tfds'
  workdir = tmp_path / 'run'
  result = run_train(
    *(config_args or ['--config=configs/digits.py']),
    f'--workdir={workdir}',
    f'--config.data_dir={data_dir}',
    *overrides,
    devices=devices,
  )
  last_line = error_line(result, returncode=None)
  assert last_line.startswith('error: ') and expected in last_line, last_line
  assert not workdir.exists()  # Nothing was started, so nothing was written.


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables exist on Linux only')
@pytest.mark.parametrize(
  'given, runs',
  [(None, ['', 'glibc.malloc.hugetlb=1']), ('glibc.malloc.hugetlb=0', ['glibc.malloc.hugetlb=0'])],
)
def test_train_restarts_once_with_huge_page_malloc_unless_told_otherwise(given, runs):
  # Each run of this program prints the GLIBC_TUNABLES it started with: one line per exec.
  program = (
    "import os, train; print(os.environ.get('GLIBC_TUNABLES', ''), flush=True); "
    'train.restart_with_huge_page_malloc()'
  )
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  if given:
    env['GLIBC_TUNABLES'] = given
  result = subprocess.run(
    [sys.executable, '-c', program], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == runs


SECOND_CTRL_C = """
import signal
from densenet_jax.train.checkpoints import PreemptionWatcher
watcher = PreemptionWatcher(manager=None)
signal.raise_signal(signal.SIGINT)
print('after the first: save at step 7' if watcher.reached(7) else 'after the first: not noticed', flush=True)
signal.raise_signal(signal.SIGINT)
print('after the second: still running', flush=True)
"""


def test_a_first_ctrl_c_asks_for_a_save_and_a_second_stops_at_once():
  result = subprocess.run(
    [*PYTHON_WITH_SIGINT, '-c', SECOND_CTRL_C],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 130, result.stderr
  assert result.stdout.splitlines() == ['after the first: save at step 7']
  assert result.stderr.splitlines() == [
    'Ctrl-C: saving after this step (press again to stop at once).',
    'error: Ctrl-C twice: stopped at once, without saving this step.',
  ]


def test_the_first_line_of_a_run_is_ours(tmp_path, digits_data_dir):
  """No TensorFlow/absl C++ start-up lines before the run's first line (stdout and stderr in order)."""
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / 'train.py'),
      '--config=configs/digits.py',
      f'--workdir={tmp_path}',
      f'--config.data_dir={digits_data_dir}',
      '--config.model_kwargs.depth=10',
      '--config.total_steps=1',
      '--config.progress_bar=False',
      '--config.compilation_cache_dir=',
    ],
    cwd=REPO,
    env={**train_env(1, None), 'PYTHONUNBUFFERED': '1'},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:]
  first = result.stdout.splitlines()[0]
  assert re.match(r'\d\d:\d\d:\d\d Training densenet_cifar on sklearn_digits', first), result.stdout[:2000]
  assert 'absl::InitializeLog' not in result.stdout and 'oneDNN' not in result.stdout


def test_start_up_info_lines_are_hidden_and_warnings_and_errors_pass(capfd):
  with reporting.quiet_native_startup():
    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n')
    os.write(2, b'I0000 00:00:1796322291.196432   25991 port.cc:153] oneDNN custom operations are on.\n')
    os.write(2, b'W1203 18:23:50.623218 140567 file_utils.py:394] a real warning\n')
    os.write(2, b'E0000 00:00:1796322291.196432   25991 cuda.cc:12] a real error\n')
    print('a Python warning', file=sys.stderr)
  # (Under capfd, Python's sys.stderr is pytest's, not file descriptor 2: compare without order.)
  assert sorted(capfd.readouterr().err.splitlines()) == sorted(
    [
      'W1203 18:23:50.623218 140567 file_utils.py:394] a real warning',
      'E0000 00:00:1796322291.196432   25991 cuda.cc:12] a real error',
      'a Python warning',
    ]
  )


@pytest.mark.parametrize('where', ['a file', 'inside a file'])
def test_a_workdir_that_is_or_is_inside_a_file_is_one_line_and_the_file_is_untouched(tmp_path, where):
  existing = tmp_path / 'notes.txt'
  existing.write_text('a user file\n')
  workdir = existing if where == 'a file' else existing / 'run'
  result = run_train('--config=configs/digits.py', f'--workdir={workdir}', f'--config.data_dir={tmp_path}')
  last_line = error_line(result)
  assert last_line.startswith(f'error: --workdir={workdir} ') and 'give a folder' in last_line, last_line
  assert existing.read_text() == 'a user file\n' and sorted(os.listdir(tmp_path)) == ['notes.txt']


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs /proc, where not even root makes folders')
def test_a_workdir_that_cannot_be_written_is_one_line_before_any_data_work(tmp_path):
  result = run_train(
    '--config=configs/digits.py', '--workdir=/proc/densenet_run', f'--config.data_dir={tmp_path}'
  )
  last_line = error_line(result)
  assert last_line.startswith('error: --workdir=/proc/densenet_run cannot be written: /proc refuses'), (
    last_line
  )
  assert 'give a folder this user can write' in last_line and os.listdir(tmp_path) == []


# Offline, as a machine without a network is: no name resolves (but localhost, for JAX's own use).
OFFLINE_SITECUSTOMIZE = """
import socket
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
  if host not in ('localhost', '127.0.0.1', '::1', None):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known (offline, for the test)')
  return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""


@pytest.mark.slow  # TFDS's downloader retries for about 3.5 minutes before it gives up
def test_a_dataset_to_download_while_offline_is_one_line(tmp_path):
  (tmp_path / 'offline').mkdir()
  (tmp_path / 'offline' / 'sitecustomize.py').write_text(OFFLINE_SITECUSTOMIZE)
  env = {'PYTHONPATH': str(tmp_path / 'offline')}
  env.update({name: '' for name in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy')})
  data_dir = tmp_path / 'tensorflow_datasets'
  data_dir.mkdir()
  result = run_train(
    '--config=configs/cifar10.py', f'--workdir={tmp_path / "run"}', f'--config.data_dir={data_dir}', env=env
  )
  last_line = error_line(result)
  assert last_line.startswith(f'error: cifar10 is not prepared in {data_dir} and preparing it failed'), (
    last_line
  )
  assert 'On a machine with internet run `tfds build cifar10 --data_dir DIR`' in last_line
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow  # a train.py process each
@pytest.mark.parametrize('weights', ['foreign', 'another depth'])
def test_init_from_weights_that_do_not_fit_is_one_line(tmp_path, digits_data_dir, tiny_reference, weights):
  from conftest import section
  from safetensors.numpy import save_file

  state_dict = {k: np.ascontiguousarray(v) for k, v in section(tiny_reference, 'state_dict').items()}
  if weights == 'foreign':  # A ResNet's keys, say: nothing of a DenseNet.
    state_dict = {
      'conv1.weight': np.zeros((64, 3, 7, 7), np.float32),
      'fc.weight': np.zeros((10, 512), np.float32),
    }
  path = tmp_path / f'{weights.replace(" ", "_")}.safetensors'
  save_file(state_dict, path)
  workdir = tmp_path / 'run'
  result = run_train(
    '--config=configs/digits.py',
    f'--workdir={workdir}',
    f'--config.data_dir={digits_data_dir}',
    f'--config.init_from={path}',
  )
  last_line = error_line(result)
  assert last_line.startswith('error: ') and str(path) in last_line, last_line
  assert not workdir.exists()


@pytest.mark.slow  # gcsfs retries a refused connection for about a minute before it gives up
@pytest.mark.parametrize('bucket_state', ['no such bucket', 'unreachable'])
def test_a_gs_workdir_that_cannot_be_used_is_one_line_before_any_data_or_model_work(
  tmp_path, gcs_bucket, bucket_state
):
  env = dict(gcs_bucket.env)
  if bucket_state == 'unreachable':  # Nothing listens there.
    env['STORAGE_EMULATOR_HOST'] = env['TENSORSTORE_GCS_HTTP_URL'] = f'http://localhost:{free_port()}'
  workdir = f'gs://{"no-such-bucket" if bucket_state == "no such bucket" else gcs_bucket.name}/run'
  # A data_dir that holds nothing: the check comes before the data would be prepared.
  data_dir = tmp_path / 'tensorflow_datasets'
  data_dir.mkdir()
  result = run_train(
    '--config=configs/digits.py', f'--workdir={workdir}', f'--config.data_dir={data_dir}', env=env
  )
  last_line = error_line(result)
  expected = (
    "there is no bucket 'no-such-bucket'" if bucket_state == 'no such bucket' else 'cannot reach the workdir'
  )
  assert last_line.startswith('error: ') and expected in last_line, last_line
  assert os.listdir(data_dir) == [] and not gcs_bucket.exists('run')
