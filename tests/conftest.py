"""Shared fixtures: the reference data computed by real torchvision (tests/data/)."""

import dataclasses
import importlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import pytest

import densenet_jax

DATA = pathlib.Path(__file__).parent / 'data'
REPO = pathlib.Path(__file__).parents[1]
# One persistent XLA cache for the whole test run, its train.py processes and pytest-xdist's workers
# (which inherit the variable from the process that starts them): the same program compiles once.
if 'DENSENET_JAX_TESTS_XLA_CACHE' not in os.environ:
  os.environ['DENSENET_JAX_TESTS_XLA_CACHE'] = tempfile.mkdtemp(prefix='densenet_jax_tests_xla_cache_')
XLA_CACHE = pathlib.Path(os.environ['DENSENET_JAX_TESTS_XLA_CACHE'])
jax.config.update('jax_compilation_cache_dir', str(XLA_CACHE))
# The float64 context manager: jax.enable_x64 on current JAX, in experimental before.
enable_x64 = jax.enable_x64 if hasattr(jax, 'enable_x64') else jax.experimental.enable_x64
# Every kernel set: the fidelity tests run for each (`densenet_jax.ops`).
KERNELS = list(densenet_jax.KERNEL_SETS)
# Each set's BatchNorm class, to find the BatchNorms among a model's modules.
BATCH_NORMS = tuple(kernels.batch_norm for kernels in densenet_jax.KERNEL_SETS.values())
PRESETS = {
  'densenet121': densenet_jax.DenseNet121,
  'densenet161': densenet_jax.DenseNet161,
  'densenet169': densenet_jax.DenseNet169,
  'densenet201': densenet_jax.DenseNet201,
  'densenet264': densenet_jax.DenseNet264,
}


def optional_module(name: str):
  """Imports an optional test dependency: skipped if missing, but a failure under CI=true.

  .ci/run installs every optional dependency, so in CI a missing one is a broken install,
  not a reason to skip.
  """
  if os.environ.get('CI'):
    return importlib.import_module(name)
  return pytest.importorskip(name, reason=f'needs {name} (.ci/run installs it)')


def import_over_cpu_torch(name: str):
  """torchvision or timm (which imports torchvision) over the pinned CPU torch (see optional_module).

  torchvision's wheel is CUDA-built; over the CPU torch it imports once
  `torch.library.register_fake` is a no-op decorator (none of DenseNet's ops use it).
  """
  torch = optional_module('torch')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(torch.library, 'register_fake', lambda *args, **kwargs: lambda fn: fn)
    return optional_module(name)


@pytest.fixture(scope='session')
def torchvision_reference() -> dict:
  """torchvision_densenet.json: counts, state-dict shapes and feature shapes per preset."""
  return json.loads((DATA / 'torchvision_densenet.json').read_text())['models']


@pytest.fixture(scope='session')
def tiny_reference() -> dict[str, np.ndarray]:
  """tiny_densenet_torchvision.npz: a tiny torchvision DenseNet, its outputs and one SGD step."""
  with np.load(DATA / 'tiny_densenet_torchvision.npz') as npz:
    return dict(npz)


@pytest.fixture(scope='session')
def tiny_model() -> densenet_jax.DenseNet:
  """The tiny reference network's configuration (see tiny_densenet_torchvision.json)."""
  kwargs = json.loads((DATA / 'tiny_densenet_torchvision.json').read_text())[
    'torchvision.models.DenseNet kwargs'
  ]
  return densenet_jax.DenseNet(
    growth_rate=kwargs['growth_rate'],
    block_config=tuple(kwargs['block_config']),
    num_init_features=kwargs['num_init_features'],
    bn_size=kwargs['bn_size'],
    drop_rate=kwargs['drop_rate'],
    num_classes=kwargs['num_classes'],
  )


def section(reference: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """The arrays under `prefix/` in the tiny reference, keyed by torchvision key."""
  return {k[len(prefix) + 1 :]: v for k, v in reference.items() if k.startswith(prefix + '/')}


def max_relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected| (the issues' 'relative')."""
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def train_step_outputs(model, variables, images, labels):
  """loss, logits, batch_stats updates and gradients of one jitted train-mode forward/backward
  of a Linen DenseNet (mean cross-entropy over integer labels)."""

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return loss, logits, updates['batch_stats'], grads


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data_dir with sklearn_digits prepared (from scikit-learn's own files: offline)."""
  tfds = optional_module('tensorflow_datasets')
  import densenet_jax.train.datasets  # noqa: F401  (registers sklearn_digits)

  data_dir = tmp_path_factory.mktemp('tensorflow_datasets')
  tfds.builder('sklearn_digits', data_dir=str(data_dir)).download_and_prepare()
  return data_dir


def train_env(devices: int, env: dict | None) -> dict:
  return {
    **os.environ,
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
    'JAX_PLATFORMS': 'cpu',
    'JAX_COMPILATION_CACHE_DIR': str(XLA_CACHE),
    **(env or {}),
  }


def run_train(*args: str, devices: int = 1, env: dict | None = None, timeout: float = 900):
  """`python train.py ARGS` in a fresh process with `devices` CPU devices; the CompletedProcess.

  Pass --config.compilation_cache_dir={XLA_CACHE}: the default path, with the session's XLA cache.
  """
  return subprocess.run(
    [sys.executable, str(REPO / 'train.py'), *args],
    cwd=REPO,
    env=train_env(devices, env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# `python` with SIGINT at its default, as at a terminal: a background process of a non-interactive
# shell starts with it ignored (and Python then installs no KeyboardInterrupt handler), so a test's
# Ctrl-C would not land. The exec keeps the default; a preexec_fn would fork a threaded process.
PYTHON_WITH_SIGINT = [
  sys.executable,
  '-c',
  'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
  'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])',
]


def start_train(args, log_path, devices: int = 1, env: dict | None = None) -> subprocess.Popen:
  """`python train.py ARGS` started in the background, stdout and stderr to `log_path`."""
  with open(log_path, 'w') as log:
    return subprocess.Popen(
      [*PYTHON_WITH_SIGINT, str(REPO / 'train.py'), *args],
      cwd=REPO,
      env=train_env(devices, env),
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def quick(config, data_dir, **overrides):
  """`config` shortened to a few steps (batches of 8), logging every step, no progress bar."""
  config.data_dir = str(data_dir)
  config.batch_size = config.eval_batch_size = 8
  config.total_steps = 3
  config.log_every_steps = 1
  config.progress_bar = False
  config.compilation_cache_dir = ''
  config.update(overrides)
  return config


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  """WORKDIR/metrics.jsonl as a list of records."""
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def pytest_unconfigure(config):
  """The run's XLA cache goes with the run, removed by the process that made it (not a worker)."""
  if not hasattr(config, 'workerinput'):
    shutil.rmtree(XLA_CACHE, ignore_errors=True)


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


@dataclasses.dataclass
class Bucket:
  name: str
  env: dict[str, str]  # What points each client of a train.py process at the emulator.
  fs: object  # gcsfs, for the test's own reads.

  def read(self, path: str) -> bytes:
    return self.fs.cat(f'{self.name}/{path}')

  def exists(self, path: str) -> bool:
    self.fs.invalidate_cache()
    return self.fs.exists(f'{self.name}/{path}')


@pytest.fixture
def gcs_bucket(tmp_path):
  """A bucket in a local GCS server (tests/gcs_emulator.py), and the environment that reaches it.

  Orbax's arrays go through tensorstore (TENSORSTORE_GCS_HTTP_URL); every other file through
  etils.epath, here on its fsspec backend, gcsfs (STORAGE_EMULATOR_HOST): the backend it takes
  where TensorFlow is installed, tf.io.gfile, has GCS's endpoint built in (EPATH_USE_TF=false).
  """
  # gcsfs's newer file system first asks GCS's control API (gRPC, which the emulator lacks) for
  # the bucket's layout, and waits 60 s for each answer: the plain one is what the emulator serves.
  no_layout_lookup = {'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  os.environ.update(no_layout_lookup)  # before gcsfs is imported
  gcsfs = optional_module('gcsfs')
  optional_module('gcp_storage_emulator')
  port, name = free_port(), 'densenet-jax-test'
  url = f'http://localhost:{port}'
  with open(tmp_path / 'emulator.log', 'w') as log:
    server = subprocess.Popen(
      [sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), str(port), name], stdout=log, stderr=log
    )
  try:
    deadline = time.monotonic() + 900
    while True:
      try:
        socket.create_connection(('localhost', port), timeout=1).close()
        break
      except OSError:
        assert time.monotonic() < deadline and server.poll() is None, (tmp_path / 'emulator.log').read_text()
        time.sleep(0.1)
    env = {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url}
    env.update(no_layout_lookup)
    yield Bucket(name, env, gcsfs.GCSFileSystem(endpoint_url=url, token='anon'))
  finally:
    server.kill()
    server.wait()
