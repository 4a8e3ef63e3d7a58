"""Train (or evaluate) a DenseNet from an ml_collections config file.

  python train.py --config configs/digits.py --workdir /tmp/digits
  python train.py --config configs/densenet121.py --workdir /ckpt/d121 --config.batch_size=512
  python train.py --config configs/cifar10.py --workdir /ckpt/c10 --config.mode=eval

Running it again with the same --workdir resumes from the latest checkpoint. Errors in the
config or data are one line on stderr and a non-zero exit code; SIGTERM saves and exits 143, Ctrl-C
saves and exits 130 (a second Ctrl-C stops at once).
"""

import gc
import importlib.util
import os
import re
import sys

# glibc's malloc, asked for transparent huge pages (2 MiB) for its large blocks. XLA:CPU
# allocates every execution's temporary buffers afresh (3 GB for a DenseNet-121 train step
# at batch 16) and glibc maps them anew each time: with 4 KiB pages that is ~780,000 page
# faults per step, a third of the step on CPU. No effect where the kernel has THP off.
HUGE_PAGE_TUNABLE = 'glibc.malloc.hugetlb=1'
# JAX's accelerator plugins: where one is installed, the step runs on TPU or GPU (whose memory
# glibc does not allocate) and the re-exec buys nothing.
ACCELERATOR_PACKAGES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin')


def runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU, told without importing it (so before the re-exec)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PACKAGES)


def restart_with_huge_page_malloc() -> None:
  """Re-executes this process with HUGE_PAGE_TUNABLE in GLIBC_TUNABLES (read at start-up only).

  Only where JAX runs on the CPU (where it was measured), on Linux, and when GLIBC_TUNABLES does
  not set `glibc.malloc.hugetlb` already (so `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns it off).
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if sys.platform != 'linux' or 'glibc.malloc.hugetlb' in tunables or not runs_on_cpu():
    return
  os.environ['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGE_TUNABLE}' if tunables else HUGE_PAGE_TUNABLE
  os.execv(sys.executable, sys.orig_argv)


if __name__ == '__main__':
  restart_with_huge_page_malloc()

# Before TensorFlow is imported (by the input pipeline): keep its C++ logs quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_dict, config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/digits.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message: str, code: int = 1) -> None:
  """One line on stderr, no traceback."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config override mistakes reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(f'{str(error).rstrip(".")}. See --helpshort.', 2)
  except OSError as error:  # The config file cannot be read.
    missing = re.search(r"No such file or directory: '(.+)'", str(error))
    what = f'{missing.group(1)!r}: no such file' if missing else str(error).strip().splitlines()[-1].strip()
    fail(f'cannot load the config file {what}; see configs/ (e.g. configs/digits.py).', 2)
  except (KeyError, AttributeError) as error:
    # ml_collections' message is a repr of a repr; take the key and its suggestion out of it.
    text = str(error).replace('\\', '')
    key = next(iter(re.findall(r"'([\w.]+)'", text)), text)
    suggestion = re.search(r'Did you mean "([\w.]+)"', text)
    culprit = next(
      (a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and a.split('=')[0].endswith(key)), ''
    )
    fail(
      f'unknown config key {key!r}'
      + (f' in {culprit}' if culprit else '')
      + (f'; did you mean {suggestion.group(1)!r}?' if suggestion else '.')
      + ' All the keys and their meaning are in configs/default.py.',
      2,
    )
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; settings go in --config.NAME=VALUE.', 2)
  config = _CONFIG.value
  if not isinstance(config, config_dict.ConfigDict):
    path = flags.FLAGS['config'].config_filename
    reason = (
      'no such file' if not os.path.exists(path) else 'it defines no get_config() returning a ConfigDict'
    )
    fail(
      f'cannot load the config file {path!r}: {reason}; see configs/ (e.g. configs/digits.py).',
      2,
    )
  # The loop prints the progress; absl logging (orbax's, JAX's) only for warnings, unless asked.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)

  import jax

  from densenet_jax.train.reporting import quiet_native_startup

  with quiet_native_startup():  # TensorFlow's C++ start-up lines, before the run's first line.
    import tensorflow as tf

    from densenet_jax.torchvision_port import StateDictError
    from densenet_jax.train import distributed, input_pipeline, loop
    from densenet_jax.train.checkpoints import SIGINT_EXIT_CODE, Preempted
    from densenet_jax.train.registry import ConfigError
    from densenet_jax.weights import PretrainedError

  is_distributed = False
  try:
    is_distributed = distributed.initialize_distributed(config)
    if config.compilation_cache_dir:
      jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
    tf.config.set_visible_devices([], 'GPU')  # tf.data only: leave the accelerators to JAX.
    # The imports leave about 470,000 objects that live as long as the process; the full
    # collections that tracing the train step sets off would scan them all again. Frozen, they
    # are skipped: tracing takes 0.1 s less (1.70 -> 1.57 s for DenseNet-121).
    gc.freeze()
    try:
      if config.mode == 'eval':
        loop.evaluate(config, _WORKDIR.value)
      else:
        loop.train_and_evaluate(config, _WORKDIR.value)
    finally:
      if is_distributed:
        jax.distributed.shutdown()  # Together, now: left to exit, it waits out a timeout.
  except Preempted as preempted:
    print(preempted.message(_WORKDIR.value), file=sys.stderr)
    sys.exit(preempted.exit_code)
  except KeyboardInterrupt:  # Ctrl-C outside the training steps (set-up, evaluation mode).
    fail(
      f'interrupted (Ctrl-C); the checkpoints already saved in {_WORKDIR.value} are kept.', SIGINT_EXIT_CODE
    )
  except (
    ConfigError,
    loop.TrainingError,
    input_pipeline.DataError,
    StateDictError,
    PretrainedError,
    FileNotFoundError,
  ) as error:
    fail(str(error))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
