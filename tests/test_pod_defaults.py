"""What a pod or an accelerator host gets by default: one host round-trip per evaluation, batches
in the compute dtype, a per-device batch, no glibc re-exec off the CPU, and TensorBoard files that
TensorBoard reads."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO, optional_module

from configs import digits, gpu, tpu
from densenet_jax.train import (
  distributed,
  input_pipeline,
  loop,
  registry,
  setup,
  sharding,
  steps,
  traced_step,
)

tfds = optional_module('tensorflow_datasets')


def digits_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = digits.get_config()
  config.data_dir = str(data_dir)
  config.model_kwargs.depth = 10  # one layer per block: compiles in seconds
  config.update(overrides)
  return config


def test_an_evaluation_fetches_its_metrics_from_the_devices_once(digits_data_dir, monkeypatch):
  config = digits_config(digits_data_dir, eval_batch_size=40)  # 9 batches for 359 images
  s = setup.setup(config, '/unused')
  state = s.create_state()
  eval_fn = traced_step.jit_eval_step(s.config, s.replicated, s.data_sharding)
  fetches = []
  to_host = sharding.to_host

  def counted_to_host(tree):
    fetches.append(tree)
    with jax.transfer_guard_device_to_host('allow'):
      return to_host(tree)

  monkeypatch.setattr(loop, 'to_host', counted_to_host)
  with jax.transfer_guard_device_to_host('disallow'):  # any other fetch raises
    metrics = loop.evaluate_state(s, eval_fn, state)
  assert s.spec.eval_steps == 9 and len(fetches) == 1
  assert metrics['test_examples'] == 359 and 0 <= metrics['test_top1'] <= 1


@pytest.mark.parametrize('half_precision', [False, True])
def test_batches_leave_the_host_as_uint8_pixels_that_the_steps_normalise(digits_data_dir, half_precision):
  config = digits_config(digits_data_dir, half_precision=half_precision)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.data_spec(config, builder, 1)
  train = next(input_pipeline.train_iterator(config, builder, spec, 0, 0, 1))
  evaluation = next(input_pipeline.eval_iterator(config, builder, spec, 0, 1))
  assert train['image'].dtype == evaluation['image'].dtype == np.uint8  # a quarter of float32's bytes
  expected = (train['image'].astype(np.float32) - np.float32(config.mean)) / np.float32(config.std)
  np.testing.assert_allclose(steps.normalize(train['image'], config.mean, config.std), expected, rtol=1e-6)


def test_a_per_device_batch_sets_the_global_batches(digits_data_dir):
  s = setup.setup(digits_config(digits_data_dir, per_device_batch_size=16), '/unused')
  assert s.config.batch_size == s.config.eval_batch_size == 16 * jax.device_count()
  for module in (tpu, gpu):
    config = module.get_config()
    assert config.half_precision and config.per_device_batch_size > 0 and config.prefetch_to_device >= 1


@pytest.mark.parametrize(
  'platforms, plugin, expected',
  [
    ('', None, True),
    ('cpu', None, True),
    ('tpu', None, False),
    ('cuda,cpu', None, False),
    ('', 'libtpu', False),
  ],
)
def test_the_huge_page_re_exec_is_only_for_the_cpu(tmp_path, platforms, plugin, expected):
  """train.py re-executes itself with glibc huge pages only where JAX will run on the CPU."""
  if plugin:  # what `pip install 'jax[tpu]'` puts on the path
    (tmp_path / plugin).mkdir()
    (tmp_path / plugin / '__init__.py').write_text('')
  env = {**os.environ, 'JAX_PLATFORMS': platforms, 'PYTHONPATH': str(tmp_path)}
  code = 'import train; print(train.runs_on_cpu())'
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == str(expected)


def test_tensorboard_reads_the_event_files(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from densenet_jax.train.reporting import TensorBoardScalars

  first = TensorBoardScalars(tmp_path, start_step=0)
  for step in (1, 2, 3):
    first.scalar('train_loss', 1.0 / step, step)
  first.close()
  # A run resumed from step 2: TensorBoard drops what the first file logged after it.
  resumed = TensorBoardScalars(tmp_path, start_step=2)
  resumed.path = resumed.path.with_name(resumed.path.name + '.resumed')  # the same second
  resumed.scalar('train_loss', 0.25, 3)
  resumed.close()
  events = EventAccumulator(str(tmp_path))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('train_loss')] == [(1, 1.0), (2, 0.5), (3, 0.25)]


@pytest.mark.parametrize(
  'env', [{'JAX_NUM_PROCESSES': '2'}, {'JAX_COORDINATOR_ADDRESS': 'localhost:1234', 'JAX_PROCESS_ID': '0'}]
)
def test_a_partly_told_multi_process_run_is_one_error_line_naming_what_is_missing(monkeypatch, env):
  for name in distributed.DISTRIBUTED_ENVIRONMENT:
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(
    registry.ConfigError, match=r'needs the coordinator.*JAX_COORDINATOR_ADDRESS, JAX_NUM_PRO'
  ):
    distributed.initialize_distributed(digits.get_config())
