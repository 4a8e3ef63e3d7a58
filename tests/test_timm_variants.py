"""timm's DenseNet variants (a deep stem; blur pooling): timm's weights in, ours out, the same logits.

timm installs with --no-deps beside the pinned CPU torch; like torchvision (which it imports) it
needs `torch.library.register_fake` as a no-op decorator. Numerics on tiny variants (random weights,
BatchNorm state moved away from its init); the full-size models key for key and shape for shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNELS, import_over_cpu_torch, max_relative_error, optional_module

import densenet_jax
from densenet_jax.torchvision_port import expected_variable_shapes, to_torch_keys

torch = optional_module('torch')


@pytest.fixture(scope='module')
def timm():
  return import_over_cpu_torch('timm')


# (timm DenseNet kwargs, our DenseNet kwargs) of a tiny network with each variant's stem.
TINY = {
  'deep stem': (
    {'stem_type': 'deep'},
    {'stem': 'deep'},
  ),
  'deep stem, blur pool': (
    {'stem_type': 'deep', 'aa_layer': 'blur'},
    {'stem': 'deep', 'blur_pool': True},
  ),
}


def tiny_timm(timm, variant: str):
  timm_kwargs, _ = TINY[variant]
  if timm_kwargs.get('aa_layer') == 'blur':
    timm_kwargs = {**timm_kwargs, 'aa_layer': timm.layers.BlurPool2d}
  torch.manual_seed(0)
  model = timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 3), num_classes=7, **timm_kwargs)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():  # Running statistics and affine parameters away from their init.
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
        module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
  return model.eval()


def ours(variant: str, kernels: str = 'auto') -> densenet_jax.DenseNet:
  return densenet_jax.DenseNet(
    growth_rate=8,
    block_config=(2, 3),
    num_init_features=16,
    num_classes=7,
    kernels=kernels,
    **TINY[variant][1],
  )


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('variant', list(TINY))
def test_timm_weights_give_timms_eval_logits(timm, variant, kernels):
  theirs = tiny_timm(timm, variant)
  images = np.random.default_rng(0).normal(size=(2, 3, 40, 40)).astype(np.float32)
  with torch.no_grad():
    expected = theirs(torch.from_numpy(images)).numpy()
  model = ours(variant, kernels)
  variables = densenet_jax.from_torchvision(theirs.state_dict(), model)  # every key and shape checked
  logits = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=False)
  # float32 rounding in another summation order, relative to the largest logit.
  assert max_relative_error(logits, expected) < 1e-5
  assert densenet_jax.config_from_variables(variables)['stem'] == 'deep'


@pytest.mark.parametrize('variant', list(TINY))
def test_our_weights_load_strictly_into_timm_and_give_our_logits(timm, variant):
  model = ours(variant)
  images = np.random.default_rng(2).normal(size=(2, 40, 40, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)), train=False)
  variables['batch_stats'] = jax.tree.map(
    lambda x: x + 0.3 * np.abs(np.random.default_rng(3).normal(size=x.shape)).astype(np.float32),
    variables['batch_stats'],
  )
  theirs = tiny_timm(timm, variant)
  theirs.load_state_dict({k: torch.from_numpy(v) for k, v in densenet_jax.to_torchvision(variables).items()})
  with torch.no_grad():
    expected = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  logits = model.apply(variables, jnp.asarray(images), train=False)
  assert max_relative_error(logits, expected) < 1e-5


@pytest.mark.parametrize(
  ('name', 'preset'),
  [('densenet264d', densenet_jax.DenseNet264d), ('densenetblur121d', densenet_jax.DenseNetBlur121d)],
)
def test_the_full_size_variants_have_timms_keys_and_shapes(timm, name, preset):
  with torch.device('meta'):  # shapes only: no memory, no init
    state_dict = timm.create_model(name, pretrained=False).state_dict()
  theirs = {k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  flat = jax.tree_util.tree_leaves_with_path(
    expected_variable_shapes(preset()), is_leaf=lambda x: isinstance(x, tuple)
  )
  ours = {}
  for path, shape in flat:
    flax_path = '/'.join(entry.key for entry in path)
    (key,) = to_torch_keys([flax_path])
    ours[key] = shape
  assert ours.keys() == theirs.keys()
  for key, shape in ours.items():
    expected = theirs[key]
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:
      shape = (shape[1], shape[0])
    assert shape == expected, key
