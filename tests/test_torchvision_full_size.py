"""Real torchvision takes our full-size DenseNet-121 weights (strict) and gives the same logits.

torchvision's wheel is CUDA-built; over the CPU torch it imports once
`torch.library.register_fake` is a no-op decorator (none of DenseNet's ops use it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_over_cpu_torch, max_relative_error, optional_module

import densenet_jax

torch = optional_module('torch')


@pytest.fixture(scope='module')
def torchvision():
  return import_over_cpu_torch('torchvision')


def test_densenet121_to_torchvision_and_back(torchvision):
  model = densenet_jax.DenseNet121()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  rng = np.random.default_rng(0)
  # Running averages away from (0, 1), so that eval mode tests them too.
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
    lambda path, a: (
      a + rng.normal(0, 0.1, a.shape) if path[-1].key == 'mean' else a * rng.uniform(0.5, 1.5, a.shape)
    ),
    variables['batch_stats'],
  )
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)

  reference = torchvision.models.densenet121()
  state_dict = {k: torch.from_numpy(v) for k, v in densenet_jax.to_torchvision(variables).items()}
  reference.load_state_dict(state_dict, strict=True)
  reference.eval()
  images = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  logits = model.apply(variables, images.transpose(0, 2, 3, 1), train=False)
  assert max_relative_error(logits, expected) <= 1e-5

  back = densenet_jax.from_torchvision(reference.state_dict(), model)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
