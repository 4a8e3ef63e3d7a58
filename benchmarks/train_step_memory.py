"""XLA temp memory of one train step, with and without memory_efficient, across depths.

  python benchmarks/train_step_memory.py                  # 121, 169, 201, 264; batch 16, 224x224
  python benchmarks/train_step_memory.py --models densenet121 --kernels xla,cpu

Compiles (does not run) forward + backward + a Nesterov SGD update with weight decay,
and reads `jax.jit(step).lower(...).compile().memory_analysis()`. Every variant is
measured in the same process on the same backend. The table gives each model's temp
memory and the ratio efficient / plain; the last line how each grows with depth.
`tests/test_memory_efficient.py` checks the growth itself (linear vs quadratic) on
one dense block of 8, 16 and 32 layers.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import densenet_jax

MODELS = {
  'densenet121': densenet_jax.DenseNet121,
  'densenet161': densenet_jax.DenseNet161,
  'densenet169': densenet_jax.DenseNet169,
  'densenet201': densenet_jax.DenseNet201,
  'densenet264': densenet_jax.DenseNet264,
}


def train_step_fn(model: densenet_jax.DenseNet, optimizer: optax.GradientTransformation):
  """A user-style train step: softmax cross-entropy, an `optax` update, the new running averages."""

  def step(variables, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        images,
        train=True,
        mutable=['batch_stats'],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
      return loss, updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(variables['params'])
    param_updates, opt_state = optimizer.update(grads, opt_state, variables['params'])
    return {'params': optax.apply_updates(variables['params'], param_updates), **updates}, opt_state

  return step


def train_step_memory(model: densenet_jax.DenseNet, batch: int, size: int) -> tuple[float, float]:
  """(temp MiB, compile seconds) of one SGD train step of `model`."""
  optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  opt_state = jax.eval_shape(optimizer.init, variables['params'])

  start = time.perf_counter()
  compiled = (
    jax.jit(train_step_fn(model, optimizer), donate_argnums=(0, 1))
    .lower(variables, opt_state, images, labels)
    .compile()
  )
  seconds = time.perf_counter() - start
  return compiled.memory_analysis().temp_size_in_bytes / 2**20, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  depths = ['densenet121', 'densenet169', 'densenet201', 'densenet264']
  parser.add_argument('--models', nargs='+', choices=sorted(MODELS), default=depths)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--kernels', default='auto', help="comma-separated kernel sets, e.g. 'xla,cpu'")
  args = parser.parse_args()
  print(f'batch {args.batch}, {args.size}x{args.size}, fp32, backend {jax.default_backend()}')
  print('| model | kernels | dense layers | plain MiB | memory_efficient MiB | efficient / plain |')
  print('|---|---|---|---|---|---|')
  rows = []
  for name in args.models:
    for kernels in args.kernels.split(','):
      (plain, _), (efficient, _) = (
        train_step_memory(MODELS[name](memory_efficient=flag, kernels=kernels), args.batch, args.size)
        for flag in (False, True)
      )
      layers = sum(MODELS[name]().block_config)
      rows.append((name, kernels, layers, plain, efficient))
      print(
        f'| {name} | {kernels} | {layers} | {plain:.0f} | {efficient:.0f} | {efficient / plain:.3f} |',
        flush=True,
      )
  for kernels in args.kernels.split(','):
    runs = [row for row in rows if row[1] == kernels]
    if len(runs) > 1:
      (first, _, layers0, plain0, efficient0), (last, _, layers1, plain1, efficient1) = runs[0], runs[-1]
      print(
        f'{kernels}, {first} -> {last}: dense layers x{layers1 / layers0:.2f}, plain memory '
        f'x{plain1 / plain0:.2f}, memory_efficient x{efficient1 / efficient0:.2f}'
      )


if __name__ == '__main__':
  main()
