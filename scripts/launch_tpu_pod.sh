#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every host runs the SAME command (`--worker=all`).
#
#   TPU_NAME=moe-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     scripts/launch_tpu_pod.sh create                 # once: create the slice
#   TPU_NAME=moe-v4-32 ZONE=us-central2-b scripts/launch_tpu_pod.sh setup    # copy code, install
#   TPU_NAME=moe-v4-32 ZONE=us-central2-b scripts/launch_tpu_pod.sh check    # all hosts see all chips
#   TPU_NAME=moe-v4-32 ZONE=us-central2-b scripts/launch_tpu_pod.sh run \
#     python -m moe_jax.train.main --config=configs/vit/mnist.py \
#       --config.mesh.data=-1 --config.mesh.expert=8 --workdir=gs://BUCKET/run1
#   TPU_NAME=moe-v4-32 ZONE=us-central2-b scripts/launch_tpu_pod.sh delete
#
# On TPU VMs `moe_jax.parallel.initialize_distributed()` finds the other hosts itself
# (jax.distributed.initialize() reads the TPU metadata), so no coordinator is passed.
# Keep the workdir and the TFDS data on GCS: every host reads and writes there.
# Not run by the test suite (needs gcloud and a TPU quota).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO_DIR="${REPO_DIR:-moe_jax}"
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}
cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${SPOT:+--spot} ;;
  setup)
    tar czf /tmp/moe_jax_src.tgz --exclude=.git --exclude=.venv --exclude='*.pyc' .
    gcloud compute tpus tpu-vm scp /tmp/moe_jax_src.tgz "$TPU_NAME":~/ --zone="$ZONE" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar xzf moe_jax_src.tgz -C $REPO_DIR && cd $REPO_DIR && \
      python3 -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'" ;;
  check)
    ssh_all "cd $REPO_DIR && python3 -c 'from moe_jax import parallel; parallel.initialize_distributed(); \
import jax; print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())'" ;;
  run)
    [ $# -gt 0 ] || { echo "usage: $0 run python -m ... (the training command)"; exit 2; }
    ssh_all "cd $REPO_DIR && $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|check|run CMD...|delete"; exit 2 ;;
esac
