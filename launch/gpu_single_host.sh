#!/usr/bin/env bash
# Train on all GPUs of one host: one process, one program over a mesh of the visible GPUs
# (batch sharded on 'data', state replicated).
#
# Usage: bash launch/gpu_single_host.sh [CONFIG[:variant]] [WORKDIR] [--config.KEY=VALUE ...]
#   e.g. bash launch/gpu_single_host.sh configs/meld.py:paper runs/meld --config.batch_size=32
# Needs: pip install 'jax[cuda12]==0.10.2' on top of requirements.txt.
#
# Environment:
#   CUDA_VISIBLE_DEVICES             GPUs to use (default: all). The global batch_size must be a
#                                    multiple of their number (paper: 4 = 1 per GPU on 4 GPUs; on 8
#                                    GPUs use 8 or 32 and consider scaling optimizer.lr, see docs/scaling.md).
#   XLA_PYTHON_CLIENT_MEM_FRACTION   share of each GPU's memory jax preallocates (default here 0.9).
#   XLA_FLAGS                        extra XLA flags; the latency-hiding scheduler is enabled to
#                                    overlap the gradient all-reduce with the backward pass.
#   TF_CPP_MIN_LOG_LEVEL             TensorFlow log level (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/meld.py:paper}"; shift || true
name="$(basename "${CONFIG%%:*}" .py)_${CONFIG##*:}"
WORKDIR="${1:-runs/$name}"; shift || true
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export ULD_DISTRIBUTED=0
nvidia-smi -L || { echo "no GPU visible (nvidia-smi failed)" >&2; exit 1; }
exec python3 -m uld_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
