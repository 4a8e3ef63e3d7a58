"""benchmarks/input_pipeline.py runs end to end on a small synthetic dataset and reports the ratio."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, optional_module

optional_module('tensorflow_datasets')


@pytest.mark.slow  # builds 100 JPEGs and runs four pipelines
def test_the_benchmark_races_both_pipelines_on_synthetic_jpegs_and_prints_the_ratio(tmp_path):
  command = [sys.executable, str(REPO / 'benchmarks' / 'input_pipeline.py'), '--data_dir', str(tmp_path)]
  command += ['--synthetic_train', '64', '--synthetic_eval', '36', '--batch', '8', '--batches', '2']
  result = subprocess.run(
    [*command, '--warmup', '1', '--rounds', '1'], capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'synthetic_imagenet' in result.stdout and '64 train, 36 eval images' in result.stdout
  rows = re.findall(
    r'^(train|eval) +(densenet-jax|Flax\'s example) +([\d.]+) +([\d.]+) *([\d.]+x)?$', result.stdout, re.M
  )
  assert [(mode, side) for mode, side, *_ in rows] == [
    ('train', 'densenet-jax'),
    ('train', "Flax's example"),
    ('eval', 'densenet-jax'),
    ('eval', "Flax's example"),
  ], result.stdout
  for mode in ('train', 'eval'):
    ours, flax = (row for row in rows if row[0] == mode)
    assert float(ours[2]) > 0 and float(flax[2]) > 0
    assert float(ours[4].rstrip('x')) == pytest.approx(float(ours[2]) / float(flax[2]), abs=0.01)
