"""benchmarks/accelerator.py, the one command for a first GPU or TPU chip, runs here on a tiny model."""

import re
import subprocess
import sys

import pytest
from conftest import KERNELS, REPO


@pytest.mark.slow  # a process that compiles train and eval steps per kernel set
def test_tiny_run_prints_a_row_per_kernel_set():
  # bfloat16 only, to keep the suite short: float32 takes the same code path with another dtype.
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / 'benchmarks' / 'accelerator.py'),
      '--tiny',
      '--steps',
      '2',
      '--dtypes',
      'bfloat16',
    ],
    capture_output=True,
    text=True,
    timeout=600,
    check=True,
  )
  rows = [line.split() for line in result.stdout.splitlines() if re.match(r'(bfloat16|float32) ', line)]
  assert [(r[0], r[1].rstrip('*')) for r in rows] == [('bfloat16', k) for k in KERNELS]
  for row in rows:
    train, evaluate, tflops, _mfu, temp, efficient, compile_seconds = row[2:]
    assert float(train) > 0 and float(evaluate) > 0 and float(tflops) > 0 and float(compile_seconds) > 0
    assert float(temp) > 0 and float(efficient) > 0
  # 'auto' is one of the sets, marked.
  assert sum(r[1].endswith('*') for r in rows) == 1
