"""Image transforms of the input pipelines: decode, crop or resize and augment one image, to uint8.

Train: `config.train_augment` ('inception_crop', 'pad_crop', 'resize' or 'none'), flip,
RandAugment, every random choice from the example's stateless seed; eval: `config.eval_preprocess`
('center_crop' as torchvision's Resize + CenterCrop, 'resize' or 'none'). Resizing is antialiased
bilinear, as torchvision's (PIL's, and its tensors' with `antialias=True`), and images leave as
uint8 pixels, as torchvision's transforms make them before `ToTensor`: a quarter of float32's
bytes to batch and send. They are normalised on the devices (`steps.normalize`).

A JPEG is decoded only where the output needs it: the crop window in training, and in eval the
part of the image that the center crop of the resized image samples (`center_crop`).
"""

import ml_collections
import tensorflow as tf

from densenet_jax.train.randaugment import randaugment


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  return tf.io.decode_image(encoded, channels=channels, expand_animations=False)


def _image_shape(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """(height, width, channels) of an encoded image; a JPEG's read from its header, without decoding."""
  return tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.io.extract_jpeg_shape(encoded),
    lambda: tf.shape(_decode(encoded, channels)),
  )


def _inception_crop(encoded: tf.Tensor, size: int, channels: int, seed: tf.Tensor) -> tf.Tensor:
  """An Inception-style random crop (area 8%-100%, aspect 3/4-4/3) as RandomResizedCrop, resized."""
  shape = _image_shape(encoded, channels)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    seed=seed,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return resized_crop(encoded, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]), size, channels)


def resized_crop(encoded: tf.Tensor, window: tf.Tensor, size: int, channels: int) -> tf.Tensor:
  """torchvision's `resized_crop`: the window (top, left, height, width) resized to size x size.

  Only the window of a JPEG is decoded, with one more pixel around it where the image has one: a
  JPEG decoded up to a window's edge upsamples its colour there differently (up to 14 of 255 off).
  The resize is antialiased bilinear, float32 out.
  """
  top, left, height, width = tf.unstack(window)
  shape = _image_shape(encoded, channels)
  first = tf.maximum(tf.stack([top, left]) - 1, 0)
  end = tf.minimum(tf.stack([top + height, left + width]) + 1, shape[:2])
  image = _decode_window(encoded, first, end, channels)
  image = tf.slice(image, [top - first[0], left - first[1], 0], [height, width, -1])
  # Enlarging, antialiasing changes nothing (the filter keeps its width): the plain, faster resize.
  return tf.cond(
    (height <= size) & (width <= size),
    lambda: tf.image.resize(image, [size, size], method='bilinear'),
    lambda: tf.image.resize(image, [size, size], method='bilinear', antialias=True),
  )


def _decode_window(encoded: tf.Tensor, first: tf.Tensor, end: tf.Tensor, channels: int) -> tf.Tensor:
  """Pixels [first, end) (rows, columns) of an image: of a JPEG, only those are decoded."""
  window = tf.concat([first, end - first], 0)
  return tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.io.decode_and_crop_jpeg(encoded, window, channels=channels),
    lambda: tf.slice(_decode(encoded, channels), [first[0], first[1], 0], [window[2], window[3], -1]),
  )


# The antialiased resize's kernel per interpolation: PIL's (and torchvision's) bilinear and bicubic
# (Keys, a = -0.5), widened by the downscale factor.
KERNELS = {'bilinear': 'triangle', 'bicubic': 'keyscubic'}


def center_crop(
  encoded: tf.Tensor, size: int, channels: int, crop_fraction: float, interpolation: str = 'bilinear'
) -> tf.Tensor:
  """torchvision's eval transform: Resize(int(size / crop_fraction)) (the short side), CenterCrop(size).

  Computed in one antialiased resampling of only the rows and columns the crop samples (with the
  filter's reach around them), so the JPEG is decoded only there: the same pixels as resizing the
  whole image and cropping, for less decoding and resizing. Float32 out.
  """
  # Each quantity is a (rows, columns) pair: one set of operations for both axes.
  shape = tf.cast(_image_shape(encoded, channels)[:2], tf.float64)
  # torchvision's sizes: the short side to `resize`, the long one truncated; the crop's offset rounded
  # (half to even, as Python's round).
  resize = int(size / crop_fraction)
  resized = tf.floor(resize * shape / tf.reduce_min(shape))
  offset = tf.round((resized - size) / 2)
  # The source pixels the crop reads: within the kernel's radius (1 bilinear, 2 bicubic) times
  # max(ratio, 1) of each sample, one more for rounding.
  ratio = shape / resized
  reach = (1.0 if interpolation == 'bilinear' else 2.0) * tf.maximum(ratio, 1.0) + 1.0
  first = tf.maximum(tf.floor((offset + 0.5) * ratio - reach), 0.0)
  end = tf.minimum(tf.math.ceil((offset + size - 0.5) * ratio + reach), shape)
  image = _decode_window(encoded, tf.cast(first, tf.int32), tf.cast(end, tf.int32), channels)
  # Output pixel (i, j) is pixel (offset + (i, j)) of the whole resized image, in window coordinates.
  scale = tf.cast(resized / shape, tf.float32)
  translation = tf.cast(first, tf.float32) * scale - tf.cast(offset, tf.float32)
  resized_crop = tf.raw_ops.ScaleAndTranslate(
    images=image[None],
    size=[size, size],
    scale=scale,
    translation=translation,
    kernel_type=KERNELS[interpolation],
  )[0]
  return tf.ensure_shape(resized_crop, [size, size, channels])


def _pad_crop(encoded: tf.Tensor, size: int, channels: int, padding: int, seed: tf.Tensor) -> tf.Tensor:
  """The CIFAR augmentation: zero-pad by `padding` pixels and take a random `size` crop."""
  image = tf.image.resize_with_crop_or_pad(_decode(encoded, channels), size, size)
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(image, [size, size, channels], seed)


def preprocess_train(
  config: ml_collections.ConfigDict, encoded: tf.Tensor, channels: int, seed: tf.Tensor
) -> tf.Tensor:
  """Decodes and augments one training image (`config.train_augment`): uint8 (size, size, channels)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if config.train_augment == 'inception_crop':
    image = _inception_crop(encoded, config.image_size, channels, crop_seed)
  elif config.train_augment == 'pad_crop':
    image = _pad_crop(encoded, config.image_size, channels, config.crop_padding, crop_seed)
  elif config.train_augment == 'resize':
    image = _resize(encoded, config.image_size, channels)
  else:  # 'none'
    image = _resize_exact(encoded, config.image_size, channels)
  if config.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if config.randaugment:
    layers, magnitude = config.randaugment
    # A seed of its own, folded from the example's: the crop and flip stay as without RandAugment.
    image = randaugment(
      tf.cast(image, tf.float32), layers, magnitude, tf.random.experimental.stateless_fold_in(seed, 2)
    )
  return to_uint8(image)


def preprocess_eval(config: ml_collections.ConfigDict, encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """Decodes one eval image (`config.eval_preprocess`): uint8 (size, size, channels)."""
  if config.eval_preprocess == 'center_crop':
    image = center_crop(
      encoded, config.image_size, channels, config.eval_crop_fraction, config.eval_interpolation
    )
  elif config.eval_preprocess == 'resize':
    image = _resize(encoded, config.image_size, channels, config.eval_interpolation)
  else:  # 'none'
    image = _resize_exact(encoded, config.image_size, channels)
  return to_uint8(image)


def _resize(encoded: tf.Tensor, size: int, channels: int, interpolation: str = 'bilinear') -> tf.Tensor:
  """The whole image resized (antialiased) to size x size, as torchvision's Resize((size, size))."""
  return tf.image.resize(_decode(encoded, channels), [size, size], method=interpolation, antialias=True)


def _resize_exact(encoded: tf.Tensor, size: int, channels: int) -> tf.Tensor:
  image = _decode(encoded, channels)
  return tf.image.resize_with_crop_or_pad(image, size, size)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Pixels rounded to the nearest integer (halves up) and clipped to 0-255, as PIL stores a resized image."""
  if image.dtype == tf.uint8:
    return image
  return tf.dtypes.saturate_cast(image + 0.5, tf.uint8)
