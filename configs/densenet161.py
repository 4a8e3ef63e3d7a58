"""DenseNet-161 on ImageNet (imagenet2012): the recipe and data setup of configs/default.py.

  python train.py --config configs/densenet161.py --workdir /ckpt/densenet161

Expected: about 77.1% top-1 / 93.6% top-5 on the validation set (torchvision's
published weights for DenseNet-161; not measured here: these machines have no ImageNet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet161'
  return config
