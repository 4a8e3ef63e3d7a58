"""The TFDS pipelines: real digits data, deterministic and resumable order, the configs' augmentations.

cifar10 and imagenet2012 cannot be downloaded here: their configs run on
`tfds.testing.mock_data`, which serves random examples with the real datasets' features
(imagenet2012's are JPEGs of random sizes), through the same pipeline code.
"""

import numpy as np
import pytest
from conftest import optional_module

tfds = optional_module('tensorflow_datasets')

from configs import cifar10, densenet121, digits  # noqa: E402
from densenet_jax.train import input_pipeline, preprocess  # noqa: E402


def digits_config(data_dir, **overrides):
  config = digits.get_config()
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_digits_dataset_is_scikit_learns_digits_with_a_held_out_test_split(digits_data_dir):
  from sklearn.datasets import load_digits

  builder = tfds.builder('sklearn_digits', data_dir=str(digits_data_dir))
  train = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  assert train['image'].shape == (1438, 8, 8, 1) and test['image'].shape == (359, 8, 8, 1)
  # Every image is one of scikit-learn's (pixel counts 0-16 scaled to 0-255), each used once.
  source = load_digits()
  expected = {
    (np.round(image * 255 / 16).astype(np.uint8).tobytes(), label)
    for image, label in zip(source.images, source.target, strict=True)
  }
  seen = [
    (image[..., 0].tobytes(), label)
    for split in (train, test)
    for image, label in zip(split['image'], split['label'], strict=True)
  ]
  assert len(seen) == 1797 and set(seen) == expected
  # The test split holds out about 20% of every digit.
  for digit in range(10):
    fraction = np.mean(test['label'] == digit) / np.mean(source.target == digit) * 359 / 1797
    assert 0.18 < fraction < 0.22


def test_batches_are_the_same_whatever_the_process_count(digits_data_dir):
  config = digits_config(digits_data_dir, num_data_shards=2)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.data_spec(config, builder, 2)
  one_process = take(input_pipeline.train_iterator(config, builder, spec, 0, 0, 1), 3)
  halves = [take(input_pipeline.train_iterator(config, builder, spec, 0, p, 2), 3) for p in (0, 1)]
  for whole, first, second in zip(one_process, *halves, strict=True):
    assert first['image'].shape == (32, 8, 8, 1)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))


def test_resuming_at_a_step_gives_the_batches_an_uninterrupted_run_sees(digits_data_dir):
  config = digits_config(digits_data_dir)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.data_spec(config, builder, 1)
  assert spec.steps_per_epoch == 1438 // 64 == 22
  uninterrupted = take(input_pipeline.train_iterator(config, builder, spec, 0, 0, 1), 30)
  resumed = take(input_pipeline.train_iterator(config, builder, spec, 25, 0, 1), 5)  # mid-epoch 2
  for expected, actual in zip(uninterrupted[25:], resumed, strict=True):
    np.testing.assert_array_equal(expected['image'], actual['image'])
    np.testing.assert_array_equal(expected['label'], actual['label'])
  # Each epoch is a new order of the same examples, and augmentation (pad-and-crop) is random.
  epoch0 = np.concatenate([b['label'] for b in uninterrupted[:22]])
  epoch1 = np.concatenate([b['label'] for b in uninterrupted[22:30]])
  assert not np.array_equal(epoch0[: len(epoch1)], epoch1)
  other_seed = take(
    input_pipeline.train_iterator(digits_config(digits_data_dir, seed=1), builder, spec, 0, 0, 1), 1
  )
  assert not np.array_equal(other_seed[0]['label'], uninterrupted[0]['label'])


def test_eval_reads_every_example_once_and_masks_the_padding(digits_data_dir):
  config = digits_config(digits_data_dir, eval_batch_size=100)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.data_spec(config, builder, 1)
  batches = list(input_pipeline.eval_iterator(config, builder, spec, 0, 1))
  assert len(batches) == spec.eval_steps == 4
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 359 and np.all(mask[:359] == 1) and np.all(mask[359:] == 0)
  labels = np.concatenate([b['label'] for b in batches])[:359]
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  np.testing.assert_array_equal(labels, test['label'])
  # Eval images are the real pixels (uint8, normalised on the devices), not a crop.
  assert batches[0]['image'].dtype == np.uint8
  np.testing.assert_array_equal(batches[0]['image'][0], test['image'][0])


@pytest.mark.parametrize('config_module, image_shape', [(cifar10, (32, 32, 3)), (densenet121, (224, 224, 3))])
def test_config_pipelines_on_mock_data(tmp_path, config_module, image_shape):
  config = config_module.get_config()
  config.data_dir = str(tmp_path)
  config.batch_size = config.eval_batch_size = 8
  with tfds.testing.mock_data(num_examples=20):
    builder = input_pipeline.get_builder(config)
    spec = input_pipeline.data_spec(config, builder, 1)
    assert spec.steps_per_epoch == 2 and spec.eval_steps == 3
    train = take(input_pipeline.train_iterator(config, builder, spec, 0, 0, 1), 4)
    again = take(input_pipeline.train_iterator(config, builder, spec, 0, 0, 1), 4)
    evals = list(input_pipeline.eval_iterator(config, builder, spec, 0, 1))
  for batch, same in zip(train, again, strict=True):
    assert batch['image'].shape == (8, *image_shape) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and np.all(
      (0 <= batch['label']) & (batch['label'] < spec.num_classes)
    )
    np.testing.assert_array_equal(batch['image'], same['image'])  # deterministic for the seed
  assert len(evals) == 3 and all(b['image'].shape == (8, *image_shape) for b in evals)
  assert np.concatenate([b['mask'] for b in evals]).sum() == 20
  # The same example augmented in two epochs differs (random crop and flip), eval does not.
  first_epoch = np.concatenate([b['image'] for b in train[:2]])
  second_epoch = np.concatenate([b['image'] for b in train[2:]])
  assert not np.array_equal(np.sort(first_epoch.ravel()), np.sort(second_epoch.ravel()))
  assert all(b['image'].dtype == np.uint8 for b in evals)  # pixels: normalised on the devices


def test_inception_crop_covers_the_configured_area_range():
  tf = optional_module('tensorflow')
  image = np.arange(300 * 400, dtype=np.float32).reshape(300, 400, 1) % 251
  encoded = tf.io.encode_png(tf.constant(np.repeat(image, 3, -1).astype(np.uint8)))
  config = densenet121.get_config()
  areas = []
  for i in range(50):
    seed = tf.constant([0, i], tf.int64)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      [300, 400, 3],
      tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed,
      area_range=(0.08, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0.1,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    areas.append(float(size[0] * size[1]) / (300 * 400))
    out = preprocess.preprocess_train(config, encoded, 3, seed)
    assert out.shape == (224, 224, 3)
  assert 0.08 <= min(areas) < 0.4 and max(areas) > 0.7
