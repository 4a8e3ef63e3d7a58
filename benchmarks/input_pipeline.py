"""Host input pipeline speed: ours against Flax's `examples/imagenet`, on the same data, in one run.

  python benchmarks/input_pipeline.py                      # synthetic ImageNet-like JPEGs, built once
  python benchmarks/input_pipeline.py --data_dir DIR --dataset imagenet2012   # a prepared dataset

Our `input_pipeline.train_iterator` / `eval_iterator` with `configs/densenet121.py` (224x224,
torchvision's antialiased transforms) race `flax_imagenet_input.create_split` (Flax's example,
re-implemented: bicubic resizes without antialiasing), batch 128 each, as numpy batches on the
host. Each round times both sides one after the other (the order alternating), after warm-up
batches that fill the shuffle buffers and let tf.data's autotuning settle; the table gives
the median over rounds: images/s, images/s per host core (the cores this process may use), and
ours / Flax's. The default data is `synthetic_imagenet` (3,000 train and 2,000 validation JPEGs of
ImageNet's sizes, 300-600 px a side; `benchmarks/synthetic_imagenet.py`), built offline in
--data_dir the first time (about two minutes on 2 cores).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax.train.reporting import quiet_native_startup  # noqa: E402

with quiet_native_startup():  # TensorFlow's start-up lines
  import flax_imagenet_input  # noqa: E402  (sibling scripts, not a package)
  import synthetic_imagenet  # noqa: E402

  from configs import densenet121  # noqa: E402
  from densenet_jax.train import input_pipeline  # noqa: E402


def host_cores() -> int:
  """The CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def ours(config, builder, spec, train: bool):
  """Endless batches of our pipeline (eval: its finite iterator, started again when it ends)."""
  if train:
    yield from input_pipeline.train_iterator(config, builder, spec, 0, 0, 1)
  while True:
    yield from input_pipeline.eval_iterator(config, builder, spec, 0, 1)


def images_per_second(batches, batch_size: int, warmup: int, count: int) -> float:
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  return batch_size * count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', help='default: ~/.cache/densenet_jax/synthetic_imagenet_TRAINxEVAL')
  parser.add_argument('--dataset', default='synthetic_imagenet')
  parser.add_argument('--synthetic_train', type=int, default=3000, help='synthetic_imagenet: train images')
  parser.add_argument('--synthetic_eval', type=int, default=2000, help='synthetic_imagenet: eval images')
  parser.add_argument('--train_split', default='train')
  parser.add_argument('--eval_split', default='validation')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batches', type=int, default=12, help='timed batches per side, mode and round')
  parser.add_argument('--warmup', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--modes', default='train,eval')
  args = parser.parse_args()

  if args.dataset == 'synthetic_imagenet':
    sizes = f'{args.synthetic_train}x{args.synthetic_eval}'
    args.data_dir = args.data_dir or os.path.expanduser(f'~/.cache/densenet_jax/synthetic_imagenet_{sizes}')
    synthetic_imagenet.builder(args.data_dir, args.synthetic_train, args.synthetic_eval)  # Built once.
  config = densenet121.get_config()
  config.update(
    dataset=args.dataset,
    data_dir=args.data_dir,
    train_split=args.train_split,
    eval_split=args.eval_split,
    batch_size=args.batch,
    eval_batch_size=args.batch,
  )
  builder = input_pipeline.get_builder(config, prepare=False)
  spec = input_pipeline.data_spec(config, builder, 1)
  cores = host_cores()
  print(
    f'{args.dataset} in {args.data_dir}: {spec.num_train_examples} train, {spec.num_eval_examples} eval '
    'images; '
    f'batch {args.batch}, {config.image_size}x{config.image_size}; {cores} host cores; '
    f'{args.rounds} rounds of {args.batches} batches'
  )
  print('mode   side                               img/s   img/s/core   ours / Flax')
  for mode in args.modes.split(','):
    train = mode == 'train'
    sides = {
      'densenet-jax': lambda train=train: ours(config, builder, spec, train),
      "Flax's example": lambda train=train: flax_imagenet_input.create_split(
        builder, args.batch, train, train_split=args.train_split, eval_split=args.eval_split
      ).as_numpy_iterator(),
    }
    rates = {side: [] for side in sides}
    for round_index in range(args.rounds):
      order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
      for side in order:
        rates[side].append(images_per_second(sides[side](), args.batch, args.warmup, args.batches))
    medians = {side: statistics.median(values) for side, values in rates.items()}
    ratio = medians['densenet-jax'] / medians["Flax's example"]
    for side, rate in medians.items():
      column = f'{ratio:10.2f}x' if side == 'densenet-jax' else ''
      print(f'{mode:6} {side:32} {rate:7.1f} {rate / cores:12.1f}   {column}', flush=True)


if __name__ == '__main__':
  main()
