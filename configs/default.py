"""Every hyper-parameter of `train.py`, with the paper's ImageNet recipe as the defaults.

DenseNet-121 on imagenet2012: batch 256, SGD with Nesterov momentum 0.9, learning rate
0.1 x batch/256, weight decay 1e-4, 90 epochs, learning rate /10 at epochs 30 and 60
(Huang et al., 2017, Sec. 4.2); random-resized crop + flip, 224x224 center-crop eval.
imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
~/tensorflow_datasets/downloads/manual/ (or set --config.manual_dir). Warmup + cosine instead:
--config.schedule=cosine --config.warmup_epochs=5. Variant files (`configs/densenet121.py`, `cifar10.py`,
`digits.py`, ...) start from this and override what differs. Any field can be overridden on
the command line:

  python train.py --config configs/default.py --workdir /tmp/run --config.batch_size=64
"""

import ml_collections

# ImageNet channel statistics on the 0-255 scale (torchvision's, x 255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def get_config() -> ml_collections.ConfigDict:
  """The default configuration: DenseNet-121 on ImageNet with the paper's recipe."""
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # 'train', or 'eval': evaluate the latest checkpoint (or init_from).

  # Model: 'densenet121' ... 'densenet264', 'densenet_cifar' (model_kwargs: depth, growth_rate,
  # bc) or 'densenet' (model_kwargs: any DenseNet attribute). num_classes comes from the data.
  config.model = 'densenet121'
  config.model_kwargs = ml_collections.ConfigDict({'memory_efficient': False, 'drop_rate': 0.0})
  config.half_precision = False  # bfloat16 activations (parameters stay float32).
  # Without half_precision: 'float32', or 'float64' (needs JAX_ENABLE_X64=1; for exactness checks).
  config.dtype = 'float32'
  config.param_dtype = 'float32'
  # Weights to start from when the workdir has no checkpoint: a pretrained name ('densenet121' ...
  # 'densenet201': ImageNet weights via densenet_jax.pretrained; 'hf-hub:OWNER/REPO'), a
  # torchvision .safetensors or .pth file, or an orbax checkpoint directory (`python -m
  # densenet_jax.convert to-jax`). A classifier of another class count is re-initialized.
  config.init_from = ''

  # Data (TFDS).
  config.dataset = 'imagenet2012'
  config.data_dir = ''  # TFDS data_dir; '' is TFDS's default (~/tensorflow_datasets).
  config.manual_dir = ''  # imagenet2012's tar files; '' is DATA_DIR/downloads/manual.
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.train_augment = 'inception_crop'  # 'inception_crop', 'pad_crop' or 'none'.
  config.crop_padding = 4  # pad_crop: zero padding before the random crop.
  config.random_flip = True
  config.eval_preprocess = 'center_crop'  # 'center_crop' (resize, then crop) or 'none'.
  config.eval_crop_fraction = 0.875  # center_crop: 224 of 256, torchvision's.
  config.mean = IMAGENET_MEAN
  config.std = IMAGENET_STD
  config.shuffle_buffer = 16 * 1024  # per data shard
  # The data order depends on this, not on the device or process count: 0 means one shard
  # per process. Fix it (e.g. 2) to compare runs across process counts.
  config.num_data_shards = 0

  # Optimization: SGD with Nesterov momentum; lr = learning_rate * batch_size / lr_reference_batch.
  config.batch_size = 256  # global, over all devices of all hosts
  config.eval_batch_size = 256
  # > 0: batch_size and eval_batch_size are this times the device count (e.g. configs/tpu.py).
  config.per_device_batch_size = 0
  config.num_epochs = 90
  config.total_steps = 0  # > 0 overrides num_epochs.
  config.learning_rate = 0.1
  config.lr_reference_batch = 256
  config.schedule = 'step'  # 'step' (x lr_decay_factor at lr_decay_epochs) or 'cosine'.
  config.lr_decay_epochs = (30, 60)
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 0.0  # linear warmup from 0, both schedules.
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4  # added to the gradient before momentum, as PyTorch's SGD.
  config.weight_decay_norm_and_bias = True  # False: decay conv/dense kernels only.
  config.label_smoothing = 0.0

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000  # and at the last step
  config.keep_checkpoints = 3
  config.progress_bar = True
  # Multi-process: 'auto' initializes jax.distributed where JAX detects a cluster (Cloud TPU pod
  # slice, SLURM, ...) or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set,
  # and runs as one process otherwise; '' never; 'host:port' names the coordinator (with
  # num_processes and process_id, or those environment variables).
  config.distributed = 'auto'
  config.num_processes = 0
  config.process_id = -1
  # Global batches copied to the devices ahead of the step that runs (overlaps the copy).
  config.prefetch_to_device = 2
  # Persistent XLA compilation cache ('' to disable): a restart does not recompile.
  config.compilation_cache_dir = '~/.cache/densenet_jax/xla'
  # Also keep the traced train step there (jax.export): a CPU restart saves ~1 s of tracing
  # (docs/performance.md). Opt-in: unmeasured on accelerators, one process only.
  config.keep_traced_step = False
  return config
