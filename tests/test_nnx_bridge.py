"""From Flax NNX: the model through `flax.nnx.bridge.ToNNX` trains and evaluates as the Linen model does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import bridge

import densenet_jax


def test_nnx_train_step_and_eval_equal_linen():
  linen_model = densenet_jax.DenseNet(growth_rate=4, block_config=(1, 2), num_init_features=8, num_classes=3)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 1])
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

  # The README's NNX recipe.
  model = bridge.ToNNX(linen_model, rngs=nnx.Rngs(0)).lazy_init(images, train=False)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images, train=True, mutable=['batch_stats'])  # updates the model's BatchStats
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  # The same variables, as Linen sees them: params are nnx.Params, batch_stats nnx.BatchStats.
  variables = {
    'params': nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    'batch_stats': nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
  }
  np.testing.assert_array_equal(model(images, train=False), linen_model.apply(variables, images, train=False))

  @jax.jit
  def linen_train_step(variables, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = linen_model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        images,
        train=True,
        mutable=['batch_stats'],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    param_updates, opt_state = tx.update(grads, opt_state, variables['params'])
    return loss, {'params': optax.apply_updates(variables['params'], param_updates), **updates}, opt_state

  opt_state = tx.init(variables['params'])
  for _ in range(2):
    nnx_loss = nnx_train_step(model, optimizer, images, labels)
    linen_loss, variables, opt_state = linen_train_step(variables, opt_state, images, labels)
    np.testing.assert_allclose(nnx_loss, linen_loss, rtol=1e-6)
  trained = {
    'params': nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    'batch_stats': nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
  }
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trained, variables)
  # The running averages moved, and evaluation reads them.
  assert not np.allclose(trained['batch_stats']['norm5']['var'], 1.0)
  np.testing.assert_allclose(
    model(images, train=False), linen_model.apply(variables, images, train=False), rtol=1e-5, atol=1e-6
  )
