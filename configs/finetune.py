"""Fine-tune ImageNet-pretrained DenseNet-121 on Imagenette (10 ImageNet classes), a new classifier.

  python train.py --config configs/finetune.py --workdir /tmp/finetune

The weights are torchvision's, fetched once by `densenet_jax.pretrained('densenet121')` from the
Hugging Face Hub into its cache (no torch); the classifier is new, for 10 classes. Other weights:
--config.init_from=densenet169 (or a .safetensors / .pth file, or a converted checkpoint); another
dataset: --config.dataset=NAME (any TFDS image classification dataset). A linear probe:
--config.freeze_backbone=True (the backbone in inference mode, its BatchNorm statistics fixed); a
slower backbone: --config.backbone_lr_multiplier=0.1 (docs/recipes.md).

Expected: well above 95% top-1 on Imagenette's validation split after 5 epochs (its classes are
ImageNet's; not measured here: these machines cannot download it).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet121'
  config.init_from = 'densenet121'
  config.dataset = 'imagenette/320px-v2'
  config.eval_split = 'validation'
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 5
  config.learning_rate = 0.01  # a tenth of training from scratch: the features are already good
  config.lr_reference_batch = 64
  config.schedule = 'cosine'
  config.warmup_epochs = 0.5
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
