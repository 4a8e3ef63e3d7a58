"""Mixed precision: bf16 compute with float32 parameters, unless param_dtype says otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import densenet_jax


def test_bfloat16_forward_and_backward_keep_float32_params():
  model = densenet_jax.densenet_cifar(16, 8, bc=True, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.arange(4)
  variables = model.init(jax.random.key(0), x, train=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

  def loss_fn(params):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
    )
    assert logits.dtype == jnp.bfloat16
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert np.isfinite(loss)
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads))

  # bf16 logits track the float32 model's.
  logits32 = model.clone(dtype=jnp.float32).apply(variables, x, train=False)
  logits16 = model.apply(variables, x, train=False)
  assert np.max(np.abs(np.asarray(logits16, np.float32) - logits32)) <= 0.05 * np.max(np.abs(logits32))


def test_param_dtype_is_honoured():
  model = densenet_jax.densenet_cifar(16, 8, bc=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.bfloat16)}
