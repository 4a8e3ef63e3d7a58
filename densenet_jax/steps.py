"""The train and eval steps, and the train state they carry (params, BatchNorm state, running metrics)."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the running training metrics.

  `train_metrics` holds sums over the steps since the last report, and the first step with a
  non-finite loss or parameter (-1 if none): kept on device, checked when reporting or saving, and saved
  in checkpoints so that a resumed run reports what an uninterrupted one does.
  """

  batch_stats: Any
  train_metrics: dict[str, jax.Array]


def zero_train_metrics() -> dict[str, jax.Array]:
  return {
    'loss_sum': jnp.zeros((), jnp.float32),
    'top1_sum': jnp.zeros((), jnp.float32),
    'steps': jnp.zeros((), jnp.int32),
    'first_nonfinite_step': jnp.full((), -1, jnp.int32),
  }


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the `k` highest logits."""
  _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(
  state: TrainState, batch: dict[str, jax.Array], *, dropout_key: jax.Array, label_smoothing: float
) -> TrainState:
  """One SGD step on the global batch; metrics accumulate in `state.train_metrics`."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.fold_in(dropout_key, state.step)},
    )
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, batch['label'], label_smoothing))
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = state.train_metrics
  # A non-finite loss, or an update that made a parameter non-finite, marks the step (cheap
  # next to the step itself), so that no such state is ever checkpointed. One reduction over all
  # parameters at once: a reduction per parameter shape cost ~4 s of XLA compile for DenseNet-121.
  all_params = jnp.concatenate([jnp.ravel(p) for p in jax.tree.leaves(state.params)])
  finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(all_params))
  return state.replace(
    train_metrics={
      'loss_sum': metrics['loss_sum'] + loss,
      'top1_sum': metrics['top1_sum'] + jnp.mean(top_k_correct(logits, batch['label'], 1)),
      'steps': metrics['steps'] + 1,
      'first_nonfinite_step': jnp.where(
        finite | (metrics['first_nonfinite_step'] >= 0), metrics['first_nonfinite_step'], state.step
      ),
    }
  )


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and the example count over the real (mask=1) examples."""
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  logits = logits.astype(jnp.float32)
  mask = batch['mask'].astype(jnp.float32)
  return {
    'loss': jnp.sum(cross_entropy(logits, batch['label'], 0.0) * mask),
    'top1': jnp.sum(top_k_correct(logits, batch['label'], 1) * mask),
    'top5': jnp.sum(top_k_correct(logits, batch['label'], 5) * mask),
    'count': jnp.sum(mask),
  }
