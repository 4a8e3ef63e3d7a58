"""Pretrained weights in one call: fetched from the Hub, cached, reused offline, converted; files too.

No test reaches the internet. A local HTTP server plays the Hugging Face Hub (`HF_ENDPOINT`) and
serves our tiny torchvision reference net (tests/data) as a safetensors file, in a repository
named like timm's; each call runs in a fresh process, as huggingface_hub reads its settings at
import.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import DATA, REPO, import_over_cpu_torch, max_relative_error, optional_module, section

import densenet_jax
from densenet_jax import PRETRAINED, StateDictError, weights

REPO_ID = 'test-org/tiny-densenet.tv_in1k'


class Hub(http.server.ThreadingHTTPServer):
  """`/{repo}/resolve/{revision}/{file}`: HEAD and GET, with the headers huggingface_hub reads."""

  def __init__(self, files: dict[str, bytes]):
    super().__init__(('localhost', 0), HubHandler)
    self.files = files
    self.requests: list[str] = []
    self.truncate = False  # drop the connection halfway through each GET

  @property
  def url(self) -> str:
    return f'http://localhost:{self.server_address[1]}'


class HubHandler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass

  def _file(self) -> str:
    parts = self.path.split('?')[0].strip('/').split('/')
    return f'{parts[0]}/{parts[1]}/{parts[-1]}' if len(parts) >= 5 else ''

  def _headers(self) -> bytes | None:
    self.server.requests.append(f'{self.command} {self.path}')
    data = self.server.files.get(self._file())
    if data is None:
      self.send_response(404)
      self.send_header('X-Error-Code', 'EntryNotFound')
      self.send_header('Content-Length', '0')
      self.end_headers()
      return None
    self.send_response(200)
    self.send_header('X-Repo-Commit', hashlib.sha1(data).hexdigest())
    self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
    self.send_header('Content-Length', str(len(data)))
    self.send_header('Content-Type', 'application/octet-stream')
    self.end_headers()
    return data

  def do_HEAD(self):  # noqa: N802
    self._headers()

  def do_GET(self):  # noqa: N802
    start = int(self.headers.get('Range', 'bytes=0-')[len('bytes=') :].split('-')[0] or 0)
    if start:  # huggingface_hub resuming an interrupted download
      self.server.requests.append(f'GET {self.path} from {start}')
      data = self.server.files[self._file()]
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
      self.send_header('Content-Length', str(len(data) - start))
      self.end_headers()
      self.wfile.write(data[start:])
      return
    data = self._headers()
    if data is not None:
      self.wfile.write(data[: len(data) // 2] if self.server.truncate else data)


@pytest.fixture
def hub(tiny_reference):
  from safetensors.numpy import save

  state_dict = {k: np.ascontiguousarray(v) for k, v in section(tiny_reference, 'state_dict').items()}
  server = Hub({f'{REPO_ID}/model.safetensors': save(state_dict)})
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()


def call(code: str, env: dict) -> dict:
  """Runs `code` (which prints one JSON line) in a fresh process; its output, or its error line."""
  result = subprocess.run(
    [sys.executable, '-c', 'import json, numpy as np, densenet_jax\n' + code],
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'HF_HUB_DISABLE_TELEMETRY': '1', **env},
    capture_output=True,
    text=True,
    timeout=300,
  )
  if result.returncode != 0:
    return {'error': result.stderr.strip().splitlines()[-1], 'stderr': result.stderr}
  return json.loads(result.stdout.strip().splitlines()[-1])


LOGITS = f"""
model, variables = densenet_jax.pretrained('hf-hub:{REPO_ID}', **kwargs)
images = np.load('{DATA}/tiny_densenet_torchvision.npz')['input_nchw'].transpose(0, 2, 3, 1)
logits = model.apply(variables, images, train=False)
print(json.dumps({{'logits': np.asarray(logits).tolist(), 'num_classes': model.num_classes}}))
"""


def test_fetched_cached_reused_offline_and_equal_to_torchvision(tmp_path, hub, tiny_reference):
  env = {'HF_ENDPOINT': hub.url, 'HF_HOME': str(tmp_path / 'hf')}
  first = call('kwargs = {}' + LOGITS, env)
  assert 'error' not in first, first.get('stderr', '')[-3000:]
  assert max_relative_error(first['logits'], tiny_reference['logits_eval']) < 1e-5
  assert [r.split()[0] for r in hub.requests] == ['HEAD', 'GET']
  # Offline (HF_HUB_OFFLINE=1), with the server gone: from the cache, the same logits.
  hub.shutdown()
  offline = call('kwargs = {}' + LOGITS, {**env, 'HF_HUB_OFFLINE': '1'})
  assert offline['logits'] == first['logits']
  # A new classifier for another class count, said in a log line.
  ten = call("kwargs = {'num_classes': 10}" + LOGITS, {**env, 'HF_HUB_OFFLINE': '1'})
  assert ten['num_classes'] == 10 and np.shape(ten['logits']) == (4, 10)


def test_offline_and_not_cached_is_one_line_naming_the_file_and_the_fix(tmp_path):
  code = "densenet_jax.pretrained('densenet121')"
  result = call(code, {'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'})
  assert result['error'].startswith('densenet_jax.weights.PretrainedError: timm/densenet121.tv_in1k/')
  assert 'model.safetensors is not in the Hugging Face cache' in result['error']
  assert 'hf download timm/densenet121.tv_in1k model.safetensors' in result['error']
  assert 'models--timm--densenet121.tv_in1k' in result['error']


def test_an_interrupted_download_leaves_nothing_a_later_call_would_read(tmp_path, hub, tiny_reference):
  env = {'HF_ENDPOINT': hub.url, 'HF_HOME': str(tmp_path / 'hf')}
  hub.truncate = True
  interrupted = call('kwargs = {}' + LOGITS, env)
  assert 'PretrainedError' in interrupted['error'], interrupted.get('stderr', '')[-3000:]
  snapshots = tmp_path / 'hf' / 'hub' / f'models--{REPO_ID.replace("/", "--")}' / 'snapshots'
  assert not [p for p in snapshots.rglob('*') if p.is_file()]  # no file where a reader looks
  hub.truncate = False
  resumed = call('kwargs = {}' + LOGITS, env)
  assert max_relative_error(resumed['logits'], tiny_reference['logits_eval']) < 1e-5


def test_an_unknown_name_lists_the_known_ones():
  with pytest.raises(
    ValueError, match=r"no pretrained weights named 'densenet_121'.*densenet121, densenet161"
  ):
    weights.repo_of('densenet_121')
  assert list(PRETRAINED) == [
    'densenet121',
    'densenet161',
    'densenet169',
    'densenet201',
    'densenet121.ra_in1k',
    'densenetblur121d.ra_in1k',
  ]
  assert PRETRAINED['densenet121'].top1 == 74.434  # torchvision's published figure


def test_timms_own_weights_by_timms_names_with_the_preprocessing_they_were_evaluated_with():
  import densenet_jax

  # timm's results-imagenet.csv: top-1, top-5 at 288 px, crop 0.95, bicubic (its pretrained_cfg).
  for name, model, top1, top5 in (
    ('densenet121.ra_in1k', densenet_jax.DenseNet121, 76.500, 93.368),
    ('densenetblur121d.ra_in1k', densenet_jax.DenseNetBlur121d, 77.320, 93.790),
  ):
    entry = PRETRAINED[name]
    assert weights.repo_of(name) == f'timm/{name}' and entry.model is model and entry.source == 'timm'
    assert (entry.top1, entry.top5) == (top1, top5)
    assert (entry.input_size, entry.crop_fraction, entry.interpolation) == (288, 0.95, 'bicubic')
  # torchvision's were evaluated with Resize(256) + CenterCrop(224), bilinear.
  tv = PRETRAINED['densenet121']
  assert (tv.input_size, tv.crop_fraction, tv.interpolation) == (224, 0.875, 'bilinear')
  assert tv.mean == PRETRAINED['densenet121.ra_in1k'].mean == tuple(255 * m for m in (0.485, 0.456, 0.406))


def test_a_timm_name_offline_and_not_cached_names_its_repository(tmp_path):
  result = call(
    "densenet_jax.pretrained('densenetblur121d.ra_in1k')", {'HF_HOME': str(tmp_path), 'HF_HUB_OFFLINE': '1'}
  )
  assert 'hf download timm/densenetblur121d.ra_in1k model.safetensors' in result['error']


@pytest.mark.slow  # a full-size timm DenseNet, saved and served
def test_a_timm_name_loads_timms_weights_and_gives_timms_logits(tmp_path):
  """timm's densenetblur121d (random weights, timm's own state dict) served as the named repository."""
  from safetensors.numpy import save

  timm = import_over_cpu_torch('timm')
  import torch

  torch.manual_seed(0)
  model = timm.create_model('densenetblur121d', pretrained=False).eval()
  with torch.no_grad():  # Running averages other than 0 and 1, so that eval mode tests them.
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 1.5)
  images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = model(images).numpy()
  state_dict = {k: np.ascontiguousarray(v.numpy()) for k, v in model.state_dict().items()}
  server = Hub({'timm/densenetblur121d.ra_in1k/model.safetensors': save(state_dict)})
  threading.Thread(target=server.serve_forever, daemon=True).start()
  np.save(tmp_path / 'images.npy', images.numpy().transpose(0, 2, 3, 1))
  code = f"""
model, variables = densenet_jax.pretrained('densenetblur121d.ra_in1k')
logits = model.apply(variables, np.load('{tmp_path}/images.npy'), train=False)
print(json.dumps({{'logits': np.asarray(logits).tolist(), 'stem': model.stem, 'blur': model.blur_pool}}))
"""
  try:
    result = call(code, {'HF_ENDPOINT': server.url, 'HF_HOME': str(tmp_path / 'hf')})
  finally:
    server.shutdown()
  assert 'error' not in result, result.get('stderr', '')[-3000:]
  assert (result['stem'], result['blur']) == ('deep', True)
  assert max_relative_error(result['logits'], expected) < 1e-5


def test_from_torchvision_reads_a_safetensors_file_without_torch(tmp_path, tiny_reference):
  from safetensors.numpy import save_file

  state_dict = {k: np.ascontiguousarray(v) for k, v in section(tiny_reference, 'state_dict').items()}
  save_file(state_dict, tmp_path / 'tiny.safetensors')
  code = f"""
import sys
sys.modules['torch'] = None  # any import of torch fails
from densenet_jax.torchvision_port import config_from_variables
variables = densenet_jax.from_torchvision('{tmp_path}/tiny.safetensors')
model = densenet_jax.DenseNet(**config_from_variables(variables))
checked = densenet_jax.from_torchvision('{tmp_path}/tiny.safetensors', model)
images = np.load('{DATA}/tiny_densenet_torchvision.npz')['input_nchw'].transpose(0, 2, 3, 1)
print(json.dumps({{'logits': np.asarray(model.apply(checked, images, train=False)).tolist()}}))
"""
  result = call(code, {})
  assert 'error' not in result, result.get('stderr', '')[-3000:]
  assert max_relative_error(result['logits'], tiny_reference['logits_eval']) < 1e-5
  (tmp_path / 'tiny.npz').write_bytes(b'')
  with pytest.raises(StateDictError, match=r'must end in \.safetensors'):
    weights.load_state_dict(tmp_path / 'tiny.npz')


def test_the_finetune_config_starts_from_pretrained_weights_and_eval_mode_evaluates_them(
  tmp_path, hub, monkeypatch, tiny_reference
):
  """configs/finetune.py with init_from a Hub name (the tiny net), on mock Imagenette."""
  import importlib

  import ml_collections
  import tensorflow_datasets as tfds
  from huggingface_hub import constants

  from configs import finetune
  from densenet_jax import from_torchvision
  from densenet_jax.train import loop, setup

  monkeypatch.setenv('HF_ENDPOINT', hub.url)
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
  importlib.reload(constants)  # huggingface_hub reads its settings at import
  try:
    kwargs = json.loads((DATA / 'tiny_densenet_torchvision.json').read_text())[
      'torchvision.models.DenseNet kwargs'
    ]
    config = finetune.get_config()
    assert config.init_from == 'densenet121'
    config.init_from = f'hf-hub:{REPO_ID}'
    config.model = 'densenet'
    config.model_kwargs = ml_collections.ConfigDict({k: v for k, v in kwargs.items() if k != 'num_classes'})
    config.data_dir = str(tmp_path / 'data')
    config.image_size = 48
    config.batch_size = config.eval_batch_size = 8
    config.total_steps = 2
    config.progress_bar = False
    config.compilation_cache_dir = ''
    with tfds.testing.mock_data(num_examples=16):
      s = setup.setup(config, tmp_path / 'run')
      loaded = setup.load_init_from(s, s.create_state())
      expected = from_torchvision(section(tiny_reference, 'state_dict'))
      for name in ('conv0', 'classifier'):
        np.testing.assert_array_equal(
          np.asarray(loaded.params[name]['kernel']), expected['params'][name]['kernel']
        )
      final = loop.train_and_evaluate(config, tmp_path / 'run')
      config.mode = 'eval'
      evaluated = loop.evaluate(config, tmp_path / 'pretrained_eval')  # no checkpoint: the weights
  finally:
    monkeypatch.undo()
    importlib.reload(constants)
  assert final['step'] == 2 and evaluated['step'] == 0 and evaluated['test_examples'] == 16
  assert json.loads((tmp_path / 'pretrained_eval' / 'eval_metrics.json').read_text()) == evaluated


def test_init_from_takes_a_safetensors_or_pth_file_with_the_same_result(tmp_path, tiny_reference):
  from safetensors.numpy import save_file

  from densenet_jax import from_torchvision
  from densenet_jax.train import registry, setup

  torch = optional_module('torch')
  state_dict = {k: np.ascontiguousarray(v) for k, v in section(tiny_reference, 'state_dict').items()}
  save_file(state_dict, tmp_path / 'tiny.safetensors')
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'tiny.pth')
  expected = from_torchvision(state_dict)
  for name in ('tiny.safetensors', 'tiny.pth'):
    description, variables = setup.init_from_variables(str(tmp_path / name))
    assert description == str(tmp_path / name)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
      np.testing.assert_array_equal(got, want)
  with pytest.raises(
    registry.ConfigError, match=r"neither a pretrained name \(densenet121, .*'hf-hub:OWNER/REPO'\)"
  ):
    setup.init_from_variables(str(tmp_path / 'missing.safetensors'))


@pytest.mark.parametrize('as_published', [True, False])
def test_eval_mode_of_a_pretrained_name_preprocesses_as_its_publisher_did(
  tmp_path, hub, monkeypatch, capsys, as_published
):
  """mode=eval with init_from a name: its entry's size, crop and interpolation, unless turned off."""
  import dataclasses
  import functools
  import importlib

  import ml_collections
  import tensorflow_datasets as tfds
  from huggingface_hub import constants

  from configs import finetune
  from densenet_jax.models import DenseNet
  from densenet_jax.train import loop, preprocess

  kwargs = json.loads((DATA / 'tiny_densenet_torchvision.json').read_text())[
    'torchvision.models.DenseNet kwargs'
  ]
  kwargs['block_config'] = tuple(kwargs['block_config'])
  entry = dataclasses.replace(
    PRETRAINED['densenet121.ra_in1k'],
    repo_id=REPO_ID,
    model=functools.partial(DenseNet, **kwargs),
    input_size=48,
  )
  monkeypatch.setitem(PRETRAINED, 'tiny.ra_in1k', entry)
  crops = []
  center_crop = preprocess.center_crop
  monkeypatch.setattr(
    preprocess,
    'center_crop',
    lambda encoded, *args: crops.append(args[0:1] + args[2:]) or center_crop(encoded, *args),
  )
  monkeypatch.setenv('HF_ENDPOINT', hub.url)
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
  importlib.reload(constants)  # huggingface_hub reads its settings at import
  try:
    config = finetune.get_config()
    config.update(
      mode='eval',
      init_from='tiny.ra_in1k',
      eval_as_published=as_published,
      model='densenet',
      model_kwargs=ml_collections.ConfigDict({k: v for k, v in kwargs.items() if k != 'num_classes'}),
      data_dir=str(tmp_path / 'data'),
      image_size=40,
      batch_size=8,
      eval_batch_size=8,
      progress_bar=False,
      compilation_cache_dir='',
    )
    with tfds.testing.mock_data(num_examples=8):
      evaluated = loop.evaluate(config, tmp_path / 'eval')
  finally:
    monkeypatch.undo()
    importlib.reload(constants)
  assert evaluated['step'] == 0 and evaluated['test_examples'] == 8
  out = capsys.readouterr().out
  if as_published:
    assert crops and set(crops) == {(48, 0.95, 'bicubic')}
    assert 'Evaluating tiny.ra_in1k as timm did: 48x48, a center crop of 0.95' in out
  else:
    assert crops and set(crops) == {(40, config.eval_crop_fraction, 'bilinear')}
    assert 'as timm did' not in out


NNX_LOGITS = f"""
import sys
sys.modules['torch'] = None  # any import of torch fails
model = densenet_jax.nnx.pretrained(NAME)
model.eval()
images = np.load('{DATA}/tiny_densenet_torchvision.npz')['input_nchw'].transpose(0, 2, 3, 1)
linen_model, variables = densenet_jax.pretrained(NAME)
print(json.dumps({{
  'nnx': np.asarray(model(images)).tolist(),
  'linen': np.asarray(linen_model.apply(variables, images, train=False)).tolist(),
  'type': type(model).__name__,
}}))
"""


def test_nnx_pretrained_is_torch_free_cached_offline_and_equal_to_torchvision(tmp_path, hub, tiny_reference):
  env = {'HF_ENDPOINT': hub.url, 'HF_HOME': str(tmp_path / 'hf')}
  first = call(f"NAME = 'hf-hub:{REPO_ID}'" + NNX_LOGITS, env)
  assert 'error' not in first, first.get('stderr', '')[-3000:]
  assert first['type'] == 'DenseNet'
  assert max_relative_error(first['nnx'], tiny_reference['logits_eval']) < 1e-5
  assert first['nnx'] == first['linen']
  hub.shutdown()
  offline = call(f"NAME = 'hf-hub:{REPO_ID}'" + NNX_LOGITS, {**env, 'HF_HUB_OFFLINE': '1'})
  assert 'error' not in offline, offline.get('stderr', '')[-3000:]
  assert offline['nnx'] == first['nnx']


@pytest.mark.slow  # a full-size DenseNet-121, saved and served
def test_nnx_pretrained_densenet121_by_name(tmp_path):
  """'densenet121' (torchvision's weights, in timm's repository; fresh ones here) into NNX."""
  from safetensors.numpy import save

  module = PRETRAINED['densenet121'].model()
  variables = jax.jit(lambda key: module.init(key, np.zeros((1, 64, 64, 3), np.float32), train=False))(
    jax.random.key(0)
  )
  state_dict = densenet_jax.to_torchvision(variables)
  rng = np.random.default_rng(1)
  for key in state_dict:  # Running averages other than 0 and 1, so that eval mode tests them.
    if key.endswith('running_mean'):
      state_dict[key] = rng.uniform(-0.5, 0.5, state_dict[key].shape).astype(np.float32)
    elif key.endswith('running_var'):
      state_dict[key] = rng.uniform(0.5, 1.5, state_dict[key].shape).astype(np.float32)
  server = Hub({f'{PRETRAINED["densenet121"].repo_id}/model.safetensors': save(state_dict)})
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    result = call(
      "NAME = 'densenet121'" + NNX_LOGITS, {'HF_ENDPOINT': server.url, 'HF_HOME': str(tmp_path / 'hf')}
    )
  finally:
    server.shutdown()
  assert 'error' not in result, result.get('stderr', '')[-3000:]
  assert result['type'] == 'DenseNet'
  assert np.all(np.isfinite(result['nnx'])) and np.std(result['nnx']) > 0
  assert result['nnx'] == result['linen']
