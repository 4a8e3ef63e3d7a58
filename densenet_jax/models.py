"""DenseNet (Huang et al., 2017, https://arxiv.org/abs/1608.06993) in Flax.

The modules mirror torchvision's `torchvision.models.densenet` part for part and name for name
(`conv0`, `norm0`, `denseblock1/denselayer1/norm1`, `transition1/conv`, `norm5`, `classifier`), so
that porting weights is a plain name map and the numbers are the same. Layout is NHWC; BatchNorm
state lives in `batch_stats`.

The convolutions, BatchNorms and pools come from a kernel set (`DenseNet.kernels`,
`densenet_jax.ops`): `'xla'` is stock Flax, `'cpu'` the same numbers in forms XLA:CPU runs about
twice as fast, `'auto'` picks by backend. Every set has the same variables.

Example:
  >>> model = DenseNet121(num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
  >>> logits = model.apply(variables, images, train=False)
  >>> logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax import ops, validation
from densenet_jax.ops import pieces

ModuleDef = Any
Dtype = Any

# torchvision initialises convolutions with `kaiming_normal_` (fan-in, gain sqrt(2), untruncated) and
# the classifier with torch's default Linear init, U(+-1/sqrt(fan_in)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (the bottleneck, `bn_size * growth_rate` channels)-BN-ReLU-3x3 conv.

  Without a bottleneck (`bn_size=None`, the paper's plain DenseNet) the layer is BN-ReLU-3x3 conv,
  named `norm1`/`conv1`. Two methods, as torchvision's `bn_function` and the rest, so that a
  memory-efficient block can keep `bottleneck`'s output and recompute what comes before it.

  Attributes:
    growth_rate: channels the layer adds (k).
    bn_size: bottleneck width as a multiple of `growth_rate`; None for no bottleneck.
    drop_rate: dropout rate on the layer's new features (torchvision's `drop_rate`).
    conv: the kernel set's convolution, `conv(features, kernel_size, strides, padding)`.
    norm: the kernel set's BatchNorm, `norm(relu=...)`, with `use_running_average` bound.
  """

  growth_rate: int
  bn_size: int | None
  drop_rate: float
  conv: ModuleDef
  norm: ModuleDef

  def setup(self):
    self.norm1 = self.norm(relu=True)
    if self.bn_size is None:
      self.conv1 = self.conv(self.growth_rate, 3, padding=1)
    else:
      self.conv1 = self.conv(self.bn_size * self.growth_rate, 1)
      self.norm2 = self.norm(relu=True)
      self.conv2 = self.conv(self.growth_rate, 3, padding=1)
    if self.drop_rate > 0:
      self.dropout = nn.Dropout(self.drop_rate)

  def __call__(
    self, features: Sequence[jax.Array], train: bool, dropout_rng: jax.Array | None = None
  ) -> jax.Array:
    """The `growth_rate` new channels computed from all earlier `features`."""
    return self.head(self.bottleneck(features), train, dropout_rng)

  def bottleneck(self, features: Sequence[jax.Array] | Any) -> jax.Array:
    """Concatenation-BN-ReLU-first convolution (torchvision's `bn_function`).

    Args:
      features: the earlier feature maps, or what the kernel set's BatchNorm takes for their
        concatenation (the CPU set's dense block passes `ops.cpu_centered.Centered`).
    """
    x = jnp.concatenate(features, axis=-1) if isinstance(features, list | tuple) else features
    return self.conv1(self.norm1(x))

  def head(self, x: jax.Array, train: bool, dropout_rng: jax.Array | None = None) -> jax.Array:
    """BN-ReLU-3x3 conv after the bottleneck (nothing without one), then dropout."""
    if self.bn_size is not None:
      x = self.conv2(self.norm2(x))
    if self.drop_rate > 0:
      x = self.dropout(x, deterministic=not train, rng=dropout_rng)
    return x


class DenseBlock(nn.Module):
  """`num_layers` dense layers, each fed the concatenation of all earlier features.

  With `memory_efficient=True`, training recomputes each layer's concatenation and first BN-ReLU in
  the backward pass instead of keeping them, so memory grows linearly with depth instead of
  quadratically (Pleiss et al., 2017; torchvision's `memory_efficient`): `nn.remat` on the
  bottleneck, or the kernel set's own block. The numbers are the same.

  Attributes:
    num_layers: dense layers in the block.
    growth_rate: channels each layer adds (k).
    bn_size: bottleneck width as a multiple of `growth_rate`; None for no bottleneck.
    drop_rate: dropout rate after each layer.
    memory_efficient: recompute instead of keeping, in training.
    conv: the kernel set's convolution, `train` bound.
    norm: the kernel set's BatchNorm, `use_running_average` bound.
    train_block: the kernel set's block in training (`ops.KernelSet.train_block`), or None.
    eval_piece_bytes: outside training, run the block on pieces of the batch of at most this many
      bytes of output, one after another (`ops/pieces.py`); None for the whole batch.
  """

  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  conv: ModuleDef
  norm: ModuleDef
  train_block: Any = None
  eval_piece_bytes: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train and self.eval_piece_bytes and not self.is_initializing():
      y = pieces.evaluate_in_pieces(self, x, self.eval_piece_bytes)  # None if the batch is one piece.
      if y is not None:
        return y
    layer_class = DenseLayer
    if train and self.memory_efficient and self.train_block is None:
      layer_class = nn.remat(DenseLayer, methods=['bottleneck'])
    layer = partial(
      layer_class,
      growth_rate=self.growth_rate,
      bn_size=self.bn_size,
      drop_rate=self.drop_rate,
      conv=self.conv,
      norm=self.norm,
    )
    names = [f'denselayer{i + 1}' for i in range(self.num_layers)]
    # Dropout keys are drawn here, so that every way of computing the block uses the same ones.
    dropout = train and self.drop_rate > 0
    rngs = [self.make_rng('dropout') if dropout else None for _ in names]
    if train and self.train_block is not None:
      # The same computation as the loop below, scheduled the kernel set's way (ops/cpu_block.py).
      return self.train_block(self, layer, names, x, rngs)
    features = [x]
    for name, rng in zip(names, rngs, strict=True):
      features.append(layer(name=name)(features, train, rng))
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to `num_output_features` channels-2x2 average pool.

  The pool runs before the convolution: both are linear and act on different axes, so they
  commute, and the convolution then has a quarter of the pixels (a DenseNet-121's three
  transitions are 11% of its multiply-adds conv-first, 3% pool-first).

  Attributes:
    num_output_features: output channels.
    conv: the kernel set's convolution.
    norm: the kernel set's BatchNorm.
    avg_pool: the kernel set's 2x2 average pool.
  """

  num_output_features: int
  conv: ModuleDef
  norm: ModuleDef
  avg_pool: Any = ops.xla.avg_pool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.norm(relu=True, name='norm')(x)
    x = self.avg_pool(x)
    return self.conv(self.num_output_features, 1, name='conv')(x)


def blur_pool(x: jax.Array) -> jax.Array:
  """timm's BlurPool2d(filt_size=3, stride=2): reflect padding 1, the [1, 2, 1]^2 / 16 filter per channel."""
  taps = jnp.array([1.0, 2.0, 1.0], x.dtype) / 4
  kernel = jnp.tile((taps[:, None] * taps[None, :])[:, :, None, None], (1, 1, 1, x.shape[-1]))
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  return jax.lax.conv_general_dilated(
    x, kernel, (2, 2), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1]
  )


class DenseNet(nn.Module):
  """DenseNet; the defaults are torchvision's `DenseNet` (= DenseNet-121).

  Attributes:
    growth_rate: channels each dense layer adds (k).
    block_config: number of layers in each dense block.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck width as a multiple of `growth_rate`; None for the paper's plain DenseNet
      layers (BN-ReLU-3x3 conv, no bottleneck).
    compression: transition compression (theta): a transition keeps `int(channels * compression)`
      channels.
    drop_rate: dropout rate after each dense layer (needs a 'dropout' rng in training).
    num_classes: classifier outputs.
    stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool), 'deep' (timm's: three 3x3 convs, the
      first of stride 2, of growth_rate, growth_rate and num_init_features channels, each followed by
      BN and ReLU, then the 3x3/2 max pool) or 'cifar' (3x3 conv).
    blur_pool: the stem's max pool at stride 1, then timm's BlurPool2d (a 3x3 binomial filter,
      reflect-padded, stride 2): the anti-aliased downsampling of Zhang (2019), as timm's
      densenetblur121d (its transitions keep average pooling).
    memory_efficient: in training, recompute each dense layer's concatenation and first BN-ReLU in
      the backward pass instead of keeping them: the same numbers, memory linear instead of
      quadratic in depth.
    features_only: return a dict of the per-stage features, by torchvision's `features` children
      names ('conv0', ..., 'denseblock1', 'transition1', ..., 'norm5'), instead of logits.
    kernels: the kernel set, 'auto' (the default: 'cpu' on the CPU, 'xla' elsewhere), 'xla' (stock
      Flax, the reference) or 'cpu' (the same numbers, about twice as fast on XLA:CPU). See
      `densenet_jax.ops`. The variables are the same for every set.
    eval_in_pieces: outside training, run each dense block on pieces of the batch of at most 8 MiB
      of output, which stay in cache; None as the kernel set does ('cpu' does). The same outputs.
    axis_name: as `nn.BatchNorm`'s: the `jax.pmap`/`jax.shard_map` axis over whose devices batch
      statistics are computed (N devices of B/N images then give what one gives on B images);
      None for each device's own. `jax.jit` over a sharded batch needs none.
    axis_index_groups: as `nn.BatchNorm`'s: groups of devices along `axis_name` that share them.
    dtype: computation dtype (e.g. jnp.bfloat16).
    param_dtype: parameter dtype.

  With the 'cpu' kernels, the model in training (`train=True`) is reverse-mode differentiable only
  (its gradients are hand-written); outside training, and with 'xla', it is differentiable both ways.
  """

  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int | None = 4
  compression: float = 0.5
  drop_rate: float = 0.0
  num_classes: int = 1000
  stem: str = 'imagenet'
  blur_pool: bool = False
  memory_efficient: bool = False
  features_only: bool = False
  kernels: str = 'auto'
  eval_in_pieces: bool | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    validation.check_config(self)  # At construction, with the fix, rather than deep inside a trace.
    # A tuple keeps the module hashable (a list would not be).
    object.__setattr__(self, 'block_config', tuple(self.block_config))
    super().__post_init__()

  def min_input_size(self) -> int:
    """The smallest image side the network's downsampling leaves at least 1 pixel of."""
    return validation.min_input_size(self.stem, len(self.block_config))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array | dict[str, jax.Array]:
    """Applies the network.

    Args:
      x: images, NHWC, any number of channels (fixed at initialization).
      train: batch statistics and dropout if True (call with `mutable=['batch_stats']` to get the
        updated running averages); running averages if False.

    Returns:
      Logits `(batch, num_classes)` in `dtype`, or with `features_only` a dict of the per-stage
      feature maps.
    """
    validation.check_input(self, x)
    kernels = ops.kernel_set(self.kernels)
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = partial(kernels.conv, train=train, kernel_init=conv_kernel_init, **dtypes)
    # PyTorch's BatchNorm momentum 0.1 is Flax's 0.9 (the weight of the running average).
    norm = partial(
      kernels.batch_norm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      **dtypes,
    )
    in_pieces = kernels.eval_in_pieces if self.eval_in_pieces is None else self.eval_in_pieces

    features = {}
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = features['conv0'] = conv(self.num_init_features, 7, strides=2, padding=3, name='conv0')(x)
      x = features['norm0'] = norm(name='norm0')(x)
      x = features['relu0'] = nn.relu(x)
    elif self.stem == 'deep':
      widths = (self.growth_rate, self.growth_rate, self.num_init_features)
      for i, (width, stride) in enumerate(zip(widths, (2, 1, 1), strict=True)):
        x = features[f'conv{i}'] = conv(width, 3, strides=stride, padding=1, name=f'conv{i}')(x)
        x = features[f'norm{i}'] = norm(name=f'norm{i}')(x)
        x = features[f'relu{i}'] = nn.relu(x)
    else:
      x = features['conv0'] = conv(self.num_init_features, 3, padding=1, name='conv0')(x)
    if self.stem != 'cifar':
      if self.blur_pool:
        x = features['pool0'] = blur_pool(kernels.max_pool(x, 3, 1, 1))
      else:
        x = features['pool0'] = kernels.max_pool(x, 3, 2, 1)

    num_features = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      x = features[f'denseblock{i + 1}'] = DenseBlock(
        num_layers=num_layers,
        growth_rate=self.growth_rate,
        bn_size=self.bn_size,
        drop_rate=self.drop_rate,
        memory_efficient=self.memory_efficient,
        conv=conv,
        norm=norm,
        train_block=kernels.train_block,
        eval_piece_bytes=pieces.EVAL_PIECE_BYTES if in_pieces else None,
        name=f'denseblock{i + 1}',
      )(x, train)
      num_features += num_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        num_features = int(num_features * self.compression)
        x = features[f'transition{i + 1}'] = Transition(
          num_features, conv=conv, norm=norm, avg_pool=kernels.avg_pool, name=f'transition{i + 1}'
        )(x)
    x = features['norm5'] = norm(name='norm5')(x)
    if self.features_only:
      return features

    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name='classifier', **dtypes)(x)


# torchvision's configurations; DenseNet-264 is the paper's (growth 32, 6-12-64-48).
DenseNet121 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
DenseNet161 = partial(DenseNet, growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
DenseNet169 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
DenseNet201 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)
DenseNet264 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)
# timm's variants: a deep stem, and with it blur pooling (their state dicts use torchvision's names).
DenseNet264d = partial(
  DenseNet, growth_rate=48, block_config=(6, 12, 64, 48), num_init_features=96, stem='deep'
)
DenseNetBlur121d = partial(
  DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, stem='deep', blur_pool=True
)


def densenet_cifar(
  depth: int, growth_rate: int, bc: bool = True, num_classes: int = 10, **kwargs: Any
) -> DenseNet:
  """The paper's CIFAR/SVHN networks: DenseNet (L, k) or DenseNet-BC (L, k).

  Three dense blocks of equal size after a 3x3 stem conv. A plain DenseNet has (L - 4) / 3 layers per
  block (BN-ReLU-3x3 conv), 16 stem channels and no compression; DenseNet-BC has (L - 4) / 6
  bottleneck layers per block, 2k stem channels and compression 0.5.

  Args:
    depth: L, the number of layers with weights (convolutions and the classifier).
    growth_rate: k.
    bc: DenseNet-BC (bottleneck + compression) if True, plain DenseNet if False.
    num_classes: classifier outputs.
    **kwargs: any other `DenseNet` attribute (drop_rate, memory_efficient, dtype, ...).

  Returns:
    The configured `DenseNet`.
  """
  # Each dense layer has 2 convolutions in DenseNet-BC, 1 in DenseNet; the other 4 layers with weights
  # are the stem conv, 2 transition convs and the classifier.
  step = 3 * (2 if bc else 1)
  if not isinstance(depth, int) or depth < 4 + step or (depth - 4) % step:
    examples = ', '.join(str(step * n + 4) for n in (1, 2, 6, 16))
    raise ValueError(
      f'depth {depth!r} does not fit the CIFAR DenseNet{"-BC" if bc else ""} rule '
      f'depth = {step} * layers_per_block + 4; use one of {examples}, ... (the paper uses '
      '40 and 100 for DenseNet, 100, 190 and 250 for DenseNet-BC).'
    )
  return DenseNet(
    growth_rate=growth_rate,
    block_config=((depth - 4) // step,) * 3,
    num_init_features=2 * growth_rate if bc else 16,
    bn_size=4 if bc else None,
    compression=0.5 if bc else 1.0,
    num_classes=num_classes,
    stem='cifar',
    **kwargs,
  )
