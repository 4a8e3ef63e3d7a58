"""The trainer says when it waits for data: `data_wait` in the log, metrics.jsonl and TensorBoard."""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import optional_module, read_metrics

from configs import digits
from densenet_jax.train import loop, reporting
from densenet_jax.train.sharding import StepPacer, WaitClock, prefetch_to_device

optional_module('tensorflow_datasets')

STEPS, LOG_EVERY = 8, 4


def _sleep_then(seconds: float):
  """A host function that sleeps, then returns its argument: a step that takes time on the 'device'."""

  def run(x):
    time.sleep(seconds)
    return np.asarray(x)

  return run


@pytest.mark.parametrize(('depth', 'every'), [(2, 1), (4, 2)])
def test_the_pacer_keeps_the_host_at_most_its_depth_steps_ahead_of_the_device(depth, every):
  @jax.jit
  def slow_step(step, x):  # Tens of milliseconds of device work: dispatching it takes microseconds.
    x = jax.lax.fori_loop(0, 8, lambda _, x: jnp.tanh(x @ x), x)
    return step + 1, x

  pacer = StepPacer(depth=depth, every=every)
  step, x = jnp.zeros((), jnp.int32), jnp.full((384, 384), 1e-3)
  jax.block_until_ready(slow_step(step, x))  # Compiled.
  counters = []
  for n in range(1, 11):
    step, x = slow_step(step, x)
    counters.append(step)
    pacer.stepped(step)
    # Step n was just dispatched; those more than depth + every - 1 before it are done.
    assert all(counter.is_ready() for counter in counters[: max(n - (depth + every - 1), 0)]), n


def test_prefetch_to_device_adds_the_time_spent_waiting_for_each_host_batch():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  clock = WaitClock()
  slept = []

  def host_batches():
    for i in range(3):
      started = time.perf_counter()
      time.sleep(0.01)
      slept.append(time.perf_counter() - started)
      yield {'image': np.full((2, 1), i, np.float32)}

  batches = list(prefetch_to_device(host_batches(), sharding, 1, 3, clock))
  assert [int(b['image'][0, 0]) for b in batches] == [0, 1, 2]
  waited = clock.lap()
  assert waited >= sum(slept) and clock.lap() == 0.0


def _config(data_dir) -> ml_collections.ConfigDict:
  config = digits.get_config()
  config.update(
    data_dir=str(data_dir),
    model_kwargs=ml_collections.ConfigDict({'depth': 10, 'growth_rate': 4, 'bc': True}),
    total_steps=STEPS,
    log_every_steps=LOG_EVERY,
    num_epochs=1,
    progress_bar=False,
    compilation_cache_dir='',
  )
  return config


def _train(config, workdir, capsys) -> tuple[list[dict], str]:
  loop.train_and_evaluate(config, workdir)
  records = [r for r in read_metrics(workdir) if 'train_loss' in r]
  return records, capsys.readouterr().out


def test_a_slow_input_pipeline_is_reported_once_as_input_bound(
  tmp_path, digits_data_dir, monkeypatch, capsys
):
  real_iterator = loop.input_pipeline.train_iterator

  def slow_iterator(*args, **kwargs):
    for batch in real_iterator(*args, **kwargs):
      time.sleep(0.3)  # A host that decodes slowly: the step (a few ms) waits for it.
      yield batch

  monkeypatch.setattr(loop.input_pipeline, 'train_iterator', slow_iterator)
  records, out = _train(_config(digits_data_dir), tmp_path, capsys)
  assert [r['step'] for r in records] == [4, 8]
  assert all(r['data_wait'] > 100 * reporting.INPUT_BOUND_FRACTION for r in records), records
  warnings = [line for line in out.splitlines() if 'warning: the run is input-bound' in line]
  assert len(warnings) == 1, out  # Once per run, not once per window.
  assert 'more host CPU cores' in warnings[0]
  assert '| data wait ' in out
  events = b''.join(path.read_bytes() for path in (tmp_path / 'tensorboard').iterdir())
  assert b'data_wait' in events


def test_a_device_bound_run_with_a_fast_pipeline_is_not_called_input_bound(
  tmp_path, digits_data_dir, monkeypatch, capsys
):
  real_jit_train_step = loop.jit_train_step
  delay = jax.jit(lambda step: jax.pure_callback(_sleep_then(0.2), jax.ShapeDtypeStruct((), jnp.int32), step))

  def slow_jit_train_step(*args, **kwargs):
    fast = real_jit_train_step(*args, **kwargs)
    # Each step takes 0.2 s more (a host callback, run as XLA:CPU runs the step): tf.data keeps ahead.
    return lambda state, batch: (stepped := fast(state, batch)).replace(step=delay(stepped.step))

  monkeypatch.setattr(loop, 'jit_train_step', slow_jit_train_step)
  records, out = _train(_config(digits_data_dir), tmp_path, capsys)
  assert [r['step'] for r in records] == [4, 8]
  assert all(0 <= r['data_wait'] < 100 * reporting.INPUT_BOUND_FRACTION for r in records), records
  assert 'input-bound' not in out


@pytest.mark.parametrize(('waited', 'warns'), [(1.5, True), (0.5, False)])
def test_the_warning_is_about_the_share_of_the_window(tmp_path, waited, warns, monkeypatch, capsys):
  now = [100.0]
  monkeypatch.setattr(reporting.time, 'perf_counter', lambda: now[0])  # A clock the test moves.
  config = ml_collections.ConfigDict(
    {'batch_size': 8, 'progress_bar': False, 'dataset': 'd', 'eval_split': 'e', 'model': 'm'}
  )
  reporter = reporting.Reporter(config, reporting.epath.Path(tmp_path), 10, 5, 0)
  reporter.restart_window(1)
  reporter.wait_clock.add(waited)
  now[0] += 10.0  # Steps 2-5 took 10 s, `waited` of them waiting for data.
  reporter.train(5, {'train_loss': 1.0, 'train_top1': 0.5, 'learning_rate': 0.1})
  reporter.close()
  record = read_metrics(tmp_path)[-1]
  assert record['data_wait'] == pytest.approx(10 * waited)
  assert ('input-bound' in capsys.readouterr().out) == warns
