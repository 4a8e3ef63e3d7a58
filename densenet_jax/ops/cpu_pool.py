"""The CPU kernel set's pools: `nn.max_pool` and `nn.avg_pool`'s numbers in forms XLA:CPU runs faster.

The references are in `densenet_jax.ops.xla`; tests/test_kernel_sets.py compares them.
"""

from functools import partial, reduce

import jax
import jax.numpy as jnp


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


def avg_pool(x: jax.Array) -> jax.Array:
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
