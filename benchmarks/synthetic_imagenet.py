"""`synthetic_imagenet`: JPEGs of ImageNet's sizes and look, made offline, as a TFDS dataset.

For input pipeline benchmarks and image-quality tests where ImageNet itself is not at hand.
Each image is a smooth colour field with shapes and fine texture (edges and detail for a
resize to alias on), JPEG-encoded at quality 90 like ImageNet's photos; sizes follow
ImageNet's spread (most 500 px on the long side, 4:3 or 3:2; some square, portrait, smaller
or larger: 300-600 px a side). Built once per data_dir, deterministically (seed 0).

  builder = synthetic_imagenet.builder(data_dir, train=3000, validation=2000)
"""

import io

import numpy as np
import tensorflow_datasets as tfds

# Shapes of ImageNet photos: (long side, aspect), the long side landscape or portrait.
_ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
  """(height, width) of one image: ImageNet's spread, 300-600 px a side."""
  long_side = 500 if rng.random() < 0.7 else int(rng.integers(360, 601))
  short_side = max(300, round(long_side / rng.choice(_ASPECTS, p=(0.55, 0.2, 0.1, 0.1, 0.05))))
  return (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A uint8 RGB image with what photos have: smooth regions, sharp edges, fine texture."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.zeros((height, width, 3), np.float32)
  for _ in range(4):  # Smooth colour waves.
    fy, fx = rng.uniform(0.002, 0.02, 2)
    phase = rng.uniform(0, 2 * np.pi)
    image += rng.uniform(20, 60, 3) * np.sin(2 * np.pi * (fy * y + fx * x) + phase)[..., None]
  for _ in range(int(rng.integers(6, 14))):  # Shapes with hard edges: discs and rectangles.
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    size = rng.uniform(0.05, 0.3) * min(height, width)
    if rng.random() < 0.5:
      inside = (y - cy) ** 2 + (x - cx) ** 2 < size**2
    else:
      inside = (abs(y - cy) < size) & (abs(x - cx) < rng.uniform(0.3, 1.5) * size)
    image[inside] = rng.uniform(-100, 100, 3)
  # Fine texture (grass, fur, fabric): high frequencies a resize without antialiasing aliases.
  texture = rng.normal(0, 1, (height, width, 1)).astype(np.float32)
  texture += np.roll(texture, 1, 0) + np.roll(texture, 1, 1)
  image += 12 * texture + rng.normal(0, 4, (height, width, 3))
  return np.clip(image + 128, 0, 255).astype(np.uint8)


class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):
  """Synthetic ImageNet-like JPEGs (1000 classes, random labels)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []
  num_train = 3000
  num_validation = 2000

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo itself: dataset_info_from_configs reads metadata beside a package's module.
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=1000),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Made here.
    return {
      'train': self._generate_examples('train', self.num_train, seed=0),
      'validation': self._generate_examples('validation', self.num_validation, seed=1),
    }

  def _generate_examples(self, split: str, count: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
      encoded = io.BytesIO()
      Image.fromarray(natural_image(rng, *image_size(rng))).save(encoded, format='JPEG', quality=90)
      yield f'{split}_{index}', {'image': encoded.getvalue(), 'label': int(rng.integers(1000))}


def builder(data_dir: str, train: int = 3000, validation: int = 2000) -> tfds.core.DatasetBuilder:
  """The dataset in `data_dir`, prepared there first if it is not (a minute or two per thousand)."""
  SyntheticImagenet.num_train, SyntheticImagenet.num_validation = train, validation
  dataset = tfds.builder('synthetic_imagenet', data_dir=data_dir)
  if not dataset.is_prepared():
    dataset.download_and_prepare()
  return dataset
