#!/usr/bin/env bash
# The quick start: the whole method on the synthetic CT world, on this machine's CPU.
#   synthesize the world -> check -> build -> train the baseline and MELD -> mine (MAM + NRM)
#   -> finetune (MAM, NRM, both) -> evaluate (volumetric, both hit rules) -> Table 1, FROC plots,
#   overlay PNGs.  See uld_jax/quickstart.py for the steps and the recipe.
# Usage: bash launch/quickstart.sh [OUT_DIR] [--recipe quick|smoke] [--seed N]   (default: ./quickstart)
# Re-running resumes: finished steps are skipped, an interrupted one continues.
set -euo pipefail
OUT="${1:-quickstart}"
shift || true
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec python3 -m uld_jax.quickstart --out "$OUT" "$@"
