"""DenseNet-169 on ImageNet (imagenet2012): the recipe and data setup of configs/default.py.

  python train.py --config configs/densenet169.py --workdir /ckpt/densenet169

Expected: about 75.6% top-1 / 92.8% top-5 on the validation set (torchvision's
published weights for DenseNet-169; not measured here: these machines have no ImageNet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet169'
  return config
