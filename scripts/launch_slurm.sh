#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task per GPU, all tasks run the same command.
#
#   sbatch --nodes=2 scripts/launch_slurm.sh \
#     python -m moe_jax.train.main --config=configs/vit/mnist.py \
#       --config.mesh.data=2 --config.mesh.expert=8 --workdir=/shared/runs/run1
#
# `moe_jax.parallel.initialize_distributed()` (called first thing by the trainer) runs
# `jax.distributed.initialize()`, which reads SLURM_JOB_ID, SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID: the coordinator is the first node, port
# SLURM_JOB_ID % 4096 + 61440 (or $JAX_COORDINATOR_PORT), and each task gets the GPU
# SLURM_LOCALID. mesh sizes must multiply to nodes × GPUs per node (-1 fills one axis).
# The workdir must be on a file system that every node sees. Not run by the test suite.
#SBATCH --job-name=moe_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: sbatch $0 python -m ... (the training command)"; exit 2; }
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
srun --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-8}" --gpus-per-node="${SLURM_GPUS_PER_NODE:-8}" \
  --kill-on-bad-exit=1 "$@"
