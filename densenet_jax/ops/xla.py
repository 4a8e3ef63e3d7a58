"""The reference kernel set, 'xla': the stock Flax and `jax.lax` operations a reader expects.

Every other kernel set computes what these compute (tests/test_kernel_sets.py), and `kernels='auto'`
picks this set on TPU and GPU, where XLA's own convolutions and fusions are what the hardware's
libraries are tuned for (`densenet_jax.ops.kernel_set`).
"""

from typing import Any

import flax.linen as nn
import jax


def conv(
  features: int, kernel_size: int, strides: int = 1, padding: int = 0, *, train: bool, **kwargs: Any
) -> nn.Module:
  """`nn.Conv(features, (kernel_size,) * 2, strides, padding, use_bias=False, **kwargs)`.

  `train` is part of every set's signature (the CPU set picks a gradient by it); XLA needs none.
  """
  del train
  return nn.Conv(features, (kernel_size, kernel_size), strides, padding, use_bias=False, **kwargs)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm`, followed by ReLU if `relu`: its variables, attributes and numbers.

  Attributes:
    relu: apply ReLU to the output.
  """

  relu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, **kwargs: Any) -> jax.Array:
    y = super().__call__(x, use_running_average, **kwargs)
    return nn.relu(y) if self.relu else y


def max_pool(x: jax.Array, size: int, stride: int, padding: int) -> jax.Array:
  """`nn.max_pool` over size x size windows, padded with -inf like torch's `MaxPool2d`."""
  return nn.max_pool(x, (size, size), (stride, stride), ((padding, padding),) * 2)


def avg_pool(x: jax.Array) -> jax.Array:
  """The transitions' 2x2 average pool, stride 2 (an odd last row or column is dropped)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))
