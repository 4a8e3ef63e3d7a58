"""DenseNet-201 on ImageNet (imagenet2012): the recipe and data setup of configs/default.py.

  python train.py --config configs/densenet201.py --workdir /ckpt/densenet201

Expected: about 76.9% top-1 / 93.4% top-5 on the validation set (torchvision's
published weights for DenseNet-201; not measured here: these machines have no ImageNet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet201'
  return config
