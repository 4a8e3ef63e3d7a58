"""A DenseNet's configuration and input checks: one-line errors that name the problem and the fix."""

from typing import Any

import jax

from densenet_jax import ops


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def check_config(model: Any) -> None:
  """Raises ValueError for a `DenseNet` configuration that cannot build, with the fix."""
  _check_positive_int('growth_rate', model.growth_rate)
  _check_positive_int('num_init_features', model.num_init_features)
  _check_positive_int('num_classes', model.num_classes)
  if model.bn_size is not None:
    _check_positive_int('bn_size (or None for no bottleneck)', model.bn_size)
  if isinstance(model.block_config, int) or not model.block_config:
    raise ValueError(
      f'block_config must be a non-empty sequence of layer counts, one per dense '
      f'block, e.g. (6, 12, 24, 16); got {model.block_config!r}.'
    )
  for num_layers in model.block_config:
    _check_positive_int('every entry of block_config', num_layers)
  if not 0.0 < model.compression <= 1.0:
    raise ValueError(f'compression must be in (0, 1], got {model.compression!r}.')
  if not 0.0 <= model.drop_rate < 1.0:
    raise ValueError(f'drop_rate must be in [0, 1), got {model.drop_rate!r}.')
  if model.stem not in ('imagenet', 'deep', 'cifar'):
    raise ValueError(f"stem must be 'imagenet', 'deep' or 'cifar', got {model.stem!r}.")
  if model.blur_pool and model.stem == 'cifar':
    raise ValueError(
      "blur_pool blurs the stem's pool, and the 'cifar' stem has none: use stem='deep' or 'imagenet'."
    )
  if model.eval_in_pieces not in (None, True, False):
    raise ValueError(
      f"eval_in_pieces must be True, False or None (the kernel set's default), got {model.eval_in_pieces!r}."
    )
  if model.kernels not in ops.KERNELS:
    raise ValueError(f'kernels must be one of {", ".join(map(repr, ops.KERNELS))}; got {model.kernels!r}.')


def downsampled_sizes(size: int, stem: str, num_blocks: int) -> list[tuple[str, int]]:
  """The spatial size after each downsampling stage, as (stage name, size)."""
  sizes = []
  if stem in ('imagenet', 'deep'):
    # 7x7/2 conv, padding 3, or 3x3/2, padding 1: the same size.
    size = (size + 2 * 3 - 7) // 2 + 1
    sizes.append(('conv0', size))
    size = (size + 2 * 1 - 3) // 2 + 1  # 3x3/2 max pool (or blur pool), padding 1.
    sizes.append(('pool0', size))
  for i in range(1, num_blocks):
    size //= 2  # 2x2/2 average pool.
    sizes.append((f'transition{i}', size))
  return sizes


def min_input_size(stem: str, num_blocks: int) -> int:
  """The smallest image side the network's downsampling leaves at least 1 pixel of."""
  size = 1
  while downsampled_sizes(size, stem, num_blocks)[-1][1] < 1:
    size += 1
  return size


def check_input(model: Any, x: jax.Array) -> None:
  """Raises ValueError for images a bound `DenseNet` cannot take, with the fix."""
  if x.ndim != 4:
    raise ValueError(
      f'DenseNet expects a batch of NHWC images (batch, height, width, channels), got '
      f'shape {tuple(x.shape)}. For one image add a batch axis (x[None]); a torch '
      f'NCHW batch becomes NHWC with x.transpose(0, 2, 3, 1).'
    )
  params = model.variables.get('params', {})
  if 'conv0' in params:
    expected = params['conv0']['kernel'].shape[2]
    if x.shape[-1] != expected:
      raise ValueError(
        f'Input has {x.shape[-1]} channels (shape {tuple(x.shape)}, NHWC) but the '
        f'parameters were initialized for {expected}-channel input. Feed '
        f'{expected}-channel NHWC images (e.g. repeat grayscale to RGB, or transpose '
        f'NCHW to NHWC), or initialize the model with {x.shape[-1]}-channel input.'
      )
  num_blocks = len(model.block_config)
  for axis, side in (('height', x.shape[1]), ('width', x.shape[2])):
    for stage, size in downsampled_sizes(side, model.stem, num_blocks):
      if size < 1:
        smallest = min_input_size(model.stem, num_blocks)
        raise ValueError(
          f'Input {axis} {side} is too small for this DenseNet: its downsampling '
          f'leaves nothing at {stage}. Use images of at least '
          f'{smallest}x{smallest} pixels (resize or pad them), or a model with fewer dense blocks.'
        )
