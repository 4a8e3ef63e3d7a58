"""BatchNorm across devices (`axis_name`): N devices of B/N images equal one device of B images.

The checks run in one subprocess with 4 CPU devices and float64 (tests/across_devices.py), for
every kernel set, with and without `memory_efficient`, under `jax.pmap` and `jax.shard_map`, for
the Linen and the NNX model (`densenet_jax.nnx`, also sharded over a `Mesh` with `nnx.jit`).
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import KERNELS, REPO

# One process with 4 devices that compiles each check for each kernel set: the full suite. One
# pytest-xdist worker runs the module and the fixture is per session, so that the process runs once
# (a module fixture is set up again whenever a worker runs another module's test in between).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('across_devices')]


@pytest.fixture(scope='session')
def results() -> dict:
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
    'JAX_PLATFORMS': 'cpu',
    'JAX_ENABLE_X64': '1',
    'PYTHONPATH': str(REPO),
  }
  worker = subprocess.run(
    [sys.executable, str(REPO / 'tests' / 'across_devices.py')],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert worker.returncode == 0, worker.stderr[-3000:]
  return json.loads(worker.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('memory_efficient', [False, True], ids=['plain', 'memory-efficient'])
@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('mapping', ['pmap', 'shard_map'])
def test_devices_with_axis_name_equal_one_device_on_the_global_batch(
  results, kernels, memory_efficient, mapping
):
  # Logits, updated running averages, and the gradients of the loss averaged over the global batch
  # (each device's gradient of its own mean loss, pmean-ed), against one device on all 8 images.
  measured = results[kernels + ('-memory-efficient' if memory_efficient else '')][mapping]
  print(mapping, kernels, memory_efficient, measured)
  assert measured['logits'] < 1e-12
  assert measured['batch_stats'] < 1e-12
  assert measured['grads'] < 1e-10  # Summed in another order: up to 3.4e-13 measured, float64.


@pytest.mark.parametrize('memory_efficient', [False, True], ids=['plain', 'memory-efficient'])
@pytest.mark.parametrize('kernels', KERNELS)
def test_axis_index_groups_share_statistics_within_each_group(results, kernels, memory_efficient):
  # 4 devices in 2 groups of 2: each group normalises as one device on the group's 4 images.
  measured = results[kernels + ('-memory-efficient' if memory_efficient else '')]['groups']
  assert measured['logits'] < 1e-12
  assert measured['batch_stats'] < 1e-12
  assert measured['grads'] < 1e-10


@pytest.mark.parametrize('kernels', KERNELS)
def test_without_axis_name_each_device_normalises_its_own_images(results, kernels):
  measured = results[kernels]['per_device']
  assert measured['logits'] < 1e-12  # Each device as one device on its 2 images alone...
  assert measured['differs_from_global'] > 1e-2  # ... which is not the global batch's normalisation.


@pytest.mark.parametrize('kernels', KERNELS)
def test_a_flax_imagenet_style_pmap_step_trains_like_our_jit_step(results, kernels):
  """Flax's examples/imagenet train step (pmap, TrainState, pmean of gradients) with our model.

  Two steps against `densenet_jax.steps.train_step` (what train.py runs) jitted on the global batch:
  the same losses, parameters and running averages. Our step computes the loss in float32 (as it
  must for bfloat16 logits), hence agreement to float32 rounding in this float64 model (3.8e-8
  measured).
  """
  measured = results[f'{kernels}-flax-imagenet-step']
  assert measured['loss'] < 1e-6
  assert measured['params'] < 1e-6
  assert measured['batch_stats'] < 1e-6
  assert measured['batch_stats_spread'] == 0.0  # Every device holds the same running averages.


@pytest.mark.parametrize('memory_efficient', [False, True], ids=['plain', 'memory-efficient'])
@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('mapping', ['mesh', 'shard_map'])
def test_nnx_model_across_devices_equals_one_device_on_the_global_batch(
  results, kernels, memory_efficient, mapping
):
  """densenet_jax.nnx: over a Mesh with nnx.jit (a sharded batch), or under shard_map with axis_name
  (nnx.split / nnx.merge), the logits, running averages and gradients of the Linen model on one device."""
  measured = results[kernels + ('-memory-efficient' if memory_efficient else '') + '-nnx'][mapping]
  print(mapping, kernels, memory_efficient, measured)
  assert measured['logits'] < 1e-12
  assert measured['batch_stats'] < 1e-12
  assert measured['grads'] < 1e-10  # Summed in another order, as for Linen.
