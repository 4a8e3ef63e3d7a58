"""DenseNet-121 on ImageNet (imagenet2012) with the paper's recipe.

Batch 256, SGD Nesterov momentum 0.9, lr 0.1 x batch/256, weight decay 1e-4, 90 epochs,
lr /10 at epochs 30 and 60, random-resized crop + flip, 224x224 center-crop eval.

  python train.py --config configs/densenet121.py --workdir /ckpt/densenet121

Expected: about 74.4% top-1 / 92.0% top-5 on the validation set (torchvision's
published weights for DenseNet-121; not measured here: these machines have no ImageNet).
imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
~/tensorflow_datasets/downloads/manual/ (or set --config.manual_dir). Warmup + cosine instead:
--config.schedule=cosine --config.warmup_epochs=5.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet121'
  return config
