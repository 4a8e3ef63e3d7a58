"""DenseNet-BC (L=100, k=12) on CIFAR-100 with the paper's CIFAR recipe (as configs/cifar10.py).

  python train.py --config configs/cifar100.py --workdir /ckpt/cifar100_densenet_bc_100

Expected: about 77.7% test top-1 (the paper's 22.27% error, Table 2, "C100+"; not measured here:
a run takes days on a CPU).
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  config = cifar10.get_config()
  config.dataset = 'cifar100'
  config.mean = (129.30, 124.07, 112.43)  # CIFAR-100 channel statistics (0-255 scale)
  config.std = (68.17, 65.39, 70.42)
  return config
