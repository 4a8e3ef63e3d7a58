"""Image transforms of the input pipelines: decode, crop or resize, augment, normalise one image.

Train: `config.train_augment` ('inception_crop', 'pad_crop', 'resize' or 'none'), flip,
RandAugment, every random choice from the example's stateless seed; eval: `config.eval_preprocess`
('center_crop' as torchvision's Resize + CenterCrop, 'resize' or 'none'). Resizing is antialiased,
as torchvision's on tensors with `antialias=True`.
"""

import ml_collections
import tensorflow as tf

from densenet_jax.train.randaugment import randaugment


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  return tf.io.decode_image(encoded, channels=channels, expand_animations=False)


def _inception_crop(encoded: tf.Tensor, size: int, channels: int, seed: tf.Tensor) -> tf.Tensor:
  """Inception-style random resized crop (area 8%-100%, aspect 3/4-4/3), bilinear to `size`."""
  is_jpeg = tf.io.is_jpeg(encoded)
  shape = tf.cond(
    is_jpeg,
    lambda: tf.io.extract_jpeg_shape(encoded),
    lambda: tf.shape(_decode(encoded, channels)),
  )
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
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  # Decoding only the crop window saves most of the JPEG decode.
  image = tf.cond(
    is_jpeg,
    lambda: tf.io.decode_and_crop_jpeg(encoded, window, channels=channels),
    lambda: tf.slice(_decode(encoded, channels), [begin[0], begin[1], 0], [crop_size[0], crop_size[1], -1]),
  )
  return tf.image.resize(image, [size, size], method='bilinear', antialias=True)


def _center_crop(encoded: tf.Tensor, size: int, channels: int, crop_fraction: float) -> tf.Tensor:
  """torchvision's eval transform: resize the short side to size / crop_fraction, center crop."""
  image = _decode(encoded, channels)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size / crop_fraction) / tf.reduce_min(shape)
  resized = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, resized, method='bilinear', antialias=True)
  top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
  return tf.slice(image, [top, left, 0], [size, size, -1])


def _pad_crop(encoded: tf.Tensor, size: int, channels: int, padding: int, seed: tf.Tensor) -> tf.Tensor:
  """The CIFAR augmentation: zero-pad by `padding` pixels and take a random `size` crop."""
  image = tf.image.resize_with_crop_or_pad(_decode(encoded, channels), size, size)
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.cast(tf.image.stateless_random_crop(image, [size, size, channels], seed), tf.float32)


def preprocess_train(
  config: ml_collections.ConfigDict, encoded: tf.Tensor, channels: int, seed: tf.Tensor
) -> tf.Tensor:
  """Decodes and augments one training image (`config.train_augment`), then normalizes it."""
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
    image = randaugment(image, layers, magnitude, tf.random.experimental.stateless_fold_in(seed, 2))
  return _normalize(config, image)


def preprocess_eval(config: ml_collections.ConfigDict, encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """Decodes one eval image (`config.eval_preprocess`) and normalizes it."""
  if config.eval_preprocess == 'center_crop':
    image = _center_crop(encoded, config.image_size, channels, config.eval_crop_fraction)
  elif config.eval_preprocess == 'resize':
    image = _resize(encoded, config.image_size, channels)
  else:  # 'none'
    image = _resize_exact(encoded, config.image_size, channels)
  return _normalize(config, image)


def _resize(encoded: tf.Tensor, size: int, channels: int) -> tf.Tensor:
  """The whole image resized (bilinear) to size x size, as torchvision's Resize((size, size))."""
  return tf.image.resize(_decode(encoded, channels), [size, size], method='bilinear', antialias=True)


def _resize_exact(encoded: tf.Tensor, size: int, channels: int) -> tf.Tensor:
  image = _decode(encoded, channels)
  image = tf.image.resize_with_crop_or_pad(image, size, size)
  return tf.cast(image, tf.float32)


def _normalize(config: ml_collections.ConfigDict, image: tf.Tensor) -> tf.Tensor:
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(config.mean, tf.float32)) / tf.constant(config.std, tf.float32)
