"""The NNX DenseNet: torchvision's structure in stock NNX layers, run by the Linen network."""

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from densenet_jax import models

# The Linen DenseNet's attributes: the configuration an NNX DenseNet carries.
_CONFIG_FIELDS = tuple(
  f.name for f in dataclasses.fields(models.DenseNet) if f.name not in ('parent', 'name')
)


def _linen_to_nnx_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Linen's variable layout (everything at the top) as the NNX model's (`features` and `classifier`)."""
  features = {k: v for k, v in tree.items() if k != 'classifier'}
  return {'features': features, **({'classifier': tree['classifier']} if 'classifier' in tree else {})}


def to_linen_tree(tree: nnx.State | Mapping[str, Any]) -> dict[str, Any]:
  """An NNX DenseNet's state (parameters, BatchNorm statistics, gradients) in the Linen layout.

  For example `densenet_jax.to_torchvision({'params': to_linen_tree(grads)})` names gradients
  by torchvision's keys.
  """
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return {**tree['features'], **({'classifier': tree['classifier']} if 'classifier' in tree else {})}


class DenseLayer(nnx.Module):
  """The weights of one dense layer: `norm1`, `conv1` (and `norm2`, `conv2` with a bottleneck)."""

  def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None, *, norm, conv):
    self.norm1 = norm(num_input_features)
    if bn_size is None:
      self.conv1 = conv(num_input_features, growth_rate, 3, padding=1)
    else:
      self.conv1 = conv(num_input_features, bn_size * growth_rate, 1)
      self.norm2 = norm(bn_size * growth_rate)
      self.conv2 = conv(bn_size * growth_rate, growth_rate, 3, padding=1)


class DenseBlock(nnx.Module):
  """The weights of a dense block: `denselayer1` ... `denselayerN`."""

  def __init__(
    self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int | None, **layers
  ):
    for i in range(num_layers):
      layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, **layers)
      setattr(self, f'denselayer{i + 1}', layer)


class Transition(nnx.Module):
  """The weights of a transition: `norm`, then `conv` (the 1x1 convolution; the pool has none)."""

  def __init__(self, num_input_features: int, num_output_features: int, *, norm, conv):
    self.norm = norm(num_input_features)
    self.conv = conv(num_input_features, num_output_features, 1)


class Features(nnx.Module):
  """torchvision's `features`: the stem, the dense blocks and transitions, and `norm5`."""


class DenseNet(nnx.Module):
  """DenseNet as an NNX module; the defaults are torchvision's `DenseNet` (= DenseNet-121).

  The configuration is the Linen `densenet_jax.models.DenseNet`'s, attribute for attribute (see
  there): growth_rate, block_config, num_init_features, bn_size, compression, drop_rate,
  num_classes, stem, blur_pool, memory_efficient, features_only, kernels, eval_in_pieces, axis_name,
  axis_index_groups, dtype, param_dtype.

  Attributes:
    features: torchvision's `features`, holding the stem, blocks, transitions and `norm5`.
    classifier: the `nnx.Linear` head (absent with `features_only`). Replace it to change the number
      of classes; the network reads the count from it.
    use_running_average: as `nnx.BatchNorm`'s: False (training, the default) normalises with batch
      statistics and moves the running averages; True uses them. `model.train()` / `model.eval()`
      set it, with `deterministic`.
    deterministic: as `nnx.Dropout`'s: no dropout if True. With `drop_rate > 0` it must agree with
      `use_running_average` (the network has one training mode); `train()` / `eval()` keep them so.
    rngs: the dropout stream (an `nnx.RngStream` forked from `rngs['dropout']`), when `drop_rate > 0`.
  """

  def __init__(
    self,
    growth_rate: int = 32,
    block_config: Sequence[int] = (6, 12, 24, 16),
    num_init_features: int = 64,
    bn_size: int | None = 4,
    compression: float = 0.5,
    drop_rate: float = 0.0,
    num_classes: int = 1000,
    stem: str = 'imagenet',
    blur_pool: bool = False,
    memory_efficient: bool = False,
    features_only: bool = False,
    kernels: str = 'auto',
    eval_in_pieces: bool | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    *,
    in_features: int = 3,
    use_running_average: bool = False,
    deterministic: bool = False,
    rngs: nnx.Rngs,
  ):
    """Builds the network with fresh weights (torchvision's initialisation) drawn from `rngs.params`.

    Args:
      growth_rate ... param_dtype: as the Linen `DenseNet`'s attributes.
      in_features: image channels.
      use_running_average: see the class attributes.
      deterministic: see the class attributes.
      rngs: `nnx.Rngs` for the weights (`params`) and, with `drop_rate > 0`, dropout (`dropout`).
    """
    if axis_index_groups is not None:  # Hashable: the configuration is static under nnx.jit.
      axis_index_groups = tuple(tuple(group) for group in axis_index_groups)
    linen = models.DenseNet(  # Checks the configuration, with the fix, as for Linen.
      growth_rate=growth_rate,
      block_config=block_config,
      num_init_features=num_init_features,
      bn_size=bn_size,
      compression=compression,
      drop_rate=drop_rate,
      num_classes=num_classes,
      stem=stem,
      blur_pool=blur_pool,
      memory_efficient=memory_efficient,
      features_only=features_only,
      kernels=kernels,
      eval_in_pieces=eval_in_pieces,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.linen = linen
    self.use_running_average = use_running_average
    self.deterministic = deterministic
    self.rngs = rngs['dropout'].fork() if drop_rate > 0 else nnx.data(None)

    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    norm = partial(
      nnx.BatchNorm,
      use_running_average=use_running_average,
      momentum=0.9,  # PyTorch's 0.1.
      epsilon=1e-5,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      rngs=rngs,
      **dtypes,
    )

    def conv(in_channels: int, out_channels: int, kernel_size: int, strides: int = 1, padding: int = 0):
      return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_init=models.conv_kernel_init,
        rngs=rngs,
        **dtypes,
      )

    features = self.features = Features()
    if stem == 'imagenet':
      features.conv0 = conv(in_features, num_init_features, 7, strides=2, padding=3)
      features.norm0 = norm(num_init_features)
    elif stem == 'deep':
      widths = (in_features, growth_rate, growth_rate, num_init_features)
      for i, stride in enumerate((2, 1, 1)):
        setattr(features, f'conv{i}', conv(widths[i], widths[i + 1], 3, strides=stride, padding=1))
        setattr(features, f'norm{i}', norm(widths[i + 1]))
    else:
      features.conv0 = conv(in_features, num_init_features, 3, padding=1)

    num_features = num_init_features
    for i, num_layers in enumerate(linen.block_config):
      block = DenseBlock(num_layers, num_features, growth_rate, bn_size, norm=norm, conv=conv)
      setattr(features, f'denseblock{i + 1}', block)
      num_features += num_layers * growth_rate
      if i != len(linen.block_config) - 1:
        num_output_features = int(num_features * compression)
        transition = Transition(num_features, num_output_features, norm=norm, conv=conv)
        setattr(features, f'transition{i + 1}', transition)
        num_features = num_output_features
    features.norm5 = norm(num_features)
    if not features_only:
      self.classifier = nnx.Linear(
        num_features, num_classes, kernel_init=models.dense_kernel_init, rngs=rngs, **dtypes
      )

  def __call__(
    self,
    x: jax.Array,
    *,
    use_running_average: bool | None = None,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
  ) -> jax.Array | dict[str, jax.Array]:
    """Applies the network; in training mode the BatchNorm running averages move.

    Args:
      x: images, NHWC.
      use_running_average: overrides the attribute for this call, as `nnx.BatchNorm`'s.
      deterministic: overrides the attribute for this call, as `nnx.Dropout`'s.
      rngs: the dropout key for this call (a key, an `nnx.RngStream` or `nnx.Rngs`) instead of the
        model's own stream.

    Returns:
      Logits `(batch, num_classes)`, or with `features_only` the dict of per-stage features.
    """
    use_running_average = self.use_running_average if use_running_average is None else use_running_average
    deterministic = self.deterministic if deterministic is None else deterministic
    train = not use_running_average
    dropout = self.linen.drop_rate > 0 and not deterministic
    if self.linen.drop_rate > 0 and dropout != train:
      raise ValueError(
        f'use_running_average={use_running_average} with deterministic={deterministic}: the network '
        'has one training mode (batch statistics and dropout together); call model.train() or '
        'model.eval(), or pass both the same way.'
      )
    module, variables = to_linen(self)
    if not train:
      return module.apply(variables, x, train=False)
    apply_rngs = {}
    if dropout:
      key = rngs if rngs is not None else self.rngs
      if isinstance(key, nnx.Rngs):
        key = key['dropout']
      if key is None:
        raise ValueError(
          f'drop_rate={self.linen.drop_rate} in training needs a dropout key: build the model with '
          'rngs=nnx.Rngs(0) (or nnx.Rngs(params=0, dropout=1)), or pass rngs= to the call.'
        )
      apply_rngs['dropout'] = key() if isinstance(key, nnx.RngStream) else key
    y, updates = module.apply(variables, x, train=True, mutable=['batch_stats'], rngs=apply_rngs)
    stats = nnx.state(self, nnx.BatchStat)
    nnx.replace_by_pure_dict(stats, _linen_to_nnx_tree(updates['batch_stats']))
    nnx.update(self, stats)
    return y


def to_linen(model: DenseNet) -> tuple[models.DenseNet, dict]:
  """The Linen `DenseNet` and `{'params', 'batch_stats'}` equal to `model` (the arrays are shared).

  What the Linen API, `densenet_jax.to_torchvision` and the trainer's checkpoints work with.
  """
  module = model.linen
  if not module.features_only:
    num_classes = model.classifier.kernel.shape[-1]  # The head may have been replaced.
    if num_classes != module.num_classes:
      module = module.clone(num_classes=num_classes)
  variables = {
    'params': to_linen_tree(nnx.state(model, nnx.Param)),
    'batch_stats': to_linen_tree(nnx.state(model, nnx.BatchStat)),
  }
  return module, variables


def _config(module: models.DenseNet) -> dict[str, Any]:
  return {name: getattr(module, name) for name in _CONFIG_FIELDS}


class _Preset(DenseNet):
  """A preset: `DenseNet` with the configuration of the Linen preset of the same name."""

  _linen_preset: partial

  def __init__(self, **kwargs: Any):
    """Takes `DenseNet`'s keyword arguments (`num_classes`, `rngs`, ...); they override the preset's."""
    super().__init__(**{**self._linen_preset.keywords, **kwargs})


class DenseNet121(_Preset):
  """DenseNet-121, torchvision's `densenet121`: growth 32, blocks (6, 12, 24, 16)."""

  _linen_preset = models.DenseNet121


class DenseNet161(_Preset):
  """DenseNet-161, torchvision's `densenet161`: growth 48, blocks (6, 12, 36, 24), 96 initial features."""

  _linen_preset = models.DenseNet161


class DenseNet169(_Preset):
  """DenseNet-169, torchvision's `densenet169`: growth 32, blocks (6, 12, 32, 32)."""

  _linen_preset = models.DenseNet169


class DenseNet201(_Preset):
  """DenseNet-201, torchvision's `densenet201`: growth 32, blocks (6, 12, 48, 32)."""

  _linen_preset = models.DenseNet201


class DenseNet264(_Preset):
  """DenseNet-264, timm's `densenet264`: growth 32, blocks (6, 12, 64, 48)."""

  _linen_preset = models.DenseNet264


class DenseNet264d(_Preset):
  """timm's `densenet264d`: growth 48, blocks (6, 12, 64, 48), 96 initial features, the deep stem."""

  _linen_preset = models.DenseNet264d


class DenseNetBlur121d(_Preset):
  """timm's `densenetblur121d`: DenseNet-121 with the deep stem and blur pooling."""

  _linen_preset = models.DenseNetBlur121d


def densenet_cifar(
  depth: int,
  growth_rate: int,
  bc: bool = True,
  num_classes: int = 10,
  *,
  in_features: int = 3,
  rngs: nnx.Rngs,
  **kwargs: Any,
) -> DenseNet:
  """The paper's CIFAR/SVHN networks as NNX; see `densenet_jax.densenet_cifar`.

  `in_features`, `rngs`, `use_running_average` and `deterministic` as `DenseNet`'s; the other
  keyword arguments are Linen `DenseNet` attributes.
  """
  modes = {k: kwargs.pop(k) for k in ('use_running_average', 'deterministic') if k in kwargs}
  module = models.densenet_cifar(depth, growth_rate, bc, num_classes, **kwargs)
  return DenseNet(**_config(module), in_features=in_features, rngs=rngs, **modes)
