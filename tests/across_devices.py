"""Worker for tests/test_batch_norm_across_devices.py: run with several CPU devices and float64.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_ENABLE_X64=1 python tests/across_devices.py

Prints one JSON object: for each check, the largest relative difference between N devices of B/N
images and one device of B images (the test asserts the bounds).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import densenet_jax
from densenet_jax import nnx as dnnx
from densenet_jax.train import steps

shard_map = getattr(jax, 'shard_map', None)
if shard_map is None:  # JAX before shard_map left experimental.
  from jax.experimental.shard_map import shard_map

DEVICES = jax.device_count()
BATCH = 2 * DEVICES


def difference(a, b) -> float:
  """The largest |a - b| over the largest |b|, across a whole tree."""
  errors = [
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) / max(float(np.max(np.abs(np.asarray(y)))), 1e-300)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(errors)


def model_for(kernels: str, memory_efficient: bool, axis_name=None, groups=None) -> densenet_jax.DenseNet:
  return densenet_jax.DenseNet(
    growth_rate=4,
    block_config=(2, 2),
    num_init_features=8,
    num_classes=5,
    kernels=kernels,
    memory_efficient=memory_efficient,
    axis_name=axis_name,
    axis_index_groups=groups,
    dtype=jnp.float64,
    param_dtype=jnp.float64,
  )


def data():
  images = jax.random.normal(jax.random.key(0), (BATCH, 32, 32, 3), jnp.float64) * 2 + 0.5
  labels = jax.random.randint(jax.random.key(1), (BATCH,), 0, 5)
  return images, labels


def variables_for(model, images):
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(2), images[:1])
  # Scale, bias and running averages away from their initial values.
  noise = functools.partial(jax.random.uniform, jax.random.key(3))
  return jax.tree.map(lambda a: a + 0.5 * noise(a.shape, a.dtype), variables)


def loss_and_grads(model, variables, images, labels):
  """(logits, updated batch_stats, gradients of the mean loss over these images)."""

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

  (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  return logits, updates['batch_stats'], grads


def mapped_step(model, variables, images, labels):
  """On each device's images: logits, batch_stats, and gradients averaged over the devices."""
  logits, batch_stats, grads = loss_and_grads(model, variables, images, labels)
  return logits, batch_stats, jax.lax.pmean(grads, 'batch')


def across_devices(kernels: str, memory_efficient: bool) -> dict[str, float]:
  images, labels = data()
  one = model_for(kernels, memory_efficient)
  variables = variables_for(one, images)
  expected = jax.jit(functools.partial(loss_and_grads, one))(variables, images, labels)
  shared = model_for(kernels, memory_efficient, axis_name='batch')
  results = {}

  # jax.pmap: a leading device axis.
  def split(x):
    return x.reshape(DEVICES, -1, *x.shape[1:])

  pmapped = jax.pmap(functools.partial(mapped_step, shared), axis_name='batch', in_axes=(None, 0, 0))
  logits, batch_stats, grads = pmapped(variables, split(images), split(labels))
  results['pmap'] = {
    'logits': difference(logits.reshape(BATCH, -1), expected[0]),
    'batch_stats': max(
      difference(jax.tree.map(lambda a, i=i: a[i], batch_stats), expected[1]) for i in range(DEVICES)
    ),
    'grads': max(difference(jax.tree.map(lambda a, i=i: a[i], grads), expected[2]) for i in range(DEVICES)),
  }

  # jax.shard_map over a mesh: the batch split along 'batch', everything else replicated.
  mesh = Mesh(np.asarray(jax.devices()), ('batch',))
  sharded = jax.jit(
    shard_map(
      functools.partial(mapped_step, shared),
      mesh=mesh,
      in_specs=(P(), P('batch'), P('batch')),
      out_specs=(P('batch'), P(), P()),
      **({'check_vma': False} if hasattr(jax, 'shard_map') else {'check_rep': False}),
    )
  )
  logits, batch_stats, grads = sharded(variables, images, labels)
  results['shard_map'] = {
    'logits': difference(logits, expected[0]),
    'batch_stats': difference(batch_stats, expected[1]),
    'grads': difference(grads, expected[2]),
  }

  # axis_index_groups: two groups of devices, each of which is one device on its group's images.
  half = DEVICES // 2
  groups = [list(range(half)), list(range(half, DEVICES))]
  grouped = model_for(kernels, memory_efficient, axis_name='batch', groups=groups)
  logits, batch_stats, grads = jax.pmap(
    functools.partial(mapped_step, grouped), axis_name='batch', in_axes=(None, 0, 0)
  )(variables, split(images), split(labels))
  per_group = [
    jax.jit(functools.partial(loss_and_grads, one))(
      variables, images[g * BATCH // 2 : (g + 1) * BATCH // 2], labels[g * BATCH // 2 : (g + 1) * BATCH // 2]
    )
    for g in range(2)
  ]
  results['groups'] = {
    'logits': difference(logits.reshape(BATCH, -1), jnp.concatenate([r[0] for r in per_group])),
    'batch_stats': max(
      difference(jax.tree.map(lambda a, i=i: a[i], batch_stats), per_group[i // half][1])
      for i in range(DEVICES)
    ),
    # Each device's gradient averaged over all devices: the mean of the groups' gradients.
    'grads': max(
      difference(
        jax.tree.map(lambda a, i=i: a[i], grads),
        jax.tree.map(lambda a, b: (a + b) / 2, per_group[0][2], per_group[1][2]),
      )
      for i in range(DEVICES)
    ),
  }

  if not memory_efficient:
    # Without axis_name each device normalises its own images, as before: each device's logits are
    # one device's on its images alone.
    own = jax.pmap(functools.partial(loss_and_grads, one), in_axes=(None, 0, 0))(
      variables, split(images), split(labels)
    )
    alone = jax.jit(functools.partial(loss_and_grads, one))
    results['per_device'] = {
      'logits': max(
        difference(own[0][i], alone(variables, split(images)[i], split(labels)[i])[0]) for i in range(DEVICES)
      ),
      'differs_from_global': difference(own[0].reshape(BATCH, -1), expected[0]),
    }
  return results


def flax_imagenet_style(kernels: str) -> dict[str, float]:
  """A train step written as Flax's examples/imagenet writes it, under pmap, against our jit step."""
  images, labels = data()
  model = model_for(kernels, False, axis_name='batch')
  variables = variables_for(model_for(kernels, False), images)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

  class TrainState(train_state.TrainState):
    batch_stats: dict

  def train_step(state, batch):
    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'],
        train=True,
        mutable=['batch_stats'],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return loss, new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name='batch')
    loss = jax.lax.pmean(loss, axis_name='batch')
    return state.apply_gradients(grads=grads, batch_stats=new_model_state['batch_stats']), loss

  state = TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=tx, batch_stats=variables['batch_stats']
  )
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *jnp.shape(x))), state)  # replicated
  p_train_step = jax.pmap(train_step, axis_name='batch')
  batch = {'image': images.reshape(DEVICES, -1, *images.shape[1:]), 'label': labels.reshape(DEVICES, -1)}
  losses = []
  for _ in range(2):
    state, loss = p_train_step(state, batch)
    losses.append(loss[0])
  # Flax's example averages batch_stats across devices before evaluating: they are equal already.
  stats_spread = difference(
    jax.tree.map(lambda a: a[1:], state.batch_stats), jax.tree.map(lambda a: a[:1], state.batch_stats)
  )
  pmapped = jax.tree.map(lambda a: a[0], {'params': state.params, 'batch_stats': state.batch_stats})

  # densenet-jax's own step (what train.py runs), jitted on the global batch, no axis_name.
  ours = steps.TrainState.create(
    apply_fn=model_for(kernels, False).apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    train_metrics=steps.zero_train_metrics(),
    tx=tx,
  )
  step = jax.jit(functools.partial(steps.train_step, dropout_key=jax.random.key(0), label_smoothing=0.0))
  our_losses = []
  for _ in range(2):
    before = ours.train_metrics['loss_sum']
    ours = step(ours, {'image': images, 'label': labels})
    our_losses.append(ours.train_metrics['loss_sum'] - before)
  return {
    'loss': difference(np.asarray(losses), np.asarray(our_losses)),
    'params': difference(pmapped['params'], ours.params),
    'batch_stats': difference(pmapped['batch_stats'], ours.batch_stats),
    'batch_stats_spread': stats_spread,
  }


def nnx_across_devices(kernels: str, memory_efficient: bool) -> dict[str, dict[str, float]]:
  """The NNX model (densenet_jax.nnx) on N devices against the Linen model on one."""
  images, labels = data()
  one = model_for(kernels, memory_efficient)
  variables = variables_for(one, images)
  expected = jax.jit(functools.partial(loss_and_grads, one))(variables, images, labels)
  mesh = Mesh(np.asarray(jax.devices()), ('batch',))

  def nnx_loss_and_grads(model, images, labels):
    def loss_fn(model):
      logits = model(images)  # Training mode: batch statistics, the running averages move.
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    grads, logits = nnx.grad(loss_fn, has_aux=True)(model)
    return logits, nnx.state(model, nnx.BatchStat), grads

  def as_linen(logits, batch_stats, grads):
    return logits, dnnx.to_linen_tree(batch_stats), dnnx.to_linen_tree(grads)

  results = {}
  # nnx.jit over a Mesh: the model replicated, the batch sharded; XLA partitions the global batch.
  model = dnnx.from_linen(one, variables)
  replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('batch'))
  nnx.update(model, jax.device_put(nnx.state(model), replicated))
  sharded_images, sharded_labels = jax.device_put((images, labels), batch_sharded)
  logits, batch_stats, grads = as_linen(*nnx.jit(nnx_loss_and_grads)(model, sharded_images, sharded_labels))
  assert len(logits.sharding.device_set) == DEVICES
  results['mesh'] = {
    'logits': difference(logits, expected[0]),
    'batch_stats': difference(batch_stats, expected[1]),
    'grads': difference(grads, expected[2]),
  }

  # shard_map with axis_name: each device its images, BatchNorm's statistics over all of them.
  shared = dnnx.from_linen(model_for(kernels, memory_efficient, axis_name='batch'), variables)
  graphdef, state = nnx.split(shared)

  def per_device(state, images, labels):
    logits, batch_stats, grads = nnx_loss_and_grads(nnx.merge(graphdef, state), images, labels)
    return logits, batch_stats, jax.lax.pmean(grads, 'batch')

  mapped = jax.jit(
    shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P('batch'), P('batch')),
      out_specs=(P('batch'), P(), P()),
      **({'check_vma': False} if hasattr(jax, 'shard_map') else {'check_rep': False}),
    )
  )
  logits, batch_stats, grads = as_linen(*mapped(state, images, labels))
  results['shard_map'] = {
    'logits': difference(logits, expected[0]),
    'batch_stats': difference(batch_stats, expected[1]),
    'grads': difference(grads, expected[2]),
  }
  return results


def main() -> None:
  assert DEVICES >= 2 and jax.config.jax_enable_x64, 'run with several devices and JAX_ENABLE_X64=1'
  results = {}
  for kernels in densenet_jax.KERNEL_SETS:
    for memory_efficient in (False, True):
      results[f'{kernels}{"-memory-efficient" if memory_efficient else ""}'] = across_devices(
        kernels, memory_efficient
      )
    results[f'{kernels}-flax-imagenet-step'] = flax_imagenet_style(kernels)
    for memory_efficient in (False, True):
      results[f'{kernels}{"-memory-efficient" if memory_efficient else ""}-nnx'] = nnx_across_devices(
        kernels, memory_efficient
      )
  print(json.dumps(results))


if __name__ == '__main__':
  main()
