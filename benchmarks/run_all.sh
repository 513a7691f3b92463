#!/usr/bin/env bash
# Run every benchmark with sizes that fit about 5 minutes on the device present and write
# benchmarks/results/<device>.json (every benchmark's JSON) and benchmarks/results/<device>.md.
#
#   benchmarks/run_all.sh            # CPU: --quick sizes (bench_checkpoint full); GPU: full sizes
#   benchmarks/run_all.sh --quick    # quick sizes everywhere
#   benchmarks/run_all.sh --full     # full sizes everywhere (long on a CPU)
#
# Needs only jax, flax, optax, orbax-checkpoint, safetensors and ml_dtypes (no wandb, no network, no install):
# the package is imported from this checkout through PYTHONPATH. Python: $PYTHON, else `python`
# on PATH. A benchmark missing from benchmarks/ is skipped with a note; one that fails or runs past
# $BENCH_TIMEOUT seconds (default 300) is recorded as failed and the others still run.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "run_all.sh: no '$PY' on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
MODE=auto
case "${1:-}" in
    "") ;;
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    *) echo "run_all.sh: unknown argument '$1' (use --quick or --full)" >&2; exit 2 ;;
esac

read -r DEVICE BACKEND < <("$PY" - <<'EOF'
import os, jax
d = jax.devices()[0]
name = f"cpu-{os.cpu_count()}core" if d.platform == "cpu" else "-".join(d.device_kind.lower().replace("_", " ").split())
print(name, jax.default_backend())
EOF
)
if [ -z "${DEVICE:-}" ]; then
    echo "run_all.sh: could not start JAX with $PY" >&2
    exit 2
fi
if [ "$MODE" = auto ]; then
    if [ "$BACKEND" = cpu ]; then MODE=quick; else MODE=full; fi
fi

# Per benchmark: arguments for quick and full runs.
declare -A QUICK_ARGS=(
    [bench_quantize]="--quick --reps 5"
    [bench_metrics]="--quick"
    [bench_step]="--quick"
    [bench_checkpoint]="--reps 5"  # the issue's 6-layer state even here: about 10 s on 2 cores
    [bench_train]="--quick --variants fp32,fp8_shadow --breakdown"
)
declare -A FULL_ARGS=(
    [bench_quantize]=""
    [bench_metrics]=""
    [bench_step]=""
    [bench_checkpoint]=""
    [bench_train]="--steps 60 --rounds 2 --breakdown"
)
BENCHES=(bench_quantize bench_metrics bench_step bench_checkpoint bench_train)

OUT_DIR="$ROOT/benchmarks/results"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TIMEOUT=${BENCH_TIMEOUT:-300}

echo "run_all.sh: device $DEVICE (backend $BACKEND), $MODE sizes, python $(command -v "$PY")" >&2
for bench in "${BENCHES[@]}"; do
    script="$ROOT/benchmarks/$bench.py"
    if [ ! -f "$script" ]; then
        echo "missing: benchmarks/$bench.py is not in this checkout" > "$WORK/$bench.skipped"
        echo "run_all.sh: skip $bench (benchmarks/$bench.py missing)" >&2
        continue
    fi
    if [ "$MODE" = quick ]; then args=${QUICK_ARGS[$bench]}; else args=${FULL_ARGS[$bench]}; fi
    echo "run_all.sh: $bench $args" >&2
    start=$(date +%s%N)
    # shellcheck disable=SC2086  # args are a word list on purpose
    timeout "$TIMEOUT" "$PY" "$script" $args > "$WORK/$bench.json" 2> "$WORK/$bench.stderr"
    status=$?
    echo "$status $(( ($(date +%s%N) - start) / 1000000 )) $args" > "$WORK/$bench.status"
    [ "$status" -eq 0 ] || { echo "run_all.sh: $bench failed (status $status):" >&2; tail -5 "$WORK/$bench.stderr" >&2; }
done

"$PY" "$ROOT/benchmarks/summarize.py" "$WORK" "$OUT_DIR" "$DEVICE" "$BACKEND" "$MODE" "${BENCHES[@]}"
