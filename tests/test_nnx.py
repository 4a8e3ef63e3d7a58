"""`densenet_jax.nnx`: DenseNet as Flax NNX modules, the Linen network's numbers, every weight path.

The NNX classes run the Linen network on their own variables, so NNX and Linen must agree bit for
bit; the structure must be torchvision's (tests/data/torchvision_densenet.json).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import KERNELS, PRESETS, REPO, enable_x64, max_relative_error, section, train_step_outputs
from flax import nnx, traverse_util

import densenet_jax
from densenet_jax import convert
from densenet_jax import nnx as dnnx
from densenet_jax.train import steps

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)

NNX_PRESETS = {
  'densenet121': dnnx.DenseNet121,
  'densenet161': dnnx.DenseNet161,
  'densenet169': dnnx.DenseNet169,
  'densenet201': dnnx.DenseNet201,
  'densenet264': dnnx.DenseNet264,
}


def torchvision_shapes(model: dnnx.DenseNet) -> dict[str, tuple[int, ...]]:
  """The model's weights by torchvision key (NNX path, torch's leaf name), in torch's layout."""
  shapes = {}
  for collection in (nnx.Param, nnx.BatchStat):
    for path, value in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, collection))).items():
      *module, name = path
      shape = tuple(value.shape)
      if name == 'kernel':
        # Conv kernels are HWIO (torch OIHW), Linear kernels (in, out) (torch (out, in)).
        shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
      torch_name = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}
      shapes['.'.join([*module, torch_name.get(name, name)])] = shape
  return shapes


def check_torchvision_structure(name: str, torchvision_reference: dict) -> None:
  model = nnx.eval_shape(lambda: NNX_PRESETS[name](rngs=nnx.Rngs(0)))
  expected = {
    key: tuple(shape)
    for key, shape in torchvision_reference[name]['state_dict_shapes'].items()
    if not key.endswith('num_batches_tracked')  # Flax does not count batches.
  }
  assert torchvision_shapes(model) == expected
  assert isinstance(model, dnnx.DenseNet) and type(model).__name__ == PRESETS[name].func.__name__ + name[8:]
  num_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert num_params == torchvision_reference[name]['num_params']


def test_densenet121_has_torchvisions_names_and_shapes(torchvision_reference):
  check_torchvision_structure('densenet121', torchvision_reference)
  model = nnx.eval_shape(lambda: dnnx.DenseNet121(rngs=nnx.Rngs(0)))
  # Each leaf is the stock NNX layer a torch user expects there.
  assert isinstance(model.features.conv0, nnx.Conv)
  assert isinstance(model.features.denseblock3.denselayer24.norm2, nnx.BatchNorm)
  assert isinstance(model.features.transition1.conv, nnx.Conv)
  assert isinstance(model.classifier, nnx.Linear)
  assert model.features.denseblock1.denselayer1.conv1.kernel.shape == (1, 1, 64, 128)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['densenet161', 'densenet169', 'densenet201', 'densenet264'])
def test_presets_have_torchvisions_names_and_shapes(name, torchvision_reference):
  check_torchvision_structure(name, torchvision_reference)


def iter_batch_norms(model: dnnx.DenseNet) -> list[nnx.BatchNorm]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def linen_shapes(module: densenet_jax.DenseNet, in_features: int = 3) -> dict:
  variables = jax.eval_shape(
    lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, in_features)), train=False)
  )
  return jax.tree.map(lambda a: a.shape, variables)


@pytest.mark.parametrize(
  'nnx_class, linen_module',
  [
    pytest.param(dnnx.DenseNet264d, densenet_jax.DenseNet264d(), marks=pytest.mark.slow),
    (dnnx.DenseNetBlur121d, densenet_jax.DenseNetBlur121d()),
    (lambda **kw: dnnx.densenet_cifar(100, 12, **kw), densenet_jax.densenet_cifar(100, 12)),
    (lambda **kw: dnnx.densenet_cifar(40, 12, bc=False, **kw), densenet_jax.densenet_cifar(40, 12, bc=False)),
    (
      lambda **kw: dnnx.DenseNet(**TINY, stem='cifar', bn_size=None, **kw),
      densenet_jax.DenseNet(**TINY, stem='cifar', bn_size=None),
    ),
  ],
  ids=['densenet264d', 'densenetblur121d', 'cifar-bc-100-12', 'cifar-40-12', 'general'],
)
def test_variants_hold_the_linen_models_variables(nnx_class, linen_module):
  model = nnx.eval_shape(lambda: nnx_class(rngs=nnx.Rngs(0)))
  _, variables = dnnx.to_linen(model)
  assert jax.tree.map(lambda a: a.shape, variables) == linen_shapes(linen_module)
  assert dnnx.to_linen(model)[0] == linen_module


@pytest.mark.parametrize('memory_efficient', [False, True], ids=['plain', 'memory_efficient'])
@pytest.mark.parametrize('kernels', KERNELS)
def test_nnx_equals_linen_in_float64(kernels, memory_efficient):
  """Logits, gradients and new BatchNorm statistics, train and eval: identical, not just close."""
  with enable_x64(True):
    model = dnnx.DenseNet(
      **TINY,
      kernels=kernels,
      memory_efficient=memory_efficient,
      dtype=jnp.float64,
      param_dtype=jnp.float64,
      rngs=nnx.Rngs(0),
    )
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3), jnp.float64)
    labels = jnp.array([0, 1, 2, 4])
    module, variables = dnnx.to_linen(model)
    assert module.kernels == kernels and module.memory_efficient == memory_efficient

    _, linen_logits, linen_stats, linen_grads = train_step_outputs(module, variables, images, labels)

    @nnx.jit
    def nnx_grads(model):
      def loss(model):
        logits = model(images)  # Training mode, as a new nnx.BatchNorm.
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

      return nnx.grad(loss, has_aux=True)(model)

    grads, logits = nnx_grads(model)
    np.testing.assert_array_equal(logits, linen_logits)
    jax.tree.map(np.testing.assert_array_equal, dnnx.to_linen_tree(grads), linen_grads)
    _, trained = dnnx.to_linen(model)
    jax.tree.map(np.testing.assert_array_equal, trained['batch_stats'], linen_stats)
    assert not np.allclose(trained['batch_stats']['norm5']['mean'], variables['batch_stats']['norm5']['mean'])

    model.eval()
    eval_logits = nnx.jit(lambda model: model(images))(model)
    linen_eval = jax.jit(lambda variables: module.apply(variables, images, train=False))
    np.testing.assert_array_equal(eval_logits, linen_eval(trained))
    _, after_eval = dnnx.to_linen(model)
    jax.tree.map(np.testing.assert_array_equal, after_eval, trained)  # Evaluation moves nothing.


def test_three_nnx_optimizer_steps_equal_our_linen_train_step():
  model = dnnx.DenseNet(**TINY, rngs=nnx.Rngs(0))
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  module, variables = dnnx.to_linen(model)
  state = steps.TrainState.create(
    apply_fn=module.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    train_metrics=steps.zero_train_metrics(),
    tx=tx,
  )
  linen_step = jax.jit(
    lambda state, batch: steps.train_step(state, batch, dropout_key=jax.random.key(0), label_smoothing=0.0)
  )

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, batch):
    def loss_fn(model):
      return steps.cross_entropy(model(batch['image']), batch['label'], 0.0).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  loss_sum = jnp.zeros((), jnp.float32)
  for step in range(3):
    key = jax.random.key(step)
    batch = {'image': jax.random.normal(key, (4, 16, 16, 3)), 'label': jax.random.randint(key, (4,), 0, 5)}
    loss_sum += nnx_step(model, optimizer, batch)
    state = linen_step(state, batch)
  np.testing.assert_array_equal(loss_sum, state.train_metrics['loss_sum'])
  _, trained = dnnx.to_linen(model)
  jax.tree.map(
    np.testing.assert_array_equal, trained, {'params': state.params, 'batch_stats': state.batch_stats}
  )
  assert int(optimizer.step[...]) == 3


def test_train_and_eval_switch_batch_norm_and_dropout_as_nnx_layers_do():
  model = dnnx.DenseNet(**TINY, drop_rate=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  module, variables = dnnx.to_linen(model)
  norms = iter_batch_norms(model)
  assert not model.use_running_average and not model.deterministic
  assert not any(norm.use_running_average for norm in norms)

  # Training: batch statistics, dropout from the model's own stream (a new mask each call).
  first, second = model(images), model(images)
  assert not np.allclose(first, second)
  key = jax.random.key(7)
  expected, updates = module.apply(
    variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': key}
  )
  np.testing.assert_array_equal(model(images, rngs=key), expected)
  moved = dnnx.to_linen(model)[1]['batch_stats']
  assert not np.allclose(moved['norm5']['var'], variables['batch_stats']['norm5']['var'])

  model.eval()
  assert model.use_running_average and model.deterministic
  assert all(norm.use_running_average for norm in norms)
  np.testing.assert_array_equal(model(images), module.apply(dnnx.to_linen(model)[1], images, train=False))
  jax.tree.map(np.testing.assert_array_equal, dnnx.to_linen(model)[1]['batch_stats'], moved)
  # A per-call override, as nnx.BatchNorm's and nnx.Dropout's, needs both: one training mode.
  with pytest.raises(ValueError, match=r'one training mode.*model.train\(\)'):
    model(images, use_running_average=False)
  assert model(images, use_running_average=False, deterministic=False).shape == (4, 5)

  model.train()
  assert not model.use_running_average and all(not norm.use_running_average for norm in norms)


def test_split_merge_state_and_classifier_surgery():
  model = dnnx.DenseNet(**TINY, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  model.eval()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  assert set(nnx.to_pure_dict(batch_stats)['features']['norm0']) == {'mean', 'var'}
  np.testing.assert_array_equal(nnx.merge(graphdef, params, batch_stats)(images), model(images))

  # A new head, as a torch user's `model.classifier = nn.Linear(...)`: the network follows it.
  model.classifier = nnx.Linear(model.classifier.in_features, 3, rngs=nnx.Rngs(5))
  logits = model(images)
  assert logits.shape == (2, 3)
  module, variables = dnnx.to_linen(model)
  assert module.num_classes == 3
  np.testing.assert_array_equal(logits, module.apply(variables, images, train=False))

  features = dnnx.DenseNet(**TINY, features_only=True, rngs=nnx.Rngs(0))
  assert not hasattr(features, 'classifier')
  assert features(images)['norm5'].shape == (2, 2, 2, features.features.norm5.num_features)


@pytest.fixture(scope='module')
def tiny_nnx_kwargs(tiny_model) -> dict:
  names = ('growth_rate', 'block_config', 'num_init_features', 'bn_size', 'drop_rate', 'num_classes')
  return {name: getattr(tiny_model, name) for name in names}


def test_torchvision_weights_give_torchvisions_logits(tiny_reference):
  state_dict = section(tiny_reference, 'state_dict')
  model = dnnx.from_torchvision(state_dict)  # The configuration read from the state dict.
  images = jnp.asarray(tiny_reference['input_nchw'].transpose(0, 2, 3, 1))
  forward = nnx.jit(lambda model: model(images))
  model.eval()
  assert max_relative_error(forward(model), tiny_reference['logits_eval']) <= 1e-5
  model.train()
  assert max_relative_error(forward(model), tiny_reference['logits_train']) <= 1e-5

  # One SGD step (torch's: nesterov momentum, weight decay folded into the gradient): torch's
  # parameters and running means (running variances: torch's is unbiased, see test_matches_torchvision).
  model = dnnx.from_torchvision(state_dict)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  labels = jnp.asarray(tiny_reference['labels'])

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

  nnx.jit(lambda model, optimizer: optimizer.update(model, nnx.grad(loss_fn)(model)))(model, optimizer)
  after = dnnx.to_torchvision(model)
  for key, expected in section(tiny_reference, 'after_sgd_step').items():
    if not key.endswith(('num_batches_tracked', 'running_var')):
      assert max_relative_error(after[key], expected) <= 1e-5, key


def test_torchvision_round_trip_and_loading_into_a_model(tiny_reference, tiny_nnx_kwargs):
  state_dict = section(tiny_reference, 'state_dict')
  model = dnnx.DenseNet(**tiny_nnx_kwargs, rngs=nnx.Rngs(3))
  assert dnnx.from_torchvision(state_dict, model) is model
  back = dnnx.to_torchvision(model)
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  wrong = dnnx.DenseNet(**{**tiny_nnx_kwargs, 'growth_rate': 4}, rngs=nnx.Rngs(0))
  with pytest.raises(densenet_jax.StateDictError) as error:
    dnnx.from_torchvision(state_dict, wrong)
  assert '\n' not in str(error.value)


def test_orbax_checkpoints_load_into_nnx_and_back(tmp_path):
  module = densenet_jax.DenseNet(**TINY)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = module.init(jax.random.key(0), images, train=False)
  convert.save_checkpoint(tmp_path / 'linen', module, variables)

  model = dnnx.from_linen(*convert.load_checkpoint(tmp_path / 'linen'))
  assert not model.use_running_average  # Training mode, as any new NNX model.
  model.eval()
  np.testing.assert_array_equal(model(images), module.apply(variables, images, train=False))

  model.train()
  model(images)  # The running averages move ...
  convert.save_checkpoint(tmp_path / 'nnx', *dnnx.to_linen(model))
  restored_module, restored = convert.load_checkpoint(tmp_path / 'nnx')  # ... and are saved.
  jax.tree.map(np.testing.assert_array_equal, restored, dnnx.to_linen(model)[1])
  assert restored_module == module


def test_variables_of_another_network_are_one_line_naming_the_problem():
  variables = densenet_jax.DenseNet(**TINY).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
  other = dnnx.DenseNet(**{**TINY, 'block_config': (2, 3)}, rngs=nnx.Rngs(0))
  with pytest.raises(densenet_jax.StateDictError) as error:
    dnnx.load_linen_variables(other, variables)
  message = str(error.value)
  assert '\n' not in message
  assert re.search(r'params do not fit this NNX DenseNet: missing .*denselayer3', message), message
  assert 'config_from_variables' in message


def readme_nnx_loop() -> str:
  """The README's NNX training loop: the python block of "## Use" that builds `densenet_jax.nnx`."""
  use = (REPO / 'README.md').read_text().split('\n## Use\n', 1)[1].split('\n## ', 1)[0]
  (block,) = [b for b in re.findall(r'```python\n(.*?)```', use, re.S) if 'densenet_jax.nnx.' in b]
  return block


@pytest.mark.slow  # DenseNet-121 at 224x224: its train step compiles for about a minute.
def test_the_readme_nnx_loop_runs_as_written_and_trains():
  code = readme_nnx_loop()
  assert len(code.splitlines()) <= 20
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)
  model, optimizer = namespace['model'], namespace['optimizer']
  assert np.isfinite(namespace['loss']) and int(optimizer.step[...]) == 1
  assert model.use_running_average and all(norm.use_running_average for norm in iter_batch_norms(model))
  # The step moved the weights and the running averages, and evaluation reads them.
  fresh = dnnx.DenseNet121(num_classes=10, rngs=nnx.Rngs(0))
  assert not np.array_equal(model.classifier.kernel[...], fresh.classifier.kernel[...])
  assert not np.array_equal(model.features.norm5.mean[...], fresh.features.norm5.mean[...])
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  module, variables = dnnx.to_linen(model)
  np.testing.assert_array_equal(
    nnx.jit(lambda model: model(images))(model),
    jax.jit(lambda variables: module.apply(variables, images, train=False))(variables),
  )
