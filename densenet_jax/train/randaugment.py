"""RandAugment (Cubuk et al., 2020) as timm's `rand-mM-nN`, in TensorFlow for the input pipeline.

Each of `layers` rounds picks one of timm's 15 operations uniformly and applies it with
probability 0.5 at `magnitude` (0-10; stronger as it grows; a random sign for the geometric
ones). Every random draw is stateless, from the seed given: the augmentation of an example is a
function of (seed, epoch, example), so a resumed run augments exactly as an uninterrupted one.
Images are float32 on the 0-255 scale with any channel count; pixels outside the image after a
rotation, shear or translation are timm's grey (128).
"""

import math

import tensorflow as tf

FILL = 128.0
MAX_LEVEL = 10.0


def _gray(image: tf.Tensor) -> tf.Tensor:
  """ITU-R 601-2 luma (PIL's 'L'), broadcast back to the channels; grey images are their own."""
  if image.shape[-1] != 3:
    return image
  luma = tf.tensordot(image, tf.constant([0.299, 0.587, 0.114]), axes=1)[..., None]
  return tf.broadcast_to(luma, tf.shape(image))


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate)."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _sharpness_degenerate(image: tf.Tensor) -> tf.Tensor:
  """PIL's SMOOTH filter on the interior, the border pixels unchanged."""
  channels = image.shape[-1]
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  return interior * tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + (1 - interior) * image


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
  low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = tf.clip_by_value((image - low) * (255.0 / tf.maximum(high - low, 1e-6)), 0.0, 255.0)
  return tf.where(high > low, scaled, image)


def _equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize, each channel on its own histogram."""

  def channel(values: tf.Tensor) -> tf.Tensor:
    values = tf.cast(values, tf.int32)
    histogram = tf.histogram_fixed_width(values, [0, 256], nbins=256)  # one bin per value
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
      lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
      lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
      return tf.gather(lut, values)

    return tf.cast(tf.cond(step > 0, equalized, lambda: values), tf.float32)

  image = tf.round(image)
  return tf.stack([channel(image[..., c]) for c in range(image.shape[-1])], -1)


def _posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  shift = 8 - bits
  return tf.cast(
    tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.uint8), shift), shift), tf.float32
  )


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
  """Output pixel (x, y) <- input pixel (a0 x + a1 y + a2, b0 x + b1 y + b2), bilinear, grey outside."""
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.cast(tf.stack(matrix + [0.0, 0.0])[None], tf.float32),
    output_shape=tf.shape(image)[:2],
    fill_value=FILL,
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )[0]


def _rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (width - 1) / 2, (height - 1) / 2
  cos, sin = tf.cos(degrees * math.pi / 180), tf.sin(degrees * math.pi / 180)
  return _transform(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


NAMES = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'SolarizeAdd',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
)


def operations(image: tf.Tensor, magnitude: float, sign: tf.Tensor) -> list:
  """The operations of NAMES, in order, as thunks on `image` at `magnitude` (sign: +-1)."""
  level = magnitude / MAX_LEVEL
  size = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = level * 1.8 + 0.1  # timm's enhance factor: 0.1 .. 1.9
  return [
    lambda: _autocontrast(image),
    lambda: _equalize(image),
    lambda: 255.0 - image,
    lambda: _rotate(image, sign * level * 30.0),
    lambda: _posterize(image, max(1, 8 - int(level * 4))),
    lambda: tf.where(image >= 256.0 - level * 256.0, 255.0 - image, image),
    lambda: tf.where(image < 128.0, tf.minimum(image + level * 110.0, 255.0), image),
    lambda: _blend(_gray(image), image, enhance),
    lambda: _blend(tf.reduce_mean(_gray(image)) * tf.ones_like(image), image, enhance),
    lambda: _blend(tf.zeros_like(image), image, enhance),
    lambda: _blend(_sharpness_degenerate(image), image, enhance),
    lambda: _transform(image, [1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0]),
    lambda: _transform(image, [1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0]),
    lambda: _transform(image, [1.0, 0.0, sign * level * 0.45 * size, 0.0, 1.0, 0.0]),
    lambda: _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * level * 0.45 * size]),
  ]


def randaugment(image: tf.Tensor, layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  """`image` (H, W, C float32, 0-255) through `layers` random operations at `magnitude`."""
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, layers)):
    choice_seed, apply_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 3))
    choice = tf.random.stateless_uniform([], choice_seed, 0, len(NAMES), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    augmented = tf.ensure_shape(tf.switch_case(choice, operations(image, magnitude, sign)), image.shape)
    image = tf.where(tf.random.stateless_uniform([], apply_seed) < 0.5, augmented, image)
  return image
