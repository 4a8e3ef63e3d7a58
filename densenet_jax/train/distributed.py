"""Several processes (the hosts of a pod or a GPU cluster) as one run: `jax.distributed`, as configured."""

import os

import jax
import ml_collections

from densenet_jax.train.registry import ConfigError

DISTRIBUTED_ENVIRONMENT = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
  """`jax.distributed.initialize` as `config.distributed` says; call before any other JAX call.

  'auto' (the default) initializes wherever there is more than this process to reach: when any
  of DISTRIBUTED_ENVIRONMENT is set, or when JAX detects a cluster (Cloud TPU VM or pod slice,
  SLURM, Open MPI, Kubernetes); a lone process runs as one. '' (or 'none') never initializes;
  'host:port' is the coordinator's address. Returns whether it initialized.
  """
  setting = config.distributed
  if setting in ('', 'none'):
    return False
  coordinator = None if setting == 'auto' else setting
  num_processes = config.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0))
  process_id = config.process_id if config.process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', -1))
  told = coordinator or num_processes > 0 or process_id >= 0 or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not told:
    try:
      jax.distributed.initialize()  # JAX's cluster detection.
    except ValueError as error:
      if 'coordinator_address' not in str(error):
        raise
      return False  # No cluster detected: one process.
    return True
  coordinator = coordinator or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not coordinator or num_processes <= 0 or process_id < 0:
    raise ConfigError(
      "a multi-process run needs the coordinator's address, the process count and this process's id: "
      'set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or --config.distributed=HOST:PORT, '
      '--config.num_processes and --config.process_id), or none of them on a single process or a detected '
      f'cluster (got address {coordinator!r}, {num_processes} processes, process id {process_id}).'
    )
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  return True
