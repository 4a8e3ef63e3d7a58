"""The CPU kernel set's BatchNorm: `nn.BatchNorm` [+ ReLU], a hand-written gradient, shared statistics.

`BatchNorm` has `nn.BatchNorm`'s variables and numbers (the reference in `densenet_jax.ops.xla`;
tests/test_kernel_sets.py compares them in float64). In training it also normalises the `Centered`
feature maps of a dense block (`densenet_jax.ops.cpu_centered`), whose statistics its layers share.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from densenet_jax.ops.cpu_centered import Centered, batch_norm_centered
from densenet_jax.ops.cpu_statistics import (
  Axis,
  affine,
  all_sum,
  batch_statistics,
  channel_count,
  channel_sum,
  moving_average,
  normalize,
  per_channel,
  promoted,
)

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
    axis = None if self.is_initializing() else Axis.of(self.axis_name, self.axis_index_groups)
    if use_running_average:
      if centered is not None:
        raise ValueError(
          'BatchNorm with running averages got Centered feature maps, which are centred with their '
          'batch statistics: pass the feature maps themselves (concatenated) instead.'
        )
      return normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.relu, dtype)
    if centered is not None:
      y = batch_norm_centered(centered.values, centered.var, scale, bias, self.epsilon, self.relu, dtype)
      mean, var = centered.mean, centered.var
    else:
      y, mean, var = _batch_norm_train(x, scale, bias, self.epsilon, self.relu, dtype, axis)
    if not self.is_initializing():
      ra_mean.value = moving_average(ra_mean.value, mean, self.momentum)
      ra_var.value = moving_average(ra_var.value, var, self.momentum)
    return y


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _batch_norm_train(x, scale, bias, epsilon, relu, dtype, axis):
  """(BatchNorm with batch statistics [+ ReLU], batch mean, batch variance)."""
  return _batch_norm_train_forward(x, scale, bias, epsilon, relu, dtype, axis)[0]


# Jitted so that outside `jit` too it is one computation, in which XLA divides by the count
# as in `jnp.mean` (by multiplying with its reciprocal): the same numbers as nn.BatchNorm's.
@partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _batch_norm_train_forward(x, scale, bias, epsilon, relu, dtype, axis):
  x32, mean, var = batch_statistics(x, axis)
  y, rstd = affine(x32, mean, var, scale, bias, epsilon)
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
  count = channel_count(x, mean.dtype, axis)
  x32 = x.astype(mean.dtype)
  # Where the ReLU output is 0 the gradient stops: its input was <= 0 (the forward's own
  # values decide, so no recomputation can round to the other side of 0).
  g = jax.lax.select(jax.lax.gt(y, np.zeros((), y.dtype)), dy, jax.lax.full_like(dy, 0)) if relu else dy
  g = g.astype(mean.dtype)
  centered = jax.lax.sub(x32, per_channel(mean, x32))
  dbias = channel_sum(g)
  dscale = jax.lax.mul(channel_sum(jax.lax.mul(g, centered)), rstd)
  # d/dx of the normalisation through x, the batch mean and the batch variance:
  # scale * rstd * (g - mean(g) - centered * rstd * dscale / count).
  mean_term = per_channel(jax.lax.div(all_sum(dbias, axis), count), g)
  variance_factor = jax.lax.div(jax.lax.mul(rstd, all_sum(dscale, axis)), count)
  variance_term = jax.lax.mul(centered, per_channel(variance_factor, g))
  inner = jax.lax.sub(jax.lax.sub(g, mean_term), variance_term)
  dx = promoted(jax.lax.mul, per_channel(promoted(jax.lax.mul, scale, rstd), g), inner)
  # The cotangents of the returned statistics: symbolic zeros when they only update running averages.
  if not isinstance(dmean, SymbolicZero):
    dx = promoted(jax.lax.add, dx, per_channel(jax.lax.div(all_sum(dmean, axis), count), dx))
  if not isinstance(dvar, SymbolicZero):
    two_dvar = jax.lax.mul(np.asarray(2, dvar.dtype), all_sum(dvar, axis))
    dx = promoted(
      jax.lax.add, dx, promoted(jax.lax.mul, centered, per_channel(jax.lax.div(two_dvar, count), dx))
    )
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_forward_rule, _batch_norm_train_backward, symbolic_zeros=True)
