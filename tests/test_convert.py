"""python -m densenet_jax.convert: torchvision .pth <-> orbax checkpoint, same numbers."""

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import max_relative_error, optional_module, section

from densenet_jax import convert

torch = optional_module('torch')


@pytest.fixture
def published_style_pth(tmp_path, tiny_reference):
  """The tiny reference weights saved by torch with the legacy keys of published files."""
  state_dict = section(tiny_reference, 'state_dict')
  legacy = {
    re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', k): torch.from_numpy(v)
    for k, v in state_dict.items()
  }
  path = tmp_path / 'tiny.pth'
  torch.save(legacy, path)
  return path


def test_pth_to_checkpoint_and_back(tmp_path, published_style_pth, tiny_reference, capsys):
  checkpoint = tmp_path / 'ckpt'
  assert convert.main(['to-jax', str(published_style_pth), str(checkpoint)]) == 0
  assert 'block_config=(2, 3, 2)' in capsys.readouterr().out

  model, variables = convert.load_checkpoint(checkpoint)
  assert (model.growth_rate, model.block_config, model.num_init_features, model.num_classes) == (
    8,
    (2, 3, 2),
    16,
    10,
  )
  logits = model.apply(variables, tiny_reference['input_nchw'].transpose(0, 2, 3, 1), train=False)
  assert max_relative_error(logits, tiny_reference['logits_eval']) <= 1e-5

  back = tmp_path / 'back.pth'
  assert convert.main(['to-torch', str(checkpoint), str(back)]) == 0
  restored = torch.load(back, weights_only=True)
  original = section(tiny_reference, 'state_dict')  # Current keys, as to_torchvision writes.
  assert restored.keys() == original.keys()
  for key, value in original.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(restored[key].numpy(), value, err_msg=key)


def test_errors_name_the_problem_and_keep_what_exists(tmp_path, published_style_pth, capsys):
  checkpoint = tmp_path / 'ckpt'
  checkpoint.mkdir()
  (checkpoint / 'keep.txt').write_text('precious')
  assert convert.main(['to-jax', str(published_style_pth), str(checkpoint)]) == 1
  assert 'exists; choose a new directory (nothing was overwritten)' in capsys.readouterr().err
  assert (checkpoint / 'keep.txt').read_text() == 'precious'

  not_densenet = tmp_path / 'resnet.pth'
  torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(10, 512)}, not_densenet)
  assert convert.main(['to-jax', str(not_densenet), str(tmp_path / 'new')]) == 1
  assert 'Not a torchvision DenseNet state dict: 2 of 2 keys' in capsys.readouterr().err
  assert not (tmp_path / 'new').exists()


def test_command_line_runs_as_a_module():
  result = subprocess.run(
    [sys.executable, '-m', 'densenet_jax.convert', '--help'], capture_output=True, text=True
  )
  assert result.returncode == 0 and 'to-jax' in result.stdout and 'to-torch' in result.stdout
