"""The models and config checks `train.py` knows: config -> model, learning-rate schedule, optimizer."""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import optax

from densenet_jax import models

MODELS: dict[str, Callable[..., models.DenseNet]] = {
  'densenet121': models.DenseNet121,
  'densenet161': models.DenseNet161,
  'densenet169': models.DenseNet169,
  'densenet201': models.DenseNet201,
  'densenet264': models.DenseNet264,
  'densenet_cifar': models.densenet_cifar,
  'densenet': models.DenseNet,
}


# Accepted values of the config's enumerated fields.
CHOICES = {
  'mode': ('train', 'eval'),
  'train_augment': ('inception_crop', 'pad_crop', 'none'),
  'eval_preprocess': ('center_crop', 'none'),
  'schedule': ('step', 'cosine'),
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
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ConfigError(
        f'config.{field}={config[field]} is not divisible by the {devices} devices the batch is '
        f'sharded over; use a multiple of {devices} (e.g. --config.{field}='
        f'{max(devices, config[field] // devices * devices)}).'
      )


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> models.DenseNet:
  """The `DenseNet` named by `config.model` with `config.model_kwargs`."""
  kwargs = dict(config.model_kwargs)
  kwargs['dtype'] = jnp.bfloat16 if config.half_precision else jnp.dtype(config.dtype)
  kwargs['param_dtype'] = jnp.dtype(config.param_dtype)
  try:
    return MODELS[config.model](num_classes=num_classes, **kwargs)
  except TypeError as error:  # An unknown keyword.
    raise ConfigError(f'config.model_kwargs do not fit {config.model!r}: {error}.') from error


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """The learning rate per step: base lr scaled by batch size, warmup, then step or cosine decay."""
  base = config.learning_rate * config.batch_size / config.lr_reference_batch
  warmup_steps = round(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup_steps, max(total_steps, warmup_steps + 1))
  decay = optax.piecewise_constant_schedule(
    base, {round(epoch * steps_per_epoch): config.lr_decay_factor for epoch in config.lr_decay_epochs}
  )
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  return optax.join_schedules([warmup, lambda step: decay(step + warmup_steps)], [warmup_steps])


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """PyTorch's SGD: weight decay added to the gradient, then (Nesterov) momentum."""
  mask = None
  if not config.weight_decay_norm_and_bias:
    mask = partial(jax.tree_util.tree_map_with_path, lambda path, _: path[-1].key == 'kernel')
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask),
    optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
  )
