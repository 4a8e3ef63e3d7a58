"""XLA temp memory of one train step, with and without memory_efficient.

  python benchmarks/train_step_memory.py --model densenet121 --batch 16 --size 224

Compiles (does not run) forward + backward + a Nesterov SGD update with weight decay,
and reads `jax.jit(step).lower(...).compile().memory_analysis()`. Both variants are
measured in the same process on the same backend; the ratio is printed.
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


def train_step_memory(model: densenet_jax.DenseNet, batch: int, size: int) -> tuple[float, float]:
  """(temp MiB, compile seconds) of one SGD train step of `model`."""
  optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  opt_state = jax.eval_shape(optimizer.init, variables['params'])

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
    params = optax.apply_updates(variables['params'], param_updates)
    return {'params': params, **updates}, opt_state

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(variables, opt_state, images, labels).compile()
  seconds = time.perf_counter() - start
  return compiled.memory_analysis().temp_size_in_bytes / 2**20, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='densenet121')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=224)
  args = parser.parse_args()
  print(f'{args.model}, batch {args.batch}, {args.size}x{args.size}, fp32, backend {jax.default_backend()}')
  results = {}
  for efficient in (False, True):
    results[efficient] = train_step_memory(
      MODELS[args.model](memory_efficient=efficient), args.batch, args.size
    )
    mib, seconds = results[efficient]
    print(f'  memory_efficient={efficient!s:5}  temp {mib:8.1f} MiB  (compile {seconds:.1f} s)')
  print(f'  ratio efficient / plain: {results[True][0] / results[False][0]:.3f}')


if __name__ == '__main__':
  main()
