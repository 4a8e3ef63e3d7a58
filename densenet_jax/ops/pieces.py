"""Evaluation on pieces of the batch: a dense block's activations stay in the processor's cache.

Outside training a dense block can run on pieces of the batch, one after another, each as many
images as keep the block's output within a budget of bytes: a piece's activations then stay in
cache instead of going out to memory and back between operations. Each image's numbers are the
same (tests/test_eval_in_pieces.py). The CPU kernel set does this by default
(`DenseNet.eval_in_pieces`).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Chosen on a 2-core AMD EPYC (32 MiB L3 cache), eval img/s with the whole network in pieces of n
# images: DenseNet-121, a batch of 16 at 224x224 (dense block 1's output 3.2 MB per image), n=16 55,
# 4 65, 2 64, 1 51; DenseNet-BC-100, 64 at 32x32 (0.9 MB per image), n=64 302, 16 413, 8 435, 4 392.
# Later blocks' products lose speed on few pixels, hence a budget per block rather than one piece
# size: DenseNet-121 then evaluates at 66-67 img/s (blocks 1-3 in pieces of 2, 4 and 8 images, block
# 4 whole) and DenseNet-BC-100 at 413-414 (blocks 1-2 in pieces of 8 and 16, block 3 whole), against
# 52-53 and 268-296 whole.
EVAL_PIECE_BYTES = 8 * 2**20


def map_over_pieces(function: Callable[[jax.Array], Any], x: jax.Array, images: int) -> Any:
  """function(x) computed on pieces of at most `images` images, one after another.

  `function` must treat each image on its own. Piece j holds images j, j + n, j + 2n, ... (n
  pieces): a batch split in contiguous blocks over devices then gives every piece the same
  share of each device's images.
  """
  batch = x.shape[0]
  fewest = -(-batch // images)
  # Equal pieces without padding if up to half as many pieces again give them (not 7 pieces of one
  # image for 7 images at most 2 a piece); else as even as can be, with at most pieces - 1 padding.
  pieces = next((n for n in range(fewest, (3 * fewest + 1) // 2) if batch % n == 0), fewest)
  images = -(-batch // pieces)
  x = jnp.pad(x, ((0, pieces * images - batch),) + ((0, 0),) * (x.ndim - 1))
  y = jax.lax.map(function, jnp.swapaxes(x.reshape(images, pieces, *x.shape[1:]), 0, 1))
  return jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])[:batch]


def evaluate_in_pieces(block: nn.Module, x: jax.Array, piece_bytes: int) -> jax.Array | None:
  """A dense block's eval output computed piece by piece, or None where the batch is one piece.

  Args:
    block: the bound `DenseBlock` (its variables, and a copy of it applied to each piece).
    x: the block's input.
    piece_bytes: the most bytes of block output a piece may have.
  """
  # Pieces would drop what the caller collects (`capture_intermediates`, `sow`).
  if block.is_mutable_collection('intermediates'):
    return None
  channels = x.shape[-1] + block.num_layers * block.growth_rate
  image_bytes = x.shape[1] * x.shape[2] * channels * x.dtype.itemsize
  images = max(1, piece_bytes // image_bytes)
  # A multiple of the device count, so that a batch sharded over the devices splits evenly.
  images = -(-images // jax.device_count()) * jax.device_count()
  if images >= x.shape[0]:
    return None
  # The block as a pure function of its variables, applied to each piece in turn.
  variables, whole = block.variables, block.clone(parent=None, eval_piece_bytes=None)
  return map_over_pieces(lambda piece: whole.apply(variables, piece, train=False), x, images)
