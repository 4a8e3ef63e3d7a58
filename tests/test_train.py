"""The trainer end to end: the configs on mock data, init_from, eval mode, devices, the quickstart."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from conftest import DATA, XLA_CACHE, optional_module, quick, read_metrics, run_train, section, start_train

from configs import cifar10, densenet121
from densenet_jax import convert, from_torchvision
from densenet_jax.models import DenseNet
from densenet_jax.train import loop, registry, setup, sharding

tfds = optional_module('tensorflow_datasets')

# A DenseNet small enough to compile in seconds, for runs of the full-size configs.
TINY = {'growth_rate': 4, 'block_config': (1, 1), 'num_init_features': 8, 'bn_size': 2}


@pytest.mark.parametrize('config_module', [cifar10, densenet121], ids=['cifar10', 'imagenet2012'])
def test_config_trains_end_to_end_on_mock_data(tmp_path, config_module):
  config = quick(config_module.get_config(), tmp_path / 'data')
  if config_module is densenet121:  # The real config's pipeline (224x224 inception crops), a tiny net.
    config.model = 'densenet'
    config.model_kwargs = ml_collections.ConfigDict(TINY)
  else:  # DenseNet-BC with one layer per block.
    config.model_kwargs.depth = 10
  with tfds.testing.mock_data(num_examples=20):
    final = loop.train_and_evaluate(config, tmp_path / 'run')
  assert final['step'] == 3 and final['test_examples'] == 20
  assert np.isfinite(final['train_loss']) and 0 <= final['test_top1'] <= final['test_top5'] <= 1
  assert json.loads((tmp_path / 'run' / 'final_metrics.json').read_text()) == final
  assert [r['step'] for r in read_metrics(tmp_path / 'run') if 'train_loss' in r] == [1, 2, 3]
  for name in ('curves.png', 'config.json', 'checkpoints/3/state', 'tensorboard'):
    assert (tmp_path / 'run' / name).exists(), name
  # The last checkpoint evaluates to the same figures (mode=eval).
  config.mode = 'eval'
  with tfds.testing.mock_data(num_examples=20):
    evaluated = loop.evaluate(config, tmp_path / 'run')
  assert evaluated['step'] == 3
  for key in ('test_loss', 'test_top1', 'test_top5'):
    assert evaluated[key] == pytest.approx(final[key], rel=1e-6)


def test_training_starts_from_a_converted_torchvision_checkpoint(tmp_path, tiny_model, tiny_reference):
  variables = from_torchvision(section(tiny_reference, 'state_dict'), tiny_model)
  convert.save_checkpoint(tmp_path / 'tiny_torchvision', tiny_model, variables)
  config = quick(cifar10.get_config(), tmp_path / 'data', init_from=str(tmp_path / 'tiny_torchvision'))
  config.model = 'densenet'
  config.model_kwargs = ml_collections.ConfigDict(
    json.loads((DATA / 'tiny_densenet_torchvision.json').read_text())['torchvision.models.DenseNet kwargs']
  )
  config.model_kwargs.block_config = tuple(config.model_kwargs.block_config)
  del config.model_kwargs['num_classes']  # The data's: cifar10, 10 classes, as the tiny net's.
  with tfds.testing.mock_data(num_examples=20):
    built = setup.setup(config, tmp_path / 'run')
    loaded = setup.load_init_from(built, built.create_state())
    final = loop.train_and_evaluate(config, tmp_path / 'run')
  # It starts from torchvision's weights exactly...
  for ours, theirs in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(variables['params']), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), theirs)
  assert sharding.param_checksum(loaded.params) == pytest.approx(sharding.param_checksum(variables['params']))
  # ...and trains from there.
  assert final['step'] == 3 and np.isfinite(final['train_loss'])
  assert final['param_checksum'] != pytest.approx(sharding.param_checksum(variables['params']), rel=1e-9)


def test_init_from_another_architecture_is_refused(tmp_path, tiny_model, tiny_reference):
  variables = from_torchvision(section(tiny_reference, 'state_dict'), tiny_model)
  convert.save_checkpoint(tmp_path / 'tiny_torchvision', tiny_model, variables)
  config = quick(cifar10.get_config(), tmp_path / 'data', init_from=str(tmp_path / 'tiny_torchvision'))
  config.model_kwargs.depth = 10
  with tfds.testing.mock_data(num_examples=20), pytest.raises(registry.ConfigError, match='does not fit'):
    loop.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_classifier_of_another_class_count_is_reinitialized(tmp_path, tiny_reference):
  model = DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=10)
  convert.save_checkpoint(
    tmp_path / 'ckpt', model, from_torchvision(section(tiny_reference, 'state_dict'), model)
  )
  config = quick(
    cifar10.get_config(), tmp_path / 'data', init_from=str(tmp_path / 'ckpt'), dataset='cifar100'
  )
  config.model = 'densenet'
  config.model_kwargs = ml_collections.ConfigDict(
    {'growth_rate': 8, 'block_config': (2, 3, 2), 'num_init_features': 16}
  )
  with tfds.testing.mock_data(num_examples=20):
    built = setup.setup(config, tmp_path / 'run')
    fresh = built.create_state()
    loaded = setup.load_init_from(built, fresh)
  assert loaded.params['classifier']['kernel'].shape[1] == 100
  np.testing.assert_array_equal(loaded.params['classifier']['kernel'], fresh.params['classifier']['kernel'])
  np.testing.assert_array_equal(
    loaded.params['conv0']['kernel'],
    from_torchvision(section(tiny_reference, 'state_dict'))['params']['conv0']['kernel'],
  )


@pytest.mark.slow
def test_eight_devices_train_exactly_like_one(tmp_path, digits_data_dir):
  """The digits config, 2 epochs and an eval, in float64 on 1 and on 8 devices: the same losses.

  In float32 the two differ from the 2nd step on by rounding (the batch sums are split
  differently), and this training amplifies any 1e-7 difference to 1e-4 within a few steps
  (README, "Data parallelism"); float64 shows the computations are the same.
  """
  processes = {
    devices: start_train(
      [
        '--config=configs/digits.py',
        f'--workdir={tmp_path / f"devices{devices}"}',
        f'--config.data_dir={digits_data_dir}',
        '--config.model_kwargs.depth=16',  # 2 layers per block: the devices are the point
        '--config.total_steps=44',
        '--config.log_every_steps=1',
        '--config.dtype=float64',
        '--config.param_dtype=float64',
        '--config.progress_bar=False',
        f'--config.compilation_cache_dir={XLA_CACHE}',
      ],
      tmp_path / f'devices{devices}.log',
      devices=devices,
      env={'JAX_ENABLE_X64': '1'},
    )
    for devices in (1, 8)
  }
  runs = {}
  for devices, process in processes.items():
    log = (tmp_path / f'devices{devices}.log').read_text() if process.wait(timeout=900) else ''
    assert process.returncode == 0, log[-3000:]
    assert f'over {devices} devices' in (tmp_path / f'devices{devices}.log').read_text()
    workdir = tmp_path / f'devices{devices}'
    runs[devices] = read_metrics(workdir), json.loads((workdir / 'final_metrics.json').read_text())
  losses = {d: np.array([r['train_loss'] for r in runs[d][0] if 'train_loss' in r]) for d in runs}
  assert len(losses[1]) == 44
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
  for key in ('test_loss', 'test_top1', 'param_checksum'):
    assert runs[8][1][key] == pytest.approx(runs[1][1][key], rel=1e-5), key


@pytest.mark.slow
def test_digits_quickstart_reaches_98_percent(tmp_path, digits_data_dir):
  """The README's main command, as is (30 epochs, about a minute on 2 cores)."""
  result = run_train(
    '--config=configs/digits.py',
    f'--workdir={tmp_path}',
    f'--config.data_dir={digits_data_dir}',
    f'--config.compilation_cache_dir={XLA_CACHE}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((tmp_path / 'final_metrics.json').read_text())
  assert final['step'] == 30 * 22 and final['test_examples'] == 359
  assert final['test_top1'] >= 0.98, final


def test_learning_rate_schedules_follow_the_config():
  config = densenet121.get_config()
  config.batch_size = 512  # lr 0.1 per 256 images -> 0.2
  step = registry.learning_rate_schedule(config, steps_per_epoch=100, total_steps=9000)
  assert [float(step(s)) for s in (0, 2999, 3000, 5999, 6000, 8999)] == pytest.approx(
    [0.2, 0.2, 0.02, 0.02, 0.002, 0.002]
  )
  config.schedule, config.warmup_epochs = 'cosine', 5
  cosine = registry.learning_rate_schedule(config, steps_per_epoch=100, total_steps=9000)
  assert float(cosine(0)) == 0 and float(cosine(250)) == pytest.approx(0.1)
  assert float(cosine(500)) == pytest.approx(0.2) and float(cosine(9000)) == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize('decay_norm_and_bias', [True, False])
def test_weight_decay_masking(decay_norm_and_bias):
  config = densenet121.get_config()
  config.weight_decay_norm_and_bias = decay_norm_and_bias
  tx = registry.create_optimizer(config, lambda step: 1.0)
  params = {'conv0': {'kernel': np.ones((3, 3))}, 'norm0': {'scale': np.ones(3), 'bias': np.ones(3)}}
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  # First Nesterov step with zero gradients: -lr x (1 + momentum) x weight_decay x w.
  decay = -1.0 * 1.9 * 1e-4
  assert float(updates['conv0']['kernel'][0, 0]) == pytest.approx(decay)
  expected = decay if decay_norm_and_bias else 0.0
  assert float(updates['norm0']['scale'][0]) == pytest.approx(expected)
  assert float(updates['norm0']['bias'][0]) == pytest.approx(expected)


def test_half_precision_trains_with_float32_parameters(tmp_path):
  config = quick(cifar10.get_config(), tmp_path / 'data', half_precision=True)
  config.model_kwargs.depth = 10
  with tfds.testing.mock_data(num_examples=20):
    built = setup.setup(config, tmp_path / 'run')
    final = loop.train_and_evaluate(config, tmp_path / 'run')
  assert built.model.dtype == jax.numpy.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(built.abstract_state.params)} == {np.dtype('float32')}
  assert final['step'] == 3 and np.isfinite(final['train_loss']) and np.isfinite(final['test_loss'])
