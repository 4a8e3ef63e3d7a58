"""Quickstart: a small DenseNet-BC on the UCI handwritten digits that ship with scikit-learn.

Real data, no download: 1,438 train and 359 held-out test images of 8x8 pixels
(`densenet_jax.train.datasets.sklearn_digits`, prepared by TFDS in about a second) through the
same input pipeline as CIFAR and ImageNet. DenseNet-BC L=40 k=12 with a 3x3 stem,
1-pixel pad-and-crop augmentation (no flip: digits are not mirror-symmetric).

  python train.py --config configs/digits.py --workdir /tmp/digits

Expected: >= 98% test top-1 in about a minute on a 2-core CPU (figures: docs/validation.md).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet_cifar'
  config.model_kwargs = ml_collections.ConfigDict(
    {'depth': 40, 'growth_rate': 12, 'bc': True, 'memory_efficient': False, 'drop_rate': 0.0}
  )
  config.dataset = 'sklearn_digits'
  config.eval_split = 'test'
  config.image_size = 8
  config.train_augment = 'pad_crop'
  config.crop_padding = 1
  config.random_flip = False
  config.eval_preprocess = 'none'
  config.mean = (77.85,)  # the images' pixel mean and standard deviation (0-255 scale)
  config.std = (95.85,)
  config.shuffle_buffer = 2048  # the whole train split
  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_epochs = 30
  config.learning_rate = 0.1
  config.lr_reference_batch = 64
  config.lr_decay_epochs = (15, 22)
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
