"""The tiny torchvision DenseNet's weights give torchvision's numbers in densenet-jax.

Reference: tests/data/tiny_densenet_torchvision.npz, computed with torchvision 0.28 /
PyTorch 2.13 (growth 8, blocks 2-3-2, 16 init features, 10 classes, 4x3x48x48 input).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BATCH_NORMS, KERNELS, enable_x64, max_relative_error, section, train_step_outputs

from densenet_jax import from_torchvision, to_torchvision


@pytest.fixture(scope='module', params=KERNELS)
def tiny_model(request, tiny_model):
  """The tiny reference network with each kernel set: every test here runs for every set."""
  return tiny_model.clone(kernels=request.param)


@pytest.fixture(scope='module')
def ported(tiny_model, tiny_reference):
  return from_torchvision(section(tiny_reference, 'state_dict'), tiny_model)


@pytest.fixture(scope='module')
def images(tiny_reference):
  return jnp.asarray(tiny_reference['input_nchw'].transpose(0, 2, 3, 1))  # NCHW -> NHWC


def test_eval_logits_equal_torchvision(tiny_model, ported, images, tiny_reference):
  logits = tiny_model.apply(ported, images, train=False)
  error = max_relative_error(logits, tiny_reference['logits_eval'])
  print(f'eval logits: {error:.2g} relative to torchvision')
  assert error <= 1e-5


def test_train_logits_loss_and_gradients_equal_torchvision(tiny_model, ported, images, tiny_reference):
  labels = tiny_reference['labels']
  loss, logits, _, grads = train_step_outputs(tiny_model, ported, images, labels)
  print(
    f'train logits: {max_relative_error(logits, tiny_reference["logits_train"]):.2g} relative to torchvision'
  )
  print(f'loss: {float(loss)!r} (torchvision {float(tiny_reference["loss_train"])!r})')
  assert max_relative_error(logits, tiny_reference['logits_train']) <= 1e-5
  np.testing.assert_allclose(loss, tiny_reference['loss_train'], rtol=1e-6)

  torch_grads = section(tiny_reference, 'grad')
  ours = to_torchvision({'params': grads})
  assert ours.keys() == torch_grads.keys()
  # The exact gradient, up to float64 rounding, from the same model in float64.
  with enable_x64(True):
    model64 = tiny_model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    ported64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), ported)
    *_, grads64 = train_step_outputs(model64, ported64, jnp.asarray(images, jnp.float64), labels)
    exact = to_torchvision({'params': jax.tree.map(lambda g: np.asarray(g, np.float64), grads64)})

  ill_conditioned, largest = [], 0.0
  for key, torch_grad in torch_grads.items():
    if max_relative_error(ours[key], torch_grad) <= 1e-4:
      largest = max(largest, max_relative_error(ours[key], torch_grad))
      continue
    # A gradient that cancels to a tiny sum (norm0.weight: |g| <= 6e-5, summed over
    # 4x24x24 positions) is as far from the exact one in torch's fp32 as in ours.
    torch_error = max_relative_error(torch_grad, exact[key])
    our_error = max_relative_error(ours[key], exact[key])
    print(
      f'{key}: {max_relative_error(ours[key], torch_grad):.2g} from torch; from the float64 gradient '
      f'ours {our_error:.2g}, torch {torch_error:.2g}'
    )
    assert torch_error > 1e-4, f'{key}: differs from torch, and torch is accurate ({torch_error:.2g})'
    assert our_error <= 2 * torch_error, f'{key}: fp32 error {our_error:.2g} vs torch {torch_error:.2g}'
    ill_conditioned.append(key)
  print(f'every other gradient: <= {largest:.2g} relative to torchvision')
  assert len(ill_conditioned) <= 1, ill_conditioned


def batchnorm_sample_counts(model, variables, images) -> dict[str, int]:
  """batch * height * width seen by each BatchNorm, keyed by torchvision module name."""
  _, state = model.apply(
    variables,
    images,
    train=False,
    capture_intermediates=lambda module, _: isinstance(module, BATCH_NORMS),
    mutable=['intermediates'],
  )
  counts = {}
  # Each BatchNorm's entry is {'__call__': (output,)}: keep the module path only.
  for path, output in jax.tree_util.tree_leaves_with_path(state['intermediates']):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and k.key != '__call__']
    counts['features.' + '.'.join(names)] = int(np.prod(output.shape[:-1]))
  return counts


def test_one_sgd_step_equals_torch(tiny_model, ported, images, tiny_reference):
  _, _, batch_stats, grads = train_step_outputs(tiny_model, ported, images, tiny_reference['labels'])
  # torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4): the decay is
  # added to the gradient before momentum, as add_decayed_weights does ahead of sgd.
  optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
  params = ported['params']
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  after = to_torchvision({'params': optax.apply_updates(params, updates), 'batch_stats': batch_stats})
  torch_after = section(tiny_reference, 'after_sgd_step')
  before = section(tiny_reference, 'state_dict')
  assert after.keys() == torch_after.keys()

  counts = batchnorm_sample_counts(tiny_model, ported, images)
  largest = 0.0
  for key, expected in torch_after.items():
    if key.endswith('num_batches_tracked'):
      continue
    if not key.endswith('running_var'):  # Parameters and running means.
      largest = max(largest, max_relative_error(after[key], expected))
      assert max_relative_error(after[key], expected) <= 1e-5, key
      continue
    # torch folds in the unbiased batch variance, Flax the biased one: the new part of
    # the running average differs by exactly n / (n - 1), n = batch * height * width.
    n = counts[key.removesuffix('.running_var')]
    decayed = 0.9 * before[key]
    assert max_relative_error(decayed + (after[key] - decayed) * n / (n - 1), expected) <= 1e-5, key
    assert max_relative_error(after[key], expected) > 1e-5, key  # ... and the factor shows.
  assert len(counts) == sum(k.endswith('running_var') for k in torch_after)
  print(f'after one SGD step, parameters and running means: <= {largest:.2g} relative to torch')


def legacy_key(key: str) -> str:
  """torchvision's current key -> the key in its published files ('norm1' -> 'norm.1')."""
  return re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', key)


def test_legacy_keys_load_to_the_same_variables(tiny_model, tiny_reference, ported):
  state_dict = section(tiny_reference, 'state_dict')
  legacy = {legacy_key(k): v for k, v in state_dict.items()}
  assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
  assert 'features.denseblock1.denselayer1.conv.2.weight' in legacy
  jax.tree.map(np.testing.assert_array_equal, from_torchvision(legacy, tiny_model), ported)
