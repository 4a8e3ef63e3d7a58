"""TFDS input pipelines: deterministic, sharded, resumable at any step.

The data a run sees is a function of the config alone (seed, batch size, `num_data_shards`),
not of how many devices or processes run it:

* The split is cut into `num_data_shards` contiguous shards (default: one per process). Each
  process reads only its own shards, and every global batch is the concatenation, in shard
  order, of `batch_size / num_data_shards` examples from each shard. So 8 devices see the same
  batches as 1, and 2 processes the same as 1 process reading both shards.
* A shard is shuffled anew each epoch with a seed made of (seed, shard, epoch), and every
  random augmentation draws from a stateless seed made of (seed, epoch, example index).
  Resuming at step s therefore only needs s: the pipeline starts at epoch s // steps_per_epoch
  and skips the (undecoded) examples of that epoch's first steps.
* Evaluation reads every example of the eval split exactly once; the last batches are padded
  and the padding is masked out (`mask` = 0).
"""

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

import densenet_jax.train.datasets  # noqa: F401  (registers sklearn_digits)
from densenet_jax.train.preprocess import preprocess_eval, preprocess_train

# The files imagenet2012 needs, from https://image-net.org (TFDS cannot download them).
IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


class DataError(ValueError):
  """The dataset cannot be used as configured; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the trainer needs to know about the data.

  Attributes:
    name: TFDS name.
    num_classes: label classes.
    channels: image channels.
    num_train_examples: examples that train: the train split's first (1 - validation_fraction).
    num_eval_examples: examples in the eval split.
    steps_per_epoch: global batches per epoch (each shard's remainder is dropped).
    eval_steps: global eval batches (the last ones padded).
    num_validation_examples: the train split's last `validation_fraction`, held out (0: none).
    validation_steps: global validation batches (as eval_steps).
  """

  name: str
  num_classes: int
  channels: int
  num_train_examples: int
  num_eval_examples: int
  steps_per_epoch: int
  eval_steps: int
  num_validation_examples: int = 0
  validation_steps: int = 0


def num_data_shards(config: ml_collections.ConfigDict, process_count: int) -> int:
  """The number of data shards: `config.num_data_shards`, or one per process if 0."""
  shards = config.num_data_shards or process_count
  if shards % process_count:
    raise DataError(
      f'config.num_data_shards={shards} must be a multiple of the number of processes '
      f'({process_count}); set it to a multiple, or to 0 for one shard per process.'
    )
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % shards:
      raise DataError(
        f'config.{name}={config[name]} is not divisible by the {shards} data shards '
        f'(config.num_data_shards, default one per process); use a multiple of {shards}.'
      )
  return shards


def get_builder(config: ml_collections.ConfigDict, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.dataset`, prepared (built here if it can be, and `prepare`).

  Several processes (a pod's hosts) must not prepare one data_dir at once: they pass
  `prepare=False` and get an error that says how to prepare it once.
  """
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DataError(
      f'unknown dataset {config.dataset!r}: config.dataset must be a TFDS name such as '
      f"'sklearn_digits', 'cifar10', 'cifar100', 'imagenette', 'imagenet2012' "
      f'(https://www.tensorflow.org/datasets/catalog).'
    ) from error
  if builder.is_prepared():
    return builder
  if not prepare:
    raise DataError(
      f'{config.dataset} is not prepared in {builder.data_dir_root}, and the processes of a multi-process '
      f'run would each prepare it: prepare it once first, on one host, with `tfds build {config.dataset} '
      f'--data_dir={builder.data_dir_root}` (add --manual_dir=DIR for imagenet2012).'
    )
  data_dir = epath.Path(builder.data_dir_root)
  manual_dir = epath.Path(config.manual_dir or data_dir / 'downloads' / 'manual')
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  except Exception as error:  # noqa: BLE001  (network, manual files, disk: all end here)
    if config.dataset.split('/')[0] == 'imagenet2012':
      missing = [name for name in IMAGENET_MANUAL_FILES if not (manual_dir / name).exists()]
      raise DataError(
        f'imagenet2012 is not prepared in {data_dir} and TFDS cannot download it: put '
        f'{" and ".join(IMAGENET_MANUAL_FILES)} (from https://image-net.org/download-images) in '
        f'{manual_dir} (or set config.manual_dir), then run again'
        + (
          f'; missing: {", ".join(missing)}.'
          if missing
          else f' ({type(error).__name__}: {_first_line(error)}).'
        )
      ) from error
    raise DataError(
      f'{config.dataset} is not prepared in {data_dir} and preparing it failed ({type(error).__name__}: '
      f'{_first_line(error)}). On a machine with internet run `tfds build {config.dataset} --data_dir DIR`, '
      'copy DIR here and set config.data_dir=DIR.'
    ) from error
  return builder


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [''])[0][:300]


def _num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError):
    # Only when the split sizes are unknown (e.g. under tfds.testing.mock_data): count.
    return int(builder.as_dataset(split=split).reduce(0, lambda count, _: count + 1))


def data_spec(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, shards: int) -> DataSpec:
  """Sizes, classes and steps for `config` on `builder`'s dataset."""
  features = builder.info.features
  for split in (config.train_split, config.eval_split):
    if builder.info.splits and split.split('[')[0] not in builder.info.splits:
      raise DataError(
        f'{config.dataset} has no split {split!r}; its splits are {sorted(builder.info.splits)} '
        f'(set config.train_split / config.eval_split).'
      )
  # The validation split is the train split's tail, as big_vision's minival (train[99%:]): TFDS
  # writes its examples shuffled, so a contiguous slice is a random sample, the same every run.
  num_train_split = _num_examples(builder, config.train_split)
  num_validation = round(num_train_split * config.validation_fraction)
  num_train = num_train_split - num_validation
  num_eval = _num_examples(builder, config.eval_split)
  channels = features['image'].shape[-1] or 3
  for field in ('mean', 'std'):
    if len(config[field]) != channels:
      raise DataError(
        f'config.{field} has {len(config[field])} values and the images of {config.dataset} have {channels} '
        f'channel{"s" if channels > 1 else ""}: give one value per channel (e.g. --config.{field}='
        f'"{tuple(config[field][:1]) * channels}").'
      )
  if config.validation_fraction and num_validation == 0:
    raise DataError(
      f'config.validation_fraction={config.validation_fraction} of the {num_train_split} examples of '
      f'{config.dataset}:{config.train_split} is no example; use a larger fraction.'
    )
  shard_batch = config.batch_size // shards
  steps_per_epoch = (num_train // shards) // shard_batch
  if steps_per_epoch == 0:
    raise DataError(
      f'config.batch_size={config.batch_size} is larger than the {num_train} examples of '
      f'{config.dataset}:{config.train_split} ({num_train // shards} per data shard); use a '
      'smaller batch size.'
    )
  eval_shard_batch = config.eval_batch_size // shards
  return DataSpec(
    name=config.dataset,
    num_classes=features['label'].num_classes,
    channels=channels,
    num_train_examples=num_train,
    num_eval_examples=num_eval,
    steps_per_epoch=steps_per_epoch,
    eval_steps=math.ceil(math.ceil(num_eval / shards) / eval_shard_batch),
    num_validation_examples=num_validation,
    validation_steps=math.ceil(math.ceil(num_validation / shards) / eval_shard_batch),
  )


def _shard_bounds(num_examples: int, shards: int, shard: int, drop_remainder: bool) -> tuple[int, int]:
  if drop_remainder:
    size = num_examples // shards
    return shard * size, (shard + 1) * size
  return shard * num_examples // shards, (shard + 1) * num_examples // shards


def _read(builder: tfds.core.DatasetBuilder, split: str, start: int, end: int) -> tf.data.Dataset:
  """Examples [start, end) of `split` in file order, images left encoded (decoded later)."""
  base = split.split('[')[0]
  if '[' in split:
    raise DataError(f'use a whole split name for {split!r}; shards are cut by num_data_shards.')
  return builder.as_dataset(
    split=f'{base}[{start}:{end}]',
    shuffle_files=False,
    decoders={'image': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(add_tfds_id=False),
  )


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # The same order every run, whatever the thread timing.
  options.threading.private_threadpool_size = 48
  options.experimental_optimization.map_parallelization = True
  return options


def _local_shards(shards: int, process_index: int, process_count: int) -> range:
  per_process = shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def train_iterator(
  config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  spec: DataSpec,
  start_step: int,
  process_index: int,
  process_count: int,
  end_step: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of every global training batch from `start_step` to `end_step` (or forever).

  Yields:
    {'image': uint8 pixels (local_batch, size, size, channels), normalised on the devices
     (`steps.normalize`), 'label': int32 (local_batch,)}, where local_batch = batch_size / process_count.
  """
  shards = num_data_shards(config, process_count)
  shard_batch = config.batch_size // shards
  examples_per_epoch = spec.steps_per_epoch * shard_batch
  start_epoch, step_in_epoch = divmod(start_step, spec.steps_per_epoch)

  def shard_dataset(shard: int) -> tf.data.Dataset:
    start, end = _shard_bounds(spec.num_train_examples, shards, shard, drop_remainder=True)
    examples = _read(builder, config.train_split, start, end).enumerate(start)
    buffer = min(end - start, config.shuffle_buffer)

    def one_epoch(epoch):
      # An int64 hash of (seed, shard, epoch): a new order every epoch, the same every run.
      epoch_key = tf.random.experimental.stateless_fold_in(tf.constant([config.seed, shard], tf.int64), epoch)
      shuffle_seed = tf.random.stateless_uniform([], epoch_key, minval=None, maxval=None, dtype=tf.int64)
      return (
        examples.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        .take(examples_per_epoch)
        .map(lambda index, example: (epoch, index, example['image'], example['label']))
      )

    def preprocess(epoch, index, encoded, label):
      seed = tf.stack([tf.constant(config.seed, tf.int64), epoch * spec.num_train_examples + index])
      image = preprocess_train(config, encoded, spec.channels, seed)
      return image, tf.cast(label, tf.int32)

    return (
      tf.data.Dataset.counter(start_epoch)
      .flat_map(one_epoch)
      .skip(step_in_epoch * shard_batch)  # Cheap: nothing is decoded yet.
      .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
      .batch(shard_batch, drop_remainder=True)
    )

  local = [shard_dataset(shard) for shard in _local_shards(shards, process_index, process_count)]
  dataset = tf.data.Dataset.zip(tuple(local)).map(
    lambda *parts: {
      'image': tf.concat([image for image, _ in parts], 0),
      'label': tf.concat([label for _, label in parts], 0),
    }
  )
  if end_step is not None:
    # A finite pipeline: its threads end with the last batch instead of being torn down at exit.
    dataset = dataset.take(end_step - start_step)
  dataset = dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return dataset.as_numpy_iterator()


def eval_iterator(
  config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  spec: DataSpec,
  process_index: int,
  process_count: int,
  validation: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of the global eval batches, each example exactly once.

  `spec.eval_steps` batches of the eval split, or with `validation` `spec.validation_steps`
  batches of the held-out tail of the train split, preprocessed as eval images.

  Yields:
    {'image', 'label', 'mask'}: mask is 1 for real examples, 0 for the padding.
  """
  shards = num_data_shards(config, process_count)
  shard_batch = config.eval_batch_size // shards
  size = config.image_size
  split, offset, count, steps = (
    (config.train_split, spec.num_train_examples, spec.num_validation_examples, spec.validation_steps)
    if validation
    else (config.eval_split, 0, spec.num_eval_examples, spec.eval_steps)
  )

  def shard_dataset(shard: int) -> tf.data.Dataset:
    start, end = _shard_bounds(count, shards, shard, drop_remainder=False)
    start, end = start + offset, end + offset
    real = (
      _read(builder, split, start, end)
      .take(end - start)
      .map(
        lambda example: (
          preprocess_eval(config, example['image'], spec.channels),
          tf.cast(example['label'], tf.int32),
          tf.constant(1, tf.int32),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
      )
    )
    padding = tf.data.Dataset.from_tensors(
      (tf.zeros([size, size, spec.channels], tf.uint8), tf.constant(0, tf.int32), tf.constant(0, tf.int32))
    ).repeat()
    return real.concatenate(padding).take(steps * shard_batch).batch(shard_batch)

  local = [shard_dataset(shard) for shard in _local_shards(shards, process_index, process_count)]
  dataset = tf.data.Dataset.zip(tuple(local)).map(
    lambda *parts: {
      'image': tf.concat([part[0] for part in parts], 0),
      'label': tf.concat([part[1] for part in parts], 0),
      'mask': tf.concat([part[2] for part in parts], 0),
    }
  )
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options()).as_numpy_iterator()


def describe(spec: DataSpec) -> dict[str, Any]:
  """`spec` as a dict (for logs)."""
  return dataclasses.asdict(spec)
