#!/usr/bin/env bash
# The prepared GPU check: one command on a fresh GPU machine, about 9 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#
# Run from the repository root. Needs only the GPU image's packages (torch, triton,
# matplotlib, pytest, pytest-xdist); wheels placed in .whl/ are installed first
# (no network). The CUDA build needs two that the image lacks: put them there with
# `pip download --no-deps -d .whl ninja nvidia-cutlass` (CUTLASS/CuTe headers, 6 MB). Stages, each under `timeout` and all under one deadline, so that a
# slow stage cannot eat the others' time; a failing stage is recorded and the
# check goes on:
#   install   pip install --no-deps --no-build-isolation -e . (PYTHONPATH is set anyway)
#   build     python -m fastattn build, only where that command exists (the only
#             stage that compiles the CUDA extension: FASTATTN_CUDA_JIT=0 elsewhere)
#   env       nvidia-smi, versions, fastattn's backends                    -> env.txt
#   fastattn  python -m fastattn (backend health, self-check)              -> env.txt
#   tests-triton  pytest -v -n 8 -k "not cuda": kernel/front-end/dispatch/compile/Transformers,
#                 CUDA graphs and the host's fast path                              -> tests.log
#   tests-cuda    pytest -v -n 8: test_cuda_backend.py + test_kernel.py + test_graphs.py -k cuda -> tests.log
#   bench     python -m benchmarks.attention --grid key kernels (ceilings first) -> bench.csv
#   bwd       the same key grid, backward (autograd.grad; peak memory)     -> bench.csv
#   varlen    varlen prefill vs padded SDPA, paged decode vs copy bandwidth -> check.log
#   unpadded  padded encoder batches: unpadded (varlen) vs masked kernel    -> check.log
#   sweep     Triton block sizes at hd128 bf16 4k                           -> sweep.csv
#   sweep256  the same at head dim 256, 5 configs                          -> sweep.csv
#   splits    the CUDA op's split-KV decode against its number of splits  -> check.log
#   overhead  host time per call against torch / Transformers (bf16)     -> check.log
#   model     Llama-3-8B-shaped layers, sdpa vs fastattn                   -> model.csv
#   hfmodel   the same through Transformers' LlamaForCausalLM               -> model.csv
#   report    stage table + compact tables + goals                        -> summary.md, bench.png
# Everything else the stages print goes to check.log: 8 files, no subfolders.
# Without a CUDA device (or with --dry-run) every stage runs a CPU stand-in, so
# the script's own logic can be checked anywhere.
#
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (deadline, default 570),
# FASTATTN_CUDA_HEAD_DIMS (e.g. "64,128" for a shorter CUDA build),
# FASTATTN_COMMIT (the commit to record when the tree has no .git),
# PYTEST_ARGS (default "-v --maxfail=40"), TEST_FILES (one pytest run over these files instead
# of the two runs).
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
DEADLINE=${GPU_CHECK_SECONDS:-570}
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
  { printf '\n===== %s (limit %ss):' "$name" "$limit"; printf ' %q' "$@"; echo; } >>"$logfile"
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
    stage build 90 330 30 "$LOG" "$PY" -m fastattn build
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
for name, backend in fastattn.registered_backends().items():
    print(f"  backend {name}: {'; '.join(backend.availability()) or 'available'}")
EOF
grep -E "^(python|gpu|fastattn|  backend)" "$OUT/env.txt" | sed 's/^/  /'
stage fastattn 60 0 10 "$OUT/env.txt" "$PY" -m fastattn

# ---------------------------------------------------------------- tests
# Two pytest runs, so that a crash or a timeout in one cannot hide the other's results:
#   tests-triton  the Triton kernel, front end, dispatch and Transformers tests (-k "not cuda";
#                 about 165 s with -n 8 on an H100)
#   tests-cuda    the CUDA extension: tests/test_cuda_backend.py and test_kernel.py's cuda cases
# Both write one line per test as it finishes (-v), so a run that is killed still shows what
# failed; --maxfail instead of -x, so one failure does not hide the next.
read -r -a PYTEST_EXTRA <<<"${PYTEST_ARGS:--v --maxfail=40}"
existing() { local f; for f in "$@"; do [ -f "$f" ] && printf '%s\n' "$f"; done; }
if [ -n "${TEST_FILES:-}" ]; then  # an explicit selection: one run over it, no split
  read -r -a FILES <<<"$TEST_FILES"
  TEST_RUNS=("tests|||${FILES[*]}")
else
  TEST_RUNS=("tests-triton|not cuda|90|$(existing tests/test_kernel.py tests/test_kernel_bwd.py tests/test_kernel_dropout.py \
                tests/test_backward.py tests/test_varlen.py tests/test_frontend.py tests/test_dispatch.py \
                tests/test_compile.py tests/test_transformers*.py tests/test_torch_sdpa.py tests/test_graphs.py \
                tests/test_hostcost.py | tr '\n' ' ')"
             "tests-cuda|cuda|60|$(existing tests/test_cuda_backend.py tests/test_kernel.py tests/test_graphs.py | tr '\n' ' ')")
fi
# name|-k expression|per-test timeout|files -> WANT RESERVE MIN of the stage (dry run: collection only)
test_run() {
  local name kexpr per_test files want reserve
  IFS='|' read -r name kexpr per_test files <<<"$1"; want=$2; reserve=$3
  read -r -a files <<<"$files"
  local sel=(); [ -n "$kexpr" ] && sel=(-k "$kexpr")
  if [ ${#files[@]} = 0 ]; then
    skip "$name" "no test files for it in this tree"
  elif [ "$DRY" = 1 ]; then
    stage "$name" 60 "$reserve" 20 "$OUT/tests.log" "$PY" -m pytest --collect-only -q -p no:cacheprovider \
      "${sel[@]}" "${files[@]}"
  else
    local args=("${PYTEST_EXTRA[@]}" -p no:cacheprovider -rfEs "${sel[@]}")
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout "${per_test:-90}")
    stage "$name" "$want" "$reserve" 30 "$OUT/tests.log" "$PY" -m pytest "${args[@]}" "${files[@]}"
  fi
}
if [ ${#TEST_RUNS[@]} = 1 ]; then
  test_run "${TEST_RUNS[0]}" 260 155
else
  # reserve: each stage keeps back the next one's minimum plus that one's reserve
  test_run "${TEST_RUNS[0]}" 240 185
  test_run "${TEST_RUNS[1]}" 60 155
fi

# section NAME: the lines tests.log holds for the pytest run NAME (each run starts "===== NAME (").
section() { awk -v h="===== $1 (" 'index($0, h) == 1 {on = 1; next} /^===== / {on = 0} on' "$OUT/tests.log" 2>/dev/null; }
# test_outcome NAME: pytest's closing line (or how far it got), then every test that failed or
# errored, once, from the per-test lines (-v, with or without xdist) and the closing summary,
# and any xdist worker that crashed under a test.
test_outcome() {
  local text last
  text=$(section "$1")
  [ -n "$text" ] || return 0
  last=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran|collected).* =+$|tests? collected' <<<"$text" | tail -n 1)
  [ -n "$last" ] || last="no closing line (cut short): $(grep -cE '(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)' <<<"$text") \
tests reported; the last one named: $(grep -oE '[^ ]+\.py::[^ ]+' <<<"$text" | tail -n 1)"
  echo "$1: $last"
  grep -oE '(FAILED|ERROR) [^ ]+\.py(::[^ ]+)?|^[^ ]+\.py::[^ ]+ (FAILED|ERROR)' <<<"$text" \
    | sed -E 's#^([^ ]+\.py::[^ ]+) (FAILED|ERROR)$#\2 \1#' | sort -u
  grep -oE "worker '[^']+' crashed while running '[^']+'" <<<"$text" | sort -u
}
TEST_OUTCOMES=$(for run in "${TEST_RUNS[@]}"; do test_outcome "${run%%|*}"; done)
sed 's/^/  /' <<<"$TEST_OUTCOMES" | head -n 30

# ---------------------------------------------------------------- benchmark
BENCH=(-m benchmarks.attention --csv "$OUT/bench.csv" --run-timestamp "$RUN_TS" --no-plot)
if [ "$DRY" = 1 ]; then
  stage bench 60 100 30 "$LOG" "$PY" "${BENCH[@]}" --cpu --quick --no-interpreter
  skip bwd "dry run (would run: $PY ${BENCH[*]} --grid key --mode bwd)"
  skip varlen "dry run (would run: $PY -m benchmarks.varlen)"
  skip unpadded "dry run (would run: $PY -m benchmarks.unpadded)"
else
  stage bench 90 125 30 "$LOG" "$PY" "${BENCH[@]}" --grid key kernels --exclude flex
  # the Triton backward (time of autograd.grad, peak memory) against each torch SDPA backend
  stage bwd 45 105 20 "$LOG" "$PY" "${BENCH[@]}" --grid key --mode bwd --exclude flex
  # varlen prefill against padded SDPA, paged decode as % of copy bandwidth (rows go to check.log)
  stage varlen 30 120 15 "$LOG" "$PY" -m benchmarks.varlen
  # padded encoder batches (MiniLM shapes): unpadded varlen vs the masked kernel at 0/25/50% padding
  stage unpadded 30 90 10 "$LOG" "$PY" -m benchmarks.unpadded
fi

# ---------------------------------------------------------------- block-size sweep
SWEEP=(-m benchmarks.sweep --csv "$OUT/sweep.csv" --run-timestamp "$RUN_TS")
if [ "$DRY" = 1 ]; then
  stage sweep 60 60 20 "$LOG" "$PY" "${SWEEP[@]}" --dry-run
  skip sweep256 "dry run (the interpreter's stand-in has head dim 64 whatever is asked)"
  skip splits "dry run (would run: $PY -m benchmarks.cuda_splits)"
else
  stage sweep 40 90 15 "$LOG" "$PY" "${SWEEP[@]}" --jobs 8
  # head dim 256: the Triton kernel ran at 0.26x of cuDNN on its 64 x 32 tiles (e52d2bb)
  stage sweep256 30 60 15 "$LOG" "$PY" "${SWEEP[@]}" --jobs 8 --head-dim 256 \
    --configs 64x32x8x2 64x64x8x2 128x32x8x2 64x32x4x3 128x64x8x2
  # the CUDA op's split-KV decode against its number of splits
  stage splits 30 50 10 "$LOG" "$PY" -m benchmarks.cuda_splits
fi

# ---------------------------------------------------------------- host cost per call (rows go to check.log)
if [ "$DRY" = 1 ]; then
  stage overhead 30 50 10 "$LOG" "$PY" -m benchmarks.overhead --quick
else
  stage overhead 20 50 10 "$LOG" "$PY" -m benchmarks.overhead --device cuda
fi

# ---------------------------------------------------------------- model
MODEL=(-m benchmarks.model --csv "$OUT/model.csv" --run-timestamp "$RUN_TS")
if [ "$DRY" = 1 ]; then
  stage model 40 20 20 "$LOG" "$PY" "${MODEL[@]}" --tiny
  stage hfmodel 40 10 20 "$LOG" "$PY" "${MODEL[@]}" --tiny --transformers
else
  stage model 30 35 15 "$LOG" "$PY" "${MODEL[@]}" --layers 2 --prefill 2x4096 --decode 16x8192 --profile
  stage hfmodel 45 15 15 "$LOG" "$PY" "${MODEL[@]}" --layers 2 --prefill 2x4096 --decode 16x8192 --transformers
fi

# ---------------------------------------------------------------- report (printed last)
REPORT=$(mktemp)
trap 'rm -f "$STAGES" "$REPORT"' EXIT
timeout -k 5 30 "$PY" -m benchmarks.report "$OUT/bench.csv" --sweep "$OUT/sweep.csv" --model "$OUT/model.csv" \
  --png "$OUT/bench.png" --md "$REPORT" >>"$LOG" 2>&1 || record report "FAILED (see check.log)"
{
  echo "# fastattn GPU check $RUN_TS (total $((SECONDS - T0))s, deadline ${DEADLINE}s, dry run: $DRY)"
  echo
  echo "| stage | result |"
  echo "| --- | --- |"
  cat "$STAGES"
  echo
  if [ -n "$TEST_OUTCOMES" ]; then
    echo "tests (full log: tests.log):"
    echo
    echo '```'
    echo "$TEST_OUTCOMES"
    echo '```'
    echo
  fi
  [ -s "$REPORT" ] && tail -n +2 "$REPORT"
} >"$OUT/summary.md"
echo
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')($(ls "$OUT" | wc -l) files)"
echo
cat "$OUT/summary.md"
