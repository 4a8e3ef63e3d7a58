"""memory_efficient=True: the same numbers, and memory that grows linearly with depth."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import KERNELS, enable_x64, max_relative_error

import densenet_jax


def train_outputs(model, variables, x, labels):
  """(loss, logits, batch_stats updates), grads of one train-mode step."""

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(3)},
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize(
  'bc, drop_rate',
  # The bottleneck network in the quick tier; without it and with dropout in the full suite.
  [
    (True, 0.0),
    pytest.param(False, 0.0, marks=pytest.mark.slow),
    pytest.param(True, 0.2, marks=pytest.mark.slow),
  ],
  ids=['bottleneck', 'plain', 'dropout'],
)
def test_memory_efficient_gives_the_same_numbers(bc, drop_rate, kernels):
  model = densenet_jax.densenet_cifar(16 if bc else 10, 8, bc=bc, drop_rate=drop_rate, kernels=kernels)
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

  # Gradients. In float64 both modes compute the same gradient, to float64 rounding: the
  # recomputation is the same mathematics. In float32 they differ by rounding only:
  # recomputation sums each feature map's gradient over the later layers in another
  # order. Each float32 gradient is measured against the float64 one: the memory-efficient
  # gradient is as accurate as the plain one (two different summation orders each err by
  # about the same amount; a wrong gradient is off by ~1).
  with enable_x64(True):
    model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64 = jnp.asarray(x, jnp.float64)
    _, grads64 = train_outputs(model64, variables64, x64, labels)
    _, grads64_e = train_outputs(model64.clone(memory_efficient=True), variables64, x64, labels)
    grads64, grads64_e = jax.tree.map(np.asarray, (grads64, grads64_e))

  def error(actual, expected):
    return max(map(max_relative_error, jax.tree.leaves(actual), jax.tree.leaves(expected)))

  print(f'float64 gradients: {error(grads64_e, grads64):.2g} apart')
  if not drop_rate:
    print(
      f'float32 vs float64: plain {error(grads, grads64):.3g}, memory-efficient {error(grads_e, grads64):.3g}'
    )
  assert error(grads64_e, grads64) < 1e-12
  if drop_rate:  # float64 draws other dropout masks than float32: compare the two float32s.
    assert error(grads_e, grads) < 1e-5
  else:
    assert error(grads, grads64) < 1e-5
    assert error(grads_e, grads64) < 2 * error(grads, grads64)


def train_step_temp_bytes(model, batch=4, size=8):
  """XLA's temp memory for the gradient of one train-mode step (compiled, not run)."""
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  init = partial(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  variables = jax.eval_shape(init)

  def loss_fn(params, batch_stats, x):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
    )
    return logits.sum()

  compiled = jax.jit(jax.grad(loss_fn)).lower(variables['params'], variables['batch_stats'], x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # six compilations of up to 32 layers
def test_memory_grows_linearly_with_depth(kernels='cpu'):
  """One dense block of 8, 16 and 32 layers: what each doubling of depth adds.

  Memory that grows with the square of the depth makes each doubling add 4x what the
  previous doubling added; memory that grows linearly, 2x (less where part of it does
  not depend on depth). Stored concatenations grow with the square: without
  memory_efficient the ratio is well above 2; kept features grow linearly: with it, about
  2. `benchmarks/train_step_memory.py` gives the figures for DenseNet-121 to -264.

  The 'cpu' kernel set's block, which recomputes by itself. The 'xla' set's `nn.remat` saves
  nothing on XLA:CPU, which merges the recomputation back into the forward pass (the same temp
  bytes with and without it: docs/performance.md); see the test below.
  """
  temp = {}
  for efficient in (False, True):
    for layers in (8, 16, 32):
      model = densenet_jax.DenseNet(
        growth_rate=8,
        block_config=(layers,),
        num_init_features=16,
        stem='cifar',
        num_classes=10,
        memory_efficient=efficient,
        kernels=kernels,
      )
      temp[efficient, layers] = train_step_temp_bytes(model)
  growth = {e: (temp[e, 32] - temp[e, 16]) / (temp[e, 16] - temp[e, 8]) for e in (False, True)}
  print(f'growth per doubling: plain {growth[False]:.2f}, memory_efficient {growth[True]:.2f}; ', end='')
  print(f'memory_efficient / plain at 32 layers: {temp[True, 32] / temp[False, 32]:.2f}')
  assert growth[False] > 2.8, (growth, temp)  # Measured: 3.19.
  assert growth[True] < 2.3, (growth, temp)  # Measured: 2.00.
  assert temp[True, 32] < 0.4 * temp[False, 32], temp  # Measured: 0.15.


def test_xla_kernels_rematerialize_each_bottleneck():
  """The 'xla' set's memory_efficient is `nn.remat` of each dense layer's concatenation-BN-ReLU-conv.

  What it saves depends on the compiler (TPU and GPU keep remat's recomputation, XLA:CPU merges it
  back): benchmarks/accelerator.py measures it on a chip. Here: one remat per dense layer, and none
  without memory_efficient.
  """
  model = densenet_jax.densenet_cifar(16, 8, kernels='xla')
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), x)

  def remats(model):
    def loss(params, batch_stats):
      variables_ = {'params': params, 'batch_stats': batch_stats}
      return model.apply(variables_, x, train=True, mutable=['batch_stats'])[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables['params'], variables['batch_stats'])
    return sum(eqn.primitive.name in ('checkpoint', 'remat2', 'remat') for eqn in jaxpr.eqns)

  assert remats(model) == 0
  assert remats(model.clone(memory_efficient=True)) == 2 * 3  # forward and backward, 2 layers x 3 blocks
