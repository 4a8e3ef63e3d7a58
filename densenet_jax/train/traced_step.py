"""The train step jitted over the mesh, its trace kept between runs (`jax.export`) where it can be."""

import hashlib
import importlib.metadata
import os
import pathlib
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import ml_collections
from absl import logging
from jax import export
from jax.sharding import NamedSharding

from densenet_jax.train.steps import TrainState, eval_step, train_step


def jit_train_step(
  config: ml_collections.ConfigDict,
  replicated: NamedSharding,
  data_sharding: NamedSharding,
  key_parts: tuple[Any, ...] = (),
) -> Callable[[TrainState, dict[str, jax.Array]], TrainState]:
  """`train_step` jitted over the mesh, the state donated: what `train_and_evaluate` runs.

  With `config.keep_traced_step` and `config.compilation_cache_dir` set, in a single process,
  the traced step is kept there too (`jax.export`), so that a restart loads it instead of tracing
  the model again, and gets the compiled code from XLA's cache: on CPU a DenseNet-121 step is
  ready in about 2 s instead of 3 (docs/performance.md). Opt-in: on TPU and GPU it is unmeasured.
  `key_parts` are what else the step depends on (e.g. the data's size, which sets the learning
  rate schedule); see `TracedStep`.
  """
  step = partial(
    train_step,
    dropout_key=jax.random.key(config.seed + 1),
    label_smoothing=config.label_smoothing,
    freeze_backbone=config.freeze_backbone,
    ema_decay=config.ema_decay,
    grad_accum_steps=config.grad_accum_steps,
    mixup_alpha=config.mixup_alpha,
    cutmix_alpha=config.cutmix_alpha,
    pixel_mean=tuple(config.mean),
    pixel_std=tuple(config.std),
  )
  if not (config.keep_traced_step and config.compilation_cache_dir) or jax.process_count() > 1:
    return jax.jit(step, in_shardings=(replicated, data_sharding), out_shardings=replicated, donate_argnums=0)
  directory = pathlib.Path(os.path.expanduser(config.compilation_cache_dir)) / 'traced_steps'
  return TracedStep(step, replicated, data_sharding, directory, (config.to_json_best_effort(), *key_parts))


def jit_eval_step(
  config: ml_collections.ConfigDict, replicated: NamedSharding, data_sharding: NamedSharding
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """`eval_step` jitted over the mesh for the input pipeline's batches (uint8, normalised in the step)."""
  step = partial(eval_step, pixel_mean=tuple(config.mean), pixel_std=tuple(config.std))
  return jax.jit(step, in_shardings=(replicated, data_sharding), out_shardings=replicated)


class TracedStep:
  """A train step, jitted, whose trace is kept on disk between runs (`jax.export`).

  Called as the jitted step, `(state, batch) -> state`. The trace is found again only under the
  same key: a hash of `key_parts`, the arguments' shapes, dtypes and shardings, the source of
  this package (every module, `ops` included), the versions of JAX, jaxlib, Flax and optax, and
  JAX's settings. Anything else the step depends on must be in `key_parts`. An unreadable file is
  traced again and replaced.
  """

  def __init__(self, step, replicated, data_sharding, directory: pathlib.Path, key_parts: tuple[Any, ...]):
    self._step = step
    self._shardings = (replicated, data_sharding)
    self._directory = directory
    self._key_parts = key_parts
    self._call = None
    self._treedef = None

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]) -> TrainState:
    if self._call is None:
      self._prepare(state, batch)
    return jax.tree.unflatten(self._treedef, self._call(*jax.tree.leaves((state, batch))))

  def lower(self, state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
    """Loads or traces the step for arguments like these (abstract ones will do) and lowers it."""
    self._prepare(state, batch)
    return self._call.lower(*jax.tree.leaves((state, batch)))

  def _prepare(self, state, batch) -> None:
    leaves, treedef = jax.tree.flatten((state, batch))
    state_leaves = len(jax.tree.leaves(state))
    shardings = [self._shardings[0]] * state_leaves + [self._shardings[1]] * (len(leaves) - state_leaves)
    avals = [
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings, strict=True)
    ]
    path = self._directory / f'train_step-{self._key(avals)}.jax_exported'
    exported = None
    if path.exists():
      try:
        exported = export.deserialize(bytearray(path.read_bytes()))
      except Exception as error:  # noqa: BLE001  (any unreadable file is traced again)
        logging.warning('Tracing the train step again: %s could not be read (%s).', path, error)
    if exported is None:
      step = self._step

      def flat_step(*leaves):
        return jax.tree.leaves(step(*jax.tree.unflatten(treedef, leaves)))

      traced = jax.jit(flat_step, in_shardings=tuple(shardings), out_shardings=self._shardings[0])
      exported = export.export(traced)(*avals)
      try:
        self._directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f'.{os.getpid()}.tmp')
        temporary.write_bytes(exported.serialize())
        temporary.replace(path)  # Atomic: a reader sees the whole file or none.
      except OSError as error:  # Not kept: the next run traces again, this one goes on.
        logging.warning('The traced train step could not be kept in %s (%s).', self._directory, error)
    self._treedef = jax.tree.structure(state)
    self._call = jax.jit(
      exported.call,
      in_shardings=tuple(shardings),
      out_shardings=self._shardings[0],
      donate_argnums=tuple(range(state_leaves)),
    )

  def _key(self, avals) -> str:
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).parents[1]  # densenet_jax: the library and the trainer
    for source in sorted(package.rglob('*.py')):
      digest.update(str(source.relative_to(package)).encode() + source.read_bytes())
    versions = [importlib.metadata.version(name) for name in ('jax', 'jaxlib', 'flax', 'optax')]
    devices = [(device.platform, device.device_kind) for device in jax.devices()]
    settings = sorted(
      (name, value)
      for name, value in jax.config.values.items()
      if isinstance(value, bool | int | float | str | type(None))
    )
    for part in (
      *self._key_parts,
      versions,
      devices,
      settings,
      [(a.shape, str(a.dtype), str(a.sharding)) for a in avals],
    ):
      digest.update(repr(part).encode())
    return digest.hexdigest()[:32]
