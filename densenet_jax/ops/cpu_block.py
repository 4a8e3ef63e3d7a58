"""The CPU kernel set's dense block in training: shared batch statistics, and recomputation for memory.

In training, a dense layer's first BatchNorm normalises the concatenation of all earlier feature
maps with their batch statistics, and a channel's batch mean and variance do not depend on the
layer that reads it. So the block centres each feature map once (`center`) and hands every layer
the centred maps (`Centered`): each layer's BatchNorm only scales and shifts them. Backward, the
gradients of all the layers with respect to a centred map add up first and go back through its
centring once. With `memory_efficient`, the block keeps only the centred maps and each layer's
bottleneck output and recomputes the rest in its backward pass (`_memory_efficient_block`).
The numbers are the reference block's (tests/test_kernel_sets.py).
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.ops.cpu_centered import Centered, center, center_backward
from densenet_jax.ops.cpu_statistics import concat_channels


def train_block(
  block: nn.Module, layer: Callable[..., nn.Module], names: Sequence[str], x: jax.Array, dropout_rngs: list
) -> jax.Array:
  """A dense block's output in training, its layers sharing each feature map's statistics.

  Args:
    block: the bound `DenseBlock` (its `memory_efficient`, variables and batch_stats).
    layer: the `DenseLayer` constructor.
    names: the layers' names.
    x: the block's input.
    dropout_rngs: one dropout key per layer, or Nones.
  """
  # The set's BatchNorm says which devices share the statistics (none while initializing, as there).
  norm = block.norm(parent=None)
  shared = (
    {}
    if block.is_initializing()
    else dict(axis_name=norm.axis_name, axis_index_groups=norm.axis_index_groups)
  )
  center_ = partial(center, **shared)
  if block.memory_efficient and not block.is_initializing():
    # The layers run as pure functions of their variables under one custom gradient.
    variables = block.variables
    y, batch_stats = _memory_efficient_block(layer(parent=None), center_)(
      [variables['params'][name] for name in names],
      [variables['batch_stats'][name] for name in names],
      x,
      None if dropout_rngs[0] is None else dropout_rngs,
    )
    for name, stats in zip(names, batch_stats, strict=True):
      block.put_variable('batch_stats', name, stats)
    return y
  features, centered = [x], center_(x)
  for i, (name, rng) in enumerate(zip(names, dropout_rngs, strict=True)):
    new = layer(name=name)(centered, True, rng)
    features.append(new)
    if i + 1 < len(names):
      # One at a time: the statistics' gradients then add up in one sum per layer, not per feature map.
      centered = Centered.concatenate([centered, center_(new)])
  return jnp.concatenate(features, axis=-1)


def _memory_efficient_block(
  layer: nn.Module, center: Callable[[jax.Array], Centered]
) -> Callable[..., tuple[jax.Array, list[Any]]]:
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
      h, updates = apply({'params': layer_params, 'batch_stats': stats}, 'bottleneck', inputs[i])
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
    _, bottleneck_vjp = jax.vjp(lambda p, c: run('bottleneck', p, c), params, centered)
    bottleneck_grads, centered_grads = bottleneck_vjp(bottleneck_grad)
    return jax.tree.map(jnp.add, head_grads, bottleneck_grads), centered_grads

  def backward(residuals, cotangents):
    params, batch_stats, inputs, bottlenecks, rngs = residuals
    gradient, _ = cotangents  # The running averages have no gradient.
    centered, axis = inputs[-1].values, inputs[-1].axis  # Each feature map but the last, centred.
    widths = [c.shape[-1] for c in centered]
    ends = np.cumsum([*widths, gradient.shape[-1] - sum(widths)])
    param_grads = [None] * len(params)
    # The summed gradients of the centred maps of features 0..i (a buffer updated in place) and
    # of their variances; the running averages' means have no gradient.
    values_grad = var_grad = None

    def feature_grad(j, start, end):
      """Feature j's gradient: from the block output, and through its centring from the later layers."""
      through_centring = center_backward(
        centered[j], values_grad[..., start:end], None, var_grad[start:end], axis=axis
      )
      return gradient[..., start:end] + through_centring.astype(gradient.dtype)

    for i in reversed(range(len(params))):
      last = values_grad is None  # No later layer reads feature i + 1.
      output_grad = gradient[..., ends[i] :] if last else feature_grad(i + 1, ends[i], ends[i + 1])
      param_grads[i], grads = layer_vjp(
        params[i], batch_stats[i], inputs[i], bottlenecks[i], None if rngs is None else rngs[i], output_grad
      )
      new_values_grad = concat_channels(grads.values)
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
