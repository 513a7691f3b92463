#!/usr/bin/env bash
# The format study on the CPU (issue 12): every 8-bit format, FP32, the hybrid E4M3/E5M2 recipe and
# E5M2 master weights with and without stochastic rounding (configs/format_study.yaml), 3 seeds,
# then the report: docs/format-study-cpu.md with its PNGs in docs/format-study-cpu/.
#
#   benchmarks/format_study.sh                          # the study: 36 runs of about 1-2 min on 2 cores
#   ARMS=FP32,E5M2 SEEDS=1 STUDY_OUT=/tmp/s STUDY_DOC=/tmp/s.md \
#       benchmarks/format_study.sh --set max_steps=20   # a dry run; extra arguments go to the sweep
#
# Running it again resumes: finished runs are skipped, interrupted ones continue from their last
# checkpoint. Ctrl-C stops every run cleanly (exit 130, no report). A run that fails (not a
# divergence: those are results) still lets the report be written, then the script exits 1.
# Environment: PYTHON (default .venv/bin/python when present, else python), ARMS, SEEDS (3),
# STUDY_OUT (runs/format_study), STUDY_DOC (docs/format-study-cpu.md; PNGs in a directory of its name).
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python}
ARMS=${ARMS:-E5M2,E4M3,E3M4,E0M7,E1M6,E2M5,E6M1,E7M0,FP32,hybrid,E5M2-master,E5M2-master-sr}
SEEDS=${SEEDS:-3}
OUT=${STUDY_OUT:-runs/format_study}
DOC=${STUDY_DOC:-docs/format-study-cpu.md}

"$PY" -m altgrad_jax.study.sweep --config configs/format_study.yaml --formats "$ARMS" --seeds "$SEEDS" \
    --out "$OUT" "$@"
sweep_status=$?
case $sweep_status in
    0|1) ;;  # 1: some run failed; the report shows the others
    *) exit $sweep_status ;;  # 2: bad input; 130/143: stopped, the same command resumes
esac
"$PY" -m altgrad_jax.study.report "$OUT" --out "${DOC%.md}" --markdown "$DOC" || exit $?
exit $sweep_status
