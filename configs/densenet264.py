"""DenseNet-264 on ImageNet (imagenet2012): the recipe and data setup of configs/default.py.

  python train.py --config configs/densenet264.py --workdir /ckpt/densenet264

Expected: about 77.9% top-1 / 93.9% top-5 on the validation set (the paper, Table 3; not
measured here: these machines have no ImageNet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet264'
  return config
