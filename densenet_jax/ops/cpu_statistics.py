"""Per-channel BatchNorm arithmetic in `jax.lax`, shared by the CPU set's BatchNorm and its centring
(`densenet_jax.ops.cpu_batch_norm`, `densenet_jax.ops.cpu_centered`).

It is written in `jax.lax` rather than `jax.numpy`: each `jnp` operation is a jitted function,
traced anew for every new shape, and every BatchNorm of a DenseNet has its own channel count. In
`lax` one traces with its gradient in 1.8 instead of 7.7 ms: 0.6 s of a DenseNet-121 train step's
warm compile (docs/performance.md). The operations, their order and their dtypes are the ones
`nn.BatchNorm` runs in `jnp`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def promoted(op: Callable[..., jax.Array], a: jax.Array, b: jax.Array) -> jax.Array:
  """op(a, b) in the dtype `jnp` would promote a and b to."""
  dtype = jnp.result_type(a, b)
  return op(a.astype(dtype), b.astype(dtype))


def per_channel(v: jax.Array, x: jax.Array) -> jax.Array:
  """A (channels,) vector broadcast along x's leading axes."""
  return jax.lax.broadcast_in_dim(v, x.shape, (x.ndim - 1,))


def channel_sum(x: jax.Array) -> jax.Array:
  """The sum over all axes but the last."""
  return jax.lax.reduce(x, np.zeros((), x.dtype), jax.lax.add, tuple(range(x.ndim - 1)))


def moving_average(average: jax.Array, value: jax.Array, momentum: float) -> jax.Array:
  """momentum * average + (1 - momentum) * value, as `nn.BatchNorm` updates its running averages."""
  kept = jax.lax.mul(np.asarray(momentum, average.dtype), average)
  added = jax.lax.mul(np.asarray(1 - momentum, value.dtype), value)
  return promoted(jax.lax.add, kept, added)


@struct.dataclass
class Axis:
  """The mapped axis (and groups of it) whose devices share batch statistics; static, hashable."""

  name: Any = struct.field(pytree_node=False)
  groups: Any = struct.field(pytree_node=False, default=None)

  @classmethod
  def of(cls, name: Any, groups: Any) -> 'Axis | None':
    if name is None:
      return None
    return cls(name, None if groups is None else tuple(tuple(group) for group in groups))

  def mean(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmean(x, self.name, axis_index_groups=self.groups)

  def sum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.name, axis_index_groups=self.groups)


def all_sum(x: jax.Array, axis: Axis | None) -> jax.Array:
  """x summed over the devices that share statistics (x itself without an axis)."""
  return x if axis is None else axis.sum(x)


def channel_count(x: jax.Array, dtype: Any, axis: Axis | None) -> jax.Array:
  """The number of values per channel that the statistics are over, on every device sharing them."""
  return all_sum(np.asarray(x.size // x.shape[-1], dtype), axis)


def batch_statistics(x: jax.Array, axis: Axis | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x in at least float32, per-channel mean, biased variance), as `nn.BatchNorm` computes them.

  With an axis, the mean and the mean of squares are averaged over its devices, as `nn.BatchNorm`
  with `axis_name` does.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  count = np.asarray(x.size // x.shape[-1], x.dtype)
  mean = jax.lax.div(channel_sum(x), count)
  mean_of_squares = jax.lax.div(channel_sum(jax.lax.square(x)), count)
  if axis is not None:
    both = axis.mean(jax.lax.concatenate([mean, mean_of_squares], 0))
    mean, mean_of_squares = both[: mean.shape[0]], both[mean.shape[0] :]
  return x, mean, jax.lax.max(np.zeros((), x.dtype), jax.lax.sub(mean_of_squares, jax.lax.square(mean)))


def affine(x, mean, var, scale, bias, epsilon):
  """((x - mean) * (rsqrt(var + epsilon) * scale) + bias, rsqrt(var + epsilon))."""
  return scale_and_shift(promoted(jax.lax.sub, x, per_channel(mean, x)), var, scale, bias, epsilon)


def scale_and_shift(centered, var, scale, bias, epsilon):
  """(centered * (rsqrt(var + epsilon) * scale) + bias, rsqrt(var + epsilon))."""
  rstd = jax.lax.rsqrt(jax.lax.add(var, np.asarray(epsilon, var.dtype)))
  y = promoted(jax.lax.mul, centered, per_channel(promoted(jax.lax.mul, rstd, scale), centered))
  return promoted(jax.lax.add, y, per_channel(bias, centered)), rstd


def normalize(x, mean, var, scale, bias, epsilon, relu, dtype):
  """BatchNorm with the given statistics [+ ReLU]."""
  y, _ = affine(x, mean, var, scale, bias, epsilon)
  # nn.relu, for its derivative at 0 (0, where max's is 1/2) when the eval model is differentiated.
  return (nn.relu(y) if relu else y).astype(dtype)


def concat_channels(arrays: Sequence[jax.Array]) -> jax.Array:
  """The arrays concatenated along their last axis."""
  return arrays[0] if len(arrays) == 1 else jax.lax.concatenate(list(arrays), arrays[0].ndim - 1)
