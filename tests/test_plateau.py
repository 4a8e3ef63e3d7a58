"""schedule='plateau' gives torch.optim.lr_scheduler.ReduceLROnPlateau's learning rates, evaluation by
evaluation, on scripted metric sequences."""

import numpy as np
import pytest
from conftest import optional_module

from configs import default
from densenet_jax.train import plateau, registry

BASE_LR = 5e-4


def scripted_losses(seed: int = 0) -> list[float]:
  """50 evaluations, float32 values: a fall, a plateau, a dip, a plateau, a creep down, noise throughout.

  The noise (1e-4 relative) is on the order of the default threshold: some stalled evaluations
  count as improvements and some do not.
  """
  rng = np.random.default_rng(seed)
  curve = np.concatenate(
    [
      np.linspace(2.0, 1.0, 8),
      np.full(14, 1.0),
      np.linspace(0.98, 0.7, 5),
      np.full(8, 0.7),
      0.7 - 2e-5 * np.arange(1, 16),  # improvements below the default relative threshold
    ]
  )
  return [float(np.float32(x)) for x in curve * (1 + 1e-4 * rng.standard_normal(curve.shape))]


def scripted_accuracies() -> list[float]:
  """A rising accuracy for mode='max', in the same float32 values the trainer would pass."""
  return [float(np.float32(2.0 - x)) for x in scripted_losses(1)]


def torch_learning_rates(metrics: list[float], **kwargs) -> list[float]:
  """The learning rate after each `scheduler.step(metric)` of torch's ReduceLROnPlateau."""
  torch = optional_module('torch')
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
  rates = []
  for metric in metrics:
    scheduler.step(metric)
    rates.append(optimizer.param_groups[0]['lr'])
  return rates


def our_learning_rates(metrics: list[float], **kwargs) -> list[float]:
  scheduler = plateau.ReduceLROnPlateau(learning_rate=BASE_LR, **kwargs)
  state = scheduler.init()
  rates = []
  for metric in metrics:
    state = scheduler.step(state, metric)
    rates.append(BASE_LR * float(state.scale))
  return rates


SETTINGS = {
  "torch's defaults": {},
  'the notebook (patience 5, min_lr 1e-6)': {'factor': 0.1, 'patience': 5, 'min_lr': 1e-6},
  'patience 0': {'patience': 0, 'factor': 0.5},
  'patience 2, cooldown 2': {'patience': 2, 'cooldown': 2, 'factor': 0.5},
  'absolute threshold': {'patience': 3, 'threshold': 0.01, 'threshold_mode': 'abs'},
  'large relative threshold, cooldown 1': {'patience': 1, 'threshold': 0.05, 'cooldown': 1, 'factor': 0.3},
  'min_lr reached': {'patience': 1, 'factor': 0.1, 'min_lr': 2e-7},
  'eps larger than a reduction': {'patience': 1, 'factor': 0.9, 'eps': 2e-5},
}


@pytest.mark.parametrize('mode', ['min', 'max'])
@pytest.mark.parametrize('settings', list(SETTINGS.values()), ids=list(SETTINGS))
def test_learning_rate_equals_torchs_at_every_evaluation(mode, settings):
  metrics = scripted_losses() if mode == 'min' else scripted_accuracies()
  theirs = torch_learning_rates(metrics, mode=mode, **settings)
  ours = our_learning_rates(metrics, mode=mode, **settings)
  # The scale is kept in float32: the rates agree to float32's rounding, evaluation by evaluation.
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
  assert len(set(theirs)) > 1, 'the sequence must make torch reduce at least once'


def test_the_off_by_one_of_optax_is_not_ours():
  """optax.contrib.reduce_on_plateau reduces after `patience` stalls; torch after `patience` + 1."""
  metrics = [1.0, 1.0, 1.0, 1.0]
  assert torch_learning_rates(metrics, patience=2) == [BASE_LR, BASE_LR, BASE_LR, pytest.approx(BASE_LR / 10)]
  assert our_learning_rates(metrics, patience=2) == pytest.approx(torch_learning_rates(metrics, patience=2))


def test_the_config_fields_are_torchs_arguments():
  config = default.get_config()
  config.update(
    schedule='plateau',
    validation_fraction=0.1,
    learning_rate=BASE_LR,
    lr_reference_batch=config.batch_size,
    plateau_mode='max',
    plateau_factor=0.5,
    plateau_patience=1,
    plateau_threshold=0.01,
    plateau_threshold_mode='abs',
    plateau_cooldown=1,
    plateau_min_lr=1e-5,
  )
  metrics = scripted_accuracies()
  scheduler = registry.plateau_scheduler(config)
  state = scheduler.init()
  ours = []
  for metric in metrics:
    state = scheduler.step(state, metric)
    ours.append(BASE_LR * float(state.scale))
  theirs = torch_learning_rates(
    metrics, mode='max', factor=0.5, patience=1, threshold=0.01, threshold_mode='abs', cooldown=1, min_lr=1e-5
  )
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'plateau_factor': 1.0}, r'plateau_factor=1.0 must be in \(0, 1\)'),
    ({'plateau_mode': 'maximum'}, "plateau_mode='maximum' is not one of 'min', 'max'"),
    ({'plateau_threshold_mode': 'relative'}, "plateau_threshold_mode='relative' is not one of 'rel', 'abs'"),
    ({'plateau_patience': -1}, 'plateau_patience must be a non-negative integer'),
    ({'plateau_metric': 'val_accuracy'}, "plateau_metric='val_accuracy' is not an eval metric"),
    (
      {'validation_fraction': 0.0},
      "plateau_metric='val_loss' needs a validation split.*set config.validation_fraction",
    ),
  ],
)
def test_bad_plateau_settings_are_named(overrides, message):
  config = default.get_config()
  config.update(schedule='plateau', validation_fraction=0.1)
  config.update(overrides)
  with pytest.raises(registry.ConfigError, match=message):
    registry.validate_config(config)
