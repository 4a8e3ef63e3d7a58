"""DenseNet (Huang et al., 2017, https://arxiv.org/abs/1608.06993) in Flax.

The modules mirror torchvision's `torchvision.models.densenet` part for part and
name for name (`conv0`, `norm0`, `denseblock1/denselayer1/norm1`, `transition1/conv`,
`norm5`, `classifier`), so that porting weights is a plain name map and the
numbers are the same. Layout is NHWC; BatchNorm state lives in `batch_stats`.

Example:
  >>> model = DenseNet121(num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  >>> logits = model.apply(variables, images, train=False)
  >>> logits, updates = model.apply(variables, images, train=True,
  ...                               mutable=['batch_stats'])
"""

from collections.abc import Callable, Sequence
from functools import partial, reduce
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.custom_derivatives import SymbolicZero

ModuleDef = Any
Dtype = Any

# torchvision initialises convolutions with `kaiming_normal_` (fan-in, gain sqrt(2),
# untruncated) and the classifier with torch's default Linear init, U(+-1/sqrt(fan_in)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class PointwiseConv(nn.Module):
  """A 1x1 convolution computed as a matrix product over the channel axis.

  The same parameter (`kernel`, shape (1, 1, in, out), HWIO) and the same numbers as
  `nn.Conv(features, (1, 1), use_bias=False)`; XLA runs it as a dot, which on CPU is 2-3x
  faster than its 1x1 convolution (and no slower elsewhere).
  """

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    # A 2-D product (pixels x channels): its kernel gradient is then one plain matrix product.
    # Contracting N, H and W of a 4-D array instead made XLA:CPU write the output gradient
    # transposed, fused with the BatchNorm backward: ~10% of a DenseNet-121 train step.
    y = jax.lax.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0])
    return y.reshape(*x.shape[:-1], self.features)


class StemConv(nn.Module):
  """A convolution on few input channels whose filter gradient is one product over patches.

  The same parameter (`kernel`, HWIO) and forward numbers as `nn.Conv(features,
  kernel_size, strides, padding, use_bias=False)`. XLA:CPU computes the stem's filter
  gradient (7x7/2 on 3 channels) as a convolution at about 20 GFLOP/s, 8% of a
  DenseNet-121 train step; as a matrix product of the image patches (7 * 7 * 3 = 147
  values per output pixel) with the output gradient it is a plain dot. Meant for few
  input channels: the backward pass builds kernel_size**2 copies of the input.
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return _stem_conv(x, kernel, self.strides, self.padding)


def _convolution(x, kernel, stride, padding):
  """What `nn.Conv` computes (NHWC, HWIO, symmetric padding, no bias)."""
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _stem_conv(x, kernel, stride, padding):
  return _convolution(x, kernel, stride, padding)


def _stem_conv_jvp(stride, padding, primals, tangents):
  """The convolution's own JVP, its kernel term written as a product over patches.

  Reverse mode transposes that term into patches^T @ output gradient: one dot.
  """
  (x, kernel), (x_dot, kernel_dot) = primals, tangents
  y = _convolution(x, kernel, stride, padding)
  size, _, channels, features = kernel.shape
  y_dot = jnp.zeros_like(y)
  if not isinstance(x_dot, SymbolicZero):
    y_dot = y_dot + _convolution(x_dot, kernel, stride, padding)
  if not isinstance(kernel_dot, SymbolicZero):
    x_padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    height, width = y.shape[1:3]
    # patches[n, h, w, i, j, c] = x_padded[n, stride * h + i, stride * w + j, c], the kernel's
    # HWI order; one stack per kernel row (XLA:CPU fuses a stack of 7 slices, not of 49).
    rows = [x_padded[:, i : i + stride * (height - 1) + 1 : stride] for i in range(size)]
    patches = jnp.stack(
      [jnp.stack([r[:, :, j : j + stride * (width - 1) + 1 : stride] for j in range(size)], 3) for r in rows],
      3,
    )
    product = jax.lax.dot(patches.reshape(-1, size * size * channels), kernel_dot.reshape(-1, features))
    y_dot = y_dot + product.reshape(y.shape)
  return y, y_dot


_stem_conv.defjvp(_stem_conv_jvp, symbolic_zeros=True)


class Conv3x3(nn.Module):
  """A 3x3 convolution, stride 1, padding 1 (a dense layer's), on CPU as matrix products.

  The same parameter (`kernel`, shape (3, 3, in, out), HWIO) and the same function as
  `nn.Conv(features, (3, 3), padding=1, use_bias=False)`. A dense layer's 3x3 convolution
  has only `growth_rate` outputs, a narrow shape XLA:CPU's convolution runs at about half
  its matrix product's speed. So on CPU the forward pass is matrix products: with at least
  32 outputs, Winograd's F(2, 3) along the width, its products to all three kernel rows at
  once (a third fewer multiplications); with fewer, and in training, one product to all
  nine taps and shifted sums (`_conv3x3_forward`). In training both gradients are one
  product each against the output gradient's nine shifts (`_conv3x3_train`). Other platforms run their
  own convolution.
  """

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the convolution.

    Args:
      x: NHWC input.
      train: on CPU, use the hand-written gradient, which is reverse-mode only (as the
        rest of a DenseNet in training); otherwise the function is differentiable both ways.
    """
    kernel = self.param('kernel', self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if jax.default_backend() != 'cpu':
      return _convolution(x, kernel, 1, 1)
    return _conv3x3_train(x, kernel) if train else _conv3x3_forward(x, kernel)


def _taps(kernel: jax.Array) -> jax.Array:
  """An HWIO 3x3 kernel as an (in, 9 * out) matrix: column (3 * i + j) * out + o is tap (i, j), output o."""
  return kernel.transpose(2, 0, 1, 3).reshape(kernel.shape[2], -1)


def _conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution's values on CPU: Winograd's form where it is the faster, else the direct product.

  Winograd's products have 3 * out columns, the direct one's 9 * out. With few outputs the
  former are too narrow to pay: alone, for growth rate 12 (DenseNet-BC-100, 64 images of 48
  channels at 32x32) the direct form takes 5.5 ms and Winograd's 10.6; for 24 outputs 13.2 and
  14.9 ms; for 32 (DenseNet-121, 16 images of 128 channels at 56x56) 20.7 and 14.2 ms, and for
  48 (DenseNet-161) 38.4 and 29.0 ms. Below 8 pixels a side the extra rows and columns that
  Winograd's form computes cost more than it saves (7x7: 0.28 vs 0.33 ms).
  """
  if kernel.shape[-1] >= 32 and min(x.shape[1:3]) >= 8:
    return _conv3x3_winograd(x, kernel)
  return _conv3x3_direct(x, kernel)


@jax.jit
def _conv3x3_direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y[n, h, w] = sum over taps (i, j) of (x @ tap (i, j))[n, h + i - 1, w + j - 1] (0 outside).

  One product of each pixel's input with all nine taps, to 9 * out channels, then each output
  pixel sums its nine neighbours' products: slices padded back, which XLA fuses into one pass.
  """
  batch, height, width, channels = x.shape
  # Products and their sum in at least float32, as a convolution accumulates, then rounded once.
  accumulation = jnp.promote_types(x.dtype, jnp.float32)
  products = jax.lax.dot(x.reshape(-1, channels), _taps(kernel), preferred_element_type=accumulation)
  products = products.reshape(batch, height, width, 9, -1)
  y = sum(_shifted(products[:, :, :, 3 * i + j], i - 1, j - 1) for i in range(3) for j in range(3))
  return y.astype(x.dtype)


# Winograd's minimal filtering F(2, 3) (Lavin and Gray, 2016, https://arxiv.org/abs/1509.09308): two
# outputs of a 3-tap filter g from four inputs d with four products, y = A^T ((G g) * (B^T d)), not six.
_WINOGRAD_INPUT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])  # B^T
_WINOGRAD_FILTER = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])  # G
_WINOGRAD_OUTPUT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])  # A^T


def _combine(coefficients: np.ndarray, arrays: Sequence[jax.Array]) -> jax.Array:
  """sum_i coefficients[i] * arrays[i], skipping zeros and multiplying only by coefficients other than +-1."""
  terms = [
    a if c == 1 else -a if c == -1 else a * np.asarray(c, a.dtype)
    for c, a in zip(coefficients, arrays, strict=True)
    if c
  ]
  return reduce(jnp.add, terms)


# Jitted, as is the backward below: a DenseNet's 3x3 convolutions have one shape per dense block,
# so each is traced and lowered once per block instead of once per layer.
@jax.jit
def _conv3x3_winograd(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution as Winograd's F(2, 3) along the width, with products to all three kernel rows.

  Each pair of output columns 2m, 2m + 1 reads input columns 2m - 1 .. 2m + 2. Their four
  transforms (B^T d, each half the input's size) are multiplied by the transformed taps (G g) of
  all three kernel rows at once: four products to 3 * out channels. Output row h then sums kernel
  row i's products from input row h + i - 1 and transforms them back (A^T): 4 x 3 = 12
  multiplications per pair of output pixels where the direct form has 18.
  """
  batch, height, width, channels = x.shape
  features = kernel.shape[-1]
  tile, outputs = _WINOGRAD_OUTPUT.shape[1], _WINOGRAD_OUTPUT.shape[0]
  # Transforms, products and their sums in at least float32, as a convolution accumulates, then
  # rounded once.
  accumulation = jnp.promote_types(x.dtype, jnp.float32)
  groups = -(-width // outputs)
  # One row of zeros above and below, so that output row h reads product rows h, h + 1, h + 2.
  padding = ((0, 0), (1, 1), (1, outputs * groups + 1 - width), (0, 0))
  padded = jnp.pad(x.astype(accumulation), padding)
  columns = [padded[:, :, j : j + outputs * (groups - 1) + 1 : outputs] for j in range(tile)]
  inputs = jnp.stack([_combine(row, columns) for row in _WINOGRAD_INPUT]).reshape(tile, -1, channels)
  # Transposed before they are combined, not after: XLA then moves the whole filter transform out of
  # a loop over pieces of the batch (`DenseBlock.eval_piece_bytes`), where a lone transpose stays.
  taps = list(kernel.astype(accumulation).transpose(1, 2, 0, 3))  # Each (in, rows, out).
  filters = jnp.stack([_combine(row, taps) for row in _WINOGRAD_FILTER])  # (tile, in, rows, out)
  filters = filters.reshape(tile, channels, 3 * features)
  # One batched product rather than one per transform: fewer operations for the compilation
  # cache to load (a DenseNet-121 train step warm from the cache: 2.9 s, with four products 3.1 s).
  products = jax.lax.dot_general(inputs, filters, (((2,), (1,)), ((0,), (0,))))
  products = products.reshape(tile, batch, height + 2, groups, 3, features)
  rows = [sum(p[:, i : i + height, :, i] for i in range(3)) for p in products]
  y = jnp.stack([_combine(row, rows) for row in _WINOGRAD_OUTPUT], axis=3)
  return y.reshape(batch, height, outputs * groups, features)[:, :, :width].astype(x.dtype)


def _shifted(x: jax.Array, rows: int, columns: int) -> jax.Array:
  """y[n, h, w] = x[n, h + rows, w + columns], 0 outside x: a slice, padded back to x's shape."""
  for axis, shift in ((1, rows), (2, columns)):
    x = jax.lax.slice_in_dim(x, max(0, shift), x.shape[axis] + min(0, shift), axis=axis)
    padding = [(0, 0, 0)] * x.ndim
    padding[axis] = (max(0, -shift), max(0, shift), 0)
    x = jax.lax.pad(x, np.zeros((), x.dtype), padding)
  return x


@jax.custom_vjp
def _conv3x3_train(x: jax.Array, kernel: jax.Array) -> jax.Array:
  # The direct form in training too: Winograd's gained a train step 2% and cost its compile 1.5 s
  # cold and 0.3 s warm from the cache (README).
  return _conv3x3_direct(x, kernel)


def _conv3x3_train_forward(x, kernel):
  return _conv3x3_direct(x, kernel), (x, kernel)


def _conv3x3_train_backward(residuals, gradient):
  return _conv3x3_gradients(*residuals, gradient)


@jax.jit
def _conv3x3_gradients(x, kernel, gradient):
  """Both gradients from the output gradient's nine shifts, one product each.

  Tap (i, j)'s products reached output pixel (h, w) from input pixel (h + i - 1, w + j - 1), so
  their gradient at input pixel (h, w) is the output gradient at (h - i + 1, w - j + 1). Stacked,
  these shifts (n, h, w, 9 * out) times the taps' transpose are the input gradient, and the input
  against them is the kernel gradient. Autodiff's transpose of the shifted sum builds the same
  array as nine padded copies of it added up, which XLA:CPU runs 1.2-2.6x slower.
  """
  batch, height, width, channels = x.shape
  accumulation = jnp.promote_types(x.dtype, jnp.float32)
  shifted = jnp.concatenate(
    [_shifted(gradient, 1 - i, 1 - j) for i in range(3) for j in range(3)], axis=-1
  ).reshape(batch * height * width, -1)
  x_grad = jax.lax.dot(shifted, _taps(kernel).T, preferred_element_type=accumulation)
  taps_grad = jax.lax.dot_general(
    x.reshape(-1, channels), shifted, (((0,), (0,)), ((), ())), preferred_element_type=accumulation
  )
  kernel_grad = taps_grad.reshape(channels, 3, 3, -1).transpose(1, 2, 0, 3)
  return x_grad.reshape(x.shape).astype(x.dtype), kernel_grad.astype(kernel.dtype)


_conv3x3_train.defvjp(_conv3x3_train_forward, _conv3x3_train_backward)


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, size: int, stride: int, padding: int) -> jax.Array:
  """`nn.max_pool(x, (size, size), (stride, stride), ((padding, padding),) * 2)`, with a cheaper gradient.

  The same values and the same gradient: each window's gradient goes to its first maximum in
  row-major order, as XLA's select_and_scatter (JAX's max-pool gradient) and PyTorch's
  `max_pool2d` route it. XLA:CPU takes ~200 ms for that gradient of DenseNet's stem pool
  (3x3/2 on 16x112x112x64) as select_and_scatter, ~65 ms as the slices and selects below.
  The values too are the element-wise maximum of strided slices, which XLA fuses with the
  BN-ReLU before them: on XLA:CPU that pool and its BN-ReLU take 19 ms, against 28 ms as a
  reduce_window after a separate BN-ReLU.
  """
  return reduce(jax.lax.max, _pool_windows(x, size, stride, padding, -jnp.inf))


def _pool_windows(x, size, stride, padding, fill):
  """For each window offset (i, j), row-major: the element at that offset of every window."""
  x_padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=fill)
  height = (x.shape[1] + 2 * padding - size) // stride + 1
  width = (x.shape[2] + 2 * padding - size) // stride + 1
  return [
    x_padded[:, i : i + stride * (height - 1) + 1 : stride, j : j + stride * (width - 1) + 1 : stride]
    for i in range(size)
    for j in range(size)
  ]


@max_pool.defjvp
def _max_pool_jvp(size, stride, padding, primals, tangents):
  """The tangent at each window's first maximum: strided slices and selects, no select_and_scatter.

  Reverse mode transposes the slices into padding and the selects into selects, which XLA
  fuses into one pass over the input gradient.
  """
  (x,), (x_dot,) = primals, tangents
  # The offset of each window's first maximum, from the windows alone: compared with a pooled
  # output computed apart, values XLA recomputes in two fusions could differ in the last bit.
  windows = _pool_windows(x, size, stride, padding, -jnp.inf)
  maximum, first = windows[0], jnp.zeros(windows[0].shape, jnp.int32)
  for offset, window in enumerate(windows[1:], 1):
    greater = window > maximum
    maximum, first = jnp.where(greater, window, maximum), jnp.where(greater, offset, first)
  y = maximum  # The maximum of each window: max_pool's values.
  tangent_windows = _pool_windows(x_dot, size, stride, padding, 0)
  y_dot = sum(jnp.where(first == offset, t, 0) for offset, t in enumerate(tangent_windows))
  # In reverse mode this is a conditional on the output gradient, which XLA must compute in
  # full before it (the predicate, always true, is data to XLA). Otherwise XLA fuses the
  # output gradient's computation (in DenseNet, the sum of the BatchNorm gradients of every
  # layer of the first block) into the pass above and recomputes it for each window an
  # input element is in, which costs more than select_and_scatter saves. XLA:CPU drops
  # `optimization_barrier`s, so that cannot say it.
  return y, jax.lax.cond(first.reshape(-1)[0] >= 0, lambda t: t, jnp.zeros_like, y_dot)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis, optionally followed by ReLU, with a hand-written gradient.

  The same variables (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`) and the same
  forward numbers as `nn.BatchNorm(momentum, epsilon)` (+ `nn.relu` if `relu`). In training
  it is one `jax.custom_vjp` whose backward is the textbook BatchNorm gradient, with the
  ReLU's mask read from the saved output. A DenseNet-121 has 120 BatchNorms: as one
  primitive each instead of autodiff through a dozen operations, its train step traces
  and compiles about a sixth faster (README), and runs as fast.

  In training it also normalises `Centered` feature maps, whose batch statistics several
  BatchNorms share (see `Centered`; a `DenseBlock` passes its layers those).

  Attributes:
    use_running_average: normalise with the running averages instead of batch statistics.
    momentum: weight of the old running average (PyTorch's momentum 0.1 is 0.9 here).
    epsilon: added to the variance.
    relu: apply ReLU to the output.
    dtype: output dtype (statistics are computed in at least float32).
    param_dtype: parameter dtype.
  """

  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  relu: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: 'jax.Array | Centered', use_running_average: bool | None = None) -> jax.Array:
    """Normalises x over all axes but the last.

    Args:
      x: an array; or, with batch statistics, `Centered` feature maps (`center`), which are
        normalised as their concatenation along the last axis.
      use_running_average: see the attribute.

    Returns:
      The normalised x (concatenated), [ReLU-ed,] in `dtype`.
    """
    use_running_average = nn.merge_param('use_running_average', self.use_running_average, use_running_average)
    centered = x if isinstance(x, Centered) else None
    features = (x.var.shape[0] if centered is not None else x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    dtype = self.dtype or jnp.result_type(centered.dtype if centered is not None else x, scale, bias)
    if use_running_average:
      if centered is not None:
        raise ValueError(
          'BatchNorm with running averages got Centered feature maps, which are centred with their '
          'batch statistics: pass the feature maps themselves (concatenated) instead.'
        )
      return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.relu, dtype)
    if centered is not None:
      y = _batch_norm_centered(centered.values, centered.var, scale, bias, self.epsilon, self.relu, dtype)
      mean, var = centered.mean, centered.var
    else:
      y, mean, var = _batch_norm_train(x, scale, bias, self.epsilon, self.relu, dtype)
    if not self.is_initializing():
      ra_mean.value = _moving_average(ra_mean.value, mean, self.momentum)
      ra_var.value = _moving_average(ra_var.value, var, self.momentum)
    return y


# The BatchNorm arithmetic below is written in `jax.lax` rather than `jax.numpy`. Each
# `jnp` operation is a jitted function, traced anew for every new shape, and every
# BatchNorm of a DenseNet has its own channel count. In `lax` one traces with its gradient
# in 1.8 instead of 7.7 ms: 0.6 s of a DenseNet-121 train step's warm compile (README).
# The operations, their order and their dtypes are the ones `nn.BatchNorm` runs in `jnp`.


def _promoted(op: Callable[..., jax.Array], a: jax.Array, b: jax.Array) -> jax.Array:
  """op(a, b) in the dtype `jnp` would promote a and b to."""
  dtype = jnp.result_type(a, b)
  return op(a.astype(dtype), b.astype(dtype))


def _per_channel(v: jax.Array, x: jax.Array) -> jax.Array:
  """A (channels,) vector broadcast along x's leading axes."""
  return jax.lax.broadcast_in_dim(v, x.shape, (x.ndim - 1,))


def _channel_sum(x: jax.Array) -> jax.Array:
  """The sum over all axes but the last."""
  return jax.lax.reduce(x, np.zeros((), x.dtype), jax.lax.add, tuple(range(x.ndim - 1)))


def _moving_average(average: jax.Array, value: jax.Array, momentum: float) -> jax.Array:
  """momentum * average + (1 - momentum) * value, as `nn.BatchNorm` updates its running averages."""
  kept = jax.lax.mul(np.asarray(momentum, average.dtype), average)
  added = jax.lax.mul(np.asarray(1 - momentum, value.dtype), value)
  return _promoted(jax.lax.add, kept, added)


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x in at least float32, per-channel mean, biased variance), as `nn.BatchNorm` computes them."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  count = np.asarray(x.size // x.shape[-1], x.dtype)
  mean = jax.lax.div(_channel_sum(x), count)
  mean_of_squares = jax.lax.div(_channel_sum(jax.lax.square(x)), count)
  return x, mean, jax.lax.max(np.zeros((), x.dtype), jax.lax.sub(mean_of_squares, jax.lax.square(mean)))


def _affine(x, mean, var, scale, bias, epsilon):
  """((x - mean) * (rsqrt(var + epsilon) * scale) + bias, rsqrt(var + epsilon))."""
  return _scale_and_shift(_promoted(jax.lax.sub, x, _per_channel(mean, x)), var, scale, bias, epsilon)


def _scale_and_shift(centered, var, scale, bias, epsilon):
  """(centered * (rsqrt(var + epsilon) * scale) + bias, rsqrt(var + epsilon))."""
  rstd = jax.lax.rsqrt(jax.lax.add(var, np.asarray(epsilon, var.dtype)))
  y = _promoted(jax.lax.mul, centered, _per_channel(_promoted(jax.lax.mul, rstd, scale), centered))
  return _promoted(jax.lax.add, y, _per_channel(bias, centered)), rstd


def _normalize(x, mean, var, scale, bias, epsilon, relu, dtype):
  """BatchNorm with the given statistics [+ ReLU]."""
  y, _ = _affine(x, mean, var, scale, bias, epsilon)
  # nn.relu, for its derivative at 0 (0, where max's is 1/2) when the eval model is differentiated.
  return (nn.relu(y) if relu else y).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(x, scale, bias, epsilon, relu, dtype):
  """(BatchNorm with batch statistics [+ ReLU], batch mean, batch variance)."""
  return _batch_norm_train_forward(x, scale, bias, epsilon, relu, dtype)[0]


# Jitted so that outside `jit` too it is one computation, in which XLA divides by the count
# as in `jnp.mean` (by multiplying with its reciprocal): the same numbers as nn.BatchNorm's.
@partial(jax.jit, static_argnums=(3, 4, 5))
def _batch_norm_train_forward(x, scale, bias, epsilon, relu, dtype):
  x32, mean, var = _statistics(x)
  y, rstd = _affine(x32, mean, var, scale, bias, epsilon)
  if relu:  # jax.nn.relu's values; the backward below is its derivative.
    y = jax.lax.max(y, np.zeros((), y.dtype))
  y = y.astype(dtype)
  return (y, mean, var), (x, y if relu else None, mean, rstd, scale)


def _batch_norm_train_forward_rule(x, scale, bias, epsilon, relu, dtype):
  # With symbolic zeros the rule gets each argument with a flag saying whether it is differentiated.
  return _batch_norm_train_forward(x.value, scale.value, bias.value, epsilon, relu, dtype)


def _batch_norm_train_backward(epsilon, relu, dtype, residuals, cotangents):
  del epsilon, dtype  # In the saved rstd, and the cotangent's dtype.
  x, y, mean, rstd, scale = residuals
  dy, dmean, dvar = cotangents
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros(dy.shape, dy.dtype)
  count = np.asarray(x.size // x.shape[-1], mean.dtype)
  x32 = x.astype(mean.dtype)
  # Where the ReLU output is 0 the gradient stops: its input was <= 0 (the forward's own
  # values decide, so no recomputation can round to the other side of 0).
  g = jax.lax.select(jax.lax.gt(y, np.zeros((), y.dtype)), dy, jax.lax.full_like(dy, 0)) if relu else dy
  g = g.astype(mean.dtype)
  centered = jax.lax.sub(x32, _per_channel(mean, x32))
  dbias = _channel_sum(g)
  dscale = jax.lax.mul(_channel_sum(jax.lax.mul(g, centered)), rstd)
  # d/dx of the normalisation through x, the batch mean and the batch variance:
  # scale * rstd * (g - mean(g) - centered * rstd * dscale / count).
  mean_term = _per_channel(jax.lax.div(dbias, count), g)
  variance_term = jax.lax.mul(centered, _per_channel(jax.lax.div(jax.lax.mul(rstd, dscale), count), g))
  inner = jax.lax.sub(jax.lax.sub(g, mean_term), variance_term)
  dx = _promoted(jax.lax.mul, _per_channel(_promoted(jax.lax.mul, scale, rstd), g), inner)
  # The cotangents of the returned statistics: symbolic zeros when they only update running averages.
  if not isinstance(dmean, SymbolicZero):
    dx = _promoted(jax.lax.add, dx, _per_channel(jax.lax.div(dmean, count), dx))
  if not isinstance(dvar, SymbolicZero):
    two_dvar = jax.lax.mul(np.asarray(2, dvar.dtype), dvar)
    dx = _promoted(
      jax.lax.add, dx, _promoted(jax.lax.mul, centered, _per_channel(jax.lax.div(two_dvar, count), dx))
    )
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_forward_rule, _batch_norm_train_backward, symbolic_zeros=True)


@struct.dataclass
class Centered:
  """Feature maps minus their batch mean, with their batch statistics, for BatchNorms that share them.

  In training, a dense layer's first BatchNorm normalises the concatenation of all earlier
  feature maps with their batch statistics, and a channel's batch mean and variance do not
  depend on the layer that reads it. So a `DenseBlock` centres each feature map once
  (`center`), and each layer's `BatchNorm` scales and shifts the concatenation of the centred
  maps with its own parameters. Backward, the gradients of all the layers with respect to a
  centred map (and to its variance) add up first and go back through its centring once. The
  same mathematics as a BatchNorm of its own in each layer, which would keep its
  concatenation for the backward pass and take each layer's gradient back through the
  statistics over all of it: a DenseNet-121 train step runs about 5% faster (3-9% in three
  alternating pairs) and needs 16% less memory (README, "Shared batch statistics").

  Attributes:
    values: the centred feature maps, in at least float32, normalised as their
      concatenation along the last axis.
    mean: the per-channel batch mean of the concatenation.
    var: its per-channel biased batch variance (as `nn.BatchNorm` computes it).
    dtype: the dtype of the feature maps before centring.
  """

  values: tuple[jax.Array, ...]
  mean: jax.Array
  var: jax.Array
  dtype: Any = struct.field(pytree_node=False)

  @classmethod
  def concatenate(cls, parts: Sequence['Centered']) -> 'Centered':
    """The parts as one set of feature maps, channels in order."""
    return cls(
      values=tuple(v for part in parts for v in part.values),
      mean=jax.lax.concatenate([part.mean for part in parts], 0),
      var=jax.lax.concatenate([part.var for part in parts], 0),
      dtype=jnp.result_type(*(part.dtype for part in parts)),
    )


def center(x: jax.Array) -> Centered:
  """x minus its per-channel batch mean (over all axes but the last), with the batch statistics.

  Differentiable in reverse mode: the summed gradients of the centred values, the mean and
  the variance, from every BatchNorm that read them, go back to x together.
  """
  values, mean, var = _center(x, x.dtype)
  return Centered((values,), mean, var, x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _center(x, dtype):
  del dtype  # x's, for its gradient.
  return _center_forward(x)[0]


@jax.jit
def _center_forward(x):
  x32, mean, var = _statistics(x)
  centered = jax.lax.sub(x32, _per_channel(mean, x32))
  return (centered, mean, var), centered


def _center_forward_rule(x, dtype):
  del dtype
  return _center_forward(x.value)


@jax.jit
def _center_backward(centered, d_centered, d_mean=None, d_var=None):
  """x's gradient: d(centered) - its mean + d(mean) / count + centered * 2 d(var) / count.

  The variance is mean(x^2) - mean(x)^2, whose derivative is 2 * (x - mean) / count. A
  cotangent that is None is zero.
  """
  count = np.asarray(centered.size // centered.shape[-1], centered.dtype)
  dx = jnp.zeros(centered.shape, centered.dtype)
  if d_centered is not None:
    dx = jax.lax.sub(d_centered, _per_channel(jax.lax.div(_channel_sum(d_centered), count), d_centered))
  if d_mean is not None:
    dx = jax.lax.add(dx, _per_channel(jax.lax.div(d_mean, count), dx))
  if d_var is not None:
    two_d_var = jax.lax.mul(np.asarray(2, d_var.dtype), d_var)
    dx = jax.lax.add(dx, jax.lax.mul(centered, _per_channel(jax.lax.div(two_d_var, count), dx)))
  return dx


def _center_backward_rule(dtype, centered, cotangents):
  cotangents = [None if isinstance(c, SymbolicZero) else c for c in cotangents]
  return (_center_backward(centered, *cotangents).astype(dtype),)


_center.defvjp(_center_forward_rule, _center_backward_rule, symbolic_zeros=True)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _batch_norm_centered(values, var, scale, bias, epsilon, relu, dtype):
  """BatchNorm [+ ReLU] of centred feature maps' concatenation, with their batch variance.

  The forward pass is `_batch_norm_train`'s after its centring, operation for operation.
  """
  return _batch_norm_centered_forward(values, var, scale, bias, epsilon, relu, dtype)[0]


@partial(jax.jit, static_argnums=(4, 5, 6))
def _batch_norm_centered_forward(values, var, scale, bias, epsilon, relu, dtype):
  y, rstd = _scale_and_shift(_concatenate(values), var, scale, bias, epsilon)
  if relu:  # jax.nn.relu's values; the backward below is its derivative.
    y = jax.lax.max(y, np.zeros((), y.dtype))
  y = y.astype(dtype)
  return y, (values, y if relu else None, rstd, scale)


def _batch_norm_centered_forward_rule(values, var, scale, bias, epsilon, relu, dtype):
  values = tuple(v.value for v in values)
  return _batch_norm_centered_forward(values, var.value, scale.value, bias.value, epsilon, relu, dtype)


def _batch_norm_centered_backward(epsilon, relu, dtype, residuals, dy):
  """Gradients of the centred values (each), their variance, scale and bias.

  With k = scale * rstd and rstd = (var + epsilon)^-1/2, y = centred * k + bias: the centred
  values' gradient is g * k, the variance's sum(g * centred) * scale * -rstd^3 / 2 (g: y's
  gradient, 0 where the ReLU cut). `center` takes them back to the feature maps.
  """
  del epsilon, dtype  # In the saved rstd, and the cotangent's dtype.
  values, y, rstd, scale = residuals
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros(dy.shape, dy.dtype)
  centered = _concatenate(values)
  if len(values) > 1:
    # Zero, but XLA cannot know it without dy: the concatenation is then not merged with the
    # forward's into one array kept from one pass to the other, but fused into its readers.
    first = jax.lax.slice(dy, (0,) * dy.ndim, (1,) * dy.ndim)
    zero = jax.lax.convert_element_type(jax.lax.mul(first, np.zeros((), dy.dtype)), rstd.dtype)
    centered = jax.lax.add(centered, jax.lax.broadcast_in_dim(zero, dy.shape, range(dy.ndim)))
  # Where the ReLU output is 0 the gradient stops: its input was <= 0 (the forward's own
  # values decide, so no recomputation can round to the other side of 0).
  g = jax.lax.select(jax.lax.gt(y, np.zeros((), y.dtype)), dy, jax.lax.full_like(dy, 0)) if relu else dy
  g = g.astype(rstd.dtype)
  dbias = _channel_sum(g)
  g_dot_centered = _channel_sum(jax.lax.mul(g, centered))
  dscale = jax.lax.mul(g_dot_centered, rstd)
  minus_half_rstd_cubed = jax.lax.mul(np.asarray(-0.5, rstd.dtype), jax.lax.mul(rstd, jax.lax.square(rstd)))
  dvar = _promoted(jax.lax.mul, g_dot_centered, _promoted(jax.lax.mul, scale, minus_half_rstd_cubed))
  d_centered = _promoted(jax.lax.mul, g, _per_channel(_promoted(jax.lax.mul, scale, rstd), g))
  ends = np.cumsum([v.shape[-1] for v in values])
  d_values = tuple(
    jax.lax.slice_in_dim(d_centered, end - v.shape[-1], end, axis=-1).astype(v.dtype)
    for v, end in zip(values, ends, strict=True)
  )
  return d_values, dvar.astype(rstd.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_centered.defvjp(
  _batch_norm_centered_forward_rule, _batch_norm_centered_backward, symbolic_zeros=True
)


def _concatenate(arrays: Sequence[jax.Array]) -> jax.Array:
  """The arrays concatenated along their last axis (`lax`, see above)."""
  return arrays[0] if len(arrays) == 1 else jax.lax.concatenate(list(arrays), arrays[0].ndim - 1)


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (the bottleneck, `bn_size * growth_rate` channels)-BN-ReLU-3x3 conv.

  Without a bottleneck (`bn_size=None`, the paper's plain DenseNet) the layer is
  BN-ReLU-3x3 conv, named `norm1`/`conv1`. The layer is two methods, `bottleneck`
  (concatenation to the first convolution) and `head` (the rest), so that the
  memory-efficient `DenseBlock` can keep `bottleneck`'s output and recompute the rest.

  Attributes:
    growth_rate: channels each layer adds (k).
    bn_size: bottleneck width as a multiple of `growth_rate`; None for no bottleneck.
    drop_rate: dropout rate on the layer's new features (torchvision's `drop_rate`).
    conv: convolution constructor (no bias).
    norm: BatchNorm constructor (`use_running_average` is given per call; in training
      `norm1` may get `Centered` feature maps, as `BatchNorm` takes them).
    pointwise: 1x1 convolution constructor (e.g. `PointwiseConv`); `conv` if None.
    conv3x3: 3x3 convolution constructor, stride 1, padding 1 (e.g. `Conv3x3`); `conv` if None.
  """

  growth_rate: int
  bn_size: int | None
  drop_rate: float
  conv: ModuleDef
  norm: ModuleDef
  pointwise: ModuleDef | None = None
  conv3x3: ModuleDef | None = None

  def setup(self):
    conv3x3 = self.conv3x3 or partial(self.conv, kernel_size=(3, 3), padding=1)
    self.norm1 = self.norm(relu=True)
    if self.bn_size is None:
      self.conv1 = conv3x3(self.growth_rate)
    else:
      self.conv1 = _pointwise(self.pointwise, self.conv, self.bn_size * self.growth_rate)
      self.norm2 = self.norm(relu=True)
      self.conv2 = conv3x3(self.growth_rate)
    if self.drop_rate > 0:
      self.dropout = nn.Dropout(self.drop_rate)

  def __call__(
    self, features: Sequence[jax.Array] | Centered, train: bool, dropout_rng: jax.Array | None = None
  ) -> jax.Array:
    """Returns the `growth_rate` new channels computed from all earlier `features`.

    Args:
      features: all earlier feature maps; in training they may come `Centered` (as a
        `DenseBlock` passes them), which gives the same numbers.
      train: batch statistics and dropout if True.
      dropout_rng: the dropout key (drawn from the 'dropout' rng stream if None).
    """
    return self.head(self.bottleneck(features, train), train, dropout_rng)

  def bottleneck(self, features: Sequence[jax.Array] | Centered, train: bool) -> jax.Array:
    """Concatenation-BN-ReLU-first convolution."""
    if not isinstance(features, Centered):
      features = jnp.concatenate(features, axis=-1)
    x = self.norm1(features, use_running_average=not train)
    if self.bn_size is not None:
      return self.conv1(x)
    return _apply_conv3x3(self.conv1, x, train, takes_train=self.conv3x3 is not None)

  def head(self, x: jax.Array, train: bool, dropout_rng: jax.Array | None = None) -> jax.Array:
    """BN-ReLU-3x3 conv after the bottleneck (nothing without one), then dropout."""
    if self.bn_size is not None:
      x = self.norm2(x, use_running_average=not train)
      x = _apply_conv3x3(self.conv2, x, train, takes_train=self.conv3x3 is not None)
    if self.drop_rate > 0:
      x = self.dropout(x, deterministic=not train, rng=dropout_rng)
    return x


def _apply_conv3x3(conv: nn.Module, x: jax.Array, train: bool, takes_train: bool) -> jax.Array:
  # A `conv3x3` module takes `train` (to pick its gradient), a plain `conv` does not. A function, not
  # a method: `nn.tabulate` records a module's method calls and would take the module argument's shape.
  return conv(x, train=train) if takes_train else conv(x)


class DenseBlock(nn.Module):
  """`num_layers` dense layers, each fed the concatenation of all earlier features.

  In training, each feature map is centred with its batch statistics once and the layers
  get them `Centered`: their first BatchNorms share the statistics (see `Centered`).

  With `memory_efficient=True`, training keeps only each layer's new features (centred) and
  its bottleneck output, so memory grows linearly with depth instead of quadratically (the
  BN-ReLUs before each bottleneck are what grows; Pleiss et al., 2017, and torchvision's
  `memory_efficient`). See `_memory_efficient_block`. The numbers are the same as without it.

  With `eval_piece_bytes`, outside training the block runs on pieces of the batch, one
  after another, each as many images as keep the block's output within that many bytes:
  the activations of a piece then stay in the processor's cache instead of going out to
  memory and back between operations. Each image's numbers are the same.
  """

  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  conv: ModuleDef
  norm: ModuleDef
  pointwise: ModuleDef | None = None
  conv3x3: ModuleDef | None = None
  eval_piece_bytes: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    layer = partial(
      DenseLayer,
      growth_rate=self.growth_rate,
      bn_size=self.bn_size,
      drop_rate=self.drop_rate,
      conv=self.conv,
      norm=self.norm,
      pointwise=self.pointwise,
      conv3x3=self.conv3x3,
    )
    images = self._images_per_piece(x) if not train and not self.is_initializing() else None
    if images is not None:
      # The block as a pure function of its variables, applied to each piece in turn.
      variables = self.variables
      whole = self.clone(parent=None, eval_piece_bytes=None)
      return _map_over_pieces(lambda piece: whole.apply(variables, piece, train=False), x, images)
    names = [f'denselayer{i + 1}' for i in range(self.num_layers)]
    # Dropout keys are drawn here, so that both ways of computing the block use the same.
    dropout = train and self.drop_rate > 0
    rngs = [self.make_rng('dropout') for _ in names] if dropout else [None] * len(names)
    if self.memory_efficient and train and not self.is_initializing():
      # The layers run as pure functions of their variables under one custom gradient.
      variables = self.variables
      y, batch_stats = _memory_efficient_block(layer(parent=None))(
        [variables['params'][name] for name in names],
        [variables['batch_stats'][name] for name in names],
        x,
        rngs if dropout else None,
      )
      for name, stats in zip(names, batch_stats, strict=True):
        self.put_variable('batch_stats', name, stats)
      return y
    # In training each feature map is centred once, for all the later layers (see `Centered`).
    features, centered = [x], center(x) if train else None
    for i, (name, rng) in enumerate(zip(names, rngs, strict=True)):
      new = layer(name=name)(centered if train else features, train, rng)
      features.append(new)
      if train and i + 1 < len(names):
        # One at a time: the statistics' gradients then add up in one sum per layer, not per feature map.
        centered = Centered.concatenate([centered, center(new)])
    return jnp.concatenate(features, axis=-1)

  def _images_per_piece(self, x: jax.Array) -> int | None:
    """Images per piece outside training (see the class docstring), None for the whole batch."""
    # Pieces would drop what the caller collects (`capture_intermediates`, `sow`).
    if self.eval_piece_bytes is None or self.is_mutable_collection('intermediates'):
      return None
    channels = x.shape[-1] + self.num_layers * self.growth_rate
    image_bytes = x.shape[1] * x.shape[2] * channels * x.dtype.itemsize
    images = max(1, self.eval_piece_bytes // image_bytes)
    # A multiple of the device count, so that a batch sharded over the devices splits evenly.
    images = -(-images // jax.device_count()) * jax.device_count()
    return images if images < x.shape[0] else None


# Chosen on a 2-core AMD EPYC (32 MiB L3 cache), eval img/s with the whole network in pieces of n
# images: DenseNet-121, a batch of 16 at 224x224 (dense block 1's output 3.2 MB per image), n=16 55,
# 4 65, 2 64, 1 51; DenseNet-BC-100, 64 at 32x32 (0.9 MB per image), n=64 302, 16 413, 8 435, 4 392.
# Later blocks' products lose speed on few pixels, hence a budget per block rather than one piece
# size: DenseNet-121 then evaluates at 66-67 img/s (blocks 1-3 in pieces of 2, 4 and 8 images, block
# 4 whole) and DenseNet-BC-100 at 413-414 (blocks 1-2 in pieces of 8 and 16, block 3 whole), against
# 52-53 and 268-296 whole.
_EVAL_PIECE_BYTES = 8 * 2**20


def _map_over_pieces(function: Callable[[jax.Array], Any], x: jax.Array, images: int) -> Any:
  """function(x) computed on pieces of at most `images` images, one after another.

  `function` must treat each image on its own. Piece j holds images j, j + n, j + 2n, ... (n
  pieces): a batch split in contiguous blocks over devices then gives every piece the same
  share of each device's images.
  """
  batch = x.shape[0]
  fewest = -(-batch // images)
  # Equal pieces without padding if up to half as many pieces again give them (not 7 pieces of one
  # image for 7 images at most 2 a piece); else as even as can be, with at most pieces - 1 padding.
  pieces = next((n for n in range(fewest, (3 * fewest + 1) // 2) if batch % n == 0), fewest)
  images = -(-batch // pieces)
  x = jnp.pad(x, ((0, pieces * images - batch),) + ((0, 0),) * (x.ndim - 1))
  y = jax.lax.map(function, jnp.swapaxes(x.reshape(images, pieces, *x.shape[1:]), 0, 1))
  return jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])[:batch]


def _memory_efficient_block(layer: DenseLayer) -> Callable[..., tuple[jax.Array, list[Any]]]:
  """A dense block in training mode whose backward pass recomputes instead of storing.

  The returned function maps (per-layer params, per-layer batch_stats, block input,
  per-layer dropout keys or None) to (block output, updated per-layer batch_stats),
  computing exactly what `DenseLayer` computes. Its gradient keeps only the block's
  centred feature maps (`Centered`) and each layer's bottleneck output from the forward
  pass, and walks the layers backwards:

  * each layer's concatenation and BN-ReLUs are recomputed from the stored centred maps and
    bottleneck output; its convolutions are not (XLA drops their unused outputs);
  * the recomputation takes an input that depends on the layer's output gradient, so
    XLA can neither merge it with the forward pass (XLA:CPU drops the
    `optimization_barrier` that `jax.checkpoint` relies on) nor run it early;
  * the gradients of all earlier centred maps accumulate in one buffer updated in place,
    layer by layer, so no layer's concatenation-sized gradient outlives the layer; a feature
    map's sum goes back through its centring when the walk reaches the layer that made it.
  """

  def apply(variables, method, *args):
    return layer.apply(variables, *args, method=method, mutable=['batch_stats'])

  def forward(params, batch_stats, x, rngs):
    # inputs[i] is what layer i normalises: features 0..i, centred (see the plain block).
    features, inputs, bottlenecks, new_stats = [x], [center(x)], [], []
    for i, (layer_params, stats) in enumerate(zip(params, batch_stats, strict=True)):
      rng = None if rngs is None else rngs[i]
      h, updates = apply({'params': layer_params, 'batch_stats': stats}, 'bottleneck', inputs[i], True)
      new, updates = apply({'params': layer_params, **updates}, 'head', h, True, rng)
      features.append(new)
      if i + 1 < len(params):
        inputs.append(Centered.concatenate([inputs[i], center(new)]))
      bottlenecks.append(h)
      new_stats.append(updates['batch_stats'])
    output = jnp.concatenate(features, axis=-1)
    return (output, new_stats), (params, batch_stats, inputs, bottlenecks, rngs)

  def layer_vjp(params, batch_stats, centered, bottleneck, rng, output_grad):
    """(param grads, centred feature grads) of one layer, recomputing its BN-ReLUs."""
    # Zero, but XLA cannot know it without computing the gradient: see the docstring.
    zero = output_grad.reshape(-1)[0] * 0
    centered, bottleneck = jax.tree.map(lambda a: a + zero.astype(a.dtype), (centered, bottleneck))

    def run(method, p, *args):
      return apply({'params': p, 'batch_stats': batch_stats}, method, *args)[0]

    _, head_vjp = jax.vjp(lambda p, h: run('head', p, h, True, rng), params, bottleneck)
    head_grads, bottleneck_grad = head_vjp(output_grad)
    _, bottleneck_vjp = jax.vjp(lambda p, c: run('bottleneck', p, c, True), params, centered)
    bottleneck_grads, centered_grads = bottleneck_vjp(bottleneck_grad)
    return jax.tree.map(jnp.add, head_grads, bottleneck_grads), centered_grads

  def backward(residuals, cotangents):
    params, batch_stats, inputs, bottlenecks, rngs = residuals
    gradient, _ = cotangents  # The running averages have no gradient.
    centered = inputs[-1].values  # Each feature map but the last, centred.
    widths = [c.shape[-1] for c in centered]
    ends = np.cumsum([*widths, gradient.shape[-1] - sum(widths)])
    param_grads = [None] * len(params)
    # The summed gradients of the centred maps of features 0..i (a buffer updated in place) and
    # of their variances; the running averages' means have no gradient.
    values_grad = var_grad = None

    def feature_grad(j, start, end):
      """Feature j's gradient: from the block output, and through its centring from the later layers."""
      through_centring = _center_backward(centered[j], values_grad[..., start:end], None, var_grad[start:end])
      return gradient[..., start:end] + through_centring.astype(gradient.dtype)

    for i in reversed(range(len(params))):
      last = values_grad is None  # No later layer reads feature i + 1.
      output_grad = gradient[..., ends[i] :] if last else feature_grad(i + 1, ends[i], ends[i + 1])
      param_grads[i], grads = layer_vjp(
        params[i], batch_stats[i], inputs[i], bottlenecks[i], None if rngs is None else rngs[i], output_grad
      )
      new_values_grad = _concatenate(grads.values)
      if last:
        values_grad, var_grad = new_values_grad, grads.var
      else:
        values_grad = jax.lax.dynamic_update_slice_in_dim(
          values_grad, values_grad[..., : ends[i]] + new_values_grad, 0, axis=-1
        )
        var_grad = var_grad[: ends[i]] + grads.var
    x_grad = feature_grad(0, 0, ends[0])
    return param_grads, None, x_grad, None

  block = jax.custom_vjp(lambda *args: forward(*args)[0])
  block.defvjp(forward, backward)
  return block


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to `num_output_features` channels-2x2 average pool.

  The pool runs before the convolution: both are linear and act on different axes, so
  they commute, and the convolution then has a quarter of the pixels (a DenseNet-121's
  three transitions are 11% of its multiply-adds conv-first, 3% pool-first).
  """

  num_output_features: int
  conv: ModuleDef
  norm: ModuleDef
  pointwise: ModuleDef | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.norm(use_running_average=not train, relu=True, name='norm')(x)
    x = _average_pool_2x2(x)
    return _pointwise(self.pointwise, self.conv, self.num_output_features, name='conv')(x)


def _average_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.avg_pool(x, (2, 2), strides=(2, 2))` as the mean of four strided slices.

  On XLA:CPU, DenseNet-121's first transition (BN-ReLU, pool, 1x1 conv on 16x56x56x256)
  takes 30 ms forward and backward this way, 46 ms with `nn.avg_pool` (its gradient is a
  padded reduce_window) and 59 ms as a reshape and a sum (fused into the product's kernel).
  """
  height, width = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2  # An odd last row or column is dropped.
  return (
    x[:, 0:height:2, 0:width:2]
    + x[:, 0:height:2, 1:width:2]
    + x[:, 1:height:2, 0:width:2]
    + x[:, 1:height:2, 1:width:2]
  ) / 4


def _pointwise(pointwise: ModuleDef | None, conv: ModuleDef, features: int, **kwargs: Any) -> nn.Module:
  return pointwise(features, **kwargs) if pointwise is not None else conv(features, (1, 1), **kwargs)


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')


class DenseNet(nn.Module):
  """DenseNet; the defaults are torchvision's `DenseNet` (= DenseNet-121).

  Attributes:
    growth_rate: channels each dense layer adds (k).
    block_config: number of layers in each dense block.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck width as a multiple of `growth_rate`; None for the paper's
      plain DenseNet layers (BN-ReLU-3x3 conv, no bottleneck).
    compression: transition compression (theta): a transition keeps
      `int(channels * compression)` channels.
    drop_rate: dropout rate after each dense layer (needs a 'dropout' rng in training).
    num_classes: classifier outputs.
    stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or 'cifar' (3x3 conv).
    memory_efficient: in training, keep only each dense layer's new features and
      bottleneck output and recompute its concatenation and BN-ReLUs in the backward
      pass (see `DenseBlock`): the same numbers, memory linear instead of quadratic in
      depth.
    features_only: return a dict of the per-stage features (torchvision's `features`
      children names: 'conv0', 'norm0', 'relu0', 'pool0', 'denseblock1',
      'transition1', ..., 'norm5') instead of logits; no classifier is created.
      A model built with `features_only=True` applies to a full model's variables.
    eval_in_pieces: outside training, run each dense block on pieces of the batch whose
      output is at most 8 MiB, one piece after another, so that a piece's activations
      stay in the processor's cache; None (the default) does so on CPU only. The outputs
      are the same. See `DenseBlock.eval_piece_bytes`.
    dtype: computation dtype (e.g. jnp.bfloat16).
    param_dtype: parameter dtype.

  In training mode (`train=True`) the model is reverse-mode differentiable only: its
  BatchNorms and the memory-efficient blocks are `jax.custom_vjp`s. With `train=False` it
  is differentiable both ways (`jax.jvp`, `jax.jacfwd`).
  """

  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int | None = 4
  compression: float = 0.5
  drop_rate: float = 0.0
  num_classes: int = 1000
  stem: str = 'imagenet'
  memory_efficient: bool = False
  features_only: bool = False
  eval_in_pieces: bool | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    # Fail at construction, with the fix, rather than deep inside a trace.
    _check_positive_int('growth_rate', self.growth_rate)
    _check_positive_int('num_init_features', self.num_init_features)
    _check_positive_int('num_classes', self.num_classes)
    if self.bn_size is not None:
      _check_positive_int('bn_size (or None for no bottleneck)', self.bn_size)
    if isinstance(self.block_config, int) or not self.block_config:
      raise ValueError(
        f'block_config must be a non-empty sequence of layer counts, one per dense '
        f'block, e.g. (6, 12, 24, 16); got {self.block_config!r}.'
      )
    for num_layers in self.block_config:
      _check_positive_int('every entry of block_config', num_layers)
    if not 0.0 < self.compression <= 1.0:
      raise ValueError(f'compression must be in (0, 1], got {self.compression!r}.')
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f'drop_rate must be in [0, 1), got {self.drop_rate!r}.')
    if self.stem not in ('imagenet', 'cifar'):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
    if self.eval_in_pieces not in (None, True, False):
      raise ValueError(
        f'eval_in_pieces must be True, False or None (on CPU only), got {self.eval_in_pieces!r}.'
      )
    # A tuple keeps the module hashable (a list would not be).
    object.__setattr__(self, 'block_config', tuple(self.block_config))
    super().__post_init__()

  def min_input_size(self) -> int:
    """The smallest image side the network's downsampling leaves at least 1 pixel of."""
    size = 1
    while _downsampled_sizes(size, self.stem, len(self.block_config))[-1][1] < 1:
      size += 1
    return size

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(
        f'DenseNet expects a batch of NHWC images (batch, height, width, channels), got '
        f'shape {tuple(x.shape)}. For one image add a batch axis (x[None]); a torch '
        f'NCHW batch becomes NHWC with x.transpose(0, 2, 3, 1).'
      )
    params = self.variables.get('params', {})
    if 'conv0' in params:
      expected = params['conv0']['kernel'].shape[2]
      if x.shape[-1] != expected:
        raise ValueError(
          f'Input has {x.shape[-1]} channels (shape {tuple(x.shape)}, NHWC) but the '
          f'parameters were initialized for {expected}-channel input. Feed '
          f'{expected}-channel NHWC images (e.g. repeat grayscale to RGB, or transpose '
          f'NCHW to NHWC), or initialize the model with {x.shape[-1]}-channel input.'
        )
    for axis, side in (('height', x.shape[1]), ('width', x.shape[2])):
      for stage, size in _downsampled_sizes(side, self.stem, len(self.block_config)):
        if size < 1:
          raise ValueError(
            f'Input {axis} {side} is too small for this DenseNet: its downsampling '
            f'leaves nothing at {stage}. Use images of at least '
            f'{self.min_input_size()}x{self.min_input_size()} pixels (resize or pad '
            f'them), or a model with fewer dense blocks.'
          )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array | dict[str, jax.Array]:
    """Applies the network.

    Args:
      x: images, NHWC, any number of channels (fixed at initialization).
      train: batch statistics and dropout if True (call with
        `mutable=['batch_stats']` to get the updated running averages); running
        averages if False.

    Returns:
      Logits `(batch, num_classes)` in `dtype`, or with `features_only` a dict of the
      per-stage feature maps.
    """
    self._check_input(x)
    conv = partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=conv_kernel_init,
    )
    stem_conv = partial(
      StemConv, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init
    )
    pointwise = partial(
      PointwiseConv, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init
    )
    conv3x3 = partial(Conv3x3, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)
    # PyTorch's BN momentum 0.1 is Flax's 0.9 (the weight of the running average).
    norm = partial(
      BatchNorm,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    in_pieces = jax.default_backend() == 'cpu' if self.eval_in_pieces is None else self.eval_in_pieces
    eval_piece_bytes = _EVAL_PIECE_BYTES if in_pieces else None
    features = {}
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = features['conv0'] = stem_conv(self.num_init_features, 7, 2, 3, name='conv0')(x)
      x = features['norm0'] = norm(use_running_average=not train, name='norm0')(x)
      x = features['relu0'] = nn.relu(x)
      x = features['pool0'] = max_pool(x, 3, 2, 1)
    else:
      x = features['conv0'] = stem_conv(self.num_init_features, 3, 1, 1, name='conv0')(x)

    num_features = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      x = features[f'denseblock{i + 1}'] = DenseBlock(
        num_layers=num_layers,
        growth_rate=self.growth_rate,
        bn_size=self.bn_size,
        drop_rate=self.drop_rate,
        memory_efficient=self.memory_efficient,
        eval_piece_bytes=eval_piece_bytes,
        conv=conv,
        norm=norm,
        pointwise=pointwise,
        conv3x3=conv3x3,
        name=f'denseblock{i + 1}',
      )(x, train)
      num_features += num_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        num_features = int(num_features * self.compression)
        x = features[f'transition{i + 1}'] = Transition(
          num_features, conv=conv, norm=norm, pointwise=pointwise, name=f'transition{i + 1}'
        )(x, train)
    x = features['norm5'] = norm(use_running_average=not train, name='norm5')(x)
    if self.features_only:
      return features

    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=dense_kernel_init,
      name='classifier',
    )(x)


def _downsampled_sizes(size: int, stem: str, num_blocks: int) -> list[tuple[str, int]]:
  """The spatial size after each downsampling stage, as (stage name, size)."""
  sizes = []
  if stem == 'imagenet':
    size = (size + 2 * 3 - 7) // 2 + 1  # 7x7/2 conv, padding 3.
    sizes.append(('conv0', size))
    size = (size + 2 * 1 - 3) // 2 + 1  # 3x3/2 max pool, padding 1.
    sizes.append(('pool0', size))
  for i in range(1, num_blocks):
    size //= 2  # 2x2/2 average pool.
    sizes.append((f'transition{i}', size))
  return sizes


# torchvision's configurations; DenseNet-264 is the paper's (growth 32, 6-12-64-48).
DenseNet121 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
DenseNet161 = partial(DenseNet, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
DenseNet169 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
DenseNet201 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)
DenseNet264 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)


def densenet_cifar(
  depth: int, growth_rate: int, bc: bool = True, num_classes: int = 10, **kwargs: Any
) -> DenseNet:
  """The paper's CIFAR/SVHN networks: DenseNet (L, k) or DenseNet-BC (L, k).

  Three dense blocks of equal size after a 3x3 stem conv. A plain DenseNet has
  (L - 4) / 3 layers per block (BN-ReLU-3x3 conv), 16 stem channels and no
  compression; DenseNet-BC has (L - 4) / 6 bottleneck layers per block, 2k stem
  channels and compression 0.5.

  Args:
    depth: L, the number of layers with weights (convolutions and the classifier).
    growth_rate: k.
    bc: DenseNet-BC (bottleneck + compression) if True, plain DenseNet if False.
    num_classes: classifier outputs.
    **kwargs: any other `DenseNet` attribute (drop_rate, memory_efficient, dtype, ...).

  Returns:
    The configured (unbound) `DenseNet`.
  """
  # Each dense layer has 2 convolutions in DenseNet-BC, 1 in DenseNet; the other 4 layers
  # with weights are the stem conv, 2 transition convs and the classifier.
  step = 3 * (2 if bc else 1)
  if not isinstance(depth, int) or depth < 4 + step or (depth - 4) % step:
    examples = ', '.join(str(step * n + 4) for n in (1, 2, 6, 16))
    raise ValueError(
      f'depth {depth!r} does not fit the CIFAR DenseNet{"-BC" if bc else ""} rule '
      f'depth = {step} * layers_per_block + 4; use one of {examples}, ... (the paper uses '
      '40 and 100 for DenseNet, 100, 190 and 250 for DenseNet-BC).'
    )
  return DenseNet(
    growth_rate=growth_rate,
    block_config=((depth - 4) // step,) * 3,
    num_init_features=2 * growth_rate if bc else 16,
    bn_size=4 if bc else None,
    compression=0.5 if bc else 1.0,
    num_classes=num_classes,
    stem='cifar',
    **kwargs,
  )
