"""DenseNet-121 on ImageNet on a Cloud TPU VM or pod slice: bfloat16, a per-chip batch, data on gs://.

Prepare imagenet2012 once into a bucket (on one host: `tfds build imagenet2012
--data_dir=gs://BUCKET/tensorflow_datasets --manual_dir=DIR_WITH_THE_TARS`), then on every host
(`gcloud compute tpus tpu-vm ssh TPU --worker=all --command=...`, README "Cloud TPU"):

  python train.py --config configs/tpu.py --workdir gs://BUCKET/densenet121 \
    --config.data_dir=gs://BUCKET/tensorflow_datasets

The hosts find each other (jax.distributed, detected). The global batch is 128 per chip (1,024 on
a v4-16 or v5e-8), the learning rate 0.1 x batch/256 after 5 warmup epochs, then cosine: the
large-batch form of the paper's recipe, as Flax's examples/imagenet runs it on TPU. Batches leave
the host as uint8 pixels (normalised on the chips) and are copied to the chips two steps ahead.
Check that the per-chip batch fills the chip with `python benchmarks/accelerator.py` (memory
with and without memory_efficient).

Expected: about 74-75% top-1 after 90 epochs (torchvision's recipe reaches 74.4% in float32;
not measured here: these machines have neither a TPU nor ImageNet).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'densenet121'
  config.half_precision = True  # bfloat16 activations, float32 parameters and optimizer state
  config.per_device_batch_size = 128
  config.schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.num_epochs = 90
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.progress_bar = False  # Logs from a remote shell, not a terminal.
  return config
