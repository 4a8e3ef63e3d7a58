"""Shared fixtures: the reference data computed by real torchvision (tests/data/)."""

import importlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest

import densenet_jax

DATA = pathlib.Path(__file__).parent / 'data'
# The float64 context manager: jax.enable_x64 on current JAX, in experimental before.
enable_x64 = jax.enable_x64 if hasattr(jax, 'enable_x64') else jax.experimental.enable_x64
PRESETS = {
  'densenet121': densenet_jax.DenseNet121,
  'densenet161': densenet_jax.DenseNet161,
  'densenet169': densenet_jax.DenseNet169,
  'densenet201': densenet_jax.DenseNet201,
  'densenet264': densenet_jax.DenseNet264,
}


def optional_module(name: str):
  """Imports an optional test dependency: skipped if missing, but a failure under CI=true.

  .ci/run installs every optional dependency, so in CI a missing one is a broken install,
  not a reason to skip.
  """
  if os.environ.get('CI'):
    return importlib.import_module(name)
  return pytest.importorskip(name, reason=f'needs {name} (.ci/run installs it)')


@pytest.fixture(scope='session')
def torchvision_reference() -> dict:
  """torchvision_densenet.json: counts, state-dict shapes and feature shapes per preset."""
  return json.loads((DATA / 'torchvision_densenet.json').read_text())['models']


@pytest.fixture(scope='session')
def tiny_reference() -> dict[str, np.ndarray]:
  """tiny_densenet_torchvision.npz: a tiny torchvision DenseNet, its outputs and one SGD step."""
  with np.load(DATA / 'tiny_densenet_torchvision.npz') as npz:
    return dict(npz)


@pytest.fixture(scope='session')
def tiny_model() -> densenet_jax.DenseNet:
  """The tiny reference network's configuration (see tiny_densenet_torchvision.json)."""
  kwargs = json.loads((DATA / 'tiny_densenet_torchvision.json').read_text())[
    'torchvision.models.DenseNet kwargs'
  ]
  return densenet_jax.DenseNet(
    growth_rate=kwargs['growth_rate'],
    block_config=tuple(kwargs['block_config']),
    num_init_features=kwargs['num_init_features'],
    bn_size=kwargs['bn_size'],
    drop_rate=kwargs['drop_rate'],
    num_classes=kwargs['num_classes'],
  )


def section(reference: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """The arrays under `prefix/` in the tiny reference, keyed by torchvision key."""
  return {k[len(prefix) + 1 :]: v for k, v in reference.items() if k.startswith(prefix + '/')}


def max_relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected| (the issues' 'relative')."""
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))
