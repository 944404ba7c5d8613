#!/usr/bin/env bash
# The prepared GPU check: one command on a fresh GPU machine, about 7 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#
# Run from the repository root. Needs only the GPU image's packages (torch, triton,
# matplotlib, pytest, pytest-xdist); wheels placed in .whl/ are installed first
# (no network). Stages, each under `timeout` and all under one deadline, so that a
# slow stage cannot eat the others' time; a failing stage is recorded and the
# check goes on:
#   install   pip install --no-deps --no-build-isolation -e . (PYTHONPATH is set anyway)
#   build     python -m fastattn build, only where that command exists (the only
#             stage that compiles the CUDA extension: FASTATTN_CUDA_JIT=0 elsewhere)
#   env       nvidia-smi, versions, fastattn's backends                    -> env.txt
#   fastattn  python -m fastattn (backend health, self-check)              -> env.txt
#   tests     pytest -n 8 on the kernel/front-end/CUDA/Transformers tests  -> tests.log
#   bench     python -m benchmarks.attention --grid key (ceilings first)  -> bench.csv
#   flex      the same cases for FlexAttention (compiles per shape: last)  -> bench.csv
#   sweep     Triton block sizes at hd128 bf16 4k                           -> sweep.csv
#   model     Llama-3-8B-shaped layers, sdpa vs fastattn                   -> model.csv
#   hfmodel   the same through Transformers' LlamaForCausalLM               -> model.csv
#   report    stage table + compact tables + goals                        -> summary.md, bench.png
# Everything else the stages print goes to check.log: 8 files, no subfolders.
# Without a CUDA device (or with --dry-run) every stage runs a CPU stand-in, so
# the script's own logic can be checked anywhere.
#
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (deadline, default 450),
# FASTATTN_CUDA_HEAD_DIMS (e.g. "64,128" for a shorter CUDA build),
# FASTATTN_COMMIT (the commit to record when the tree has no .git),
# PYTEST_ARGS (default "-q -x"), TEST_FILES (override the test selection).
set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUT=""
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    *) [ -z "$OUT" ] && OUT="$arg" || usage ;;
  esac
done
[ -n "$OUT" ] || usage
[ -f pyproject.toml ] && [ -d fastattn ] || { echo "run from the repository root" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_SECONDS:-450}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
# The CUDA extension is compiled by the build stage alone (its own time limit); any other
# process only loads what that stage left in the cache, and never starts a build itself.
export FASTATTN_CUDA_JIT=${FASTATTN_CUDA_JIT:-0}
LOG="$OUT/check.log"
STAGES=$(mktemp)
trap 'rm -f "$STAGES"' EXIT
: >"$LOG"
T0=$SECONDS
RUN_TS=$(date -u +%Y-%m-%dT%H:%M:%SZ)

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device visible to $PY: dry run (CPU stand-ins for every stage)"
  DRY=1
fi

# cap WANT RESERVE MIN: seconds a stage may take, given the time the later stages need
# (RESERVE); 0 when that leaves less than MIN, too little for the stage to be useful.
cap() {
  local want=$1 reserve=$2 min=$3 left
  left=$(( DEADLINE - (SECONDS - T0) - reserve ))
  (( left < want )) && want=$left
  (( want < min )) && want=0
  echo "$want"
}

# stage NAME WANT RESERVE MIN LOGFILE CMD...: run CMD under timeout, output to LOGFILE,
# one status line to stdout and to the stage table.
stage() {
  local name=$1 want=$2 reserve=$3 min=$4 logfile=$5; shift 5
  local limit t rc note
  limit=$(cap "$want" "$reserve" "$min")
  if [ "$limit" = 0 ]; then
    record "$name" "skipped: no time left before the ${DEADLINE}s deadline"
    return 0
  fi
  printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$logfile"
  t=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$logfile" 2>&1
  rc=$?
  case $rc in
    0) note="ok" ;;
    124|137) note="TIMED OUT after ${limit}s" ;;
    *) note="FAILED (exit $rc)" ;;
  esac
  record "$name" "$note, $((SECONDS - t))s (log: $(basename "$logfile"))"
  return 0
}

# record NAME RESULT: one line of the stage table (stdout now, summary.md at the end).
record() { printf '%-8s %s\n' "$1" "$2"; printf '| %s | %s |\n' "$1" "$2" >>"$STAGES"; }
skip() { record "$1" "skipped: $2"; }

echo "gpu_check: out=$OUT deadline=${DEADLINE}s dry_run=$DRY python=$PY"

# ---------------------------------------------------------------- install
if compgen -G ".whl/*.whl" >/dev/null; then
  if [ "$DRY" = 1 ]; then
    skip wheels "dry run (would install: $(cd .whl && ls -- *.whl | tr '\n' ' '))"
  else
    stage wheels 60 0 10 "$LOG" "$PY" -m pip install --no-deps --no-index --no-build-isolation .whl/*.whl
  fi
fi
stage install 60 0 10 "$LOG" "$PY" -m pip install --no-deps --no-build-isolation -e .

# ---------------------------------------------------------------- build (optional)
if "$PY" -m fastattn --help 2>/dev/null | grep -qw build; then
  if [ "$DRY" = 1 ]; then
    skip build "dry run (would run: $PY -m fastattn build)"
  else
    stage build 120 300 30 "$LOG" "$PY" -m fastattn build
  fi
else
  skip build "no \`python -m fastattn build\` command in this tree"
fi

# ---------------------------------------------------------------- env
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   commit: ${FASTATTN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
} >"$OUT/env.txt" 2>&1
stage env 40 0 10 "$OUT/env.txt" "$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"cudnn {torch.backends.cudnn.version()}")
for name in ("triton", "transformers", "flash_attn", "flash_attn_interface", "matplotlib", "xdist", "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', 'present')}")
    except Exception as exc:
        print(f"{name}: not available ({type(exc).__name__})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.0f} GiB  {p.multi_processor_count} SMs")
import fastattn
print(f"fastattn {fastattn.__version__} from {fastattn.__file__}")
for name, backend in fastattn.backends().items():
    print(f"  backend {name}: {'; '.join(backend.availability()) or 'available'}")
EOF
grep -E "^(python|gpu|fastattn|  backend)" "$OUT/env.txt" | sed 's/^/  /'
stage fastattn 60 0 10 "$OUT/env.txt" "$PY" -m fastattn

# ---------------------------------------------------------------- tests
if [ -n "${TEST_FILES:-}" ]; then
  read -r -a FILES <<<"$TEST_FILES"
else
  FILES=()
  for f in tests/test_kernel*.py tests/test_frontend*.py tests/test_cuda_backend.py tests/test_transformers*.py; do
    [ -f "$f" ] && FILES+=("$f")
  done
fi
read -r -a PYTEST_EXTRA <<<"${PYTEST_ARGS:--q -x}"
if [ ${#FILES[@]} = 0 ]; then
  skip tests "no kernel/front-end test files yet"
elif [ "$DRY" = 1 ]; then
  stage tests 120 150 30 "$OUT/tests.log" "$PY" -m pytest --collect-only -q -p no:cacheprovider "${FILES[@]}"
else
  ARGS=("${PYTEST_EXTRA[@]}" -p no:cacheprovider -rfEs)
  "$PY" -c "import xdist" 2>/dev/null && ARGS+=(-n 8)
  "$PY" -c "import pytest_timeout" 2>/dev/null && ARGS+=(--timeout 120)
  stage tests 170 200 30 "$OUT/tests.log" "$PY" -m pytest "${ARGS[@]}" "${FILES[@]}"
fi
tail -n 3 "$OUT/tests.log" 2>/dev/null | sed 's/^/  /'

# ---------------------------------------------------------------- benchmark
BENCH=(-m benchmarks.attention --csv "$OUT/bench.csv" --run-timestamp "$RUN_TS" --no-plot)
if [ "$DRY" = 1 ]; then
  stage bench 60 60 30 "$LOG" "$PY" "${BENCH[@]}" --cpu --quick --no-interpreter
  skip flex "dry run (FlexAttention runs on CUDA only)"
else
  stage bench 130 120 30 "$LOG" "$PY" "${BENCH[@]}" --grid key --exclude flex
  stage flex 45 100 20 "$LOG" "$PY" "${BENCH[@]}" --grid key --providers flex
fi

# ---------------------------------------------------------------- block-size sweep
if [ "$DRY" = 1 ]; then
  stage sweep 60 40 20 "$LOG" "$PY" -m benchmarks.sweep --dry-run --csv "$OUT/sweep.csv"
else
  stage sweep 80 60 20 "$LOG" "$PY" -m benchmarks.sweep --csv "$OUT/sweep.csv" --jobs 8
fi

# ---------------------------------------------------------------- model
MODEL=(-m benchmarks.model --csv "$OUT/model.csv" --run-timestamp "$RUN_TS")
if [ "$DRY" = 1 ]; then
  stage model 40 20 20 "$LOG" "$PY" "${MODEL[@]}" --tiny
  stage hfmodel 40 10 20 "$LOG" "$PY" "${MODEL[@]}" --tiny --transformers
else
  stage model 60 30 20 "$LOG" "$PY" "${MODEL[@]}" --layers 2 --prefill 2x4096 --decode 16x8192
  stage hfmodel 50 10 20 "$LOG" "$PY" "${MODEL[@]}" --layers 2 --prefill 2x4096 --decode 16x8192 --transformers
fi

# ---------------------------------------------------------------- report (printed last)
REPORT=$(mktemp)
trap 'rm -f "$STAGES" "$REPORT"' EXIT
timeout -k 5 60 "$PY" -m benchmarks.report "$OUT/bench.csv" --sweep "$OUT/sweep.csv" --model "$OUT/model.csv" \
  --png "$OUT/bench.png" --md "$REPORT" >>"$LOG" 2>&1 || record report "FAILED (see check.log)"
{
  echo "# fastattn GPU check $RUN_TS (total $((SECONDS - T0))s, deadline ${DEADLINE}s, dry run: $DRY)"
  echo
  echo "| stage | result |"
  echo "| --- | --- |"
  cat "$STAGES"
  echo
  [ -s "$REPORT" ] && tail -n +2 "$REPORT"
} >"$OUT/summary.md"
echo
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')($(ls "$OUT" | wc -l) files)"
echo
cat "$OUT/summary.md"
