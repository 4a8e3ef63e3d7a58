"""memory_efficient=True recomputes the bottleneck in the backward pass: same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import enable_x64, max_relative_error

import densenet_jax


def train_outputs(model, variables, x, labels):
  """(loss, logits, batch_stats updates), grads of one train-mode step."""

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


@pytest.mark.parametrize('bc', [True, False], ids=['bottleneck', 'plain'])
def test_memory_efficient_gives_the_same_numbers(bc):
  model = densenet_jax.densenet_cifar(16 if bc else 10, 8, bc=bc)
  efficient = model.clone(memory_efficient=True)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(2), (8,), 0, 10)
  variables = model.init(jax.random.key(0), x, train=False)
  (loss, (logits, updates)), grads = train_outputs(model, variables, x, labels)
  (loss_e, (logits_e, updates_e)), grads_e = train_outputs(efficient, variables, x, labels)

  # The forward pass is the same computation: bit for bit.
  np.testing.assert_array_equal(logits_e, logits)
  np.testing.assert_array_equal(loss_e, loss)
  jax.tree.map(np.testing.assert_array_equal, updates_e, updates)
  np.testing.assert_array_equal(
    efficient.apply(variables, x, train=False), model.apply(variables, x, train=False)
  )

  # Gradients: recomputation changes the order in which each feature map's gradient is
  # summed over the later layers, so they agree to fp32 rounding, not bit for bit. The
  # test measures that rounding against the float64 gradient: switching memory_efficient
  # on moves the gradients less than fp32 arithmetic itself is off on this network.
  with enable_x64(True):
    model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    _, grads64 = train_outputs(model64, variables64, jnp.asarray(x, jnp.float64), labels)
    grads64 = jax.tree.map(np.asarray, grads64)
  fp32_error = max(map(max_relative_error, jax.tree.leaves(grads), jax.tree.leaves(grads64)))
  difference = max(map(max_relative_error, jax.tree.leaves(grads_e), jax.tree.leaves(grads)))
  assert difference <= fp32_error, (difference, fp32_error)
  assert fp32_error < 1e-5  # Both are good fp32 gradients (a wrong one is off by ~1).
