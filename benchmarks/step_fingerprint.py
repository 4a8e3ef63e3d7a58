"""A fingerprint of the compiled train and eval steps of a config: equal fingerprints, equal programs.

Compares what XLA runs across two revisions, e.g. to show that a change leaves the default path as it
was. Instruction names, numbering and source locations are left out of the fingerprint:

  python benchmarks/step_fingerprint.py                       # this tree
  git worktree add /tmp/before REV && (cd /tmp/before && python $OLDPWD/benchmarks/step_fingerprint.py)

Run from the root of the tree to fingerprint (its `densenet_jax` and `configs` are imported).
"""

import argparse
import hashlib
import importlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, '.')


def normalized(hlo: str) -> str:
  """The HLO text without names, numbering, metadata and the stack-frame tables."""
  hlo = re.sub(r', metadata=\{[^}]*\}', '', hlo)
  hlo = re.sub(r'stack_frame_id=\d+', '', hlo)
  lines = [line for line in hlo.splitlines() if not re.match(r'^\d+ (\{|")', line)]
  return re.sub(r'%?[A-Za-z_][\w-]*\.\d+(\.\d+)*', 'N', '\n'.join(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='digits', help='a module of configs/')
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--channels', type=int, default=1)
  args = parser.parse_args()
  from densenet_jax.train import registry, steps
  from densenet_jax.train.traced_step import jit_train_step

  config = importlib.import_module(f'configs.{args.config}').get_config()
  model = registry.create_model(config, args.num_classes)
  tx = registry.create_optimizer(config, registry.learning_rate_schedule(config, 10, 100))
  size = config.image_size

  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state = jax.eval_shape(lambda: steps.create_train_state(model, tx, (1, size, size, args.channels)))
  batch = {
    'image': jax.ShapeDtypeStruct((config.batch_size, size, size, args.channels), jnp.float32),
    'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
  }
  train = jit_train_step(config, replicated, data).lower(state, batch).compile().as_text()
  evaluate = jax.jit(steps.eval_step).lower(state, {**batch, 'mask': batch['label']}).compile().as_text()
  for name, hlo in (('train step', train), ('eval step', evaluate)):
    print(f'{args.config} {name}: {hashlib.sha256(normalized(hlo).encode()).hexdigest()[:16]}')


if __name__ == '__main__':
  main()
