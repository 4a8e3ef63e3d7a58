"""DenseNet-BC (L=100, k=12) on CIFAR-100 with the paper's CIFAR recipe.

Batch 64, SGD Nesterov momentum 0.9, lr 0.1, weight decay 1e-4, 300 epochs, lr /10 at epochs 150
and 225 (50% and 75%), 4-pixel zero padding + random 32x32 crop + horizontal flip, no dropout
(Huang et al., 2017, Sec. 4.2, "CIFAR-100+").

  python train.py --config configs/cifar100.py --workdir /ckpt/cifar100_densenet_bc_100

Expected: about 77.7% test top-1 (the paper's 22.27% error, Table 2; not measured here: a run
takes days on a CPU). Other CIFAR nets: --config.model_kwargs.depth=190
--config.model_kwargs.growth_rate=40, or --config.model_kwargs.bc=False for the plain DenseNet.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet_cifar'
  config.model_kwargs = ml_collections.ConfigDict(
    {'depth': 100, 'growth_rate': 12, 'bc': True, 'memory_efficient': False, 'drop_rate': 0.0}
  )
  config.dataset = 'cifar100'
  config.eval_split = 'test'
  config.image_size = 32
  config.train_augment = 'pad_crop'
  config.crop_padding = 4
  config.random_flip = True
  config.eval_preprocess = 'none'
  config.mean = (129.3, 124.07, 112.43)
  config.std = (68.17, 65.39, 70.42)
  config.shuffle_buffer = 50_000  # the whole train split
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 300
  config.learning_rate = 0.1
  config.lr_reference_batch = 64
  config.lr_decay_epochs = (150, 225)
  config.log_every_steps = 200
  config.checkpoint_every_steps = 5000
  return config
