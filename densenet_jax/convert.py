"""Convert torchvision DenseNet weights (.pth) to an orbax checkpoint and back.

  python -m densenet_jax.convert to-jax densenet121-a639ec97.pth /ckpt/densenet121
  python -m densenet_jax.convert to-torch /ckpt/densenet121 densenet121_back.pth
  python -m densenet_jax.convert to-torch --ema WORKDIR/checkpoints/STEP ema.pth  # a run's EMA weights

The checkpoint directory holds `variables` ({'params', 'batch_stats'}, orbax
StandardSave) and `model_config` (JSON: the `DenseNet` keyword arguments), so
`load_checkpoint` (and `train.py`'s `config.init_from`) rebuilds the model without
being told the preset. Needs torch (`pip install 'densenet-jax[torch]'`) for .pth files.
"""

import argparse
import os
import sys
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from densenet_jax.models import DenseNet
from densenet_jax.paths import as_path
from densenet_jax.torchvision_port import (
  StateDictError,
  config_from_variables,
  from_torchvision,
  import_torch,
  load_pth,
  to_torchvision,
)


def model_config(model: DenseNet) -> dict[str, Any]:
  """The `DenseNet` keyword arguments that fix the variables' shapes (saved beside them)."""
  names = (
    'growth_rate',
    'block_config',
    'num_init_features',
    'bn_size',
    'compression',
    'num_classes',
    'stem',
    'blur_pool',
  )
  return {name: getattr(model, name) for name in names}


def save_checkpoint(directory: str | os.PathLike, model: DenseNet, variables: dict) -> epath.Path:
  """Writes `variables` and `model`'s configuration as an orbax checkpoint; never overwrites."""
  directory = as_path(directory)
  if directory.exists():
    raise FileExistsError(f'{directory} exists; choose a new directory (nothing was overwritten).')
  config = model_config(model)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
      directory,
      args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), model_config=ocp.args.JsonSave(config)
      ),
    )
  return directory


def load_checkpoint(
  directory: str | os.PathLike, *, ema: bool = False, **model_kwargs: Any
) -> tuple[DenseNet, dict]:
  """(model, variables) from a `save_checkpoint` directory or a training checkpoint.

  A training checkpoint is one step of train.py's WORKDIR/checkpoints (e.g.
  WORKDIR/checkpoints/660): its `state` holds params and batch_stats beside the optimizer
  state, and with config.ema_decay their moving average, which `ema` selects. `model_kwargs` add
  e.g. dtype.
  """
  directory = as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} is not a checkpoint directory.')
  is_training_checkpoint = (directory / 'state').is_dir()
  item = 'state' if is_training_checkpoint else 'variables'
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
      directory,
      args=ocp.args.Composite(**{item: ocp.args.StandardRestore(), 'model_config': ocp.args.JsonRestore()}),
    )
  config = dict(restored.model_config)
  config['block_config'] = tuple(config['block_config'])
  variables = restored[item]
  if ema:
    if not (is_training_checkpoint and variables.get('ema')):
      raise FileNotFoundError(
        f'{directory} holds no EMA weights: they are in the checkpoints of runs with config.ema_decay > 0; '
        'drop --ema to use the weights.'
      )
    variables = variables['ema']
  if is_training_checkpoint or ema:
    variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return DenseNet(**config, **model_kwargs), variables


def pth_to_checkpoint(pth: str | os.PathLike, directory: str | os.PathLike) -> DenseNet:
  """Converts a torchvision .pth to a checkpoint; returns the model it fits."""
  state_dict = load_pth(pth)
  model = DenseNet(**config_from_variables(from_torchvision(state_dict)))
  variables = from_torchvision(state_dict, model)  # Checks every key and shape against it.
  save_checkpoint(directory, model, variables)
  return model


def checkpoint_to_pth(directory: str | os.PathLike, pth: str | os.PathLike, ema: bool = False) -> None:
  """Writes a checkpoint's variables (or its EMA's) as a torchvision state dict (.pth); never overwrites."""
  torch = import_torch()
  pth = as_path(pth)
  if pth.exists():
    raise FileExistsError(f'{pth} exists; choose a new file name (nothing was overwritten).')
  _, variables = load_checkpoint(directory, ema=ema)
  with pth.open('wb') as f:
    torch.save({k: torch.from_numpy(v) for k, v in to_torchvision(variables).items()}, f)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m densenet_jax.convert', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  to_jax = commands.add_parser('to-jax', help='torchvision .pth -> orbax checkpoint directory')
  to_jax.add_argument('pth')
  to_jax.add_argument('checkpoint_dir')
  to_torch = commands.add_parser('to-torch', help='orbax checkpoint directory -> torchvision .pth')
  to_torch.add_argument('checkpoint_dir')
  to_torch.add_argument('pth')
  to_torch.add_argument(
    '--ema', action='store_true', help="a training checkpoint's EMA weights (config.ema_decay)"
  )
  args = parser.parse_args(argv)
  try:
    if args.command == 'to-jax':
      model = pth_to_checkpoint(args.pth, args.checkpoint_dir)
      print(
        f'wrote {as_path(args.checkpoint_dir)} (growth_rate={model.growth_rate}, '
        f'block_config={model.block_config}, num_classes={model.num_classes})'
      )
    else:
      checkpoint_to_pth(args.checkpoint_dir, args.pth, ema=args.ema)
      print(f'wrote {args.pth}')
  except (StateDictError, FileExistsError, FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
