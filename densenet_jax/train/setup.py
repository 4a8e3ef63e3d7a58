"""What a run builds from its config before its first step: mesh, data spec, model, train state.

`setup` validates the config and builds everything `densenet_jax.train.loop` runs; `load_init_from`
puts `config.init_from`'s weights (pretrained, a state dict file or a checkpoint) into a fresh state.
"""

import dataclasses
import logging
import os
import pathlib
import tempfile
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from densenet_jax import convert, models, weights
from densenet_jax.paths import as_path, is_local
from densenet_jax.torchvision_port import StateDictError, from_torchvision
from densenet_jax.train import input_pipeline
from densenet_jax.train.registry import (
  ConfigError,
  create_model,
  create_optimizer,
  learning_rate_schedule,
  validate_config,
)
from densenet_jax.train.reporting import log
from densenet_jax.train.sharding import replicate, to_host
from densenet_jax.train.steps import TrainState, create_train_state


@dataclasses.dataclass
class Setup:
  """Everything `train_and_evaluate` and `evaluate` build from a config."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Mesh
  data_sharding: NamedSharding
  replicated: NamedSharding
  builder: Any
  spec: input_pipeline.DataSpec
  model: models.DenseNet
  total_steps: int
  schedule: optax.Schedule
  abstract_state: TrainState
  create_state: Callable[[], TrainState]


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Setup:
  """Validates the config and builds the mesh, data spec, model and (abstract) train state.

  `workdir` may be local or in an object store (gs://...): every file goes through `etils.epath`.
  """
  if config.per_device_batch_size:
    config = config.copy_and_resolve_references()
    config.batch_size = config.eval_batch_size = config.per_device_batch_size * jax.device_count()
  validate_config(config)
  workdir = as_path(workdir)
  check_workdir(workdir)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  data_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  shards = input_pipeline.num_data_shards(config, jax.process_count())
  builder = input_pipeline.get_builder(config, prepare=jax.process_count() == 1)
  spec = input_pipeline.data_spec(config, builder, shards)
  model = create_model(config, spec.num_classes)
  if config.image_size < model.min_input_size():
    raise ConfigError(
      f'config.image_size={config.image_size} is too small for {config.model}: it needs at least '
      f'{model.min_input_size()}x{model.min_input_size()} images.'
    )
  total_steps = config.total_steps or config.num_epochs * spec.steps_per_epoch
  # The schedule counts optimizer updates: one per grad_accum_steps steps.
  accumulation = config.grad_accum_steps
  schedule = learning_rate_schedule(config, spec.steps_per_epoch / accumulation, total_steps // accumulation)
  tx = create_optimizer(config, schedule)
  image_shape = (1, config.image_size, config.image_size, spec.channels)

  def init() -> TrainState:
    return with_ema(config, create_train_state(model, tx, image_shape, config.seed))

  abstract_state = jax.eval_shape(init)
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state
  )
  create_state = jax.jit(init, out_shardings=replicated)
  return Setup(
    config,
    workdir,
    mesh,
    data_sharding,
    replicated,
    builder,
    spec,
    model,
    total_steps,
    schedule,
    abstract_state,
    create_state,
  )


def check_workdir(workdir: epath.Path) -> None:
  """Fails before any data or model work if the run could not write `workdir`; writes nothing.

  Raises:
    ConfigError: a local workdir that is a file, is inside one or lies in a folder this user cannot
      write; an object-store workdir (gs://...) whose bucket does not exist or cannot be reached (no
      network, no credentials, forbidden).
  """
  if is_local(workdir):
    local = pathlib.Path(workdir)
    existing = next(path for path in (local, *local.parents) if path.exists())
    if not existing.is_dir():
      where = 'is a file' if existing == local else f'is inside {existing}, which is a file'
      raise ConfigError(
        f'--workdir={workdir} {where}: give a folder (a new one, or the workdir of a run to resume).'
      )
    try:  # Permission bits do not tell (root, read-only mounts, /proc): make a folder, remove it.
      os.rmdir(tempfile.mkdtemp(prefix='.densenet_jax_write_check_', dir=existing))
    except OSError as error:
      raise ConfigError(
        f'--workdir={workdir} cannot be written: {existing} refuses a new folder ({error.strerror}); give '
        'a folder this user can write.'
      ) from error
    return
  url = urllib.parse.urlsplit(os.fspath(workdir))
  logging.disable(logging.ERROR)  # A backend's own retry log (with tracebacks): the line below says it.
  try:
    bucket_exists = as_path(f'{url.scheme}://{url.netloc}').exists()
  except Exception as error:  # Each file-system backend raises its own (tf.errors, OSError, ...).
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    raise ConfigError(
      f'cannot reach the workdir {workdir} ({type(error).__name__}: {reason}); check the bucket name, '
      "the network and this machine's credentials (gcloud auth application-default login)."
    ) from error
  finally:
    logging.disable(logging.NOTSET)
  if not bucket_exists:
    raise ConfigError(
      f'--workdir={workdir}: there is no bucket {url.netloc!r} (or these credentials cannot see it); '
      f'fix the name or create it (gcloud storage buckets create {url.scheme}://{url.netloc}).'
    )


def with_ema(config: ml_collections.ConfigDict, state: TrainState) -> TrainState:
  """`state` whose EMA (with config.ema_decay) starts at its weights, as timm's ModelEmaV2."""
  if not config.ema_decay:
    return state
  return state.replace(ema=jax.tree.map(jnp.copy, {'params': state.params, 'batch_stats': state.batch_stats}))


def init_from_variables(init_from: str) -> tuple[str, dict]:
  """(what it is, variables) of `config.init_from`.

  It is a pretrained name ('densenet121', 'hf-hub:OWNER/REPO': `densenet_jax.pretrained`), a
  torchvision state dict file (.safetensors, or .pth with torch), or an Orbax checkpoint directory
  (`python -m densenet_jax.convert to-jax`, or a step of a training run's checkpoints).
  """
  if init_from in weights.PRETRAINED or init_from.startswith(weights.HUB_PREFIX):
    _, variables = weights.pretrained(init_from)
    return f'the pretrained {init_from} ({weights.repo_of(init_from)})', variables
  path = as_path(init_from)
  if not path.exists():
    raise ConfigError(
      f'config.init_from={init_from!r} is neither a pretrained name ({", ".join(weights.PRETRAINED)}, '
      "'hf-hub:OWNER/REPO') nor an existing state dict file or checkpoint directory."
    )
  if path.suffix in ('.safetensors', '.pth', '.pt', '.bin'):
    try:
      return str(path), from_torchvision(path)
    except StateDictError as error:  # Not a DenseNet's: say which setting named it.
      raise ConfigError(f'config.init_from={init_from!r}: {error}') from error
  return str(path), convert.load_checkpoint(path)[1]


def as_published(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the eval preprocessing `config.init_from`'s publisher measured its weights with.

  For mode=eval of a pretrained name (`densenet_jax.PRETRAINED`), with `config.eval_as_published`.
  """
  published = weights.PRETRAINED[config.init_from]
  config = config.copy_and_resolve_references()
  config.update(
    image_size=published.input_size,
    eval_preprocess='center_crop',
    eval_crop_fraction=published.crop_fraction,
    eval_interpolation=published.interpolation,
    mean=published.mean,
    std=published.std,
  )
  size = published.input_size
  log(
    f'Evaluating {config.init_from} as {published.source} did: {size}x{size}, a center crop of '
    f'{published.crop_fraction:g} of the resized short side, {published.interpolation} '
    f'(published: {published.top1:.3f}% top-1; config.eval_as_published=False evaluates as configured).'
  )
  return config


def load_init_from(s: Setup, state: TrainState) -> TrainState:
  """`state` with the params and batch_stats of `config.init_from` (see `init_from_variables`)."""
  path, variables = init_from_variables(s.config.init_from)
  ours = {'params': state.params, 'batch_stats': state.batch_stats}
  theirs_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  ours_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ours)}
  mismatched = [
    key
    for key in ours_flat
    if key not in theirs_flat or tuple(theirs_flat[key].shape) != ours_flat[key].shape
  ]
  extra = sorted(set(theirs_flat) - set(ours_flat))
  if extra or any('classifier' not in key for key in mismatched):
    problems = [k for k in mismatched if 'classifier' not in k] + extra
    raise ConfigError(
      f'config.init_from={s.config.init_from!r} does not fit config.model={s.config.model!r} '
      f'({len(problems)} variables differ, e.g. {", ".join(problems[:3])}); set config.model and '
      f"config.model_kwargs to the checkpoint's architecture."
    )
  if mismatched:
    log(f'init_from: the classifier of {path} has another class count; it is re-initialized.')
  loaded = {
    key: (ours_flat[key] if key in mismatched else np.asarray(theirs_flat[key], ours_flat[key].dtype))
    for key in ours_flat
  }
  treedef = jax.tree.structure(ours)
  leaves = [loaded[jax.tree_util.keystr(k)] for k, _ in jax.tree_util.tree_leaves_with_path(ours)]
  restored = replicate(
    jax.tree.map(
      lambda x: to_host(x) if isinstance(x, jax.Array) else x, jax.tree.unflatten(treedef, leaves)
    ),
    s.replicated,
  )
  log(f'Initialized from {path}.')
  state = state.replace(params=restored['params'], batch_stats=restored['batch_stats'])
  return jax.jit(partial(with_ema, s.config), out_shardings=s.replicated)(state)
