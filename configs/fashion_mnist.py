"""DenseNet-121 on Fashion-MNIST as d2l.ai trains its DenseNet: 28x28 images resized to 96, one channel.

TFDS `fashion_mnist` (60,000 train / 10,000 test grey images of 10 clothing classes), resized to
96x96 (bilinear) for training and test alike, no augmentation; DenseNet-121 whose stem takes one
channel; plain SGD, lr 0.1, batch 256, 10 epochs (d2l's `train_ch6`, Sec. 8.7).

  python train.py --config configs/fashion_mnist.py --workdir /tmp/fashion_mnist

Not measured here (DenseNet-121 at 96x96 is hours on a CPU); d2l's smaller DenseNet reaches about
91% test accuracy with this recipe. TFDS downloads the dataset on the first run.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet121'
  config.dataset = 'fashion_mnist'
  config.eval_split = 'test'
  config.image_size = 96
  config.train_augment = 'resize'
  config.random_flip = False
  config.eval_preprocess = 'resize'
  config.mean = (72.94,)  # Fashion-MNIST's pixel mean and standard deviation (0-255 scale)
  config.std = (90.02,)
  config.shuffle_buffer = 60_000
  config.batch_size = 256
  config.eval_batch_size = 500
  config.num_epochs = 10
  config.learning_rate = 0.1
  config.lr_reference_batch = 256
  config.lr_decay_epochs = ()
  config.momentum = 0.0
  config.nesterov = False
  config.weight_decay = 0.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  return config
