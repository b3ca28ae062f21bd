#!/usr/bin/env bash
# The quick start on the embedded default, the synthetic CT world, on this machine's CPU.
# Usage: bash launch/quickstart.sh [OUT_DIR]    (default: ./quickstart)
# Re-running resumes: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-quickstart}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
mkdir -p "$OUT"

# 1. The synthetic world (small preset), its statistics beside the real files', and previews.
if [ ! -d "$OUT/world" ]; then
  python3 -m data_prep.synthesize --preset small --seed 0 --out "$OUT/world" --stats --preview
else
  echo "[quickstart] $OUT/world exists; skipping synthesis"
fi
echo "[quickstart] done: world in $OUT/world (previews in $OUT/world/preview)"
