"""Every kernel set computes what the reference set ('xla': stock Flax) computes.

Each CPU kernel against the stock operation it replaces (float64, values and derivatives), then the
whole network under every set against the reference.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNELS, enable_x64

from densenet_jax import DenseNet, densenet_cifar, kernel_set
from densenet_jax.models import Transition
from densenet_jax.ops.cpu_batch_norm import BatchNorm
from densenet_jax.ops.cpu_centered import Centered, center
from densenet_jax.ops.cpu_conv import Conv
from densenet_jax.ops.cpu_pool import max_pool


def outputs_and_gradients(module, variables, x, weights, activation, prepare=lambda x: x):
  """(output, updated batch_stats, gradients of a loss that also reads the batch statistics).

  The module gets prepare(x), and the gradient is x's through it.
  """

  def loss(params, x):
    y, state = module.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      prepare(x),
      use_running_average=False,
      mutable=['batch_stats'],
    )
    stats = state['batch_stats']
    # The statistics get cotangents too, so the backward's terms for them are checked.
    value = (activation(y) * weights).sum() + (stats['mean'] ** 2).sum() + 3 * stats['var'].sum()
    return value, (y, stats)

  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
  return y, stats, grads


def centered_in_pieces(x):
  """x's channels as three feature maps, each centred, joined one at a time: what a dense block passes."""
  first, *rest = (center(piece) for piece in jnp.split(x, [2, 3], axis=-1))
  for centered in rest:
    first = Centered.concatenate([first, centered])
  return first


@pytest.mark.parametrize('prepare', [lambda x: x, centered_in_pieces], ids=['array', 'centered'])
@pytest.mark.parametrize('relu', [True, False])
def test_forward_running_averages_and_gradients_equal_flax_in_float64(relu, prepare):
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), (4, 5, 6, 7), jnp.float64) * 2 + 0.5
    weights = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    kwargs = dict(momentum=0.9, epsilon=1e-5, dtype=jnp.float64, param_dtype=jnp.float64)
    reference = nn.BatchNorm(**kwargs)
    variables = reference.init(jax.random.key(2), x, use_running_average=False)
    # Scale and bias away from 1 and 0, and running averages away from their initial values.
    variables = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(3), a.shape, a.dtype), variables)
    ours = outputs_and_gradients(BatchNorm(relu=relu, **kwargs), variables, x, weights, lambda y: y, prepare)
    expected = outputs_and_gradients(reference, variables, x, weights, nn.relu if relu else lambda y: y)
    ours_y, expected_y = ours[0], expected[0] if not relu else nn.relu(expected[0])
    np.testing.assert_allclose(ours_y, expected_y, rtol=1e-14, atol=1e-14)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), ours[1:], expected[1:]
    )

    evaluated = BatchNorm(relu=relu, **kwargs).apply(variables, x, use_running_average=True)
    expected_eval = reference.apply(variables, x, use_running_average=True)
    np.testing.assert_array_equal(evaluated, nn.relu(expected_eval) if relu else expected_eval)


def test_centered_feature_maps_need_batch_statistics():
  x = jnp.ones((2, 3, 3, 4))
  module = BatchNorm()
  variables = module.init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(ValueError, match='running averages got Centered'):
    module.apply(variables, centered_in_pieces(x), use_running_average=True)


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


@pytest.mark.parametrize('prepare', [lambda x: x, centered_in_pieces], ids=['array', 'centered'])
def test_bfloat16_output_with_float32_statistics(prepare):
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 4), jnp.bfloat16)
  module = BatchNorm(relu=True, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(1), x, use_running_average=False)
  y, state = module.apply(variables, prepare(x), use_running_average=False, mutable=['batch_stats'])
  expected, expected_state = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16).apply(
    variables, x, use_running_average=False, mutable=['batch_stats']
  )
  assert y.dtype == jnp.bfloat16 and state['batch_stats']['mean'].dtype == jnp.float32
  np.testing.assert_array_equal(y, nn.relu(expected))
  jax.tree.map(np.testing.assert_array_equal, state, expected_state)
  grads = jax.grad(
    lambda x: module.apply(variables, prepare(x), use_running_average=False, mutable=['batch_stats'])[0].sum()
  )(x)
  assert grads.dtype == jnp.bfloat16 and bool(jnp.isfinite(grads.astype(jnp.float32)).all())


@pytest.mark.parametrize('kernels', KERNELS)
def test_eval_mode_model_is_forward_mode_differentiable(kernels):
  # The CPU stem's custom JVP and the running-average BatchNorm keep jax.jvp working at eval.
  model = DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3, kernels=kernels)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  direction = jax.random.normal(jax.random.key(2), x.shape)
  _, tangent = jax.jvp(lambda x: model.apply(variables, x, train=False), (x,), (direction,))
  _, vjp = jax.vjp(lambda x: model.apply(variables, x, train=False), x)
  cotangent = jax.random.normal(jax.random.key(3), tangent.shape)
  # <J d, c> == <d, J^T c>: forward and reverse mode agree.
  np.testing.assert_allclose((tangent * cotangent).sum(), (direction * vjp(cotangent)[0]).sum(), rtol=1e-4)


@pytest.mark.parametrize('kernel_size, stride, padding', [(7, 2, 3), (3, 2, 1), (3, 1, 1), (3, 2, 0)])
def test_stem_conv_values_and_derivatives_equal_nn_conv_in_float64(kernel_size, stride, padding):
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), (2, 17, 15, 3), jnp.float64)
    kwargs = dict(use_bias=False, dtype=jnp.float64, param_dtype=jnp.float64)
    # Three input channels: an image, which takes the stem's form.
    ours = Conv(5, kernel_size, stride, padding, dtype=jnp.float64, param_dtype=jnp.float64)
    reference = nn.Conv(5, (kernel_size, kernel_size), (stride, stride), padding, **kwargs)
    variables = ours.init(jax.random.key(1), x)
    np.testing.assert_array_equal(ours.apply(variables, x), reference.apply(variables, x))
    for argnums in (0, 1, (0, 1)):  # kernel gradient alone, image gradient alone, both

      def grads(module, argnums=argnums):
        return jax.grad(lambda v, x: (module.apply(v, x) ** 2).sum(), argnums=argnums)(variables, x)

      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), grads(ours), grads(reference))
    tangent = jax.tree.map(jnp.ones_like, variables)
    ours_jvp = jax.jvp(lambda v: ours.apply(v, x), (variables,), (tangent,))[1]
    reference_jvp = jax.jvp(lambda v: reference.apply(v, x), (variables,), (tangent,))[1]
    np.testing.assert_allclose(ours_jvp, reference_jvp, rtol=1e-12)


def _assert_equal_in_float64(actual, desired):
  """Equal to 1e-12 of the largest magnitude, elementwise: float64 rounding, not a formula's error.

  Winograd's form sums other terms in another order than XLA's convolution: an element that
  cancels to 1e-3 of its array's largest (kernel gradients here) keeps an absolute difference of
  about 4e-15, 1.6e-16 of that largest value, which a relative bound on the element alone
  (1.2e-12 there) would take for an error. A wrong transform is off by O(1).
  """
  np.testing.assert_allclose(actual, desired, rtol=1e-12, atol=1e-12 * float(np.abs(desired).max()))


@pytest.mark.parametrize(
  'shape, features',
  [((2, 6, 5, 7), 4), ((1, 1, 1, 6), 4), ((3, 2, 9, 16), 4), ((2, 8, 9, 5), 32), ((1, 10, 8, 6), 32)],
)
def test_conv3x3_values_and_derivatives_equal_nn_conv_in_float64(shape, features):
  # More than 4 input channels (fewer is an image: the stem's form, above). Few outputs or small
  # images take one product to all nine taps and shifted sums, the
  # others (32 outputs, sides >= 8, odd and even widths here) Winograd's F(2, 3) along the width;
  # in training both take the hand-written gradient. Edges included: 1x1 and 2-pixel-high images
  # have taps that fall wholly outside.
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    ours = partial(Conv, features, 3, 1, 1, dtype=jnp.float64, param_dtype=jnp.float64)
    reference = nn.Conv(
      features, (3, 3), padding=1, use_bias=False, dtype=jnp.float64, param_dtype=jnp.float64
    )
    variables = reference.init(jax.random.key(1), x)
    weights = jax.random.normal(jax.random.key(2), (*shape[:-1], features), jnp.float64)

    def loss(module, v, x, train=None):
      module = module if train is None else module(train=train)
      return (jnp.sin(module.apply(v, x)) * weights).sum()

    expected_grads = jax.grad(partial(loss, reference), (0, 1))(variables, x)
    expected_example_grads = jax.vmap(jax.grad(partial(loss, reference), 1), (None, 0))(variables, x[:, None])
    for train in (False, True):
      _assert_equal_in_float64(ours(train=train).apply(variables, x), reference.apply(variables, x))
      grads = jax.grad(partial(loss, ours, train=train), (0, 1))(variables, x)
      jax.tree.map(lambda a, b: _assert_equal_in_float64(a, b), grads, expected_grads)
      # Per-example gradients (vmap of grad) go through the hand-written gradient too.
      example_grads = jax.vmap(jax.grad(partial(loss, ours, train=train), 1), (None, 0))(
        variables, x[:, None]
      )
      _assert_equal_in_float64(example_grads, expected_example_grads)
    # Outside training the function is forward-mode differentiable.
    tangents = jax.tree.map(jnp.ones_like, (variables, x))
    ours_jvp = jax.jvp(partial(loss, ours, train=False), (variables, x), tangents)[1]
    _assert_equal_in_float64(ours_jvp, jax.jvp(partial(loss, reference), (variables, x), tangents)[1])


@pytest.mark.parametrize('size, stride, padding', [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)])
def test_max_pool_values_and_derivatives_equal_nn_max_pool_exactly(size, stride, padding):
  # After a ReLU (as in the stem) and rounded to halves: windows with tied maxima, where
  # the gradient must go to the first maximum (row-major), as XLA's and PyTorch's do.
  x = jnp.round(2 * nn.relu(jax.random.normal(jax.random.key(0), (2, 13, 11, 4)))) / 2
  assert int((x == 0).sum()) > x.size // 3

  def reference(x):
    return nn.max_pool(x, (size, size), (stride, stride), ((padding, padding),) * 2)

  def ours(x):
    return max_pool(x, size, stride, padding)

  np.testing.assert_array_equal(ours(x), reference(x))
  cotangent = jax.random.normal(jax.random.key(1), reference(x).shape)
  np.testing.assert_array_equal(jax.vjp(ours, x)[1](cotangent), jax.vjp(reference, x)[1](cotangent))
  np.testing.assert_array_equal(jax.jit(jax.vjp(ours, x)[1])(cotangent), jax.vjp(reference, x)[1](cotangent))
  tangent = jax.random.normal(jax.random.key(2), x.shape)
  np.testing.assert_array_equal(jax.jvp(ours, (x,), (tangent,))[1], jax.jvp(reference, (x,), (tangent,))[1])


class ConvThenPoolTransition(nn.Module):
  """torchvision's transition in plain Flax: BN-ReLU-1x1 conv, then the 2x2 average pool."""

  features: int

  @nn.compact
  def __call__(self, x, train):
    kwargs = dict(dtype=x.dtype, param_dtype=x.dtype)
    x = nn.relu(nn.BatchNorm(not train, momentum=0.9, epsilon=1e-5, name='norm', **kwargs)(x))
    x = nn.Conv(self.features, (1, 1), use_bias=False, name='conv', **kwargs)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def transition_outputs_and_gradients(apply, variables, x):
  """Output and gradients of `apply(variables, x)`, a transition applied."""

  def loss(params, x):
    y = apply({**variables, 'params': params}, x)
    return (y * jnp.arange(y.size).reshape(y.shape)).sum(), y

  (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables['params'], x)
  return y, grads


def transition(kernels: str, features: int, train: bool) -> Transition:
  """A float64 transition built from the kernel set `kernels`, as `DenseNet` builds it."""
  ops, dtypes = kernel_set(kernels), dict(dtype=jnp.float64, param_dtype=jnp.float64)
  return Transition(
    features,
    conv=partial(ops.conv, train=train, **dtypes),
    norm=partial(ops.batch_norm, use_running_average=not train, **dtypes),
    avg_pool=ops.avg_pool,
  )


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('height, width', [(8, 6), (7, 9)])
def test_transition_pooling_before_its_convolution_equals_conv_then_pool(height, width, kernels):
  # Both are linear and act on different axes, so only the rounding may differ (odd sides
  # drop their last row or column either way): float64 shows the same function.
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), (3, height, width, 6), jnp.float64)
    reference = ConvThenPoolTransition(4)
    variables = reference.init(jax.random.key(1), x, train=False)
    variables = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape, a.dtype), variables)
    shapes = jax.tree.map(jnp.shape, transition(kernels, 4, False).init(jax.random.key(1), x))
    assert shapes == jax.tree.map(jnp.shape, variables)
    for train in (False, True):
      ours = transition(kernels, 4, train)
      ours_y, ours_grads = transition_outputs_and_gradients(
        lambda v, x, ours=ours: ours.apply(v, x, mutable=['batch_stats'])[0], variables, x
      )
      expected_y, expected_grads = transition_outputs_and_gradients(
        lambda v, x, t=train: reference.apply(v, x, train=t, mutable=['batch_stats'])[0], variables, x
      )
      assert ours_y.shape == (3, height // 2, width // 2, 4)
      np.testing.assert_allclose(ours_y, expected_y, rtol=1e-13, atol=1e-13)
      for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def model_outputs_and_gradients(model, variables, x, labels, train):
  """(logits, updated batch_stats or None, gradients of the loss wrt params and images)."""

  def loss(params, x):
    logits, state = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=train,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(5)},
    )
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()
    return loss, (logits, state['batch_stats'] if train else None)

  # Jitted: one compilation of the whole model rather than op by op (the comparison is the same).
  value_and_grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
  (_, (logits, stats)), grads = value_and_grad(variables['params'], x)
  return logits, stats, grads


@pytest.mark.slow  # two whole networks in float64, fwd and bwd, per case; the layers are compared above
@pytest.mark.parametrize('kernels', [k for k in KERNELS if k != 'xla'])
@pytest.mark.parametrize(
  'depth, bc, stem, memory_efficient, drop_rate',
  [(16, True, 'imagenet', False, 0.0), (10, False, 'cifar', True, 0.2)],
  ids=['bc-imagenet-stem', 'plain-cifar-memory-efficient-dropout'],
)
def test_whole_model_equals_the_reference_set_in_float64(
  kernels, depth, bc, stem, memory_efficient, drop_rate
):
  """The network under each set against the 'xla' set (what 'auto' runs on TPU and GPU).

  Logits, running averages and the gradients of the loss with respect to every parameter and the
  images, in training and outside it: with a bottleneck and the imagenet stem (growth rate 8, the
  direct 3x3 form), and without a bottleneck with `memory_efficient` and dropout (growth rate 32,
  Winograd's form); with 'eval_in_pieces' outside training.
  """
  with enable_x64():
    model = densenet_cifar(depth, 8 if bc else 32, bc=bc, drop_rate=drop_rate, num_classes=5)
    model = model.clone(
      stem=stem, memory_efficient=memory_efficient, dtype=jnp.float64, param_dtype=jnp.float64
    )
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3), jnp.float64)
    labels = jax.random.randint(jax.random.key(1), (4,), 0, 5)
    init = partial(model.clone(kernels='xla').init, train=False)
    variables = jax.jit(init)(jax.random.key(2), x)
    # Scale, bias and running averages away from their initial values.
    variables = jax.tree.map(
      lambda a: a + 0.5 * jax.random.uniform(jax.random.key(3), a.shape, a.dtype), variables
    )
    ours_model = model.clone(kernels=kernels, eval_in_pieces=True)
    for train in (True, False):
      ours = model_outputs_and_gradients(ours_model, variables, x, labels, train)
      expected = model_outputs_and_gradients(model.clone(kernels='xla'), variables, x, labels, train)
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        _assert_equal_in_float64(a, b)
