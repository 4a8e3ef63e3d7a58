"""Train-step and eval throughput: densenet-jax vs a straightforward Flax DenseNet vs torchvision.

  python benchmarks/speed.py                       # DenseNet-121, batch 16, 224x224, fp32
  python benchmarks/speed.py --model densenet_bc_100 --batch 64 --size 32
  python benchmarks/speed.py --sides densenet-jax --rounds 1 --profile 25   # where a train step goes
  python benchmarks/speed.py --sides densenet-jax,densenet-jax-nnx,densenet-jax-nnx-graph  # NNX / Linen

Each side runs in its own process, the sides alternate over `--rounds`, and every figure is
the median over rounds of the median step time after warm-up. A train step is forward,
backward and an SGD (Nesterov momentum, weight decay) update, as a user writes it with optax;
eval is a forward pass with running statistics. torchvision runs with channels_last when torch
is installed (`.ci/run` installs it). Every side runs in the process a user of the library gets:
glibc's malloc as it comes. `--huge-pages` runs every side as `train.py` runs itself, with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which moves the sides by different amounts on different
machines (docs/performance.md, "What a user sees"). The script assumes nothing about the platform:
on a GPU or TPU host it measures there and adds model FLOP utilization where the chip's
peak is known. `--profile N` also runs a few train steps under `jax.profiler` and prints, for
each JAX side, the N XLA operations that take the longest (ms per step, with their HLO) and the
time per kind of operation. XLA:CPU runs independent operations concurrently, so these times
can add up to more than the step.
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

MODELS = {
  # name: (growth_rate, block_config, num_init_features, stem, num_classes)
  'densenet121': (32, (6, 12, 24, 16), 64, 'imagenet', 1000),
  'densenet_bc_100': (12, (16, 16, 16), 24, 'cifar', 10),
}
# Dense peak FLOP/s per chip for the dtype measured (fp32 here): for utilization figures.
PEAK_FLOPS = {
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,
  'TPU v5p': 459e12,
  'NVIDIA A100': 19.5e12,
  'NVIDIA H100': 67e12,
}


def median_seconds(step, warmup: int, steps: int) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def profile_ops(compiled, run, steps: int = 3) -> dict[str, float]:
  """Seconds per step of each XLA operation of `compiled` over `steps` calls of `run`."""
  import jax

  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(steps):
        run()
    (path,) = glob.glob(f'{directory}/**/*.xplane.pb', recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  module = compiled.as_text().split('\n', 1)[0].split()[1].rstrip(',')  # "HloModule jit_train_step, ..."
  seconds = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      on_device = plane.name.startswith('/device:') and line.name == 'XLA Ops'
      for event in line.events:
        stats = dict(event.stats)
        if on_device or stats.get('hlo_module') == module:  # XLA:CPU thunks
          seconds[stats.get('hlo_op', event.name)] += event.duration_ns * 1e-9 / steps
  return dict(seconds)


def describe_ops(hlo_text: str, names) -> dict[str, str]:
  """'opcode result-shape' of each named instruction in an HLO module's text."""
  described = {}
  for name in names:
    match = re.search(rf'%{re.escape(name)} = (\S+) ([\w-]+)\(', hlo_text)
    if match:
      shape, opcode = match.groups()
      described[name] = f'{opcode} {shape.split("{")[0]}'
  return described


def jax_worker(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from flax_baseline import BaselineDenseNet

  import densenet_jax

  growth, blocks, init, stem, classes = MODELS[args.model]
  if args.side == 'baseline':
    model = BaselineDenseNet(growth, blocks, init, num_classes=classes, stem=stem)
  else:
    model = densenet_jax.DenseNet(
      growth_rate=growth,
      block_config=blocks,
      num_init_features=init,
      stem=stem,
      num_classes=classes,
      memory_efficient=args.side
      == 'densenet-jax-memory-efficient',  # 'densenet-jax-nnx': the same Linen model, run through NNX.
    )
  images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  labels = jax.random.randint(jax.random.key(1), (args.batch,), 0, classes)
  variables = model.init(jax.random.key(2), images[:1], train=False)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
  # A copy: the train step donates its state, and eval still reads `variables`.
  state = jax.tree.map(
    jnp.copy, (variables['params'], variables['batch_stats'], tx.init(variables['params']))
  )

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']

    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  def eval_step(variables, images):
    return model.apply(variables, images, train=False)

  start = time.perf_counter()
  train = jax.jit(train_step, donate_argnums=0).lower(state, images, labels).compile()
  compile_seconds = time.perf_counter() - start
  evaluate = jax.jit(eval_step).lower(variables, images).compile()
  holder = [state]

  def run_train():
    holder[0] = train(holder[0], images, labels)
    jax.block_until_ready(holder[0])

  def run_eval():
    evaluate(variables, images).block_until_ready()

  if args.side.startswith('densenet-jax-nnx'):
    nnx_train, run_train, run_eval, compile_seconds = nnx_steps(
      model, variables, tx, images, labels, tree_mode=args.side == 'densenet-jax-nnx'
    )
    del train, evaluate, state, holder  # The Linen step gave its cost analysis only.
  train_seconds = median_seconds(run_train, args.warmup, args.steps)
  eval_seconds = median_seconds(run_eval, args.warmup, args.eval_steps)
  if args.side.startswith('densenet-jax-nnx'):
    train = nnx_train
  cost = train.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  device = jax.devices()[0]
  profile = {}
  if args.profile:
    seconds = profile_ops(train, run_train)
    top = sorted(seconds, key=seconds.get, reverse=True)[: args.profile]
    described = describe_ops(train.as_text(), top)
    kinds = collections.Counter()
    for name, value in seconds.items():
      kinds[re.sub(r'\.\d+$', '', name)] += value
    profile = {
      'profile_ops': [(name, seconds[name], described.get(name, '')) for name in top],
      'profile_kinds': kinds.most_common(),
    }
  return {
    'train_img_s': args.batch / train_seconds,
    'eval_img_s': args.batch / eval_seconds,
    'compile_s': compile_seconds,
    'train_gflop_per_image': cost.get('flops', float('nan')) / args.batch / 1e9,
    'temp_mib': train.memory_analysis().temp_size_in_bytes / 2**20,
    'device': f'{device.platform}:{device.device_kind}',
    **profile,
  }


def nnx_steps(module, variables, tx, images, labels, tree_mode: bool):
  """The NNX model (densenet_jax.nnx) with the same weights, trained and evaluated as README's NNX loop.

  `nnx.Optimizer` and `nnx.jit`, in tree mode (`graph=False`) or in graph mode, flax 0.12's default
  (side 'densenet-jax-nnx-graph'), whose traversal of the object graph in Python on every call
  Flax's performance guide describes; the model and optimizer donated as the Linen side donates its
  state; the compile time is that of `nnx.jit(...).lower(...).compile()`, as the Linen side's.

  Returns:
    (the compiled train step, run_train, run_eval, compile seconds).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from densenet_jax import nnx as dnnx

  model = dnnx.from_linen(module, jax.tree.map(jnp.copy, variables))  # Training mode.
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  eval_model = dnnx.from_linen(module, variables, use_running_average=True)

  # Tree mode (graph=False): the model as a pytree, without graph mode's per-call Python traversal.
  jit = partial(nnx.jit, graph=not tree_mode)

  @jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))

  eval_step = jit(lambda model, images: model(images))

  start = time.perf_counter()
  compiled = train_step.lower(model, optimizer, images, labels).compile()
  compile_seconds = time.perf_counter() - start
  compiled = getattr(
    compiled, 'compiled', compiled
  )  # NNX's wrapper around jax's Compiled, where there is one.

  def run_train():
    train_step(model, optimizer, images, labels)
    jax.block_until_ready(nnx.state(model))

  def run_eval():
    eval_step(eval_model, images).block_until_ready()

  return compiled, run_train, run_eval, compile_seconds


def torch_worker(args) -> dict:
  import torch

  torch.library.register_fake = lambda *a, **k: lambda f: f  # torchvision's CUDA wheel on CPU torch
  import torchvision

  growth, blocks, init, _, classes = MODELS[args.model]
  model = torchvision.models.DenseNet(growth, blocks, init, num_classes=classes)
  if MODELS[args.model][3] == 'cifar':
    model.features = torch.nn.Sequential(
      torch.nn.Conv2d(3, init, 3, padding=1, bias=False), *list(model.features.children())[4:]
    )
  model = model.to(memory_format=torch.channels_last)
  images = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
  labels = torch.randint(0, classes, (args.batch,))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

  def run_train():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()

  def run_eval():
    model.eval()
    with torch.inference_mode():
      model(images)

  return {
    'train_img_s': args.batch / median_seconds(run_train, args.warmup, args.steps),
    'eval_img_s': args.batch / median_seconds(run_eval, args.warmup, args.eval_steps),
    'device': f'cpu ({torch.get_num_threads()} threads)',
  }


def run_side(side: str, args) -> dict | None:
  command = [sys.executable, os.path.abspath(__file__), '--worker', side]
  for name in ('model', 'batch', 'size', 'warmup', 'steps', 'eval_steps', 'profile'):
    command += [f'--{name.replace("_", "-")}', str(getattr(args, name))]
  command += ['--huge-pages'] if args.huge_pages else []
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    print(f'{side}: failed\n{result.stderr[-2000:]}', file=sys.stderr)
    return None
  return json.loads(result.stdout.strip().splitlines()[-1])


def print_profile(side: str, ops, kinds) -> None:
  """The slowest operations of a train step, and the time per kind of operation."""
  if not ops:
    return
  total = sum(seconds for _, seconds in kinds)
  print(f'{side}: the {len(ops)} slowest XLA operations of a train step (ms per step)')
  for name, seconds, description in ops:
    print(f'  {1e3 * seconds:8.1f}  {name:<36} {description}')
  print(f'{side}: ms per step by kind of operation ({1e3 * total:.0f} ms in all XLA operations)')
  for kind, seconds in kinds[: len(ops)]:
    print(f'  {1e3 * seconds:8.1f}  {kind}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='densenet121', choices=sorted(MODELS))
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  # An eval step is about a fifth of a train step. More of them make its median robust to phases,
  # up to seconds long, in which this machine runs steps a third slower (after a train phase, the
  # first 7 of 10 eval steps at 33-58 img/s, then 65-67, with the same page faults; single slow
  # steps coincide with the hypervisor's steal time in /proc/stat).
  parser.add_argument('--eval-steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--sides', default='densenet-jax,densenet-jax-memory-efficient,baseline,torch')
  parser.add_argument('--profile', type=int, default=0, metavar='N', help='print the N slowest XLA ops')
  parser.add_argument(
    '--huge-pages',
    action='store_true',
    help="every side with glibc's malloc asking for huge pages, as train.py",
  )
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    # This checkout's densenet_jax and train.py, whatever is installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.huge_pages:  # Every side, torch too, in the process environment train.py gives itself.
      from train import restart_with_huge_page_malloc

      restart_with_huge_page_malloc()
    args.side = args.worker
    print(json.dumps(torch_worker(args) if args.worker == 'torch' else jax_worker(args)))
    return

  sides = args.sides.split(',')
  if 'torch' in sides:
    try:
      import torch  # noqa: F401
    except ImportError:
      sides.remove('torch')
      print('torch is not installed: torchvision is left out.')
  results = {side: [] for side in sides}
  for round_index in range(args.rounds):
    for side in sides if round_index % 2 == 0 else reversed(sides):  # alternate the order
      measured = run_side(side, args)
      if measured:
        print_profile(side, measured.pop('profile_ops', None), measured.pop('profile_kinds', None))
        results[side].append(measured)
        print(
          f'round {round_index + 1} {side}: '
          + ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in measured.items()),
          flush=True,
        )

  summary = {}
  for side, runs in results.items():
    if runs:
      summary[side] = {
        k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)
      }
      summary[side]['device'] = runs[0]['device']
  gflop = summary.get('densenet-jax', summary.get('baseline', {})).get('train_gflop_per_image')
  malloc = 'huge pages, as train.py' if args.huge_pages else "glibc's default malloc, as a library user"
  print(
    f'\n{args.model}, batch {args.batch}, {args.size}x{args.size}, fp32, {malloc}, '
    f'median of {args.rounds} rounds:'
  )
  print(
    f'{"side":<32}{"train img/s":>12}{"eval img/s":>12}{"train GFLOP/s":>15}{"compile s":>11}{"temp MiB":>10}'
  )
  for side, m in summary.items():
    train_gflops = m['train_img_s'] * gflop if gflop else float('nan')
    print(
      f'{side:<32}{m["train_img_s"]:>12.2f}{m["eval_img_s"]:>12.2f}{train_gflops:>15.1f}'
      f'{m.get("compile_s", float("nan")):>11.1f}{m.get("temp_mib", float("nan")):>10.0f}'
    )
    peak = next((v for k, v in PEAK_FLOPS.items() if k in m['device']), None)
    if peak and gflop:
      print(f'{"":<32}model FLOP utilization {100 * train_gflops * 1e9 / peak:.1f}% of {m["device"]}')
  for nnx_side in [s for s in summary if s.startswith('densenet-jax-nnx') and 'densenet-jax' in summary]:
    nnx, linen = summary[nnx_side], summary['densenet-jax']
    print(
      f'{nnx_side} / densenet-jax (NNX / Linen): train {nnx["train_img_s"] / linen["train_img_s"]:.3f}x, '
      f'eval {nnx["eval_img_s"] / linen["eval_img_s"]:.3f}x, '
      f'compile time {nnx["compile_s"] / linen["compile_s"]:.3f}x'
    )
  for ours in [s for s in summary if s.startswith('densenet-jax')]:
    for other in [s for s in summary if not s.startswith('densenet-jax')]:
      print(
        f'{ours} / {other}: train {summary[ours]["train_img_s"] / summary[other]["train_img_s"]:.2f}x, '
        f'eval {summary[ours]["eval_img_s"] / summary[other]["eval_img_s"]:.2f}x'
      )
  print(f'(train step: {gflop:.2f} GFLOP per image by XLA cost analysis)' if gflop else '')


if __name__ == '__main__':
  main()
