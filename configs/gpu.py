"""DenseNet-121 on ImageNet on one or more GPU hosts: configs/tpu.py's recipe, 64 images per GPU.

  pip install -U 'jax[cuda12]' -e '.[train]'
  python train.py --config configs/gpu.py --workdir gs://BUCKET/densenet121 \
    --config.data_dir=gs://BUCKET/tensorflow_datasets

Several hosts: the same command on each, under SLURM or with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (README "Train"). bfloat16 needs Ampere or newer.
Expected: about 74-75% top-1 after 90 epochs (not measured here: no GPU, no ImageNet).
"""

import ml_collections

from configs import tpu


def get_config() -> ml_collections.ConfigDict:
  config = tpu.get_config()
  config.per_device_batch_size = 64  # 16 GB and up; raise it where memory allows
  return config
