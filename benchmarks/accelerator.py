"""DenseNet-121 on one accelerator chip, per kernel set: speed, utilisation, memory, compile time.

  python benchmarks/accelerator.py            # one GPU or TPU chip: DenseNet-121, batch 128, 224x224
  python benchmarks/accelerator.py --tiny     # a tiny DenseNet on whatever JAX has (the CI smoke test)

For each dtype (bfloat16, float32) and kernel set ('xla', 'cpu'), one table row: train and eval
images per second (median step time of `--steps` steps after a warm-up step), model FLOP
utilisation (XLA's FLOP count of the train step over its time, against the chip's bfloat16 peak,
`--peak-tflops` where the chip is not in PEAK_TFLOPS), XLA's temp memory of the train step with and
without `memory_efficient` (compiled, not run), and the train step's compile time. Everything runs
in one process on the first device. The defaults are sized to finish in under 5 minutes on one chip;
the row 'auto' picks on this backend is marked, and the first run on a chip decides what 'auto'
should pick there (`densenet_jax.ops.kernel_set`).
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import densenet_jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_memory import train_step_fn  # noqa: E402  (a sibling script, not a package)

# Dense bfloat16 peak per chip, TFLOP/s (vendors' figures), by `jax.devices()[0].device_kind`.
PEAK_TFLOPS = {
  'TPU v4': 275,
  'TPU v5 lite': 197,
  'TPU v5e': 197,
  'TPU v5p': 459,
  'TPU v5': 459,
  'TPU v6 lite': 918,
  'TPU v6e': 918,
  'NVIDIA A100-SXM4-40GB': 312,
  'NVIDIA A100-SXM4-80GB': 312,
  'NVIDIA A100 80GB PCIe': 312,
  'NVIDIA H100 80GB HBM3': 989,
  'NVIDIA H100 PCIe': 756,
  'NVIDIA L4': 121,
}


def median_seconds(run, steps: int) -> float:
  """Median wall time of `run()` over `steps` calls after one warm-up call, synchronised."""
  jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(model: densenet_jax.DenseNet, batch: int, size: int, steps: int) -> dict[str, float]:
  """Train and eval img/s, train-step FLOPs, temp MiB with and without memory_efficient, compile s."""
  optimizer = optax.sgd(0.1, momentum=0.9, nesterov=True)
  key_images, key_labels, key_init = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(key_images, (batch, size, size, 3), model.dtype)
  labels = jax.random.randint(key_labels, (batch,), 0, model.num_classes)
  variables = jax.jit(lambda: model.init(key_init, images[:1], train=False))()
  opt_state = optimizer.init(variables['params'])

  start = time.perf_counter()
  train = jax.jit(train_step_fn(model, optimizer)).lower(variables, opt_state, images, labels).compile()
  compile_seconds = time.perf_counter() - start
  efficient = jax.jit(train_step_fn(model.clone(memory_efficient=True), optimizer))
  efficient = efficient.lower(variables, opt_state, images, labels).compile()
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()

  state = [variables, opt_state]

  def train_once():
    state[:] = train(*state, images, labels)
    return state

  train_seconds = median_seconds(train_once, steps)
  eval_seconds = median_seconds(lambda: evaluate(state[0], images), steps)
  costs = train.cost_analysis()
  costs = costs[0] if isinstance(costs, list) else costs  # A list of one on older JAX.
  mib = 2.0**20
  return {
    'train_img_s': batch / train_seconds,
    'eval_img_s': batch / eval_seconds,
    'train_tflop_s': float(costs.get('flops', 0.0)) / train_seconds / 1e12,
    'temp_mib': train.memory_analysis().temp_size_in_bytes / mib,
    'temp_mib_efficient': efficient.memory_analysis().temp_size_in_bytes / mib,
    'compile_s': compile_seconds,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--tiny', action='store_true', help='a tiny DenseNet, batch 4, 32x32 (the CI smoke test)'
  )
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--kernels', default=','.join(densenet_jax.KERNEL_SETS))
  parser.add_argument('--peak-tflops', type=float, help="the chip's bfloat16 peak, if not in PEAK_TFLOPS")
  args = parser.parse_args()

  started = time.perf_counter()
  device = jax.devices()[0]
  if args.tiny:
    base, batch, size, steps = densenet_jax.DenseNet(8, (2, 2), 16, num_classes=10), 4, 32, 2
  else:
    base, batch, size, steps = densenet_jax.DenseNet121(), args.batch, 224, args.steps
  peak = args.peak_tflops or PEAK_TFLOPS.get(device.device_kind)
  auto = densenet_jax.kernel_set('auto').name
  print(
    f'{device.platform} {device.device_kind}: {"tiny DenseNet" if args.tiny else "DenseNet-121"}, ', end=''
  )
  print(f'batch {batch}, {size}x{size}; bfloat16 peak {f"{peak:g} TFLOP/s" if peak else "unknown"}')
  print(
    'dtype    kernels  train img/s  eval img/s  train TFLOP/s  MFU     temp MiB  efficient MiB  compile s'
  )
  for dtype in args.dtypes.split(','):
    for kernels in args.kernels.split(','):
      model = base.clone(kernels=kernels, dtype=jnp.dtype(dtype))
      r = measure(model, batch, size, steps)
      mfu = f'{100 * r["train_tflop_s"] / peak:5.1f}%' if peak else '  n/a '
      name = f'{kernels}{"*" if kernels == auto else ""}'
      print(
        f'{dtype:8} {name:8} {r["train_img_s"]:11.1f} {r["eval_img_s"]:11.1f} {r["train_tflop_s"]:14.3f}  '
        f'{mfu} {r["temp_mib"]:9.1f} {r["temp_mib_efficient"]:14.1f} {r["compile_s"]:10.1f}',
        flush=True,
      )
  print(f"* what kernels='auto' picks on {device.platform}; {time.perf_counter() - started:.0f} s in all")


if __name__ == '__main__':
  main()
