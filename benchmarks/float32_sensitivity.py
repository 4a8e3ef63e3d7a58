"""How much does this training amplify a tiny change? (Why 8 devices cannot match 1 in float32.)

Trains the digits config twice on one device from the same batches, the second time with
every initial parameter multiplied by (1 + 1e-7 x N(0, 1)), about float32's rounding, and prints
the relative difference of the two losses at each step:

  python benchmarks/float32_sensitivity.py --data_dir /tmp/tfds --steps 20
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parents[1]))
from configs import digits  # noqa: E402
from densenet_jax.train import input_pipeline, setup, steps  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--perturbation', type=float, default=1e-7)
  args = parser.parse_args()
  config = digits.get_config()
  config.data_dir = args.data_dir
  s = setup.setup(config, '/tmp/unused')
  step = jax.jit(partial(steps.train_step, dropout_key=jax.random.key(1), label_smoothing=0.0))
  reference = s.create_state()
  noise_keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(reference.params))))
  perturbed = reference.replace(
    params=jax.tree.map(
      lambda p: p * (1 + args.perturbation * jax.random.normal(next(noise_keys), p.shape)), reference.params
    )
  )
  batches = input_pipeline.train_iterator(config, s.builder, s.spec, 0, 0, 1, end_step=args.steps)
  for index, batch in enumerate(batches):
    losses = []
    for name, state in (('reference', reference), ('perturbed', perturbed)):
      state = step(state, batch)
      losses.append(float(state.train_metrics['loss_sum']))
      state = state.replace(train_metrics=steps.zero_train_metrics())
      reference, perturbed = (state, perturbed) if name == 'reference' else (reference, state)
    print(
      f'step {index + 1:3d}: loss {losses[0]:.6f}, '
      f'relative change {abs(losses[1] - losses[0]) / losses[0]:.2e}'
    )


if __name__ == '__main__':
  main()
