"""`sklearn_digits`: the UCI handwritten digits that ship inside scikit-learn, as a TFDS dataset.

1,797 real 8x8 grayscale images of the digits 0-9 (`sklearn.datasets.load_digits`), split
once, with a fixed seed, into 1,438 train and 359 test images (20% of each digit held out).
The data is read from scikit-learn's own files, so preparing it needs no network and takes
under a second; it goes through the same TFDS input pipeline as cifar10 or imagenet2012.
"""

import numpy as np
import tensorflow_datasets as tfds

# The hold-out split is part of the dataset's definition: changing it is a new version.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def _train_test_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A stratified split: the same fraction of every digit is held out."""
  rng = np.random.default_rng(_SPLIT_SEED)
  test = []
  for digit in range(10):
    members = np.flatnonzero(labels == digit)
    test.extend(rng.choice(members, size=round(len(members) * _TEST_FRACTION), replace=False))
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's copy of the UCI ML hand-written digits (8x8, 10 classes)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 80/20 train/test split with seed 0.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(8, 8, 1)),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0-16 (of a 4x4 block of the original 32x32 bitmap); scale to 0-255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train, test = _train_test_indices(labels)
    return {
      'train': self._generate_examples(images, labels, train),
      'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for index in indices:
      yield int(index), {'image': images[index], 'label': labels[index]}
