"""The CPU kernel set's convolutions: one module, each shape in the form XLA:CPU runs fastest.

Each form computes what `nn.Conv(features, (k, k), strides, padding, use_bias=False)` computes, the
reference in `densenet_jax.ops.xla`; tests/test_kernel_sets.py compares them in float64, values and
derivatives. Measurements behind each choice: docs/performance.md.
"""

from collections.abc import Sequence
from functools import partial, reduce
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

# An input with at most this many channels is an image (the stem): its filter gradient is a product over
# patches (`_stem_conv`), which builds kernel_size**2 copies of the input in the backward pass.
_IMAGE_CHANNELS = 4


class Conv(nn.Module):
  """A convolution without bias, in the form XLA:CPU runs fastest for its shape.

  The same parameter (`kernel`, HWIO) and function as `nn.Conv(features, (kernel_size,) * 2, strides,
  padding, use_bias=False)`:

  * 1x1: a matrix product over the channel axis (XLA:CPU's 1x1 convolution is 2-3x slower);
  * an image input (at most 4 channels, the stem): XLA's convolution, its filter gradient a product
    over patches (XLA:CPU's filter-gradient convolution runs at about 20 GFLOP/s);
  * 3x3, stride 1, padding 1 (a dense layer's, few outputs): matrix products to the kernel taps and
    shifted sums, Winograd's F(2, 3) for the values outside training, and in training a hand-written
    gradient (reverse mode only);
  * anything else: XLA's convolution.

  Attributes:
    features: output channels.
    kernel_size: the side of the square kernel.
    strides: the stride along both sides.
    padding: zeros added to each side.
    train: whether this is a training step (which picks the 3x3 convolution's gradient).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    kernel_init: the kernel's initializer.
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  train: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size, strides, padding = self.kernel_size, self.strides, self.padding
    kernel = self.param(
      'kernel', self.kernel_init, (size, size, x.shape[-1], self.features), self.param_dtype
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if (size, strides, padding) == (1, 1, 0):
      return pointwise(x, kernel)
    if x.shape[-1] <= _IMAGE_CHANNELS:
      return _stem_conv(x, kernel, strides, padding)
    if (size, strides, padding) == (3, 1, 1):
      return _conv3x3_train(x, kernel) if self.train else _conv3x3_forward(x, kernel)
    return _convolution(x, kernel, strides, padding)


def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 convolution (kernel (1, 1, in, out)) as one matrix product over the channel axis.

  A 2-D product (pixels x channels): its kernel gradient is then one plain matrix product. Contracting
  N, H and W of a 4-D array instead made XLA:CPU write the output gradient transposed, fused with the
  BatchNorm backward: ~10% of a DenseNet-121 train step.
  """
  y = jax.lax.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0])
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _convolution(x, kernel, stride, padding):
  """What `nn.Conv` computes (NHWC, HWIO, symmetric padding, no bias)."""
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _stem_conv(x, kernel, stride, padding):
  """XLA's convolution, with a JVP whose kernel term reverse mode turns into one product over patches.

  XLA:CPU computes the stem's filter gradient (7x7/2 on 3 channels) as a convolution at about 20
  GFLOP/s, 8% of a DenseNet-121 train step; as a matrix product of the image patches (7 * 7 * 3 = 147
  values per output pixel) with the output gradient it is a plain dot.
  """
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
  # cold and 0.3 s warm from the cache (docs/performance.md).
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
