"""Values between the hosts and the device mesh: global batches, replicated state, host copies."""

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_host(tree: Any) -> Any:
  """Replicated (or single-device) arrays as numpy, on every process."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def param_checksum(params: Any) -> float:
  """The float64 sum of all parameter values plus the sum of their squares: a run's fingerprint."""
  leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(to_host(params))]
  return float(sum(leaf.sum() + np.square(leaf).sum() for leaf in leaves))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> one array sharded over all devices."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Host values (the same on every process) as arrays replicated over all devices."""
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree
  )


def prefetch_to_device(
  host_batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int, count: int
) -> Iterator[dict[str, jax.Array]]:
  """`count` global batches on the devices, `size` of them in flight ahead of the one in use.

  `jax.make_array_from_process_local_data` copies asynchronously, so the copies of the next
  batches overlap the step that runs (`flax.jax_utils.prefetch_to_device` does this for pmap).
  """
  queue = collections.deque()
  fetched = 0
  for _ in range(count):
    while fetched < count and len(queue) <= size:
      queue.append(global_batch(next(host_batches), sharding))
      fetched += 1
    yield queue.popleft()
