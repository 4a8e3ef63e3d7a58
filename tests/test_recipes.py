"""The training recipes: optimizers as PyTorch's, plateau decay on a held-out validation split,
fine-tuning a frozen or slower backbone, EMA, mixup/cutmix, accumulation, clipping, the best
checkpoint, Fashion-MNIST. Unit tests on a tiny DenseNet; end to end on digits or mock data."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import DATA, optional_module, quick, read_metrics, section

from configs import cifar10_adamw, default, digits, fashion_mnist, finetune
from densenet_jax import convert, from_torchvision
from densenet_jax.models import DenseNet
from densenet_jax.train import input_pipeline, loop, plateau, registry, setup, steps
from densenet_jax.train.checkpoints import Checkpoints

tfds = optional_module('tensorflow_datasets')

TINY = {'growth_rate': 4, 'block_config': (1, 1), 'num_init_features': 8, 'bn_size': 2}


def config_with(**overrides) -> ml_collections.ConfigDict:
  """The default config with `overrides`; the learning rate is not scaled (batch = reference)."""
  config = default.get_config()
  config.batch_size = config.lr_reference_batch = 8
  config.update(overrides)
  return config


def tiny_state(config: ml_collections.ConfigDict, num_classes: int = 3) -> steps.TrainState:
  model = DenseNet(**TINY, num_classes=num_classes)
  tx = registry.create_optimizer(config, registry.learning_rate_schedule(config, 10, 100))
  state = jax.jit(lambda: steps.create_train_state(model, tx, (1, 8, 8, 1)))()
  return setup.with_ema(config, state)


def batch(seed: int, size: int = 8, num_classes: int = 3) -> dict[str, jax.Array]:
  images = jax.random.normal(jax.random.key(seed), (size, 8, 8, 1))
  return {'image': images, 'label': jnp.arange(size) % num_classes}


def jitted_step(config: ml_collections.ConfigDict):
  return jax.jit(
    functools.partial(
      steps.train_step,
      dropout_key=jax.random.key(1),
      label_smoothing=0.0,
      freeze_backbone=config.freeze_backbone,
      ema_decay=config.ema_decay,
      grad_accum_steps=config.grad_accum_steps,
      mixup_alpha=config.mixup_alpha,
      cutmix_alpha=config.cutmix_alpha,
    )
  )


def assert_trees_equal(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Float32 rounding over a few steps: the same arithmetic in another order.
FLOAT32 = {'rtol': 1e-5, 'atol': 1e-7}


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw'])
def test_each_optimizer_takes_the_steps_pytorchs_takes(name):
  torch = optional_module('torch')
  rng = np.random.default_rng(0)
  params = {
    'kernel': rng.normal(size=(3, 4)).astype(np.float32),
    'bias': rng.normal(size=4).astype(np.float32),
  }
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
  config = config_with(optimizer=name, learning_rate=0.05, weight_decay=0.01, adam_betas=(0.8, 0.99))
  config.adam_eps = 1e-6
  tx = registry.create_optimizer(config, registry.learning_rate_schedule(config, 10, 100))
  ours, opt_state = jax.tree.map(jnp.asarray, params), None
  opt_state = tx.init(ours)
  for grad in grads:
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grad), opt_state, ours)
    ours = jax.tree.map(jnp.add, ours, updates)

  theirs = {key: torch.tensor(value, requires_grad=True) for key, value in params.items()}
  torch_optimizer = {
    'sgd': lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    'adam': lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
    'adamw': lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
  }[name](list(theirs.values()))
  for grad in grads:
    for key, tensor in theirs.items():
      tensor.grad = torch.tensor(grad[key])
    torch_optimizer.step()
  for key in params:
    np.testing.assert_allclose(np.asarray(ours[key]), theirs[key].detach().numpy(), **FLOAT32)
    assert not np.allclose(np.asarray(ours[key]), params[key])


def test_grad_clip_norm_bounds_the_gradient_norm_before_the_optimizer():
  config = config_with(momentum=0.0, weight_decay=0.0, learning_rate=0.1, grad_clip_norm=0.5)
  tx = registry.create_optimizer(config, registry.learning_rate_schedule(config, 10, 100))
  params = {'w': jnp.zeros(4)}
  big, small = {'w': jnp.array([6.0, 8.0, 0.0, 0.0])}, {'w': jnp.array([0.03, 0.04, 0.0, 0.0])}
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5 * big['w'] / 10.0, rtol=1e-6)  # norm 10 -> 0.5
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * small['w'], rtol=1e-6)  # below the norm: as is


def test_grad_accumulation_updates_every_k_steps_with_the_mean_gradient_and_ema_follows_updates():
  config = config_with(grad_accum_steps=2, ema_decay=0.5, learning_rate=0.05)
  state0 = tiny_state(config)
  step = jitted_step(config)
  first, second = batch(1), batch(2)
  after_one = step(state0, first)
  # No update yet: the params (and so the EMA) stand still; BatchNorm's statistics moved.
  assert_trees_equal(after_one.params, state0.params)
  assert_trees_equal(after_one.ema['params'], state0.params)
  assert not np.allclose(after_one.batch_stats['norm0']['mean'], state0.batch_stats['norm0']['mean'])
  after_two = step(after_one, second)

  # The reference: one update of the unaccumulated optimizer (at the same learning rate, which
  # accumulation scales by k) on the mean of the two micro-batches' gradients.
  def grads_on(images_labels, batch_stats):
    def loss(params):
      logits, _ = state0.apply_fn(
        {'params': params, 'batch_stats': batch_stats},
        images_labels['image'],
        train=True,
        mutable=['batch_stats'],
      )
      return jnp.mean(steps.cross_entropy(logits, images_labels['label'], 0.0))

    return jax.jit(jax.grad(loss))(state0.params)

  mean_grad = jax.tree.map(
    lambda a, b: (a + b) / 2, grads_on(first, state0.batch_stats), grads_on(second, after_one.batch_stats)
  )
  reference_config = config_with(learning_rate=0.1, ema_decay=0.5)
  reference_tx = registry.create_optimizer(
    reference_config, registry.learning_rate_schedule(reference_config, 10, 100)
  )
  updates, _ = reference_tx.update(mean_grad, reference_tx.init(state0.params), state0.params)
  expected = jax.tree.map(jnp.add, state0.params, updates)
  for ours, theirs in zip(jax.tree.leaves(after_two.params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(ours, theirs, **FLOAT32)
  assert not np.allclose(after_two.params['classifier']['kernel'], state0.params['classifier']['kernel'])
  # The EMA moved once, at the update: halfway from the start to the new params.
  for ema, start, new in zip(
    jax.tree.leaves(after_two.ema['params']),
    jax.tree.leaves(state0.params),
    jax.tree.leaves(after_two.params),
    strict=True,
  ):
    np.testing.assert_allclose(ema, 0.5 * start + 0.5 * new, **FLOAT32)


def test_evaluation_uses_the_ema_weights():
  config = config_with(ema_decay=0.9, learning_rate=0.5)
  state = jitted_step(config)(tiny_state(config), batch(1))
  assert not np.allclose(state.ema['params']['conv0']['kernel'], state.params['conv0']['kernel'])
  eval_batch = {**batch(2), 'mask': jnp.ones(8)}
  sums = steps.eval_step(state, eval_batch)
  logits = state.apply_fn(state.ema, eval_batch['image'], train=False)
  expected = jnp.sum(steps.cross_entropy(logits, eval_batch['label'], 0.0))
  np.testing.assert_allclose(sums['loss'], expected, rtol=1e-6)
  without_ema = steps.eval_step(state.replace(ema={}), eval_batch)
  assert not np.isclose(sums['loss'], without_ema['loss'])


@pytest.mark.parametrize('kind', ['mixup', 'cutmix'])
def test_mix_batch_mixes_images_and_labels_alike(kind):
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
  labels = jnp.arange(6)
  targets = jax.nn.one_hot(labels, 6)
  alphas = (0.4, 0.0) if kind == 'mixup' else (0.0, 1.0)
  lams = []
  for seed in range(3):
    mixed, mixed_targets = steps.mix_batch(jax.random.key(seed), images, targets, *alphas)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    lam = float(mixed_targets[0, 0])  # image 0's own label's weight; the rest is image 5's
    np.testing.assert_allclose(mixed_targets[0, 5], 1 - lam, rtol=1e-6)
    if kind == 'mixup':
      np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
    else:  # Every pixel is its own image's or the reverse's, in the share the label weight says.
      from_reverse = np.all(np.asarray(mixed) == np.asarray(images[::-1]), axis=-1)
      from_own = np.all(np.asarray(mixed) == np.asarray(images), axis=-1)
      assert np.all(from_reverse | from_own)
      np.testing.assert_allclose(from_reverse[0].mean(), 1 - lam, rtol=1e-6)
    lams.append(lam)
  assert len(set(lams)) == 3 and all(0 <= lam <= 1 for lam in lams)


def test_mixup_changes_the_training_step():
  plain, mixed = config_with(), config_with(mixup_alpha=0.2, cutmix_alpha=1.0)
  without = jitted_step(plain)(tiny_state(plain), batch(1))
  with_mixing = jitted_step(mixed)(tiny_state(mixed), batch(1))
  assert without.train_metrics['loss_sum'] != with_mixing.train_metrics['loss_sum']


def test_a_frozen_backbone_and_its_batchnorm_statistics_do_not_move():
  config = config_with(freeze_backbone=True, learning_rate=0.5)
  state0 = tiny_state(config)
  step = jitted_step(config)
  state = step(step(state0, batch(1)), batch(2))
  for name in state0.params:
    if name != 'classifier':
      assert_trees_equal(state.params[name], state0.params[name])
  assert_trees_equal(state.batch_stats, state0.batch_stats)
  assert not np.allclose(state.params['classifier']['kernel'], state0.params['classifier']['kernel'])


def grads_of(state: steps.TrainState) -> dict:
  """The gradient of the tiny model's loss on a batch (an update's input)."""

  def loss(params):
    logits, _ = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch(1)['image'],
      train=True,
      mutable=['batch_stats'],
    )
    return jnp.mean(steps.cross_entropy(logits, batch(1)['label'], 0.0))

  return jax.jit(jax.grad(loss))(state.params)


def test_the_backbone_learning_rate_multiplier_scales_only_the_backbone_updates():
  def updates(multiplier):
    config = config_with(backbone_lr_multiplier=multiplier, weight_decay=1e-3, learning_rate=0.5)
    state = tiny_state(config)
    return state.tx.update(grads_of(state), state.opt_state, state.params)[0]

  full, tenth = updates(1.0), updates(0.1)
  for name in full:
    factor = 1.0 if name == 'classifier' else 0.1
    for a, b in zip(jax.tree.leaves(tenth[name]), jax.tree.leaves(full[name]), strict=True):
      np.testing.assert_allclose(a, factor * b, rtol=1e-6)
  assert np.abs(np.asarray(full['conv0']['kernel'])).max() > 0


def test_plateau_scale_drops_by_the_factor_after_more_than_patience_stalled_losses_and_scales_the_updates():
  config = config_with(
    optimizer='adamw', schedule='plateau', validation_fraction=0.1, plateau_factor=0.5, plateau_patience=2
  )
  config.grad_accum_steps = 2  # The plateau state is found inside optax.MultiSteps' state too.
  state = tiny_state(config)
  scheduler = registry.plateau_scheduler(config)
  scales = []
  for loss in [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]:
    stepped = jax.tree.map(jnp.asarray, scheduler.step(plateau.find_state(state.opt_state), loss))
    state = state.replace(opt_state=plateau.replace_state(state.opt_state, stepped))
    scales.append(float(registry.learning_rate_scale(state.opt_state)))
  # inf -> 1.0 improves; the third stall (more than 2) -> x0.5; 0.5 improves; three stalls -> x0.5.
  assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]

  # The updates of the next step are a quarter of a fresh state's (an update every 2 steps).
  grads = grads_of(state)
  fresh = tiny_state(config)
  ours = state.tx.update(grads, state.opt_state, state.params)[1]
  theirs = fresh.tx.update(grads, fresh.opt_state, fresh.params)[1]
  ours, _ = state.tx.update(grads, ours, state.params)
  theirs, _ = fresh.tx.update(grads, theirs, fresh.params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_allclose(a, 0.25 * b, rtol=1e-6)
  assert np.abs(np.asarray(theirs['classifier']['kernel'])).max() > 0


@pytest.fixture(scope='module')
def digits_builder(digits_data_dir):
  config = digits.get_config()
  config.data_dir = str(digits_data_dir)
  return input_pipeline.get_builder(config)


def test_the_validation_split_is_the_train_splits_tail_disjoint_and_the_same_every_time(digits_builder):
  config = digits.get_config()
  config.update(
    validation_fraction=0.2,
    train_augment='none',
    random_flip=False,
    mean=(0.0,),
    std=(1.0,),
    eval_batch_size=50,
  )
  spec = input_pipeline.data_spec(config, digits_builder, 1)
  every = [
    np.asarray(example['image'])
    for example in tfds.as_numpy(digits_builder.as_dataset(split='train', shuffle_files=False))
  ]
  assert spec.num_validation_examples == round(0.2 * len(every)) and spec.num_train_examples == len(
    every
  ) - round(0.2 * len(every))
  trained_on, held_out = every[: spec.num_train_examples], every[spec.num_train_examples :]

  def validation_images():
    batches = input_pipeline.eval_iterator(config, digits_builder, spec, 0, 1, validation=True)
    images = [b['image'][b['mask'] == 1] for b in (next(batches) for _ in range(spec.validation_steps))]
    return np.concatenate(images)

  first = validation_images()
  np.testing.assert_array_equal(first, np.stack(held_out))  # the tail, in order, each once
  np.testing.assert_array_equal(validation_images(), first)
  # Two epochs of training never see a held-out image (the split's images are distinct).
  held_out_bytes = {image.tobytes() for image in held_out}
  assert held_out_bytes.isdisjoint(image.tobytes() for image in trained_on)
  train = input_pipeline.train_iterator(
    config, digits_builder, spec, 0, 0, 1, end_step=2 * spec.steps_per_epoch
  )
  seen = {image.tobytes() for b in train for image in b['image']}
  assert seen and seen.isdisjoint(held_out_bytes)
  assert seen <= {image.tobytes() for image in trained_on}


@pytest.mark.slow  # five epochs of the digits
def test_plateau_end_to_end_lowers_the_logged_learning_rate_after_stalled_validation_losses(
  tmp_path, digits_data_dir
):
  config = digits.get_config()
  config.update(
    data_dir=str(digits_data_dir),
    model_kwargs=ml_collections.ConfigDict({'depth': 10, 'growth_rate': 12, 'bc': True}),
    schedule='plateau',
    validation_fraction=0.1,
    # A validation loss improves only when it falls below 1% of the best so far: after
    # the first evaluation every one stalls.
    plateau_threshold=0.99,
    plateau_patience=2,
    plateau_factor=0.5,
    num_epochs=5,
    batch_size=128,
    progress_bar=False,
    compilation_cache_dir='',
  )
  config.log_every_steps = 10  # an epoch: 1,294 train images / 128
  loop.train_and_evaluate(config, tmp_path)
  records = read_metrics(tmp_path)
  rates = [r['learning_rate'] for r in records if 'learning_rate' in r]
  evals = [r for r in records if 'test_loss' in r]
  base = 0.1 * 128 / 64
  # Stalls at evaluations 2, 3 and 4: the third (more than patience 2) halves the rate for epoch 5.
  assert rates == pytest.approx([base, base, base, base, base / 2])
  assert len(evals) == 5 and all(r['val_examples'] == 144 and np.isfinite(r['val_loss']) for r in evals)


def test_the_best_checkpoint_by_a_metric_is_kept_beside_the_newest(tmp_path):
  config = config_with()
  state = tiny_state(config)
  checkpoints = Checkpoints(tmp_path, 2, {}, best_metric='test_top1')
  for step, top1 in [(1, 0.1), (2, 0.9), (3, None), (4, 0.3), (5, 0.2), (6, None), (7, 0.4)]:
    checkpoints.save(state.replace(step=step), None if top1 is None else {'test_top1': top1})
  assert checkpoints.best_step() == 2
  checkpoints.close()
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 6, 7]
  losses = Checkpoints(tmp_path / 'loss', 1, {}, best_metric='val_loss')
  for step, loss in [(1, 0.5), (2, 0.2), (3, 0.7)]:
    losses.save(state.replace(step=step), {'val_loss': loss})
  assert losses.best_step() == 2  # lower is better for a loss
  losses.close()


def test_the_fashion_mnist_config_trains_end_to_end_on_mock_data(tmp_path):
  config = fashion_mnist.get_config()
  model = registry.create_model(config, 10)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 96, 96, 1))
  )
  assert config.model == 'densenet121' and shapes['params']['conv0']['kernel'].shape == (7, 7, 1, 64)
  quick(config, tmp_path / 'data', model='densenet', model_kwargs=ml_collections.ConfigDict(TINY))
  with tfds.testing.mock_data(num_examples=24):
    s = setup.setup(config, tmp_path / 'run')
    batch = next(input_pipeline.train_iterator(config, s.builder, s.spec, 0, 0, 1, end_step=1))
    final = loop.train_and_evaluate(config, tmp_path / 'run')
  assert batch['image'].shape == (8, 96, 96, 1) and s.spec.channels == 1
  assert final['step'] == 3 and np.isfinite(final['train_loss']) and final['test_examples'] == 24


def test_the_cifar10_adamw_config_is_the_notebooks_recipe():
  config = cifar10_adamw.get_config()
  registry.validate_config(config)
  assert (config.optimizer, config.schedule, config.validation_fraction) == ('adamw', 'plateau', 0.1)
  # torch.optim.AdamW(lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-4) on batches of 64.
  assert registry.base_learning_rate(config) == 5e-4 and config.batch_size == 64
  assert (tuple(config.adam_betas), config.weight_decay) == ((0.9, 0.999), 1e-4)
  # ReduceLROnPlateau(mode='min', factor=0.1, patience=5, min_lr=1e-6) on the validation loss, each epoch.
  assert registry.plateau_scheduler(config) == plateau.ReduceLROnPlateau(
    learning_rate=5e-4, mode='min', factor=0.1, patience=5, min_lr=1e-6
  )
  assert (config.plateau_metric, config.eval_every_epochs, config.num_epochs) == ('val_loss', 1, 20)


def test_finetuning_a_frozen_backbone_from_a_converted_checkpoint_on_a_new_class_count(
  tmp_path, tiny_model, tiny_reference
):
  variables = from_torchvision(section(tiny_reference, 'state_dict'), tiny_model)
  convert.save_checkpoint(tmp_path / 'tiny_torchvision', tiny_model, variables)
  kwargs = json.loads((DATA / 'tiny_densenet_torchvision.json').read_text())[
    'torchvision.models.DenseNet kwargs'
  ]
  config = quick(
    finetune.get_config(),
    tmp_path / 'data',
    init_from=str(tmp_path / 'tiny_torchvision'),
    freeze_backbone=True,
    model='densenet',
    model_kwargs=ml_collections.ConfigDict(
      {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if k != 'num_classes'}
    ),
    dataset='cifar100',  # 100 classes: the classifier is new
    eval_split='test',
    image_size=48,
  )
  with tfds.testing.mock_data(num_examples=16):
    loop.train_and_evaluate(config, tmp_path / 'run')
  _, trained = convert.load_checkpoint(tmp_path / 'run' / 'checkpoints' / '3')
  assert trained['params']['classifier']['kernel'].shape[-1] == 100
  for collection in ('params', 'batch_stats'):
    for name, value in variables[collection].items():
      if name != 'classifier':
        assert_trees_equal(trained[collection][name], value)


def test_a_checkpoint_saved_before_the_ema_field_existed_still_resumes(tmp_path):
  import orbax.checkpoint as ocp

  state = tiny_state(config_with()).replace(step=5)
  fields = ('step', 'params', 'opt_state', 'batch_stats', 'train_metrics')  # TrainState before `ema`
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints', item_names=('state', 'model_config'))
  manager.save(
    5,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({name: getattr(state, name) for name in fields}),
      model_config=ocp.args.JsonSave({}),
    ),
  )
  manager.wait_until_finished()
  manager.close()
  checkpoints = Checkpoints(tmp_path, 3, {})
  restored = checkpoints.restore_latest(jax.eval_shape(lambda: state))
  checkpoints.close()
  assert int(restored.step) == 5 and restored.ema == {}
  assert_trees_equal(restored.params, state.params)
  assert not (tmp_path / 'corrupt_checkpoints').exists()


@pytest.mark.parametrize('channels', [3, 1])
def test_every_randaugment_operation_changes_an_image_and_stays_in_range(channels):
  tf = optional_module('tensorflow')
  from densenet_jax.train import randaugment

  # 32x32: PIL's equalize leaves images of fewer than ~2 pixels per grey level as they are.
  image = tf.random.stateless_uniform([32, 32, channels], [0, 1], 50.0, 200.0)
  for name, operation in zip(randaugment.NAMES, randaugment.operations(image, 9, 1.0), strict=True):
    out = operation().numpy()
    assert out.shape == (32, 32, channels) and out.min() >= 0 and out.max() <= 255, name
    if not (name == 'Color' and channels == 1):  # a grey image has no colour to take away
      assert np.abs(out - image.numpy()).mean() > 1.0, name
  assert randaugment.operations(image, 0, 1.0)[randaugment.NAMES.index('Rotate')]().numpy() == pytest.approx(
    image.numpy(), abs=1e-3
  )  # magnitude 0 rotates by nothing


def test_randaugment_batches_are_a_function_of_seed_epoch_and_example(digits_builder):
  config = digits.get_config()
  config.randaugment = (2, 9)
  spec = input_pipeline.data_spec(config, digits_builder, 1)

  def batches(start, end, config=config):
    return list(input_pipeline.train_iterator(config, digits_builder, spec, start, 0, 1, end_step=end))

  run = batches(0, spec.steps_per_epoch + 4)
  resumed = batches(spec.steps_per_epoch + 1, spec.steps_per_epoch + 4)  # mid-epoch 2
  for ours, theirs in zip(resumed, run[spec.steps_per_epoch + 1 :], strict=True):
    np.testing.assert_array_equal(ours['image'], theirs['image'])
  plain = digits.get_config()
  without = batches(0, 1, plain)
  assert not np.array_equal(without[0]['image'], run[0]['image'])
  np.testing.assert_array_equal(without[0]['label'], run[0]['label'])  # the same examples, augmented


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'best_checkpoint_metric': 'top1'}, "'top1' is not an eval metric: use one of 'test_top1'"),
    ({'best_checkpoint_metric': 'val_loss'}, 'needs a validation split: set config.validation_fraction'),
    ({'randaugment': (2, 11)}, r'must be \(layers, magnitude\)'),
    ({'freeze_backbone': True, 'backbone_lr_multiplier': 0.1}, 'a frozen backbone has no learning rate'),
    ({'grad_accum_steps': 0}, 'grad_accum_steps must be a positive integer'),
  ],
)
def test_a_recipe_set_wrong_is_a_config_error_naming_the_fix(overrides, message):
  with pytest.raises(registry.ConfigError, match=message):
    registry.validate_config(config_with(**overrides))
