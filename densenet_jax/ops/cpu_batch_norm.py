"""The CPU kernel set's BatchNorm: `nn.BatchNorm` [+ ReLU], a hand-written gradient, shared statistics.

`BatchNorm` has `nn.BatchNorm`'s variables and numbers (the reference in `densenet_jax.ops.xla`;
tests/test_kernel_sets.py compares them in float64). `Centered` and `center` let the BatchNorms of a
dense block share each feature map's batch statistics (`densenet_jax.ops.cpu_block`).
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.custom_derivatives import SymbolicZero

Dtype = Any


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis, optionally followed by ReLU, with a hand-written gradient.

  The same variables (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`) and the same
  forward numbers as `nn.BatchNorm(momentum, epsilon)` (+ `nn.relu` if `relu`). In training
  it is one `jax.custom_vjp` whose backward is the textbook BatchNorm gradient, with the
  ReLU's mask read from the saved output. A DenseNet-121 has 120 BatchNorms: as one
  primitive each instead of autodiff through a dozen operations, its train step traces
  and compiles about a sixth faster (docs/performance.md), and runs as fast.

  In training it also normalises `Centered` feature maps, whose batch statistics several
  BatchNorms share (see `Centered`; a `DenseBlock` passes its layers those).

  Attributes:
    use_running_average: normalise with the running averages instead of batch statistics.
    momentum: weight of the old running average (PyTorch's momentum 0.1 is 0.9 here).
    epsilon: added to the variance.
    relu: apply ReLU to the output.
    dtype: output dtype (statistics are computed in at least float32).
    param_dtype: parameter dtype.
    axis_name: the name of the mapped axis (`jax.pmap`, `jax.shard_map`) whose devices' examples
      share their batch statistics, as in `nn.BatchNorm`; None for each device's own.
    axis_index_groups: groups of device indices along `axis_name` that share statistics, as in
      `nn.BatchNorm`; None for all.
  """

  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  relu: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  axis_name: str | None = None
  axis_index_groups: Any = None

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
    # As nn.BatchNorm: no collectives at initialization, which runs outside the mapped function.
    axis = None if self.is_initializing() else _Axis.of(self.axis_name, self.axis_index_groups)
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
      y, mean, var = _batch_norm_train(x, scale, bias, self.epsilon, self.relu, dtype, axis)
    if not self.is_initializing():
      ra_mean.value = _moving_average(ra_mean.value, mean, self.momentum)
      ra_var.value = _moving_average(ra_var.value, var, self.momentum)
    return y


# The BatchNorm arithmetic below is written in `jax.lax` rather than `jax.numpy`. Each
# `jnp` operation is a jitted function, traced anew for every new shape, and every
# BatchNorm of a DenseNet has its own channel count. In `lax` one traces with its gradient
# in 1.8 instead of 7.7 ms: 0.6 s of a DenseNet-121 train step's warm compile (docs/performance.md).
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


@struct.dataclass
class _Axis:
  """The mapped axis (and groups of it) whose devices share batch statistics; static, hashable."""

  name: Any = struct.field(pytree_node=False)
  groups: Any = struct.field(pytree_node=False, default=None)

  @classmethod
  def of(cls, name: Any, groups: Any) -> '_Axis | None':
    if name is None:
      return None
    return cls(name, None if groups is None else tuple(tuple(group) for group in groups))

  def mean(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmean(x, self.name, axis_index_groups=self.groups)

  def sum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.name, axis_index_groups=self.groups)


def _all_sum(x: jax.Array, axis: _Axis | None) -> jax.Array:
  """x summed over the devices that share statistics (x itself without an axis)."""
  return x if axis is None else axis.sum(x)


def _count(x: jax.Array, dtype: Any, axis: _Axis | None) -> jax.Array:
  """The number of values per channel that the statistics are over, on every device sharing them."""
  return _all_sum(np.asarray(x.size // x.shape[-1], dtype), axis)


def _statistics(x: jax.Array, axis: _Axis | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x in at least float32, per-channel mean, biased variance), as `nn.BatchNorm` computes them.

  With an axis, the mean and the mean of squares are averaged over its devices, as `nn.BatchNorm`
  with `axis_name` does.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  count = np.asarray(x.size // x.shape[-1], x.dtype)
  mean = jax.lax.div(_channel_sum(x), count)
  mean_of_squares = jax.lax.div(_channel_sum(jax.lax.square(x)), count)
  if axis is not None:
    both = axis.mean(jax.lax.concatenate([mean, mean_of_squares], 0))
    mean, mean_of_squares = both[: mean.shape[0]], both[mean.shape[0] :]
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


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _batch_norm_train(x, scale, bias, epsilon, relu, dtype, axis):
  """(BatchNorm with batch statistics [+ ReLU], batch mean, batch variance)."""
  return _batch_norm_train_forward(x, scale, bias, epsilon, relu, dtype, axis)[0]


# Jitted so that outside `jit` too it is one computation, in which XLA divides by the count
# as in `jnp.mean` (by multiplying with its reciprocal): the same numbers as nn.BatchNorm's.
@partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _batch_norm_train_forward(x, scale, bias, epsilon, relu, dtype, axis):
  x32, mean, var = _statistics(x, axis)
  y, rstd = _affine(x32, mean, var, scale, bias, epsilon)
  if relu:  # jax.nn.relu's values; the backward below is its derivative.
    y = jax.lax.max(y, np.zeros((), y.dtype))
  y = y.astype(dtype)
  return (y, mean, var), (x, y if relu else None, mean, rstd, scale)


def _batch_norm_train_forward_rule(x, scale, bias, epsilon, relu, dtype, axis):
  # With symbolic zeros the rule gets each argument with a flag saying whether it is differentiated.
  return _batch_norm_train_forward(x.value, scale.value, bias.value, epsilon, relu, dtype, axis)


def _batch_norm_train_backward(epsilon, relu, dtype, axis, residuals, cotangents):
  """The textbook gradient. With an axis, x's gradient sums the per-channel terms over its devices.

  Every device's loss reads the shared statistics, so the statistics' cotangents (and the sums
  through which the normalisation's own terms reach them) add up over the devices, and the count is
  the devices' total: what autodiff through `nn.BatchNorm`'s `pmean` gives. The scale's and bias's
  gradients stay this device's own, as autodiff gives them.
  """
  del epsilon, dtype  # In the saved rstd, and the cotangent's dtype.
  x, y, mean, rstd, scale = residuals
  dy, dmean, dvar = cotangents
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros(dy.shape, dy.dtype)
  count = _count(x, mean.dtype, axis)
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
  mean_term = _per_channel(jax.lax.div(_all_sum(dbias, axis), count), g)
  variance_factor = jax.lax.div(jax.lax.mul(rstd, _all_sum(dscale, axis)), count)
  variance_term = jax.lax.mul(centered, _per_channel(variance_factor, g))
  inner = jax.lax.sub(jax.lax.sub(g, mean_term), variance_term)
  dx = _promoted(jax.lax.mul, _per_channel(_promoted(jax.lax.mul, scale, rstd), g), inner)
  # The cotangents of the returned statistics: symbolic zeros when they only update running averages.
  if not isinstance(dmean, SymbolicZero):
    dx = _promoted(jax.lax.add, dx, _per_channel(jax.lax.div(_all_sum(dmean, axis), count), dx))
  if not isinstance(dvar, SymbolicZero):
    two_dvar = jax.lax.mul(np.asarray(2, dvar.dtype), _all_sum(dvar, axis))
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
  alternating pairs) and needs 16% less memory (docs/performance.md).

  Attributes:
    values: the centred feature maps, in at least float32, normalised as their
      concatenation along the last axis.
    mean: the per-channel batch mean of the concatenation.
    var: its per-channel biased batch variance (as `nn.BatchNorm` computes it).
    dtype: the dtype of the feature maps before centring.
    axis: the mapped axis whose devices share the statistics (`center`), or None.
  """

  values: tuple[jax.Array, ...]
  mean: jax.Array
  var: jax.Array
  dtype: Any = struct.field(pytree_node=False)
  axis: Any = struct.field(pytree_node=False, default=None)

  @classmethod
  def concatenate(cls, parts: Sequence['Centered']) -> 'Centered':
    """The parts as one set of feature maps, channels in order."""
    return cls(
      values=tuple(v for part in parts for v in part.values),
      mean=jax.lax.concatenate([part.mean for part in parts], 0),
      var=jax.lax.concatenate([part.var for part in parts], 0),
      dtype=jnp.result_type(*(part.dtype for part in parts)),
      axis=parts[0].axis,
    )


def center(x: jax.Array, axis_name: Any = None, axis_index_groups: Any = None) -> Centered:
  """x minus its per-channel batch mean (over all axes but the last), with the batch statistics.

  Differentiable in reverse mode: the summed gradients of the centred values, the mean and
  the variance, from every BatchNorm that read them, go back to x together.

  Args:
    x: the feature maps.
    axis_name: the mapped axis whose devices share the statistics, as in `nn.BatchNorm`.
    axis_index_groups: groups of devices along it that share them, as in `nn.BatchNorm`.
  """
  axis = _Axis.of(axis_name, axis_index_groups)
  values, mean, var = _center(x, x.dtype, axis)
  return Centered((values,), mean, var, x.dtype, axis)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _center(x, dtype, axis):
  del dtype  # x's, for its gradient.
  return _center_forward(x, axis)[0]


@partial(jax.jit, static_argnums=(1,))
def _center_forward(x, axis):
  x32, mean, var = _statistics(x, axis)
  centered = jax.lax.sub(x32, _per_channel(mean, x32))
  return (centered, mean, var), centered


def _center_forward_rule(x, dtype, axis):
  del dtype
  return _center_forward(x.value, axis)


@partial(jax.jit, static_argnames=('axis',))
def _center_backward(centered, d_centered, d_mean=None, d_var=None, *, axis=None):
  """x's gradient: d(centered) - its mean + d(mean) / count + centered * 2 d(var) / count.

  The variance is mean(x^2) - mean(x)^2, whose derivative is 2 * (x - mean) / count. A
  cotangent that is None is zero. With an axis, the per-channel terms are summed over its devices
  and the count is theirs (see `_batch_norm_train_backward`).
  """
  count = _count(centered, centered.dtype, axis)
  dx = jnp.zeros(centered.shape, centered.dtype)
  if d_centered is not None:
    d_mean_of_centring = jax.lax.div(_all_sum(_channel_sum(d_centered), axis), count)
    dx = jax.lax.sub(d_centered, _per_channel(d_mean_of_centring, d_centered))
  if d_mean is not None:
    dx = jax.lax.add(dx, _per_channel(jax.lax.div(_all_sum(d_mean, axis), count), dx))
  if d_var is not None:
    two_d_var = jax.lax.mul(np.asarray(2, d_var.dtype), _all_sum(d_var, axis))
    dx = jax.lax.add(dx, jax.lax.mul(centered, _per_channel(jax.lax.div(two_d_var, count), dx)))
  return dx


def _center_backward_rule(dtype, axis, centered, cotangents):
  cotangents = [None if isinstance(c, SymbolicZero) else c for c in cotangents]
  return (_center_backward(centered, *cotangents, axis=axis).astype(dtype),)


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
