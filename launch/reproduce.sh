#!/usr/bin/env bash
# The paper's experiments on the synthetic world (Table 1 over seeds, mining quality, key-slice
# Table 3 analog, Tables 2 and 4 analogs, Fig. 5 theta and added-slices sweeps) and docs/results.md
# written from their outputs.
# Usage: bash launch/reproduce.sh [OUT_DIR] [python -m uld_jax.reproduce options]
#   e.g. bash launch/reproduce.sh runs/reproduce --seeds 0,1,2 --keyslice --thetas 0.05,0.1,0.2,0.3 \
#        --table2 --table4 --unlabeled 0,0.25,1,2
#        bash launch/reproduce.sh runs/reproduce_long --recipe long --keyslice --calibrated-nrm
#        bash launch/reproduce.sh runs/reproduce_equal --recipe equal --seeds 0,1,2,3 --keyslice \
#            --control --oracle --oracle-scratch positive,ignore,ignore_key,ignore_added \
#            --mined-scratch mam,nrm,both,yield,yield_mam,added \
#            --heldout 96 --resume --heldout-checkpoints 2 --baseline-nrm --suppression \
#            --unlabeled 0,2,4
#        bash launch/reproduce.sh runs/reproduce_dense --variant dense --seeds 0,1,2 --control
#            (Table 1 and the control on the world with 40 unmarked lesions per patient beyond
#             the marks: docs/results_quick_dense.md)
#   (the pages of the runs in docs/ used --heldout 24; python -m uld_jax.spread evaluates such an
#    output on a second, larger held-out world too: docs/results_spread.md)
# A relative --results PATH is taken from the repository root.
# Resumable: re-run the same command to continue.
set -euo pipefail
OUT="${1:-runs/reproduce}"
shift || true
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# the page: docs/results.md (docs/results_<recipe>.md with --recipe other than quick,
# docs/results_<recipe>_<variant>.md with --variant; --results PATH)
exec python3 -m uld_jax.reproduce --out "$OUT" "$@"
