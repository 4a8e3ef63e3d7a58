"""The PyTorch notebook's CIFAR-10 recipe, exactly: AdamW and ReduceLROnPlateau on the validation loss.

DenseNet-BC (L=100, k=12) on batches of 64 with what the notebook writes in PyTorch:

  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-4)
  scheduler = ReduceLROnPlateau(optimizer, mode='min', factor=0.1, patience=5, min_lr=1e-6)
  for epoch in range(20): train(...); scheduler.step(val_loss)

The validation set is the last 10% of the train split (5,000 images), never trained on, evaluated
after every epoch; the CIFAR augmentation (4-pixel pad + random crop + flip). The learning rate
follows torch's ReduceLROnPlateau evaluation by evaluation (tests/test_plateau.py checks it against
torch). metrics.jsonl and curves.png carry the train, validation and test loss and the learning rate.

  python train.py --config configs/cifar10_adamw.py --workdir /ckpt/cifar10_adamw

Expected: about 90% test top-1 after the 20 epochs (an estimate: not measured here, a run takes
about a day on 2 CPU cores). The paper's recipe is configs/cifar10.py.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
  config = cifar10.get_config()
  config.optimizer = 'adamw'
  config.learning_rate = 5e-4
  config.lr_reference_batch = 64  # = batch_size: the learning rate is 5e-4 as given
  config.adam_betas = (0.9, 0.999)
  config.weight_decay = 1e-4
  config.schedule = 'plateau'
  config.plateau_metric = 'val_loss'
  config.plateau_mode = 'min'
  config.plateau_factor = 0.1
  config.plateau_patience = 5
  config.plateau_min_lr = 1e-6
  config.validation_fraction = 0.1
  config.eval_every_epochs = 1
  config.num_epochs = 20
  config.shuffle_buffer = 45_000  # the whole training part
  return config
