"""PyTorch's `ReduceLROnPlateau`, evaluation by evaluation, as a scale of the optimizer's updates.

`optax.contrib.reduce_on_plateau` reduces once `patience` evaluations have not improved, PyTorch
only when more than `patience` have; it also has no 'max' mode, no absolute threshold and no
absolute `min_lr`. A PyTorch recipe's learning rates need PyTorch's rule, so this is its `step`,
line for line, in Python floats on the host (once per evaluation; PyTorch compares in float64 too).
The state lives in the optimizer state, so a checkpoint carries it and a resumed run goes on exactly.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class PlateauState(NamedTuple):
  """The scheduler's state, in the optimizer state (float32 and int32 scalars, so checkpointable)."""

  scale: jax.Array  # The learning rate is the schedule's times this.
  best: jax.Array  # The best metric so far (+inf in 'min' mode, -inf in 'max' mode before the first).
  num_bad_evaluations: jax.Array
  cooldown_counter: jax.Array


@dataclasses.dataclass(frozen=True)
class ReduceLROnPlateau:
  """`torch.optim.lr_scheduler.ReduceLROnPlateau` with its arguments and defaults.

  Attributes:
    learning_rate: the learning rate the scale multiplies (the schedule's after its warmup); `min_lr`
      and `eps` are in its units, as PyTorch's are in the param group's.
    mode: 'min' (a loss) or 'max' (an accuracy).
    factor: the learning rate's multiplier at a reduction (< 1).
    patience: evaluations without improvement that are tolerated; the next one reduces.
    threshold: how much better a metric must be to count as an improvement.
    threshold_mode: 'rel' (better than best x (1 -/+ threshold)) or 'abs' (than best -/+ threshold).
    cooldown: evaluations after a reduction during which bad evaluations are not counted.
    min_lr: the learning rate never goes below this.
    eps: a reduction smaller than this is not made.
  """

  learning_rate: float
  mode: str = 'min'
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  threshold_mode: str = 'rel'
  cooldown: int = 0
  min_lr: float = 0.0
  eps: float = 1e-8

  def init(self) -> PlateauState:
    """The state before the first evaluation."""
    return PlateauState(
      scale=jnp.ones((), jnp.float32),
      best=jnp.asarray(math.inf if self.mode == 'min' else -math.inf, jnp.float32),
      num_bad_evaluations=jnp.zeros((), jnp.int32),
      cooldown_counter=jnp.zeros((), jnp.int32),
    )

  def scale_updates(self) -> optax.GradientTransformation:
    """Multiplies the updates by the state's scale, which only `step` changes."""

    def update(updates, state, params=None):
      del params
      return jax.tree.map(lambda u: (state.scale * u).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: self.init(), update)

  def is_better(self, current: float, best: float) -> bool:
    """PyTorch's `ReduceLROnPlateau.is_better`."""
    if self.mode == 'min' and self.threshold_mode == 'rel':
      return current < best * (1.0 - self.threshold)
    if self.mode == 'min':
      return current < best - self.threshold
    if self.threshold_mode == 'rel':
      return current > best * (self.threshold + 1.0)
    return current > best + self.threshold

  def step(self, state: PlateauState, metric: float) -> PlateauState:
    """The state after one evaluation's `metric` (host values in, numpy scalars out).

    PyTorch's `ReduceLROnPlateau.step(metrics)`. The metric is taken as float32, as a PyTorch
    user's `loss.item()` of a float32 tensor is, so that `best` is stored without rounding.
    """
    current = float(np.float32(metric))
    best = float(state.best)
    num_bad = int(state.num_bad_evaluations)
    cooldown_counter = int(state.cooldown_counter)
    scale = np.float32(state.scale)
    if self.is_better(current, best):
      best, num_bad = current, 0
    else:
      num_bad += 1
    if cooldown_counter > 0:  # PyTorch's in_cooldown: bad evaluations in the cooldown don't count.
      cooldown_counter -= 1
      num_bad = 0
    if num_bad > self.patience:
      old_lr = self.learning_rate * float(scale)
      new_lr = max(old_lr * self.factor, self.min_lr)
      if old_lr - new_lr > self.eps:
        scale = np.float32(new_lr / self.learning_rate)
      cooldown_counter, num_bad = self.cooldown, 0
    return PlateauState(
      scale=np.float32(scale),
      best=np.float32(best),
      num_bad_evaluations=np.int32(num_bad),
      cooldown_counter=np.int32(cooldown_counter),
    )


def is_plateau_state(x: Any) -> bool:
  return isinstance(x, PlateauState)


def find_state(opt_state: Any) -> PlateauState | None:
  """The plateau state inside `opt_state` (under chains, multi-transforms, MultiSteps), or None."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_plateau_state) if is_plateau_state(x)]
  return found[0] if found else None


def replace_state(opt_state: Any, new: PlateauState) -> Any:
  """`opt_state` with its plateau state replaced by `new`."""
  return jax.tree.map(lambda x: new if is_plateau_state(x) else x, opt_state, is_leaf=is_plateau_state)
