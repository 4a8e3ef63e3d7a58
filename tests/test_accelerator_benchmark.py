"""benchmarks/accelerator.py, the one command for a first GPU or TPU chip, runs here on a tiny model."""

import re
import subprocess
import sys

import pytest
from conftest import KERNELS, REPO

# What a bare accelerator machine lacks: the script runs with these imports refused.
ABSENT = ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'torch', 'torchvision', 'timm')
REFUSE_IMPORTS = f"""
import runpy, sys

class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {ABSENT!r}:
      raise ModuleNotFoundError(f'No module named {{name!r}} (refused by the test)', name=name)

sys.meta_path.insert(0, Refuse())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
loaded = sorted(name for name in sys.modules if name.split('.')[0] in {ABSENT!r})
assert not loaded, loaded
"""


def run_benchmark(*args: str, bare: bool = False) -> str:
  prefix = ['-c', REFUSE_IMPORTS] if bare else []
  command = [sys.executable, *prefix, str(REPO / 'benchmarks' / 'accelerator.py'), '--tiny', '--steps', '2']
  # A made-up chip (2 TFLOP/s, 50 GB/s): the roofline columns are computed as on a chip in the table.
  command += ['--dtypes', 'bfloat16', '--peak-tflops', '2', '--bandwidth-tbs', '0.05', *args]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def rows(output: str) -> list[list[str]]:
  return [line.split() for line in output.splitlines() if re.match(r'(bfloat16|float32) ', line)]


@pytest.mark.slow  # a process that compiles train and eval steps per kernel set, and timm's
def test_tiny_run_prints_a_row_per_kernel_set_with_its_roofline_and_timm_beside_it():
  output = run_benchmark()
  table = rows(output)
  assert [(r[0], r[1].rstrip('*')) for r in table] == [('bfloat16', k) for k in KERNELS]
  for row in table:
    train, evaluate, tflops, mfu, gflop, megabytes, roof, bound, reached, temp, efficient, compiled = row[2:]
    assert float(train) > 0 and float(evaluate) > 0 and float(tflops) > 0 and float(compiled) > 0
    assert float(temp) > 0 and float(efficient) > 0 and float(gflop) > 0 and float(megabytes) > 0
    # The roofline is max(FLOPs / peak, bytes / bandwidth) per image, and no step beats it.
    per_image_seconds = max(float(gflop) * 1e9 / 2e12, float(megabytes) * 1e6 / 0.05e12)
    assert float(roof) == pytest.approx(1 / per_image_seconds, rel=0.01, abs=1)
    assert bound == ('(mem)' if float(megabytes) * 1e6 / 0.05e12 > float(gflop) * 1e9 / 2e12 else '(com)')
    assert 0 < float(reached.rstrip('%')) <= 100
    assert float(mfu.rstrip('%')) == pytest.approx(100 * float(tflops) / 2, abs=0.06)
  # 'auto' is one of the sets, marked.
  assert sum(r[1].endswith('*') for r in table) == 1
  # timm's DenseNet of the same shape, trained in the same run, and the ratio.
  assert re.search(
    r'^timm \S+ tiny DenseNet \(torch .*\): train [\d.]+ img/s, eval [\d.]+ img/s$', output, re.M
  )
  assert re.search(r'^densenet-jax bfloat16 \(\w+\) / timm: train [\d.]+x, eval [\d.]+x$', output, re.M)


@pytest.mark.slow  # a process that compiles a train and an eval step
def test_it_runs_on_a_bare_accelerator_machine_without_tensorflow_ml_collections_or_torch():
  output = run_benchmark('--kernels', 'xla', bare=True)
  assert [r[:2] for r in rows(output)] == [['bfloat16', 'xla']]
  assert 'timm: skipped: torch or timm is not installed' in output


def test_the_chip_table_has_the_h200_and_every_chip_has_a_peak_and_a_bandwidth():
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import accelerator

  assert accelerator.chip_figures('NVIDIA H200') == (989, 4.8)
  assert accelerator.chip_figures('NVIDIA H100 80GB HBM3') == (989, 3.35)
  assert accelerator.chip_figures('TPU v5 lite') == (197, 0.82)
  assert accelerator.chip_figures('a chip nobody knows') == (None, None)
  assert all(tflops > 0 and tbs > 0 for tflops, tbs in accelerator.CHIPS.values())
  # DenseNet-121's bfloat16 train step (about 16 GFLOP and 2 GB per image) is memory-bound on an H200.
  assert accelerator.roofline(16e9, 2e9, 989, 4.8)['bound'] == 'memory'
