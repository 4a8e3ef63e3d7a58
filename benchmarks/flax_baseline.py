"""The straightforward Flax DenseNet that `speed.py` measures densenet-jax against.

What one writes first: a new `jnp.concatenate` per dense layer, every convolution an
`nn.Conv`, BatchNorm from `nn.BatchNorm`. Same architecture, parameters and numbers as
`densenet_jax.DenseNet` (the bottleneck variant); kept here, apart from the library, so
that the baseline does not move when the library does.
"""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp


class BaselineDenseNet(nn.Module):
  growth_rate: int = 32
  block_config: tuple[int, ...] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = 1000
  stem: str = 'imagenet'

  @nn.compact
  def __call__(self, x, train: bool):
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    if self.stem == 'imagenet':
      x = conv(self.num_init_features, (7, 7), (2, 2), 3)(x)
      x = nn.relu(norm()(x))
      x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    else:
      x = conv(self.num_init_features, (3, 3), padding=1)(x)
    channels = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      for _ in range(num_layers):
        y = nn.relu(norm()(x))
        y = conv(self.bn_size * self.growth_rate, (1, 1))(y)
        y = nn.relu(norm()(y))
        y = conv(self.growth_rate, (3, 3), padding=1)(y)
        x = jnp.concatenate([x, y], axis=-1)
      channels += num_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        channels //= 2
        x = nn.relu(norm()(x))
        x = conv(channels, (1, 1))(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(norm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
