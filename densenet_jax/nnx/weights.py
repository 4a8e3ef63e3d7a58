"""NNX DenseNets from Linen variables, torchvision state dicts and pretrained weights, and back."""

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from densenet_jax import models, torchvision_port, weights
from densenet_jax.nnx.models import DenseNet, _config, _linen_to_nnx_tree, to_linen


def from_linen(
  module: models.DenseNet,
  variables: Mapping[str, Any],
  *,
  use_running_average: bool = False,
  rngs: nnx.Rngs | None = None,
) -> DenseNet:
  """The NNX `DenseNet` of a Linen `DenseNet` and its variables (a checkpoint, pretrained weights).

  Args:
    module: the Linen model.
    variables: its `{'params', 'batch_stats'}`, every one there with its shape (checked).
    use_running_average: the mode the model starts in (`deterministic` follows it); False is
      training mode, as for a freshly built NNX model.
    rngs: the dropout stream's seed, with `drop_rate > 0` (default `nnx.Rngs(0)`).

  Returns:
    The NNX model holding the variables.
  """
  params = variables['params']
  in_features = params['conv0']['kernel'].shape[2]

  def build():
    return DenseNet(
      **_config(module),
      in_features=in_features,
      use_running_average=use_running_average,
      deterministic=use_running_average,
      rngs=rngs or nnx.Rngs(0),
    )

  model = nnx.eval_shape(build)  # Shapes only: the values come from `variables`.
  load_linen_variables(model, variables)
  if module.drop_rate > 0:
    model.rngs = (rngs or nnx.Rngs(0))['dropout'].fork()
  return model


def load_linen_variables(model: DenseNet, variables: Mapping[str, Any]) -> None:
  """Puts Linen `{'params', 'batch_stats'}` into `model`, in place; every variable must fit its shape."""
  for collection, kind in (('params', nnx.Param), ('batch_stats', nnx.BatchStat)):
    state = nnx.state(model, kind)
    expected = nnx.to_pure_dict(state)
    given = _linen_to_nnx_tree(variables[collection])
    expected_paths = {jax.tree_util.keystr(p): jnp.shape(v) for p, v in jax.tree.leaves_with_path(expected)}
    given_paths = {jax.tree_util.keystr(p): jnp.shape(v) for p, v in jax.tree.leaves_with_path(given)}
    missing = sorted(set(expected_paths) - set(given_paths))
    unexpected = sorted(set(given_paths) - set(expected_paths))
    wrong = sorted(
      p for p in expected_paths.keys() & given_paths.keys() if expected_paths[p] != given_paths[p]
    )
    if missing or unexpected or wrong:
      problems = [
        f'{name} {paths[:3]}{" ..." if len(paths) > 3 else ""}'
        for name, paths in (('missing', missing), ('unexpected', unexpected), ('of another shape', wrong))
        if paths
      ]
      raise torchvision_port.StateDictError(
        f'{collection} do not fit this NNX DenseNet: {"; ".join(problems)}. Build the model with the '
        'configuration the variables come from (densenet_jax.config_from_variables reads it).'
      )
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, given))
    nnx.update(model, state)


def from_torchvision(
  state_dict: Mapping[str, Any] | str | os.PathLike, model: DenseNet | None = None, **model_kwargs: Any
) -> DenseNet:
  """An NNX DenseNet holding a torchvision (or timm) DenseNet state dict.

  Args:
    state_dict: as `densenet_jax.from_torchvision`'s (a dict of tensors or arrays, or a
      `.safetensors` / `.pth` file).
    model: load into this model, in place (every key and shape checked); None builds the model the
      state dict fits (`densenet_jax.config_from_variables`).
    **model_kwargs: without `model`, other `DenseNet` attributes (`dtype`, `kernels`, `blur_pool`
      for timm's densenetblur121d, ...).

  Returns:
    The model.
  """
  if model is not None:
    module, _ = to_linen(model)
    load_linen_variables(model, torchvision_port.from_torchvision(state_dict, module))
    return model
  variables = torchvision_port.from_torchvision(state_dict)
  module = models.DenseNet(**torchvision_port.config_from_variables(variables), **model_kwargs)
  return from_linen(module, torchvision_port.from_torchvision(state_dict, module))


def to_torchvision(model: DenseNet, num_batches_tracked: int = 0) -> dict[str, Any]:
  """torchvision's state dict (numpy arrays) of an NNX DenseNet; see `densenet_jax.to_torchvision`."""
  return torchvision_port.to_torchvision(to_linen(model)[1], num_batches_tracked)


def pretrained(name: str = 'densenet121', *, rngs: nnx.Rngs | None = None, **kwargs: Any) -> DenseNet:
  """An NNX DenseNet with pretrained weights; see `densenet_jax.pretrained` (torch-free, cached).

  Args:
    name: a key of `densenet_jax.PRETRAINED` or 'hf-hub:OWNER/REPO'.
    rngs: the dropout stream's seed, with `drop_rate > 0`.
    **kwargs: as `densenet_jax.pretrained`'s (`num_classes`, `revision`, `cache_dir`, `seed`, model
      attributes).

  Returns:
    The model, in training mode as any new NNX model (`model.eval()` to evaluate).
  """
  module, variables = weights.pretrained(name, **kwargs)
  return from_linen(module, variables, rngs=rngs)
