#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker (one process per host),
# joined by jax.distributed.initialize() (auto-detected on TPU VMs); one program over a mesh of
# all chips. Run from a workstation with gcloud configured.
#
# Usage: TPU_NAME=my-v5e-32 ZONE=us-west4-a WORKDIR=gs://bucket/runs/meld \
#          bash launch/tpu_vm_pod.sh [CONFIG[:variant]] [--config.KEY=VALUE ...]
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (pod slice) and its zone (required); PROJECT optional.
#   WORKDIR          checkpoints + TensorBoard on storage all workers see: a gs:// bucket (orbax and
#                    the TensorBoard writer read and write gs:// directly). Rerun to resume (same
#                    slice size: the data-iterator state is saved per host).
#   REPO_DIR         the checkout on every worker (default ~/uld_jax; copy it with
#                    gcloud compute tpus tpu-vm scp --worker=all, install requirements.txt and
#                    'jax[tpu]==0.10.2' there first).
#   DATA_ROOT        optional: passed as --config.data.root (the built datasets, e.g. on gs://).
# On the workers: ULD_DISTRIBUTED=1 makes uld_jax.main call jax.distributed.initialize().
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://...)}"
CONFIG="${1:-configs/meld.py:paper}"; shift || true
REPO_DIR="${REPO_DIR:-~/uld_jax}"
extra=("$@")
[ -n "${DATA_ROOT:-}" ] && extra+=("--config.data.root=$DATA_ROOT")
args=""
[ "${#extra[@]}" -gt 0 ] && printf -v args ' %q' "${extra[@]}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $REPO_DIR && TF_CPP_MIN_LOG_LEVEL=2 ULD_DISTRIBUTED=1 python3 -m uld_jax.main --config $CONFIG --workdir $WORKDIR$args"
