"""Bad input raises ValueError naming the problem and the fix."""

import functools

import jax
import jax.numpy as jnp
import pytest

import densenet_jax


def init_abstract(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize('shape', [(224, 224, 3), (1, 1, 224, 224, 3), (224, 224)])
def test_wrong_rank(shape):
  with pytest.raises(ValueError, match=r'NHWC.*x\[None\]'):
    init_abstract(densenet_jax.DenseNet121(), shape)


def test_wrong_channel_count_for_the_initialized_params(tiny_model):
  variables = tiny_model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)), train=False)
  with pytest.raises(ValueError, match=r'1 channels.*initialized for 3-channel input.*repeat grayscale'):
    tiny_model.apply(variables, jnp.zeros((1, 48, 48, 1)), train=False)
  # A torch-layout NCHW batch is the common way to get there: the message says how to fix it.
  with pytest.raises(ValueError, match=r'48 channels.*NCHW to NHWC'):
    tiny_model.apply(variables, jnp.zeros((1, 3, 48, 48)), train=False)


def test_image_too_small_for_the_downsampling():
  model = densenet_jax.DenseNet121()
  with pytest.raises(ValueError, match=r'height 16 is too small.*transition3.*at least 29x29'):
    init_abstract(model, (1, 16, 16, 3))
  init_abstract(model, (1, 29, 29, 3))  # The size named in the message works...
  with pytest.raises(ValueError, match='width 28 is too small'):
    init_abstract(model, (1, 224, 28, 3))  # ...and one pixel less does not.
  assert densenet_jax.densenet_cifar(100, 12).min_input_size() == 4


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'growth_rate': 0}, 'growth_rate must be a positive integer, got 0'),
    ({'growth_rate': -32}, 'growth_rate must be a positive integer'),
    ({'block_config': ()}, r'block_config must be a non-empty sequence.*e\.g\. \(6, 12, 24, 16\)'),
    ({'block_config': 6}, 'block_config must be a non-empty sequence'),
    ({'block_config': (6, 0)}, 'every entry of block_config must be a positive integer'),
    ({'compression': 0.0}, r'compression must be in \(0, 1\]'),
    ({'drop_rate': 1.0}, r'drop_rate must be in \[0, 1\)'),
    ({'stem': 'resnet'}, "stem must be 'imagenet', 'deep' or 'cifar'"),
    ({'stem': 'cifar', 'blur_pool': True}, "the 'cifar' stem has none: use stem='deep' or 'imagenet'"),
    ({'num_classes': 0}, 'num_classes must be a positive integer'),
  ],
)
def test_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    densenet_jax.DenseNet(**kwargs)


@pytest.mark.parametrize(('depth', 'bc'), [(41, False), (102, True), (43, True), (4, False), (7, True)])
def test_cifar_depth_that_does_not_fit_the_rule(depth, bc):
  with pytest.raises(ValueError, match=rf'depth {depth} does not fit the CIFAR DenseNet.*rule.*use one of'):
    densenet_jax.densenet_cifar(depth, 12, bc=bc)
