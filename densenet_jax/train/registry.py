"""The models and config checks `train.py` knows: config -> model, learning-rate schedule, optimizer."""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from densenet_jax import models
from densenet_jax.train import plateau

MODELS: dict[str, Callable[..., models.DenseNet]] = {
  'densenet121': models.DenseNet121,
  'densenet161': models.DenseNet161,
  'densenet169': models.DenseNet169,
  'densenet201': models.DenseNet201,
  'densenet264': models.DenseNet264,
  'densenet264d': models.DenseNet264d,
  'densenetblur121d': models.DenseNetBlur121d,
  'densenet_cifar': models.densenet_cifar,
  'densenet': models.DenseNet,
}


# Accepted values of the config's enumerated fields.
CHOICES = {
  'mode': ('train', 'eval'),
  'train_augment': ('inception_crop', 'pad_crop', 'resize', 'none'),
  'eval_preprocess': ('center_crop', 'resize', 'none'),
  'eval_interpolation': ('bilinear', 'bicubic'),
  'schedule': ('step', 'cosine', 'plateau'),
  'optimizer': ('sgd', 'adamw', 'adam'),
  'plateau_mode': ('min', 'max'),
  'plateau_threshold_mode': ('rel', 'abs'),
}


class ConfigError(ValueError):
  """The config cannot run as given; the message names the field and the fix."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked before touching devices or data."""
  for field, choices in CHOICES.items():
    if config[field] not in choices:
      raise ConfigError(f'config.{field}={config[field]!r} is not one of {", ".join(map(repr, choices))}.')
  if config.model not in MODELS:
    raise ConfigError(f'unknown model {config.model!r}: config.model must be one of {", ".join(MODELS)}.')
  for field in (
    'batch_size',
    'eval_batch_size',
    'log_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
  ):
    if not isinstance(config[field], int) or config[field] <= 0:
      raise ConfigError(f'config.{field} must be a positive integer, got {config[field]!r}.')
  for field in ('dtype', 'param_dtype'):
    if config[field] not in ('float32', 'bfloat16', 'float64'):
      raise ConfigError(f"config.{field}={config[field]!r} is not one of 'float32', 'bfloat16', 'float64'.")
    if config[field] == 'float64' and not jax.config.jax_enable_x64:
      raise ConfigError(f'config.{field}=float64 needs 64-bit JAX: run with JAX_ENABLE_X64=1.')
  metrics = [f'{split}_{name}' for split in ('test', 'val') for name in ('top1', 'top5', 'loss')]
  if config.schedule == 'plateau':
    _validate_plateau(config, metrics)
  if not 0 <= config.validation_fraction < 1:
    raise ConfigError(f'config.validation_fraction={config.validation_fraction} must be in [0, 1).')
  if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 1:
    raise ConfigError(f'config.grad_accum_steps must be a positive integer, got {config.grad_accum_steps!r}.')
  if config.freeze_backbone and config.backbone_lr_multiplier != 1.0:
    raise ConfigError(
      'config.freeze_backbone and config.backbone_lr_multiplier both set: a frozen backbone has no learning '
      'rate; set one of them.'
    )
  randaugment = tuple(config.randaugment)
  if randaugment and not (
    len(randaugment) == 2
    and isinstance(randaugment[0], int)
    and randaugment[0] > 0
    and 0 <= randaugment[1] <= 10
  ):
    raise ConfigError(
      f'config.randaugment={randaugment!r} must be (layers, magnitude) with layers >= 1 and magnitude in '
      "[0, 10], e.g. '(2, 9)' (timm's rand-m9-n2), or () for none."
    )
  if config.best_checkpoint_metric:
    _check_eval_metric(config, 'best_checkpoint_metric', metrics, "or '' to keep only the newest checkpoints")
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f'config.ema_decay={config.ema_decay} must be in [0, 1) (0 disables the EMA).')
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ConfigError(
        f'config.{field}={config[field]} is not divisible by the {devices} devices the batch is '
        f'sharded over; use a multiple of {devices} (e.g. --config.{field}='
        f'{max(devices, config[field] // devices * devices)}).'
      )


def _check_eval_metric(config: ml_collections.ConfigDict, field: str, metrics: list[str], hint: str) -> None:
  """`config[field]` names a metric the run evaluates; a val_* one needs the validation split."""
  if config[field] not in metrics:
    raise ConfigError(
      f'config.{field}={config[field]!r} is not an eval metric: use one of '
      f'{", ".join(map(repr, metrics))} ({hint}).'
    )
  if config[field].startswith('val_') and not config.validation_fraction:
    raise ConfigError(
      f'config.{field}={config[field]!r} needs a validation split: set config.validation_fraction (e.g. 0.1).'
    )


def _validate_plateau(config: ml_collections.ConfigDict, metrics: list[str]) -> None:
  """The checks of PyTorch's ReduceLROnPlateau constructor, and a metric that the run evaluates."""
  _check_eval_metric(config, 'plateau_metric', metrics, "the metric schedule='plateau' steps on")
  if not 0 < config.plateau_factor < 1:
    raise ConfigError(f'config.plateau_factor={config.plateau_factor} must be in (0, 1), e.g. 0.1.')
  for field in ('plateau_patience', 'plateau_cooldown'):
    if not isinstance(config[field], int) or config[field] < 0:
      raise ConfigError(f'config.{field} must be a non-negative integer, got {config[field]!r}.')
  for field in ('plateau_threshold', 'plateau_min_lr', 'plateau_eps'):
    if config[field] < 0:
      raise ConfigError(f'config.{field}={config[field]} must be >= 0.')


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.DenseNet:
  """The `DenseNet` named by `config.model` with `config.model_kwargs`."""
  kwargs = dict(config.model_kwargs)
  kwargs['dtype'] = jnp.bfloat16 if config.half_precision else jnp.dtype(config.dtype)
  kwargs['param_dtype'] = jnp.dtype(config.param_dtype)
  try:
    return MODELS[config.model](num_classes=num_classes, **kwargs)
  except TypeError as error:  # An unknown keyword.
    raise ConfigError(f'config.model_kwargs do not fit {config.model!r}: {error}.') from error
  except ValueError as error:  # The model's own check of a value (e.g. a CIFAR depth off its rule).
    raise ConfigError(f'config.model_kwargs: {error}') from error


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`config.learning_rate` scaled by the batch of one update (batch_size x grad_accum_steps)."""
  return config.learning_rate * config.batch_size * config.grad_accum_steps / config.lr_reference_batch


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int
) -> optax.Schedule:
  """The learning rate per optimizer update: base lr, warmup, then step, cosine or constant decay.

  With schedule='plateau' the schedule is constant after the warmup; the plateau scale multiplies it.
  Under gradient accumulation, `steps_per_epoch` and `total_steps` count updates, not micro-batches.
  """
  base = base_learning_rate(config)
  warmup_steps = round(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup_steps, max(total_steps, warmup_steps + 1))
  if config.schedule == 'plateau':
    decay = optax.constant_schedule(base)
  else:
    decay = optax.piecewise_constant_schedule(
      base, {round(epoch * steps_per_epoch): config.lr_decay_factor for epoch in config.lr_decay_epochs}
    )
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  return optax.join_schedules([warmup, lambda step: decay(step + warmup_steps)], [warmup_steps])


def plateau_scheduler(config: ml_collections.ConfigDict) -> plateau.ReduceLROnPlateau:
  """PyTorch's ReduceLROnPlateau with the config's settings, on the base learning rate."""
  return plateau.ReduceLROnPlateau(
    learning_rate=base_learning_rate(config),
    mode=config.plateau_mode,
    factor=config.plateau_factor,
    patience=config.plateau_patience,
    threshold=config.plateau_threshold,
    threshold_mode=config.plateau_threshold_mode,
    cooldown=config.plateau_cooldown,
    min_lr=config.plateau_min_lr,
    eps=config.plateau_eps,
  )


def learning_rate_scale(opt_state: Any) -> jax.Array:
  """The plateau scale in `opt_state` (1 without schedule='plateau')."""
  state = plateau.find_state(opt_state)
  return jnp.ones((), jnp.float32) if state is None else state.scale


def is_head(path: tuple) -> bool:
  """Whether a parameter path is the classifier's (the head fine-tuning re-initializes)."""
  return any(getattr(entry, 'key', None) == 'classifier' for entry in path)


def _base_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD and Adam as PyTorch's (weight decay added to the gradient), AdamW decoupled as PyTorch's."""
  mask = None
  if not config.weight_decay_norm_and_bias:
    mask = partial(jax.tree_util.tree_map_with_path, lambda path, _: path[-1].key == 'kernel')
  b1, b2 = config.adam_betas
  if config.optimizer == 'adamw':
    return optax.adamw(
      schedule, b1=b1, b2=b2, eps=config.adam_eps, weight_decay=config.weight_decay, mask=mask
    )
  if config.optimizer == 'adam':
    optimizer = optax.adam(schedule, b1=b1, b2=b2, eps=config.adam_eps)
  else:
    optimizer = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask), optimizer)


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The optimizer of `config`: clipping, the optimizer (per parameter group), plateau, accumulation.

  In order: the gradient's global norm clipped to `grad_clip_norm` (as torch's clip_grad_norm_
  before `optimizer.step()`); `config.optimizer` on the schedule, the backbone frozen
  (`freeze_backbone`) or at `backbone_lr_multiplier` times it (`optax.multi_transform`; the head is
  the classifier); the plateau scale; all of it applied every `grad_accum_steps` micro-batches to
  their mean gradient (`optax.MultiSteps`).
  """
  optimizer = _base_optimizer(config, schedule)
  if config.freeze_backbone or config.backbone_lr_multiplier != 1.0:
    multiplier = config.backbone_lr_multiplier
    backbone = (
      optax.set_to_zero()
      if config.freeze_backbone
      else _base_optimizer(config, lambda step: multiplier * schedule(step))
    )
    optimizer = optax.multi_transform(
      {'head': optimizer, 'backbone': backbone},
      partial(jax.tree_util.tree_map_with_path, lambda path, _: 'head' if is_head(path) else 'backbone'),
    )
  parts = [optimizer]
  if config.grad_clip_norm:
    parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  if config.schedule == 'plateau':
    parts.append(plateau_scheduler(config).scale_updates())
  optimizer = optax.chain(*parts) if len(parts) > 1 else optimizer
  if config.grad_accum_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accum_steps)
  return optimizer
