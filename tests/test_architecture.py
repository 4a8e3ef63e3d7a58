"""Full-size architectures equal torchvision's and the paper's, checked with jax.eval_shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PRESETS

import densenet_jax


def abstract_variables(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(shape))


def num_elements(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_counts_and_shapes_equal_torchvision(name, torchvision_reference):
  reference = torchvision_reference[name]
  model = PRESETS[name]()
  variables = abstract_variables(model, (1, 224, 224, 3))

  assert num_elements(variables['params']) == reference['num_params']
  num_batchnorms = sum(k.endswith('num_batches_tracked') for k in reference['state_dict_shapes'])
  assert num_elements(variables['batch_stats']) == reference['num_buffers'] - num_batchnorms

  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((2, 224, 224, 3)))
  assert logits.shape == tuple(reference['output_shape_224_batch2'])

  features = jax.eval_shape(
    functools.partial(model.clone(features_only=True).apply, train=False),
    variables,
    jnp.zeros((1, 224, 224, 3)),
  )
  expected = {k: (n, h, w, c) for k, (n, c, h, w) in reference['feature_shapes_224_batch1'].items()}
  assert {k: v.shape for k, v in features.items()} == expected


# The paper's Table 2 (C10, 10 classes): (depth, growth rate, BC) -> parameters in millions.
PAPER_CIFAR_PARAMS = {
  (40, 12, False): 1.0,
  (100, 12, False): 7.0,
  (100, 24, False): 27.2,
  (100, 12, True): 0.8,
  (250, 24, True): 15.3,
  (190, 40, True): 25.6,
}


@pytest.mark.parametrize(('depth', 'growth_rate', 'bc'), sorted(PAPER_CIFAR_PARAMS))
def test_cifar_nets_have_the_papers_parameter_counts(depth, growth_rate, bc):
  model = densenet_jax.densenet_cifar(depth, growth_rate, bc=bc, num_classes=10)
  variables = abstract_variables(model, (1, 32, 32, 3))
  millions = num_elements(variables['params']) / 1e6
  assert round(millions, 1) == PAPER_CIFAR_PARAMS[depth, growth_rate, bc]
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((5, 32, 32, 3)))
  assert logits.shape == (5, 10)


def test_cifar_layout():
  """DenseNet-BC-100 k=12: 16 bottleneck layers a block, 2k stem, halving transitions."""
  model = densenet_jax.densenet_cifar(100, 12, bc=True)
  assert model.block_config == (16, 16, 16)
  variables = abstract_variables(model, (1, 32, 32, 3))
  params = variables['params']
  assert params['conv0']['kernel'].shape == (3, 3, 3, 24)
  assert params['denseblock1']['denselayer1']['conv1']['kernel'].shape == (1, 1, 24, 48)
  assert params['transition1']['conv']['kernel'].shape == (1, 1, 24 + 16 * 12, (24 + 16 * 12) // 2)
  plain = abstract_variables(densenet_jax.densenet_cifar(40, 12, bc=False), (1, 32, 32, 3))
  layer = plain['params']['denseblock1']['denselayer1']
  assert set(layer) == {'norm1', 'conv1'} and layer['conv1']['kernel'].shape == (3, 3, 16, 12)


def test_grayscale_and_any_channel_count():
  model = densenet_jax.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3)
  x = jnp.ones((2, 40, 40, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  assert variables['params']['conv0']['kernel'].shape == (7, 7, 1, 8)
  assert model.apply(variables, x, train=False).shape == (2, 3)


def test_train_updates_running_averages_and_eval_uses_them(tiny_model):
  x = jax.random.normal(jax.random.key(1), (4, 48, 48, 3))
  variables = tiny_model.init(jax.random.key(0), x, train=False)
  _, updates = tiny_model.apply(variables, x, train=True, mutable=['batch_stats'])
  before, after = variables['batch_stats']['norm0'], updates['batch_stats']['norm0']
  assert not np.allclose(before['mean'], after['mean'])
  eval_before = tiny_model.apply(variables, x, train=False)
  eval_after = tiny_model.apply({**variables, **updates}, x, train=False)
  assert not np.allclose(eval_before, eval_after)
  # Eval mode is a pure function of the variables: nothing to mutate.
  np.testing.assert_array_equal(eval_before, tiny_model.apply(variables, x, train=False))


def test_dropout_is_active_in_training_only(tiny_model):
  model = tiny_model.clone(drop_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
  variables = model.init(jax.random.key(0), x, train=False)

  def train_logits(seed):
    return model.apply(
      variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(seed)}
    )[0]

  assert not np.allclose(train_logits(0), train_logits(1))
  np.testing.assert_array_equal(train_logits(2), train_logits(2))
  np.testing.assert_array_equal(
    model.apply(variables, x, train=False), tiny_model.apply(variables, x, train=False)
  )


def test_pointwise_conv_is_a_1x1_conv():
  """The CPU set's 1x1 convolution (a dot): the same parameter, init and output as nn.Conv."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 24))
  conv = densenet_jax.models.nn.Conv(
    40, (1, 1), use_bias=False, kernel_init=densenet_jax.models.conv_kernel_init
  )
  pointwise = densenet_jax.ops.cpu_conv.Conv(40, 1, kernel_init=densenet_jax.models.conv_kernel_init)
  conv_params = conv.init(jax.random.key(1), x)
  pointwise_params = pointwise.init(jax.random.key(1), x)
  np.testing.assert_array_equal(conv_params['params']['kernel'], pointwise_params['params']['kernel'])
  np.testing.assert_allclose(
    pointwise.apply(conv_params, x), conv.apply(conv_params, x), rtol=1e-5, atol=1e-6
  )
  bf16 = densenet_jax.ops.cpu_conv.Conv(40, 1, dtype=jnp.bfloat16).apply(conv_params, x)
  assert bf16.dtype == jnp.bfloat16
