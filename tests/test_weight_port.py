"""torchvision state dicts of every preset cross to Flax and back exactly; bad ones are named."""

import jax
import numpy as np
import pytest
from conftest import PRESETS, section

import densenet_jax
from densenet_jax import StateDictError, config_from_variables, from_torchvision, to_torchvision


def random_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
  """A state dict with torchvision's keys and shapes and random values."""
  rng = np.random.default_rng(seed)
  return {
    key: rng.integers(0, 1000, shape).astype(np.int64)
    if key.endswith('num_batches_tracked')
    else rng.standard_normal(shape).astype(np.float32)
    for key, shape in shapes.items()
  }


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_round_trip_is_exact_for_every_preset(name, torchvision_reference):
  shapes = torchvision_reference[name]['state_dict_shapes']
  state_dict = random_state_dict(shapes)
  model = PRESETS[name]()
  variables = from_torchvision(state_dict, model)  # Checked against the model's variables.
  assert variables['params']['conv0']['kernel'].shape == (7, 7, 3, shapes['features.conv0.weight'][0])

  back = to_torchvision(variables, num_batches_tracked=7)
  assert back.keys() == state_dict.keys()  # Every key consumed, every key given back.
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      assert back[key].dtype == np.int64 and back[key].shape == () and back[key] == 7
    else:
      assert back[key].dtype == np.float32
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_ported_variables_apply(tiny_model, tiny_reference):
  """Converted variables have exactly the structure the model creates."""
  ported = from_torchvision(section(tiny_reference, 'state_dict'), tiny_model)
  fresh = tiny_model.init(jax.random.key(0), np.zeros((1, 48, 48, 3)), train=False)
  assert jax.tree.structure(ported) == jax.tree.structure(jax.tree.map(np.asarray, fresh))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), ported, fresh)


def test_exported_arrays_are_writable_contiguous_copies(tiny_model):
  """What `torch.from_numpy` takes without a copy or a warning, sharing nothing with the input."""
  variables = tiny_model.init(jax.random.key(0), np.zeros((1, 48, 48, 3)), train=False)  # JAX arrays
  for key, value in to_torchvision(variables).items():
    assert value.flags.writeable and value.flags.c_contiguous, key
  numpy_variables = jax.tree.map(np.array, variables)
  exported = to_torchvision(numpy_variables)
  exported['classifier.bias'] += 1
  exported['features.conv0.weight'] += 1
  np.testing.assert_array_equal(
    numpy_variables['params']['classifier']['bias'], variables['params']['classifier']['bias']
  )
  np.testing.assert_array_equal(
    numpy_variables['params']['conv0']['kernel'], variables['params']['conv0']['kernel']
  )


def test_torch_tensors_are_accepted(tiny_reference, tiny_model):
  """Anything with .detach().cpu().numpy() (a torch tensor) is read without importing torch."""

  class TensorLike:
    def __init__(self, array):
      self.array = array

    def detach(self):
      return self

    def cpu(self):
      return self

    def numpy(self):
      return self.array

  state_dict = section(tiny_reference, 'state_dict')
  wrapped = from_torchvision({k: TensorLike(v) for k, v in state_dict.items()}, tiny_model)
  jax.tree.map(np.testing.assert_array_equal, wrapped, from_torchvision(state_dict, tiny_model))


def test_state_dict_of_another_preset(torchvision_reference):
  state_dict = random_state_dict(torchvision_reference['densenet161']['state_dict_shapes'])
  with pytest.raises(
    StateDictError, match=r'does not fit the chosen model DenseNet\(growth_rate=32'
  ) as error:
    from_torchvision(state_dict, densenet_jax.DenseNet121())
  message = str(error.value)
  # 161 has 36 layers in block 3, 121 has 24; and 161's layers are wider.
  assert 'not in this model: features.denseblock3.denselayer25.' in message
  assert 'features.conv0.weight (96, 3, 7, 7) (model: (64, 3, 7, 7))' in message.split('wrong shape: ')[1]
  assert 'It fits DenseNet(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96' in message


def test_configuration_is_read_from_the_state_dict(torchvision_reference):
  for name, preset in PRESETS.items():
    variables = from_torchvision(random_state_dict(torchvision_reference[name]['state_dict_shapes']))
    model = densenet_jax.DenseNet(**config_from_variables(variables))
    reference = preset()
    assert (model.growth_rate, model.block_config, model.num_init_features) == (
      reference.growth_rate,
      reference.block_config,
      reference.num_init_features,
    )


def test_truncated_state_dict(torchvision_reference):
  state_dict = random_state_dict(torchvision_reference['densenet121']['state_dict_shapes'])
  del state_dict['classifier.weight'], state_dict['features.denseblock4.denselayer16.conv2.weight']
  with pytest.raises(
    StateDictError,
    match=r'truncated\?.*missing for this model: '
    r'classifier\.weight, features\.denseblock4\.denselayer16\.conv2\.weight',
  ):
    from_torchvision(state_dict, densenet_jax.DenseNet121())


def test_wrong_number_of_classes(torchvision_reference):
  state_dict = random_state_dict(torchvision_reference['densenet121']['state_dict_shapes'])
  with pytest.raises(
    StateDictError, match=r'wrong shape.*classifier\.weight \(1000, 1024\) \(model: \(10, 1024\)\)'
  ):
    from_torchvision(state_dict, densenet_jax.DenseNet121(num_classes=10))


def test_non_densenet_state_dict():
  resnet_like = {
    'conv1.weight': np.zeros((64, 3, 7, 7)),
    'bn1.weight': np.zeros(64),
    'layer1.0.conv1.weight': np.zeros((64, 64, 3, 3)),
    'fc.weight': np.zeros((1000, 512)),
  }
  with pytest.raises(
    StateDictError, match=r'Not a torchvision DenseNet state dict: 4 of 4 keys.*bn1\.weight'
  ):
    from_torchvision(resnet_like)


def test_data_parallel_prefix_is_explained(tiny_reference):
  prefixed = {'module.' + k: v for k, v in section(tiny_reference, 'state_dict').items()}
  with pytest.raises(StateDictError, match=r"'module\.' prefix: strip it first"):
    from_torchvision(prefixed)
