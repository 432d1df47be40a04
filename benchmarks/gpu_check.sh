#!/usr/bin/env bash
# The GPU checks, in one command, on a machine with a CUDA GPU (issue 13):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh        # about 8 minutes on one H200
#
# 1. finds a Python whose torch sees a GPU ($PYTHON, .venv/bin/python, python3, python);
# 2. makes Pollinate importable without touching that torch: this checkout on PYTHONPATH
#    (a `pollinate` link to it), its other dependencies from a wheelhouse when some are
#    missing ($WHEELS, default .gpu-wheels/, filled beforehand on a machine with a package
#    registry by `bash benchmarks/gpu_check.sh --wheels`), always `--no-deps`, so nothing
#    can replace the machine's CUDA torch (never `pip install -e .`: it would pull the
#    CPU torch pin's range, or try to, with no network);
# 3. runs the GPU tests (tests/test_gpu.py and the device/stacking tests) -> $OUT/pytest.txt;
# 4. runs the issue's GPU benchmark: 10,000 users x 20 rounds, FedAvg on Synthetic(1,1),
#    10% a round, E=1, B=10, logistic regression; the plain loop on the GPU and on the CPU
#    beside Pollinate on the GPU -> $OUT/gpu-speed.{md,csv,png} + $OUT/bench.txt.
#
# Everything it finds is in $OUT/summary.txt (it says what is missing and stops there, with
# exit code 3, rather than fail half-way). Exit 0 = tests passed and the benchmark ran.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
WHEELS=${WHEELS:-$ROOT/.gpu-wheels}
say() { echo "$*" | tee -a "$SUMMARY"; }
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0

# Pollinate's runtime dependencies other than torch (pyproject.toml), by import name.
MODULES="flwr numpy pandas pyarrow sklearn matplotlib fastapi uvicorn httptools prometheus_client
opacus cryptography psutil redis plotly rich sqlalchemy pydantic tomli_w pytest"
# ... and by distribution, for the wheelhouse (flwr without [simulation]: no Ray; about 27 MB).
WHEEL_REQS="flwr==1.42.* tomli-w fastapi uvicorn httptools opacus cryptography redis hiredis
plotly sqlalchemy pydantic pydantic-core starlette annotated-types typing-inspection
pycryptodome iterators tomli"

if [ "${1:-}" = "--wheels" ]; then # on a machine with a registry: fill the wheelhouse
    PYV=${GPU_PYTHON_VERSION:-3.12} # the GPU image's python3 (KINDS.md: 3.12)
    # The versions this checkout's .venv runs and tests (pydantic pins its pydantic-core).
    FREEZE=$("${VENV_PY:-$ROOT/.venv/bin/python}" -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
    PINNED=""
    for req in $WHEEL_REQS; do
        name=${req%%=*}
        pin=$(echo "$FREEZE" | grep -m1 "^$name==" || true)
        PINNED="$PINNED ${pin:-$req}"
    done
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    python3 -m pip download -q --only-binary=:all: --no-deps --python-version "$PYV" \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$WHEELS" $PINNED
    du -sh "$WHEELS"
    echo "carry it: run(carry=['.gpu-wheels'], command='OUT=\$OUT bash benchmarks/gpu_check.sh')"
    exit 0
fi


mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') in $ROOT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$SUMMARY"

PY=""
for cand in ${PYTHON:-} "$ROOT/.venv/bin/python" python3 python; do
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        PY=$cand
        break
    fi
    say "skip $cand: $("$cand" -c 'import torch; print("torch", torch.__version__, "sees no GPU")' 2>&1 | tail -1)"
done
if [ -z "$PY" ]; then
    say "NO GPU: no Python here has a torch that sees a CUDA GPU; nothing run"
    exit 3
fi
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'))"

# Pollinate importable as `pollinate` from this checkout, whatever the folder is called.
LINK=$(mktemp -d)
ln -s "$ROOT" "$LINK/pollinate"
export PYTHONPATH="$LINK${PYTHONPATH:+:$PYTHONPATH}"

missing() {
    # shellcheck disable=SC2086
    "$PY" - $MODULES <<'EOF'
import importlib, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ] && [ -d "$WHEELS" ]; then
    say "installing from $WHEELS (--no-index --no-deps): $MISSING"
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$SUMMARY"
    MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
    say "MISSING Python packages: $MISSING"
    say "fill a wheelhouse where a registry is reachable (bash benchmarks/gpu_check.sh --wheels)"
    say "and carry it (.gpu-wheels), or install them; nothing run"
    exit 3
fi
if ! "$PY" -c 'import pollinate.cli, pollinate.client.app, pollinate.server.app' 2>"$OUT/import.txt"; then
    say "Pollinate does not import: $(tail -1 "$OUT/import.txt")"
    exit 3
fi

status=0
say "--- GPU tests (timeout 240 s)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_device.py \
    tests/models/test_models_batched.py tests/client/test_client_steps.py \
    >"$OUT/pytest.txt" 2>&1 || status=1
tail -3 "$OUT/pytest.txt" | tee -a "$SUMMARY"

say "--- benchmark: 10,000 users x 20 rounds, logreg, B=10 (timeout 360 s; the slowest, plain on the GPU, last)"
timeout 360 "$PY" benchmarks/bench_speed.py --device cuda --users 10000 --rounds 20 \
    --model logreg --batch-size 10 --timeout 170 \
    --variants plain-cpu,pollinate,pollinate-stacked,pollinate-stacked-few,plain \
    --out "$OUT" --name gpu-speed >"$OUT/bench.txt" 2>&1 || status=1
grep -E '^ +[a-z-]+ +[0-9]+ users' "$OUT/bench.txt" | tee -a "$SUMMARY"
[ -f "$OUT/gpu-speed.md" ] && cat "$OUT/gpu-speed.md" >>"$SUMMARY"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
rm -rf "$LINK"
say "exit $status"
exit $status
