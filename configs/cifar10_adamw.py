"""DenseNet-BC (L=100, k=12) on CIFAR-10 the way PyTorch notebooks train it: AdamW, ReduceLROnPlateau.

AdamW (lr 1e-3, weight decay 0.01: torch.optim.AdamW's defaults) on batches of 64; the learning rate
x0.1 when the validation loss has not improved for 5 epochs (torch's ReduceLROnPlateau, threshold
1e-4 relative); the validation set is the last 10% of the train split (5,000 images), never trained
on; 100 epochs; the CIFAR augmentation (4-pixel pad + random crop + flip). metrics.jsonl and
curves.png carry the train, validation and test loss.

  python train.py --config configs/cifar10_adamw.py --workdir /ckpt/cifar10_adamw

Not measured here (a run takes days on a CPU). The paper's recipe is configs/cifar10.py.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  config = cifar10.get_config()
  config.optimizer = 'adamw'
  config.learning_rate = 1e-3
  config.lr_reference_batch = 64
  config.weight_decay = 0.01
  config.schedule = 'plateau'
  config.plateau_factor = 0.1
  config.plateau_patience = 5
  config.validation_fraction = 0.1
  config.num_epochs = 100
  config.shuffle_buffer = 45_000  # the whole training part
  return config
