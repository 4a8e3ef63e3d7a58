"""The input pipeline of Flax's `examples/imagenet`, re-implemented for `input_pipeline.py` to race.

From https://github.com/google/flax/blob/main/examples/imagenet/input_pipeline.py
(`create_split` and the transforms it maps), written again here with the same operations in
the same order and the same settings, so that the benchmark needs neither Flax's repository
nor its `clu`: train decodes only an Inception-style random crop window
(`decode_and_crop_jpeg`; a crop that fell back to the whole image becomes the center crop),
resizes it bicubic (no antialiasing) to 224, flips, and normalises in float32; eval decodes
only the center window of 224/256 of the short side and resizes it bicubic. The dataset
options are the example's (a private thread pool of 48), and so are the shuffle buffer
(2,000), the batching (drop_remainder) and prefetch (10).
"""

import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_SIZE = 224
CROP_PADDING = 32
MEAN_RGB = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STDDEV_RGB = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def _resize_bicubic(image: tf.Tensor, size: int) -> tf.Tensor:
  return tf.image.resize([image], [size, size], method=tf.image.ResizeMethod.BICUBIC)[0]


def _center_crop(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.image.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  crop = tf.cast((size / (size + CROP_PADDING)) * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  window = tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])
  return _resize_bicubic(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), size)


def _random_crop(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  whole_image = tf.reduce_sum(tf.cast(tf.equal(shape, tf.shape(image)), tf.int32)) >= 3
  return tf.cond(whole_image, lambda: _center_crop(image_bytes, size), lambda: _resize_bicubic(image, size))


def _normalize(image: tf.Tensor) -> tf.Tensor:
  image -= tf.constant(MEAN_RGB, shape=[1, 1, 3], dtype=image.dtype)
  image /= tf.constant(STDDEV_RGB, shape=[1, 1, 3], dtype=image.dtype)
  return image


def preprocess_for_train(image_bytes: tf.Tensor, dtype=tf.float32, size: int = IMAGE_SIZE) -> tf.Tensor:
  image = tf.reshape(_random_crop(image_bytes, size), [size, size, 3])
  image = _normalize(tf.image.random_flip_left_right(image))
  return tf.image.convert_image_dtype(image, dtype=dtype)


def preprocess_for_eval(image_bytes: tf.Tensor, dtype=tf.float32, size: int = IMAGE_SIZE) -> tf.Tensor:
  image = _normalize(tf.reshape(_center_crop(image_bytes, size), [size, size, 3]))
  return tf.image.convert_image_dtype(image, dtype=dtype)


def create_split(
  builder: tfds.core.DatasetBuilder,
  batch_size: int,
  train: bool,
  dtype=tf.float32,
  image_size: int = IMAGE_SIZE,
  shuffle_buffer_size: int = 2_000,
  prefetch: int = 10,
  train_split: str = 'train',
  eval_split: str = 'validation',
) -> tf.data.Dataset:
  """Batches of {'image', 'label'} of one process (here: the only one), as Flax's example makes them."""
  split = train_split if train else eval_split
  options = tf.data.Options()
  options.threading.private_threadpool_size = 48
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()}).with_options(options)
  if train:
    ds = ds.repeat().shuffle(shuffle_buffer_size, seed=0)

  def decode_example(example):
    preprocess = preprocess_for_train if train else preprocess_for_eval
    return {'image': preprocess(example['image'], dtype, image_size), 'label': example['label']}

  ds = ds.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)
  if not train:
    ds = ds.repeat()
  return ds.prefetch(prefetch)
