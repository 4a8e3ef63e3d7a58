"""Weights between torchvision's DenseNet state dicts and densenet-jax variables.

The map is explicit and total: every torchvision key has one place in the Flax
variables and back.

    torchvision key                                    Flax variable
    features.conv0.weight            (O, I, H, W)      params/conv0/kernel      (H, W, I, O)
    features.norm0.weight / .bias                      params/norm0/scale, bias
    features.norm0.running_mean / .running_var         batch_stats/norm0/mean, var
    features.norm0.num_batches_tracked                 (not kept; see to_torchvision)
    features.denseblock1.denselayer1.conv1.weight      params/denseblock1/denselayer1/conv1/kernel
    features.transition1.norm.weight                   params/transition1/norm/scale
    classifier.weight                (out, in)         params/classifier/kernel (in, out)

The weight files torchvision publishes use legacy names inside dense layers
(`denselayer1.norm.1.weight`, `conv.2.weight`); they load too.

A running variance crosses unchanged: both frameworks normalize by it in eval mode,
so eval logits agree. They differ only in how training updates it: PyTorch folds in
the unbiased batch variance (times n / (n - 1), n = batch * height * width), Flax the
biased one.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from densenet_jax.models import DenseNet
from densenet_jax.paths import as_path

# torchvision's own fix-up for its published files: 'denselayer1.norm.1.weight' -> 'norm1'.
_LEGACY_KEY = re.compile(
  r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$'
)
# Every key of a torchvision DenseNet, current style: the module path, then the leaf.
_KEY = re.compile(
  r'^(?:features\.(?P<module>conv[012]|norm[0125]|transition\d+\.(?:norm|conv)'
  r'|denseblock\d+\.denselayer\d+\.(?:norm|conv)[12])|(?P<classifier>classifier))'
  r'\.(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)$'
)
# (module kind, torch leaf) -> (Flax collection, Flax leaf); '' = consumed, not kept.
_LEAVES = {
  ('norm', 'weight'): ('params', 'scale'),
  ('norm', 'bias'): ('params', 'bias'),
  ('norm', 'running_mean'): ('batch_stats', 'mean'),
  ('norm', 'running_var'): ('batch_stats', 'var'),
  ('norm', 'num_batches_tracked'): ('', ''),
  ('conv', 'weight'): ('params', 'kernel'),
  ('classifier', 'weight'): ('params', 'kernel'),
  ('classifier', 'bias'): ('params', 'bias'),
}


class StateDictError(ValueError):
  """A state dict that does not fit: its message names the keys."""


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # A torch tensor; torch itself is never imported here.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _canonical_key(key: str) -> str:
  match = _LEGACY_KEY.match(key)
  return match.group(1) + match.group(2) if match else key


def _flax_location(key: str) -> tuple[str, tuple[str, ...]] | None:
  """(collection, path) of a current-style torchvision key; None if not a DenseNet key."""
  match = _KEY.match(key)
  if match is None:
    return None
  module = tuple((match['module'] or match['classifier']).split('.'))
  kind = re.sub(r'\d+$', '', module[-1])
  if (kind, match['leaf']) not in _LEAVES:
    return None  # E.g. a conv bias: torchvision's convs have none.
  collection, leaf = _LEAVES[kind, match['leaf']]
  return collection, module + (leaf,)


def _torch_to_flax_array(array: np.ndarray, is_kernel: bool) -> np.ndarray:
  if is_kernel and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if is_kernel and array.ndim == 2:
    return array.T  # (out, in) -> (in, out)
  return array


def _list(keys, limit: int = 8) -> str:
  keys = sorted(keys)
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def from_torchvision(
  state_dict: Mapping[str, Any] | str | os.PathLike, model: DenseNet | None = None
) -> dict:
  """Converts a torchvision DenseNet state dict to Flax variables.

  Args:
    state_dict: key -> array (torch tensors or numpy arrays), with torchvision's
      current keys or the legacy keys of its published weight files; or the path of a
      `.safetensors` file (read without torch) or a `.pth` file (needs torch).
    model: if given, the variables are checked against it: every key it needs must be
      present with the right shape, and no key may be left over.

  Returns:
    `{'params': ..., 'batch_stats': ...}`, numpy arrays, ready for `model.apply`.

  Raises:
    StateDictError (a ValueError): a key that is not a DenseNet key, or (with
      `model`) a missing, left-over or wrongly shaped one. The message names them.
  """
  if isinstance(state_dict, str | os.PathLike):
    state_dict = load_state_dict(state_dict)
  flat = {}
  foreign = []
  for key, value in state_dict.items():
    location = _flax_location(_canonical_key(key))
    if location is None:
      foreign.append(key)
      continue
    collection, path = location
    if collection:
      flat[(collection,) + path] = _torch_to_flax_array(_to_numpy(value), path[-1] == 'kernel')
  if foreign:
    hint = ''
    if all(k.startswith('module.') for k in foreign):
      hint = " They carry DataParallel's 'module.' prefix: strip it first."
    raise StateDictError(
      f'Not a torchvision DenseNet state dict: {len(foreign)} of {len(state_dict)} keys '
      f'are not DenseNet keys: {_list(foreign)}.{hint} Pass the state dict of a '
      'torchvision.models.DenseNet (e.g. densenet121().state_dict()).'
    )
  variables = traverse_util.unflatten_dict(flat)
  if model is not None:
    _check_against_model(variables, model)
  return variables


def expected_variable_shapes(model: DenseNet, in_channels: int = 3) -> dict:
  """The variable shapes `model` creates for `in_channels`-channel input (no compute)."""
  size = model.min_input_size()
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, in_channels)), train=False)
  )
  return jax.tree.map(lambda s: tuple(s.shape), shapes)


def _check_against_model(variables: dict, model: DenseNet) -> None:
  conv0 = variables.get('params', {}).get('conv0', {}).get('kernel')
  in_channels = conv0.shape[2] if conv0 is not None else 3
  expected = traverse_util.flatten_dict(expected_variable_shapes(model, in_channels), sep='/')
  got = {k: v.shape for k, v in traverse_util.flatten_dict(variables, sep='/').items()}
  missing = expected.keys() - got.keys()
  unexpected = got.keys() - expected.keys()
  wrong = [
    f'{to_torch_keys([k])[0]} {_torch_shape(k, got[k])} (model: {_torch_shape(k, expected[k])})'
    for k in expected.keys() & got.keys()
    if got[k] != expected[k]
  ]
  if not (missing or unexpected or wrong):
    return
  problems = []
  if missing:
    problems.append(f'missing for this model: {_list(to_torch_keys(missing))}')
  if unexpected:
    problems.append(f'not in this model: {_list(to_torch_keys(unexpected))}')
  if wrong:
    problems.append(f'wrong shape: {_list(wrong)}')
  try:
    fits = f'It fits DenseNet({_kwargs(config_from_variables(variables))}): choose that model. '
  except (KeyError, ValueError):
    fits = 'Is it the state dict of another preset, or truncated? Choose the model it was saved from. '
  raise StateDictError(
    f'The state dict does not fit the chosen model DenseNet({_kwargs(_config_of(model))}). '
    + fits
    + '; '.join(problems)
    + '.'
  )


_CONFIG_FIELDS = ('growth_rate', 'block_config', 'num_init_features', 'bn_size', 'num_classes')


def _config_of(model: DenseNet) -> dict:
  return {name: getattr(model, name) for name in _CONFIG_FIELDS}


def _kwargs(config: dict) -> str:
  return ', '.join(f'{k}={v!r}' for k, v in config.items())


def config_from_variables(variables: dict) -> dict:
  """The DenseNet(**kwargs) that `variables` (e.g. `from_torchvision(sd)`) were made by.

  Reads growth rate, block sizes, stem width, bottleneck size and class count from the
  shapes, so that a state dict of unknown preset can be loaded:
  `DenseNet(**config_from_variables(v))`. Handles torchvision's (ImageNet-stem) layout and timm's
  deep stem.
  """
  params = variables['params']
  blocks = sorted((k for k in params if k.startswith('denseblock')), key=lambda k: int(k[10:]))
  if not blocks:
    raise ValueError('no dense blocks in the variables')
  first = params[blocks[0]]['denselayer1']
  growth_rate = first['conv2']['kernel'].shape[3]
  deep = 'conv2' in params  # timm's deep stem: conv0, conv1, conv2 before the pool
  config = {
    'growth_rate': growth_rate,
    'block_config': tuple(len(params[b]) for b in blocks),
    'num_init_features': params['conv2' if deep else 'conv0']['kernel'].shape[3],
    'bn_size': first['conv1']['kernel'].shape[3] // growth_rate,
    'num_classes': params['classifier']['kernel'].shape[1],
  }
  if deep:  # (Whether it blurs its pool, weights cannot say: blur pooling has none.)
    config['stem'] = 'deep'
  return config


def _torch_shape(flax_path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_path.endswith('kernel') and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
  if flax_path.endswith('kernel') and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def to_torch_keys(flax_paths) -> list[str]:
  """torchvision keys of Flax variable paths ('params/norm0/scale' -> 'features.norm0.weight')."""
  names = {
    'scale': 'weight',
    'bias': 'bias',
    'kernel': 'weight',
    'mean': 'running_mean',
    'var': 'running_var',
  }
  keys = []
  for path in flax_paths:
    _, *module, leaf = path.split('/')
    prefix = 'classifier' if module == ['classifier'] else 'features.' + '.'.join(module)
    keys.append(f'{prefix}.{names[leaf]}')
  return keys


def to_torchvision(variables: Mapping[str, Any], num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """Converts Flax variables to a torchvision DenseNet state dict (numpy arrays).

  `torchvision.models.densenet121().load_state_dict({k: torch.from_numpy(v) ...},
  strict=True)` accepts the result of a DenseNet-121's variables.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` of a `DenseNet`. Without
      `batch_stats` (e.g. gradients) only the parameters are converted.
    num_batches_tracked: the value of every BatchNorm's `num_batches_tracked`
      buffer (Flax does not count batches; torch uses it only with momentum=None).

  Returns:
    torchvision key -> float32 (int64 for `num_batches_tracked`) numpy array.
  """
  state_dict = {}
  params = traverse_util.flatten_dict(variables['params'])
  stats = traverse_util.flatten_dict(variables.get('batch_stats', {}))
  for path, value in params.items():
    *module, leaf = path
    prefix = 'classifier' if module == ['classifier'] else 'features.' + '.'.join(module)
    # Copies, C-contiguous in torch's layout: `torch.from_numpy` takes them as they are (a view
    # of a JAX array is read-only, and torch warns), and they share no memory with `variables`.
    array = np.array(value, np.float32)
    if leaf == 'kernel':
      state_dict[f'{prefix}.weight'] = np.ascontiguousarray(
        array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
      )
    elif leaf == 'scale':
      state_dict[f'{prefix}.weight'] = array
    else:
      state_dict[f'{prefix}.bias'] = array
    if leaf == 'scale' and stats:
      state_dict[f'{prefix}.running_mean'] = np.array(stats[(*module, 'mean')], np.float32)
      state_dict[f'{prefix}.running_var'] = np.array(stats[(*module, 'var')], np.float32)
      state_dict[f'{prefix}.num_batches_tracked'] = np.array(num_batches_tracked, np.int64)
  return state_dict


def import_torch():
  """torch, or a SystemExit naming the install command (torch is optional: only .pth files need it)."""
  try:
    import torch
  except ImportError as error:
    raise SystemExit(
      'error: reading and writing .pth files needs PyTorch: pip install "densenet-jax[torch]"'
    ) from error
  return torch


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict in a .pth file, as numpy arrays (a {'state_dict': ...} wrapper is opened)."""
  torch = import_torch()
  with as_path(path).open('rb') as f:
    state_dict = torch.load(f, map_location='cpu', weights_only=True)
  if isinstance(state_dict, dict) and isinstance(state_dict.get('state_dict'), dict):
    state_dict = state_dict['state_dict']
  return {key: value.detach().cpu().numpy() for key, value in state_dict.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torchvision-layout state dict from a file: `.safetensors` without torch, `.pth` with it."""
  path = as_path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load

    return load(path.read_bytes())
  if path.suffix in ('.pth', '.pt', '.bin'):
    return load_pth(path)
  raise StateDictError(f'{path}: a state dict file must end in .safetensors (no torch needed) or .pth.')
