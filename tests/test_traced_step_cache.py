"""A restart loads the traced train step (`traced_step.TracedStep`) rather than tracing it: the same run."""

import logging

import numpy as np
import pytest
from conftest import optional_module

from configs import cifar10
from densenet_jax.train import loop, traced_step

tfds = optional_module('tensorflow_datasets')


@pytest.mark.slow  # five training runs in one test
def test_a_restart_loads_the_traced_step_and_trains_exactly_the_same(tmp_path, monkeypatch, caplog):
  traces = []
  train_step = traced_step.train_step  # The step jit_train_step traces.

  def counted_train_step(*args, **kwargs):
    traces.append(1)
    return train_step(*args, **kwargs)

  monkeypatch.setattr(traced_step, 'train_step', counted_train_step)

  def train(workdir: str, **overrides) -> tuple[dict, int]:
    """(final metrics, times the step was traced) of a 2-step run of a 1-layer-per-block DenseNet-BC."""
    config = cifar10.get_config()
    config.data_dir = str(tmp_path / 'data')
    config.batch_size = config.eval_batch_size = 8
    config.total_steps = 2
    config.progress_bar = False
    config.model_kwargs.depth = 10
    config.compilation_cache_dir = str(tmp_path / 'cache')
    config.keep_traced_step = True
    config.update(overrides)
    traces.clear()
    with tfds.testing.mock_data(num_examples=20):
      final = loop.train_and_evaluate(config, tmp_path / workdir)
    return final, len(traces)

  def kept() -> list:
    return sorted((tmp_path / 'cache' / 'traced_steps').iterdir())

  plain, _ = train('plain', keep_traced_step=False)  # jax.jit alone (the default), nothing kept
  first, first_traces = train('first')
  (kept_step,) = kept()
  restarted, restarted_traces = train('restarted')
  assert first_traces >= 1 and restarted_traces == 0
  assert kept() == [kept_step]
  for key in ('train_loss', 'param_checksum', 'test_loss', 'test_top1'):
    assert plain[key] == first[key] == restarted[key], key

  # What the step depends on is in the key: with label smoothing it is traced anew, kept apart.
  smoothed, smoothed_traces = train('smoothed', label_smoothing=0.1)
  assert smoothed_traces >= 1 and len(kept()) == 2
  assert not np.isclose(smoothed['train_loss'], first['train_loss'])

  # An unreadable file is traced again, replaced, and the run is the same.
  kept_step.write_bytes(b'not a serialized jax.export.Exported')
  with caplog.at_level(logging.WARNING):
    again, again_traces = train('again')
  assert again_traces >= 1 and again['param_checksum'] == first['param_checksum']
  assert 'could not be read' in caplog.text and str(kept_step) in caplog.text
  assert kept_step.read_bytes() != b'not a serialized jax.export.Exported'
