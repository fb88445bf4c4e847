"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

- Cloud TPU pod slices, SLURM (srun), Open MPI, Kubernetes: `--distributed`
  lets JAX detect the cluster and this process's place in it.
- Anything else (e.g. several processes on one host): `--coordinator_address=HOST:PORT
  --num_processes=P --process_id=I` (or the env vars JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID).

CPU processes exchange collectives through gloo, which is switched on here
(it only affects the CPU backend). Each process then reads its own rows of
every batch (`pipeline.make_train_iterator(..., process_index, process_count)`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Initialise jax.distributed from the cluster environment.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """`jax.distributed.initialize` with gloo CPU collectives; all None: auto-detect."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def initialize_from_flags() -> None:
  """Initialises jax.distributed when asked to; a single process needs nothing."""
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    num = _NUM_PROCESSES.value or int(os.environ["JAX_NUM_PROCESSES"])
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else int(
        os.environ["JAX_PROCESS_ID"])
    initialize(address, num, pid)
  elif _DISTRIBUTED.value:
    initialize()
