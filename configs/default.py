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
  # > 0: this last fraction of the train split is held out (never trained on) and evaluated with the
  # eval split, as val_loss / val_top1 (big_vision's minival is train[99%:]); schedule='plateau' reads it.
  config.validation_fraction = 0.0
  config.image_size = 224
  # 'inception_crop', 'pad_crop', 'resize' (the whole image to image_size) or 'none'.
  config.train_augment = 'inception_crop'

  config.crop_padding = 4  # pad_crop: zero padding before the random crop.
  config.random_flip = True
  config.eval_preprocess = 'center_crop'  # 'center_crop' (resize, then crop), 'resize' or 'none'.
  config.eval_crop_fraction = 0.875  # center_crop: 224 of 256, torchvision's.
  config.eval_interpolation = 'bilinear'  # of the antialiased eval resize: 'bilinear' or 'bicubic'.
  # mode=eval with init_from a pretrained name: image_size, eval_crop_fraction, eval_interpolation,
  # mean and std as its publisher evaluated it (densenet_jax.PRETRAINED), not as set here.
  config.eval_as_published = True
  # (layers, magnitude): RandAugment after crop and flip, timm's rand-mM-nN ops (e.g. (2, 9)); () none.
  config.randaugment = ()
  config.mean = IMAGENET_MEAN  # one value per image channel
  config.std = IMAGENET_STD
  config.shuffle_buffer = 16 * 1024  # per data shard
  # The data order depends on this, not on the device or process count: 0 means one shard
  # per process. Fix it (e.g. 2) to compare runs across process counts.
  config.num_data_shards = 0

  # Optimization: SGD with Nesterov momentum; lr = learning_rate * batch_size * grad_accum_steps /
  # lr_reference_batch.
  config.batch_size = 256  # global, over all devices of all hosts
  config.eval_batch_size = 256
  # > 0: batch_size and eval_batch_size are this times the device count (e.g. configs/tpu.py).
  config.per_device_batch_size = 0
  config.num_epochs = 90
  config.total_steps = 0  # > 0 overrides num_epochs.
  config.learning_rate = 0.1
  config.lr_reference_batch = 256
  # 'step' (x lr_decay_factor at lr_decay_epochs), 'cosine', or 'plateau': PyTorch's ReduceLROnPlateau
  # stepped on plateau_metric at every evaluation, with its arguments and defaults (plateau_min_lr and
  # plateau_eps in learning-rate units, on the learning rate after the warmup).
  config.schedule = 'step'
  config.lr_decay_epochs = (30, 60)
  config.lr_decay_factor = 0.1
  config.plateau_metric = 'val_loss'  # an eval metric; val_* need validation_fraction
  config.plateau_mode = 'min'  # 'min' for a loss, 'max' for an accuracy
  config.plateau_factor = 0.1
  config.plateau_patience = 10  # evaluations (every eval_every_epochs) tolerated without improvement
  config.plateau_threshold = 1e-4
  config.plateau_threshold_mode = 'rel'  # 'rel' or 'abs'
  config.plateau_cooldown = 0
  config.plateau_min_lr = 0.0
  config.plateau_eps = 1e-8
  config.warmup_epochs = 0.0  # linear warmup from 0, every schedule.
  # 'sgd' (momentum, nesterov), 'adam' or 'adamw' (adam_betas, adam_eps), with PyTorch's meaning of
  # weight_decay: added to the gradient for sgd and adam, decoupled (lr x weight_decay x param) for adamw.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.adam_betas = (0.9, 0.999)
  config.adam_eps = 1e-8
  config.weight_decay = 1e-4
  config.weight_decay_norm_and_bias = True  # False: decay conv/dense kernels only.
  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0  # > 0: clip the gradient's global norm (torch's clip_grad_norm_).
  # > 1: one update per this many steps, on their mean gradient (optax.MultiSteps): an update sees
  # batch_size x grad_accum_steps images; BatchNorm normalizes each step's batch_size images and
  # updates its running statistics every step, as with accumulation in PyTorch.
  config.grad_accum_steps = 1
  # Fine-tuning (init_from): the classifier trains; the backbone (everything else) is frozen (run in
  # inference mode: its BatchNorm statistics do not move either) or trains at this times the lr.
  config.freeze_backbone = False
  config.backbone_lr_multiplier = 1.0
  # > 0: keep an exponential moving average of the weights and BatchNorm statistics (timm's
  # ModelEmaV2, e.g. 0.9998), updated after every optimizer update. Evaluation uses it, and
  # `python -m densenet_jax.convert to-torch --ema` exports it.
  config.ema_decay = 0.0
  # > 0: timm's Mixup / CutMix on the device (batch mode: each image with the batch's reverse, labels
  # mixed alike; both > 0: one or the other per batch, evenly). timm's ImageNet recipes: 0.2 / 1.0.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000  # and at the last step
  config.keep_checkpoints = 3
  # '' or an eval metric ('test_top1', 'val_top1', 'val_loss', ...): every evaluation is saved with
  # its metrics, and the best one is kept beside the newest keep_checkpoints (orbax's BestN); its
  # step is final_metrics.json's best_step.
  config.best_checkpoint_metric = ''
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
