"""Outside training a dense block may run on pieces of the batch: each image's numbers stay the same."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BATCH_NORMS, KERNELS, enable_x64

from densenet_jax import DenseNet121, kernel_set
from densenet_jax.models import DenseBlock
from densenet_jax.ops.pieces import map_over_pieces


def dense_block(
  kernels: str, growth_rate: int, eval_piece_bytes: int | None, train: bool = False
) -> DenseBlock:
  """Three float64 dense layers built from the kernel set `kernels`, as `DenseNet` builds them."""
  ops = kernel_set(kernels)
  dtypes = dict(dtype=jnp.float64, param_dtype=jnp.float64)
  return DenseBlock(
    num_layers=3,
    growth_rate=growth_rate,
    bn_size=2,
    drop_rate=0.0,
    memory_efficient=False,
    conv=partial(ops.conv, train=train, **dtypes),
    norm=partial(ops.batch_norm, use_running_average=not train, **dtypes),
    train_block=ops.train_block,
    eval_piece_bytes=eval_piece_bytes,
  )


def scan_lengths(function, *args) -> list[int]:
  """The lengths of the loops (`jax.lax.map`, `scan`) in function's jaxpr."""
  return [int(n) for n in re.findall(r'length=(\d+)', str(jax.make_jaxpr(function)(*args)))]


# Growth rate 4 on 6x6 takes the 3x3 convolutions' direct form, 32 on 8x8 Winograd's.
@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('growth_rate, side', [(4, 6), (32, 8)])
def test_block_in_pieces_equals_the_whole_batch_in_float64(growth_rate, side, kernels):
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), (7, side, side, 5), jnp.float64)
    whole = dense_block(kernels, growth_rate, None)
    variables = whole.init(jax.random.key(1), x, train=False)
    # Up to 2 images per piece: 4 pieces for 7 images (one of them padding).
    image_bytes = side * side * (5 + 3 * growth_rate) * 8
    pieces = dense_block(kernels, growth_rate, 2 * image_bytes + 1)

    def apply(block, x):
      return block.apply(variables, x, train=False)

    assert scan_lengths(partial(apply, pieces), x) == [4]
    assert scan_lengths(partial(apply, whole), x) == []
    expected = apply(whole, x)
    np.testing.assert_allclose(apply(pieces, x), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    # Forward mode through the pieces' loop too.
    direction = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)
    _, tangent = jax.jvp(partial(apply, pieces), (x,), (direction,))
    _, expected_tangent = jax.jvp(partial(apply, whole), (x,), (direction,))
    np.testing.assert_allclose(
      tangent, expected_tangent, rtol=1e-12, atol=1e-12 * np.abs(expected_tangent).max()
    )


@pytest.mark.parametrize('kernels', KERNELS)
def test_training_and_captured_intermediates_use_the_whole_batch(kernels):
  with enable_x64():
    x = jax.random.normal(jax.random.key(0), (7, 6, 6, 5), jnp.float64)
    block = dense_block(kernels, 4, 1)  # One image per piece, were pieces used.
    variables = block.init(jax.random.key(1), x, train=False)
    # Training normalises with the whole batch's statistics.
    training = dense_block(kernels, 4, 1, train=True)
    assert scan_lengths(lambda x: training.apply(variables, x, train=True, mutable=['batch_stats']), x) == []
    # Pieces would lose what the caller collects: the block runs whole and every BatchNorm's
    # output is captured for all 7 images.
    _, state = block.apply(
      variables,
      x,
      train=False,
      capture_intermediates=lambda module, _: isinstance(module, BATCH_NORMS),
      mutable=['intermediates'],
    )
    # One entry per BatchNorm (the 'xla' set's records nn.BatchNorm's output and its ReLU's).
    captured = state['intermediates']
    assert sum(len(layer) for layer in captured.values()) == 6
    assert {a.shape[0] for a in jax.tree.leaves(captured)} == {7}


def test_densenet121_eval_runs_its_first_three_blocks_in_pieces_with_the_cpu_kernels():
  # Batch 16 at 224x224: the blocks' outputs are 3.2, 1.6, 0.8 and 0.2 MB per image, so at most
  # 8 MiB per piece gives pieces of 2, 4 and 8 images and block 4 whole. jax.eval_shape: no FLOPs.
  images = jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.float32)
  model = DenseNet121()
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)
  assert scan_lengths(partial(model.clone(kernels='cpu').apply, train=False), variables, images) == [8, 4, 2]
  assert scan_lengths(partial(model.clone(kernels='xla').apply, train=False), variables, images) == []
  assert scan_lengths(partial(model.clone(eval_in_pieces=False).apply, train=False), variables, images) == []
  assert scan_lengths(partial(model.clone(eval_in_pieces=True).apply, train=False), variables, images) == [
    8,
    4,
    2,
  ]


@pytest.mark.parametrize(
  'batch, most, pieces',
  [(7, 2, 4), (13, 2, 7), (64, 27, 4), (16, 3, 8), (16, 2, 8), (5, 5, 1)],
)
def test_pieces_are_equal_when_a_few_more_make_them_so_else_padded(batch, most, pieces):
  x = jnp.arange(batch * 3.0).reshape(batch, 3)
  function = partial(map_over_pieces, lambda piece: piece * 2, images=most)
  assert scan_lengths(function, x) == [pieces]
  np.testing.assert_array_equal(function(x), x * 2)
