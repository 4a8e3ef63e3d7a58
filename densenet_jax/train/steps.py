"""The train and eval steps, and the train state they carry (params, BatchNorm state, running metrics)."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from densenet_jax.train import registry


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the running training metrics.

  `train_metrics` holds sums over the steps since the last report, and the first step with a
  non-finite loss or parameter (-1 if none): kept on device, checked when reporting or saving, and saved
  in checkpoints so that a resumed run reports what an uninterrupted one does.
  """

  batch_stats: Any
  train_metrics: dict[str, jax.Array]
  # With config.ema_decay: {'params', 'batch_stats'} averaged over the updates; {} without.
  ema: dict[str, Any] = struct.field(default_factory=dict)


def create_train_state(
  model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, ...], seed: int = 0
) -> TrainState:
  """A fresh train state: `model` initialized from `seed` for images of `image_shape` (NHWC)."""
  variables = model.init(jax.random.key(seed), jnp.zeros(image_shape, model.dtype), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    train_metrics=zero_train_metrics(),
    tx=tx,
  )


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
  return optax.softmax_cross_entropy(logits, smoothed_targets(labels, logits.shape[-1], label_smoothing))


def smoothed_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  targets = jax.nn.one_hot(labels, num_classes)
  return optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets


def mix_batch(
  key: jax.Array, images: jax.Array, targets: jax.Array, mixup_alpha: float, cutmix_alpha: float
) -> tuple[jax.Array, jax.Array]:
  """timm's batch-mode Mixup: each image mixed with the batch's reverse, the targets alike.

  Mixup blends whole images with a weight lam ~ Beta(mixup_alpha, mixup_alpha); CutMix pastes a box
  of area (1 - lam), lam ~ Beta(cutmix_alpha, cutmix_alpha), and lam becomes the uncovered share
  (the box clipped at the border). With both alphas, each batch uses one or the other, evenly.
  """
  choice_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 4)
  reversed_images, reversed_targets = jnp.flip(images, 0), jnp.flip(targets, 0)
  height, width = images.shape[1:3]

  def mixup():
    lam = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha)
    return (lam * images + (1 - lam) * reversed_images).astype(images.dtype), lam

  def cutmix():
    lam = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha)
    ratio = jnp.sqrt(1 - lam)
    center = jax.random.uniform(box_key, (2,)) * jnp.array([height, width])
    half = jnp.array([height, width]) * ratio / 2
    (top, left), (bottom, right) = (
      jnp.clip(jnp.round(center - half), 0, jnp.array([height, width])).astype(jnp.int32),
      jnp.clip(jnp.round(center + half), 0, jnp.array([height, width])).astype(jnp.int32),
    )
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = jnp.where(inside[None, :, :, None], reversed_images, images)
    return mixed, 1 - jnp.mean(inside.astype(jnp.float32))

  if mixup_alpha and cutmix_alpha:
    mixed, lam = jax.lax.cond(jax.random.bernoulli(choice_key), cutmix, mixup)
  else:
    mixed, lam = cutmix() if cutmix_alpha else mixup()
  return mixed, lam * targets + (1 - lam) * reversed_targets


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 pixels (0-255) as the model's input: (x - mean) / std per channel, float32.

  The input pipeline sends pixels, a quarter of float32's bytes; this runs on the devices, fused
  into the step's first operations.
  """
  return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  dropout_key: jax.Array,
  label_smoothing: float,
  freeze_backbone: bool = False,
  ema_decay: float = 0.0,
  grad_accum_steps: int = 1,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
  pixel_mean: Sequence[float] | None = None,
  pixel_std: Sequence[float] | None = None,
) -> TrainState:
  """One step on the global batch; metrics accumulate in `state.train_metrics`.

  Args:
    state: the train state; its optimizer may apply the update only every `grad_accum_steps` steps
      (`optax.MultiSteps`), BatchNorm's running statistics move every step.
    batch: {'image', 'label'}.
    dropout_key: folded with the step for each step's dropout.
    label_smoothing: of the cross-entropy targets.
    freeze_backbone: the model runs in inference mode (BatchNorm normalizes with, and keeps, its
      running statistics; no dropout), as a torch user's `backbone.eval()`, and no gradient flows
      into anything but the classifier.
    ema_decay: > 0: `state.ema` moves towards the new params and batch_stats after each update.
    grad_accum_steps: micro-batches per optimizer update (for the EMA's timing).
    mixup_alpha, cutmix_alpha: > 0: the batch is mixed on the device (`mix_batch`), with a key
      folded from the step; train top-1 is then against the unmixed labels.
    pixel_mean, pixel_std: the images are uint8 pixels, normalised with these first (`normalize`);
      None: they are the model's input as they are.
  """
  train = not freeze_backbone
  images = batch['image'] if pixel_mean is None else normalize(batch['image'], pixel_mean, pixel_std)
  step_key = jax.random.fold_in(dropout_key, state.step)
  num_classes = state.params['classifier']['kernel'].shape[-1]
  targets = smoothed_targets(batch['label'], num_classes, label_smoothing)
  if mixup_alpha or cutmix_alpha:
    images, targets = mix_batch(jax.random.fold_in(step_key, 1), images, targets, mixup_alpha, cutmix_alpha)

  def loss_fn(params):
    if freeze_backbone:
      params = jax.tree_util.tree_map_with_path(
        lambda path, p: p if registry.is_head(path) else jax.lax.stop_gradient(p), params
      )
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=train,
      mutable=['batch_stats'] if train else [],
      rngs={'dropout': step_key},
    )
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return loss, (logits, updates['batch_stats'] if train else state.batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if ema_decay:
    # After an optimizer update only: under accumulation the params move every grad_accum_steps.
    updated = state.step % grad_accum_steps == 0
    decay = jnp.where(updated, ema_decay, 1.0)
    new = {'params': state.params, 'batch_stats': state.batch_stats}
    state = state.replace(
      ema=jax.tree.map(lambda e, x: (decay * e + (1 - decay) * x).astype(e.dtype), state.ema, new)
    )
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


def eval_variables(state: TrainState) -> dict[str, Any]:
  """What evaluation and export use: the EMA weights when the run keeps them, else the weights."""
  return state.ema or {'params': state.params, 'batch_stats': state.batch_stats}


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  pixel_mean: Sequence[float] | None = None,
  pixel_std: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and the example count over the real (mask=1) examples.

  With the EMA weights when the run keeps them (`eval_variables`); uint8 images are normalised
  with `pixel_mean` and `pixel_std` first, as in `train_step`.
  """
  images = batch['image'] if pixel_mean is None else normalize(batch['image'], pixel_mean, pixel_std)
  logits = state.apply_fn(eval_variables(state), images, train=False)
  logits = logits.astype(jnp.float32)
  mask = batch['mask'].astype(jnp.float32)
  return {
    'loss': jnp.sum(cross_entropy(logits, batch['label'], 0.0) * mask),
    'top1': jnp.sum(top_k_correct(logits, batch['label'], 1) * mask),
    'top5': jnp.sum(top_k_correct(logits, batch['label'], 5) * mask),
    'count': jnp.sum(mask),
  }
