"""DenseNet-121 on one accelerator chip, per kernel set: speed against the roofline and timm.

  python benchmarks/accelerator.py            # one GPU or TPU chip: DenseNet-121, batch 128, 224x224
  python benchmarks/accelerator.py --tiny     # a tiny DenseNet on whatever JAX has (the CI smoke test)

For each dtype (bfloat16, float32) and kernel set ('xla', 'cpu'), one table row: train and eval
images per second (median step time of `--steps` steps after a warm-up step), the train step's
model FLOP utilisation (XLA's FLOP count over its time, against the chip's bfloat16 peak), its
roofline (XLA's FLOP and bytes-accessed counts of the compiled step against the chip's peak and
memory bandwidth: the fastest the step could run) and the share of it reached, XLA's temp memory
of the train step with and without `memory_efficient` (compiled, not run), and its compile time.
DenseNet is memory-bound on every chip in CHIPS: its bytes, not its FLOPs, set the roofline, so MFU
alone reads low at any speed. Where torch and timm are installed, timm's `densenet121` (bfloat16
autocast, channels_last, the same batch and optimizer) is measured first, in a process of its own
on the same chip, for the ratio. Needs only jax, flax, optax and numpy (no TensorFlow, TFDS,
ml_collections or torch). The row 'auto' picks on this backend is marked.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import densenet_jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_memory import train_step_fn  # noqa: E402  (a sibling script, not a package)

# Per chip, by `jax.devices()[0].device_kind`: dense bfloat16 peak in TFLOP/s and memory bandwidth
# in TB/s (vendors' data sheets; SXM parts where a name covers several).
CHIPS = {
  'TPU v4': (275, 1.23),
  'TPU v5 lite': (197, 0.82),
  'TPU v5e': (197, 0.82),
  'TPU v5p': (459, 2.76),
  'TPU v5': (459, 2.76),
  'TPU v6 lite': (918, 1.64),
  'TPU v6e': (918, 1.64),
  'TPU7x': (2307, 7.37),
  'NVIDIA A100-SXM4-40GB': (312, 1.56),
  'NVIDIA A100-SXM4-80GB': (312, 2.04),
  'NVIDIA A100 80GB PCIe': (312, 1.94),
  'NVIDIA H100 80GB HBM3': (989, 3.35),
  'NVIDIA H100 PCIe': (756, 2.04),
  'NVIDIA H100 NVL': (835, 3.94),
  'NVIDIA H200': (989, 4.8),
  'NVIDIA H200 NVL': (835, 4.8),
  'NVIDIA B200': (2250, 8.0),
  'NVIDIA L4': (121, 0.3),
}

# The tiny DenseNet of --tiny: growth 8, two blocks of two layers, 16 stem features, 10 classes.
TINY = {'growth_rate': 8, 'block_config': (2, 2), 'num_classes': 10}


def chip_figures(device_kind: str) -> tuple[float | None, float | None]:
  """(bfloat16 TFLOP/s, TB/s) of a chip: its entry in CHIPS, or the longest entry it starts with."""
  if device_kind in CHIPS:
    return CHIPS[device_kind]
  names = [name for name in CHIPS if device_kind.startswith(name)]
  return CHIPS[max(names, key=len)] if names else (None, None)


def median_seconds(run, steps: int, synchronize=jax.block_until_ready) -> float:
  """Median wall time of `run()` over `steps` calls after one warm-up call, synchronised."""
  synchronize(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    synchronize(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(model: densenet_jax.DenseNet, batch: int, size: int, steps: int) -> dict[str, float]:
  """Train and eval img/s, the train step's FLOPs and bytes, temp MiB with and without memory_efficient."""
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
    'train_seconds': train_seconds,
    'train_img_s': batch / train_seconds,
    'eval_img_s': batch / eval_seconds,
    'flops': float(costs.get('flops', 0.0)),
    'bytes': float(costs.get('bytes accessed', 0.0)),
    'temp_mib': train.memory_analysis().temp_size_in_bytes / mib,
    'temp_mib_efficient': efficient.memory_analysis().temp_size_in_bytes / mib,
    'compile_s': compile_seconds,
  }


def roofline(flops: float, bytes_accessed: float, tflops: float | None, tbs: float | None) -> dict:
  """The fastest a step of `flops` and `bytes_accessed` could run on a chip, and what bounds it."""
  if not (tflops and tbs):
    return {}
  compute_seconds, memory_seconds = flops / (tflops * 1e12), bytes_accessed / (tbs * 1e12)
  return {
    'seconds': max(compute_seconds, memory_seconds),
    'bound': 'memory' if memory_seconds > compute_seconds else 'compute',
  }


def timm_worker(args) -> dict:
  """timm's DenseNet (121, or the tiny one) trained and evaluated on this machine's GPU (or CPU)."""
  import torch

  torch.library.register_fake = lambda *a, **k: lambda f: f  # torchvision's CUDA wheel on CPU torch
  import timm

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = True
  if args.tiny:
    model = timm.models.densenet.DenseNet(**TINY)
  else:
    model = timm.create_model('densenet121', pretrained=False)
  model = model.to(device, memory_format=torch.channels_last)
  images = torch.randn(args.batch, 3, args.size, args.size, device=device).to(
    memory_format=torch.channels_last
  )
  labels = torch.randint(0, model.num_classes, (args.batch,), device=device)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

  def synchronize(_):
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def run_train():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  def run_eval():
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
      model(images)

  for _ in range(2):  # cuDNN's algorithm search, outside the timing.
    run_train()
  return {
    'train_img_s': args.batch / median_seconds(run_train, args.steps, synchronize),
    'eval_img_s': args.batch / median_seconds(run_eval, args.steps, synchronize),
    'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
    'torch': torch.__version__,
    'timm': timm.__version__,
  }


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # A finder that refuses it (as the bare-machine test's does).
    return False


def run_timm(args) -> dict | str:
  """timm's figures from a process of its own (JAX and torch would share the chip's memory), or why not."""
  if not all(_installed(name) for name in ('torch', 'timm')):
    return 'skipped: torch or timm is not installed'
  command = [sys.executable, os.path.abspath(__file__), '--timm-worker', '--batch', str(args.batch)]
  command += ['--steps', str(args.steps), '--size', str(args.size)] + (['--tiny'] if args.tiny else [])
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    return f'failed: {(result.stderr.strip().splitlines() or [""])[-1]}'
  return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--tiny', action='store_true', help='a tiny DenseNet, batch 4, 32x32 (the CI smoke test)'
  )
  parser.add_argument('--batch', type=int)
  parser.add_argument('--size', type=int)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--kernels', default=','.join(densenet_jax.KERNEL_SETS))
  parser.add_argument('--peak-tflops', type=float, help="the chip's bfloat16 peak, if not in CHIPS")
  parser.add_argument('--bandwidth-tbs', type=float, help="the chip's memory bandwidth, if not in CHIPS")
  parser.add_argument('--no-timm', action='store_true', help="skip timm's densenet121")
  parser.add_argument('--timm-worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.batch = args.batch or (4 if args.tiny else 128)
  args.size = args.size or (32 if args.tiny else 224)
  if args.timm_worker:
    print(json.dumps(timm_worker(args)))
    return

  started = time.perf_counter()
  timm_figures = 'skipped (--no-timm)' if args.no_timm else run_timm(args)  # Before JAX takes the chip.
  device = jax.devices()[0]
  base = densenet_jax.DenseNet(**TINY, num_init_features=16) if args.tiny else densenet_jax.DenseNet121()
  peak, bandwidth = chip_figures(device.device_kind)
  peak, bandwidth = args.peak_tflops or peak, args.bandwidth_tbs or bandwidth
  auto = densenet_jax.kernel_set('auto').name
  name = 'tiny DenseNet' if args.tiny else 'DenseNet-121'
  print(
    f'{device.platform} {device.device_kind}: {name}, batch {args.batch}, {args.size}x{args.size}; ', end=''
  )
  print(
    f'bfloat16 peak {f"{peak:g} TFLOP/s" if peak else "unknown"}, memory '
    f'{f"{bandwidth:g} TB/s" if bandwidth else "unknown"} (JAX {jax.__version__})'
  )
  print(
    'dtype    kernels  train img/s  eval img/s  train TFLOP/s  MFU    GFLOP/img  MB/img  roofline img/s  '
    'reached  temp MiB  efficient MiB  compile s'
  )
  best = {}
  for dtype in args.dtypes.split(','):
    for kernels in args.kernels.split(','):
      model = base.clone(kernels=kernels, dtype=jnp.dtype(dtype))
      r = measure(model, args.batch, args.size, args.steps)
      tflop_s = r['flops'] / r['train_seconds'] / 1e12
      mfu = f'{100 * tflop_s / peak:5.1f}%' if peak else '  n/a '
      roof = roofline(r['flops'], r['bytes'], peak, bandwidth)
      roof_img_s = f'{args.batch / roof["seconds"]:9.0f} ({roof["bound"][:3]})' if roof else f'{"n/a":>15}'
      reached = f'{100 * roof["seconds"] / r["train_seconds"]:6.1f}%' if roof else '   n/a '
      label = f'{kernels}{"*" if kernels == auto else ""}'
      print(
        f'{dtype:8} {label:8} {r["train_img_s"]:11.1f} {r["eval_img_s"]:11.1f} {tflop_s:14.3f}  {mfu} '
        f'{r["flops"] / args.batch / 1e9:10.3f} {r["bytes"] / args.batch / 1e6:7.1f} {roof_img_s}  {reached} '
        f'{r["temp_mib"]:9.1f} {r["temp_mib_efficient"]:14.1f} {r["compile_s"]:10.1f}',
        flush=True,
      )
      if dtype == 'bfloat16' and r['train_img_s'] > best.get('train_img_s', 0):
        best = {**r, 'kernels': kernels}
  print(f"* what kernels='auto' picks on {device.platform}; roofline: max(FLOP / peak, bytes / bandwidth)")
  if isinstance(timm_figures, str):
    print(f'timm: {timm_figures}')
  else:
    t = timm_figures
    timm_model = 'tiny DenseNet' if args.tiny else 'densenet121'
    print(
      f'timm {t["timm"]} {timm_model} (torch {t["torch"]}, {t["device"]}, bfloat16 autocast, '
      f'channels_last): train {t["train_img_s"]:.1f} img/s, eval {t["eval_img_s"]:.1f} img/s'
    )
    if best:
      train_ratio, eval_ratio = best['train_img_s'] / t['train_img_s'], best['eval_img_s'] / t['eval_img_s']
      print(
        f'densenet-jax bfloat16 ({best["kernels"]}) / timm: train {train_ratio:.2f}x, eval {eval_ratio:.2f}x'
      )
  print(f'{time.perf_counter() - started:.0f} s in all')


if __name__ == '__main__':
  main()
