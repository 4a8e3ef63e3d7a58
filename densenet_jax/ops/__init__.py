"""Kernel sets: the operations a DenseNet is built from, one set per kind of backend.

`densenet_jax.models` describes the network; the convolutions, BatchNorms, pools and (in training)
the dense block's schedule come from the kernel set named by `DenseNet.kernels`:

* `'xla'` (`ops/xla.py`): the stock Flax and `jax.lax` operations, `nn.Conv`, `nn.BatchNorm`,
  `nn.max_pool`, `nn.avg_pool`, and `nn.remat` for `memory_efficient`. The reference: every other
  set must compute what it computes.
* `'cpu'` (`ops/cpu_*.py`): forms XLA:CPU runs about twice as fast (docs/performance.md): 1x1
  convolutions as matrix products, the dense layers' 3x3 convolutions as products and shifted sums
  with a hand-written gradient, BatchNorm with a hand-written gradient and statistics shared within
  a dense block, pools as strided slices, evaluation in cache-sized pieces of the batch.
* `'auto'` (the default): `'cpu'` on the CPU, `'xla'` on TPU and GPU (`kernel_set`).

Every set has the same variables, so any checkpoint or torchvision state dict loads into any set.
tests/test_kernel_sets.py compares each set with the reference in float64, values and gradients.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from densenet_jax.ops import cpu_batch_norm, cpu_block, cpu_conv, cpu_pool, xla

ModuleDef = Any


@dataclasses.dataclass(frozen=True)
class KernelSet:
  """The operations of one kernel set.

  Attributes:
    name: the set's name, the value of `DenseNet.kernels` that selects it.
    conv: `conv(features, kernel_size, strides=1, padding=0, *, train, dtype, param_dtype, kernel_init)`
      -> a module with `nn.Conv`'s one parameter, `kernel` (HWIO), and no bias.
    batch_norm: a module class with `nn.BatchNorm`'s attributes and variables and a `relu` attribute.
    max_pool: `max_pool(x, size, stride, padding)`, as `nn.max_pool` pads (with -inf).
    avg_pool: the transitions' 2x2 average pool, stride 2.
    train_block: `train_block(block, layer, names, x, dropout_rngs)` -> a dense block's output in
      training, computed this set's way (it honours `block.memory_efficient`); None for the block's
      own loop (`models.DenseBlock`), with `nn.remat` for `memory_efficient`.
    eval_in_pieces: whether dense blocks evaluate on cache-sized pieces of the batch by default
      (`DenseNet.eval_in_pieces`, `ops/pieces.py`).
  """

  name: str
  conv: Callable[..., ModuleDef]
  batch_norm: ModuleDef
  max_pool: Callable[..., jax.Array]
  avg_pool: Callable[[jax.Array], jax.Array]
  train_block: Callable[..., jax.Array] | None
  eval_in_pieces: bool


KERNEL_SETS = {
  'xla': KernelSet(
    name='xla',
    conv=xla.conv,
    batch_norm=xla.BatchNorm,
    max_pool=xla.max_pool,
    avg_pool=xla.avg_pool,
    train_block=None,
    eval_in_pieces=False,
  ),
  'cpu': KernelSet(
    name='cpu',
    conv=cpu_conv.Conv,
    batch_norm=cpu_batch_norm.BatchNorm,
    max_pool=cpu_pool.max_pool,
    avg_pool=cpu_pool.avg_pool,
    train_block=cpu_block.train_block,
    eval_in_pieces=True,
  ),
}
KERNELS = ('auto', *KERNEL_SETS)


def kernel_set(name: str = 'auto') -> KernelSet:
  """The kernel set called `name`; 'auto' picks by the default backend.

  This is the one place that reads the backend. On the CPU, 'auto' is 'cpu'. On TPU and GPU it is
  'xla': the CPU set's forms are written around XLA:CPU's slow spots (narrow convolutions,
  select_and_scatter, its cache), which TPU and GPU compilers do not share, and they are unmeasured
  there; `benchmarks/accelerator.py` measures both sets on a chip and decides.
  """
  if name == 'auto':
    name = 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  if name not in KERNEL_SETS:
    raise ValueError(f'kernels must be one of {", ".join(map(repr, KERNELS))}; got {name!r}.')
  return KERNEL_SETS[name]
