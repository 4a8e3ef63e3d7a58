"""Compile time of the trainer's train step: cold, and warm from the persistent cache.

  python benchmarks/compile_time.py                      # DenseNet-121, batch 16, 224x224, fp32
  python benchmarks/compile_time.py --config configs/cifar10.py --batch 64

Times the train step exactly as `train.py` builds it from the config
(`traced_step.jit_train_step`: model, optimizer, shardings, donation, caches), twice over: with the
defaults (XLA's persistent cache alone) and with `config.keep_traced_step` (the traced step kept
too, `jax.export`). Each measurement runs in a fresh process: the first with an empty cache
directory (cold: trace, lower, XLA compile, caches written), the next ones with what the first wrote
(warm: what a restarted or resumed run pays). Trace+lower (load+lower when the traced step is
kept) and compile are reported apart; their sum is what a run waits for. The last line is the
ratio of the warm times, kept / not kept.
"""

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from densenet_jax.train import registry, steps, traced_step

  jax.config.update('jax_compilation_cache_dir', args.cache_dir)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`
  spec = importlib.util.spec_from_file_location('config', args.config)
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  config = config_module.get_config()
  config.batch_size = args.batch
  config.image_size = args.size
  model = registry.create_model(config, args.num_classes)
  tx = registry.create_optimizer(config, lambda step: config.learning_rate)
  mesh = Mesh(jax.devices(), ('data',))
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  state = jax.eval_shape(lambda: steps.create_train_state(model, tx, (1, args.size, args.size, 3)))
  batch = {
    'image': jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32),
    'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32),
  }
  config.compilation_cache_dir = args.cache_dir  # Where train.py keeps the traced step too,
  config.keep_traced_step = args.keep_traced_step  # when asked to.
  step = traced_step.jit_train_step(config, replicated, data_sharding)
  gc.freeze()  # As train.py does after its imports.
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lowered_at = time.perf_counter()
  lowered.compile()
  compiled_at = time.perf_counter()
  return {'lower': lowered_at - start, 'compile': compiled_at - lowered_at}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/densenet121.py')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--num-classes', type=int, default=1000)
  parser.add_argument('--warm-runs', type=int, default=3)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--cache-dir', help=argparse.SUPPRESS)
  parser.add_argument('--keep-traced-step', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return

  import jax

  print(f'{args.config}, batch {args.batch}, {args.size}x{args.size}, backend {jax.default_backend()}')
  warm = {}
  # The default (XLA's cache alone), then with config.keep_traced_step (the traced step kept too).
  for keep_traced_step in (False, True):
    print(f'config.keep_traced_step={keep_traced_step}:')
    with tempfile.TemporaryDirectory() as cache_dir:
      command = [sys.executable, __file__, '--worker', '--cache-dir', cache_dir]
      command += ['--config', args.config, '--batch', str(args.batch), '--size', str(args.size)]
      command += ['--num-classes', str(args.num_classes)] + ['--keep-traced-step'] * keep_traced_step
      runs = []
      for run in range(1 + args.warm_runs):
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        kind = 'cold' if run == 0 else 'warm'
        seconds = runs[-1]['lower'] + runs[-1]['compile']
        loads = run > 0 and keep_traced_step
        print(
          f'  {kind}: {seconds:5.1f} s  ({"load" if loads else "trace"}+lower {runs[-1]["lower"]:.1f} s, '
          f'compile {runs[-1]["compile"]:.1f} s)',
          flush=True,
        )
    warm[keep_traced_step] = statistics.median(r['lower'] + r['compile'] for r in runs[1:])
    print(
      f'  cold {runs[0]["lower"] + runs[0]["compile"]:.1f} s, warm (median) {warm[keep_traced_step]:.1f} s'
    )
  print(f'warm with the traced step kept / without: {warm[True] / warm[False]:.2f}')


if __name__ == '__main__':
  main()
