"""Full-size DenseNet-121 weights cross to real torchvision and back (strict), with the same logits.

torchvision's wheel is CUDA-built; over the CPU torch it imports once
`torch.library.register_fake` is a no-op decorator (none of DenseNet's ops use it).
"""

import functools

import jax
import numpy as np
import pytest
from conftest import import_over_cpu_torch, max_relative_error, optional_module

import densenet_jax

torch = optional_module('torch')


@pytest.fixture(scope='module')
def torchvision():
  return import_over_cpu_torch('torchvision')


@pytest.mark.slow
def test_densenet121_to_torchvision_and_back(torchvision):
  """torchvision's DenseNet-121 -> our variables -> the same eval logits -> torchvision again, strictly.

  The weights start as torchvision's own (no full-size init on our side: `from_torchvision` checks
  them against the variables our model creates), with running averages away from (0, 1) so that
  eval mode tests them too.
  """
  torch.manual_seed(0)
  reference = torchvision.models.densenet121()
  with torch.no_grad():
    for module in reference.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  reference.eval()
  model = densenet_jax.DenseNet121()
  variables = densenet_jax.from_torchvision(reference.state_dict(), model)

  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images.transpose(0, 2, 3, 1))
  assert max_relative_error(logits, expected) <= 1e-5

  back = torchvision.models.densenet121()
  back.load_state_dict(
    {k: torch.from_numpy(v) for k, v in densenet_jax.to_torchvision(variables).items()}, strict=True
  )
  for key, value in reference.state_dict().items():
    if not key.endswith('num_batches_tracked'):  # not kept (to_torchvision writes 0)
      torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)
