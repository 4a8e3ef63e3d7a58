"""The fused BatchNorm(-ReLU) with its hand-written gradient computes what nn.BatchNorm does."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import enable_x64

from densenet_jax import BatchNorm


def outputs_and_gradients(module, variables, x, weights, activation):
  """(output, updated batch_stats, gradients of a loss that also reads the batch statistics)."""

  def loss(params, x):
    y, state = module.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      use_running_average=False,
      mutable=['batch_stats'],
    )
    stats = state['batch_stats']
    # The statistics get cotangents too, so the backward's terms for them are checked.
    value = (activation(y) * weights).sum() + (stats['mean'] ** 2).sum() + 3 * stats['var'].sum()
    return value, (y, stats)

  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
  return y, stats, grads


@pytest.mark.parametrize('relu', [True, False])
def test_forward_running_averages_and_gradients_equal_flax_in_float64(relu):
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), (4, 5, 6, 7), jnp.float64) * 2 + 0.5
    weights = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    kwargs = dict(momentum=0.9, epsilon=1e-5, dtype=jnp.float64, param_dtype=jnp.float64)
    reference = nn.BatchNorm(**kwargs)
    variables = reference.init(jax.random.key(2), x, use_running_average=False)
    # Scale and bias away from 1 and 0, and running averages away from their initial values.
    variables = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(3), a.shape, a.dtype), variables)
    ours = outputs_and_gradients(BatchNorm(relu=relu, **kwargs), variables, x, weights, lambda y: y)
    expected = outputs_and_gradients(reference, variables, x, weights, nn.relu if relu else lambda y: y)
    ours_y, expected_y = ours[0], expected[0] if not relu else nn.relu(expected[0])
    np.testing.assert_allclose(ours_y, expected_y, rtol=1e-14, atol=1e-14)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), ours[1:], expected[1:]
    )

    evaluated = BatchNorm(relu=relu, **kwargs).apply(variables, x, use_running_average=True)
    expected_eval = reference.apply(variables, x, use_running_average=True)
    np.testing.assert_array_equal(evaluated, nn.relu(expected_eval) if relu else expected_eval)


def test_relu_gradient_follows_the_forward_mask():
  # Inputs on both sides of the ReLU's kink: exactly where the output is 0 the gradient
  # is 0, as for nn.relu (jax.nn.relu's derivative at 0 is 0).
  x = jnp.array([-1.0, 0.0, 1.0, 2.0, -2.0, 0.0]).reshape(6, 1, 1, 1)
  module = BatchNorm(relu=True)
  variables = module.init(jax.random.key(0), x, use_running_average=False)

  def forward(x):
    return module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])[0]

  y, vjp = jax.vjp(forward, x)
  (dx,) = vjp(jnp.ones_like(y))
  reference = nn.BatchNorm(momentum=0.9, epsilon=1e-5)

  def expected_forward(x):
    return nn.relu(reference.apply(variables, x, use_running_average=False, mutable=['batch_stats'])[0])

  expected_y, expected_vjp = jax.vjp(expected_forward, x)
  np.testing.assert_array_equal(y, expected_y)
  np.testing.assert_allclose(dx, expected_vjp(jnp.ones_like(y))[0], rtol=1e-6, atol=1e-6)
  assert (y == 0).any() and (y > 0).any()


def test_bfloat16_output_with_float32_statistics():
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3), jnp.bfloat16)
  module = BatchNorm(relu=True, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(1), x, use_running_average=False)
  y, state = module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  expected, expected_state = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16).apply(
    variables, x, use_running_average=False, mutable=['batch_stats']
  )
  assert y.dtype == jnp.bfloat16 and state['batch_stats']['mean'].dtype == jnp.float32
  np.testing.assert_array_equal(y, nn.relu(expected))
  jax.tree.map(np.testing.assert_array_equal, state, expected_state)
  grads = jax.grad(
    lambda x: module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])[0].sum()
  )(x)
  assert grads.dtype == jnp.bfloat16 and bool(jnp.isfinite(grads.astype(jnp.float32)).all())
