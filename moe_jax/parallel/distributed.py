"""Multi-host start-up: `jax.distributed.initialize` on TPU pods, SLURM and by hand.

Call `initialize_distributed()` first thing in `main`, before anything touches a device.
Every process then runs the same program; `jax.devices()` lists all processes' devices
and `parallel.make_mesh` spans them.
"""
from __future__ import annotations

import jax


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None,
                           *, cpu_collectives: str = 'gloo') -> bool:
  """Joins the processes of a multi-host job; a no-op on a single host.

  Args:
    coordinator_address, num_processes, process_id: give all three to start by hand
      (e.g. '10.0.0.1:1234', GPU VMs without a scheduler, or local tests); leave them
      None on Cloud TPU VMs and under SLURM (`srun`, one task per GPU), which JAX detects.
    local_device_ids: devices of this process (default: JAX's choice; under SLURM
      one GPU per task).
    cpu_collectives: cross-process collectives of the CPU backend (tests, CPU clusters).

  Returns:
    True when this process is part of a multi-process job.
  """
  jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  except ValueError:
    # No coordinator given and no cluster (TPU VM metadata, SLURM, Open MPI, k8s) detected:
    # "coordinator_address should be defined" means a plain single-host run.
    if coordinator_address is not None:
      raise
    return False
  return jax.process_count() > 1
