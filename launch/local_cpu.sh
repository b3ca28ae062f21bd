#!/usr/bin/env bash
# Train on this machine's CPU (one process).
#
# Usage: bash launch/local_cpu.sh [CONFIG[:variant]] [WORKDIR] [--config.KEY=VALUE ...]
#   default: configs/meld.py:tiny  runs/<config>_<variant>
#   e.g.     bash launch/local_cpu.sh configs/meld.py:tiny runs/toy --config.task.name=toy --config.data.name=toy
#
# Environment:
#   ULD_CPU_DEVICES       host devices to split the CPU into (default 1). >1 runs the same sharded
#                         program as a multi-device job (the mesh's 'data' axis), to check sharding
#                         on a laptop; batch_size must be a multiple of it.
#   TF_CPP_MIN_LOG_LEVEL  TensorFlow (TensorBoard writer) log level (default 2: warnings off).
# Rerunning with the same WORKDIR resumes from its latest checkpoint. TensorBoard: tensorboard --logdir WORKDIR
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/meld.py:tiny}"; shift || true
name="$(basename "${CONFIG%%:*}" .py)_${CONFIG##*:}"
WORKDIR="${1:-runs/$name}"; shift || true
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${ULD_CPU_DEVICES:-1}"
exec python3 -m uld_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
