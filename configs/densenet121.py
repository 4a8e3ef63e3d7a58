"""DenseNet-121 on ImageNet (imagenet2012): the recipe and data setup of configs/default.py.

  python train.py --config configs/densenet121.py --workdir /ckpt/densenet121

Expected: about 74.4% top-1 / 92.0% top-5 on the validation set (torchvision's
published weights for DenseNet-121; not measured here: these machines have no ImageNet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet121'
  return config
