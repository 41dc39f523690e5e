#!/usr/bin/env bash
# One GPU session in one command of at most 9 minutes, on a fresh H100/H200 machine (torch, triton and nvcc
# there; no network, no pip). Stages run in priority order, each under its own wall-clock cap (`timeout`), and
# everything is packed after every stage, so whatever has finished comes back even if the command is killed.
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine; results in $OUT (or benchmarks/results/)
#   bash benchmarks/gpu_session.sh --dry-run   # the same stages on the CPU: Triton interpreter, tiny sizes,
#                                              # caps scaled down; under 3 minutes (tests/test_gpu_session.py)
#
# Stages (caps in seconds, GPU run):
#   1 env       nvidia-smi, versions, the measured ceilings (bf16 matmul, device copy)              30
#   2 build     the CUDA extension for sm_90a only, MAX_JOBS=16, in the background from the start  300
#   3 check     triton-fft, then triton (bf16, fp16, fp32) against the reference (forward and every
#               gradient; 1D/2D/3D grids, extra tokens, M > 1, causal; poisoned outputs)          240
#     check-cuda  the same for cuda, once the build is done                                         60
#     memcheck  compute-sanitizer --tool memcheck on one small call of each compiled backend       90
#   4 overhead  benchmarks/overhead.py: host time, kernel launches, 14x14+1 bf16 vs sdpa-flash      60
#     timing    benchmarks/benchmark.py, bf16, D=64, fwd and fwd+bwd, 14x14 .. 256x256 and 16x64x64
#               at batches that fill the GPU, vs sdpa-flash, sdpa-cudnn, sdpa-efficient, flash-attn;
#               peak memory; the Triton autotune choices (TRITON_PRINT_AUTOTUNING); D=128 if time is left
#   5 fit       benchmarks/fit_cost_model.py --device-class sm_90 --dry-run on the timings          30
# The whole run stops starting stages when its budget (LISA_SESSION_SECONDS, 530) is nearly spent.
#
# What comes back (at most 8 files): $OUT/gpu_session.tar.gz (every log and result), $OUT/summary.txt (the
# stage table and the targets table, also printed last). benchmarks/README.md says how to commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
STAMP=$(date +%Y-%m-%d)
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"
WORK=${LISA_SESSION_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/lisa_gpu_session.XXXXXX")}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  BUDGET=${LISA_SESSION_SECONDS:-170}
  SCALE=2          # caps divided by this
  TAG=dryrun
else
  BUDGET=${LISA_SESSION_SECONDS:-530}
  SCALE=1
  TAG=gpu
fi
export TRITON_PRINT_AUTOTUNING=1
SUMMARY="$WORK/summary.txt"
: > "$WORK/stages.txt"
echo "lisa_kernels GPU session ($TAG), $(date -u +%FT%TZ), budget ${BUDGET}s, work dir $WORK" | tee "$WORK/session.log"

START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export ROOT PY DRY WORK BUDGET SCALE START

pack() {   # everything so far into $DEST (two files), after every stage
  { head -1 "$WORK/session.log"; grep -m1 -E '"gpu"|"torch"' "$WORK/env.json" 2> /dev/null
    cat "$WORK/stages.txt"; echo; [ -f "$WORK/targets.txt" ] && cat "$WORK/targets.txt"; } > "$SUMMARY"
  cp "$SUMMARY" "$DEST/summary.txt"
  tar -czf "$DEST/gpu_session.tar.gz.part" -C "$WORK" --exclude=build . 2>/dev/null \
    && mv "$DEST/gpu_session.tar.gz.part" "$DEST/gpu_session.tar.gz"
}

# stage NAME CAP COMMAND...: run under min(CAP / SCALE, time left - reserve), log to $WORK/NAME.log, record
stage() {
  local name=$1 cap=$(( $2 / SCALE )) t0=$SECONDS rc
  shift 2
  local room=$(( $(left) - 15 / SCALE ))
  if [ "$room" -lt 5 ]; then
    printf '%-12s %-8s %5ss  %s\n' "$name" "no-time" 0 "budget spent" | tee -a "$WORK/stages.txt"
    return 0
  fi
  [ "$cap" -gt "$room" ] && cap=$room
  echo "=== $name (cap ${cap}s, $(date +%T))"
  # shell functions run in a child bash (timeout needs a program); they and the variables above are exported
  timeout --kill-after=5 "$cap" bash -c '"$@"' _ "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local verdict=ok
  [ $rc = 124 ] || [ $rc = 137 ] && verdict=TIMEOUT
  [ $rc != 0 ] && [ "$verdict" = ok ] && verdict="rc=$rc"
  tail -n "${TAIL:-8}" "$WORK/$name.log"
  printf '%-12s %-8s %5ss\n' "$name" "$verdict" $((SECONDS - t0)) | tee -a "$WORK/stages.txt"
  pack
  return 0
}

# ---------------------------------------------------------------- 1 env
env_stage() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw \
      --format=csv || true
  else
    echo "no nvidia-smi (dry run: CPU)"
  fi
  command -v nvcc > /dev/null && nvcc --version | tail -2 || echo "no nvcc"
  command -v compute-sanitizer > /dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" \
    || echo "no compute-sanitizer"
  git -C "$ROOT" rev-parse HEAD 2> /dev/null || echo "(not a git checkout)"
  $PY benchmarks/gpu_check.py env --out "$WORK/env.json"
}
export -f left env_stage
TAIL=3 stage env 30 env_stage

# ---------------------------------------------------------------- 2 build (background)
BUILD_RC="$WORK/build.rc"
# setuptools < 77 rejects pyproject.toml's SPDX license string: that machine's setup.py then reads a copy with the
# older table form (restored at exit)
if ! $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  cp pyproject.toml "$WORK/pyproject.toml.orig"
  trap 'cp "$WORK/pyproject.toml.orig" "$ROOT/pyproject.toml"' EXIT
  sed -i 's/^license = "\(.*\)"$/license = {text = "\1"}/' pyproject.toml
  echo "setuptools $($PY -c 'import setuptools; print(setuptools.__version__)') < 77: building with license = {text = ...}"
fi
if [ $DRY = 1 ]; then
  # no CUDA toolkit needed: the same background-job mechanics with a stand-in that only configures setup.py
  ( LISA_BUILD_CUDA=0 $PY setup.py --version > "$WORK/build.log" 2>&1; echo $? > "$BUILD_RC" ) &
else
  ( timeout 300 env MAX_JOBS=16 LISA_BUILD_CUDA=1 LISA_CUDA_ARCHS=9.0a TORCH_CUDA_ARCH_LIST=9.0a \
      $PY setup.py build_ext --inplace > "$WORK/build.log" 2>&1; echo $? > "$BUILD_RC" ) &
fi
BUILD_PID=$!
export BUILD_RC BUILD_PID
echo "=== build started in the background (pid $BUILD_PID)"

# ---------------------------------------------------------------- 3 correctness (Triton while the build runs)
TINY=""
# the dry run: tiny shapes, and an H100 simulated (lisa_kernels.testing.fake_gpu), so that the checks run the host
# code the GPU run takes (autotuning over the H100's candidates, the GPU dot modes) and count its compiles
[ $DRY = 1 ] && TINY="--tiny --fake-gpu h100"
export TINY
# triton-fft first (no autotuning: a few compiles), then triton bf16 first: simulated (gpu_check.py --fake-gpu h100,
# 2026-12-07) the triton checks of the 8 cases x 3 dtypes compile 218 autotune candidates over 75 tuning keys and
# run each once more to time it, besides the untuned kernels' compiles (about 5 per case and dtype)
stage check 240 $PY benchmarks/gpu_check.py check --backends triton-fft triton --dtypes bfloat16 float16 float32 \
  $TINY --out "$WORK/check.jsonl"

wait_build() {   # the rest of the build's own cap, at most the time left
  local waited=0
  while [ ! -f "$BUILD_RC" ] && kill -0 "$BUILD_PID" 2> /dev/null; do   # (not our child: poll)
    sleep 2; waited=$((waited + 2))
    [ $(( $(left) - 60 / SCALE )) -lt 0 ] && { echo "budget nearly spent: giving up on the build"; kill "$BUILD_PID"; break; }
  done
  local rc; rc=$(cat "$BUILD_RC" 2> /dev/null || echo killed)
  echo "build exit: $rc (waited ${waited}s)"; tail -5 "$WORK/build.log"
  ls lisa_kernels/_C*.so 2> /dev/null || echo "no lisa_kernels/_C*.so"
  [ "$rc" = 0 ]
}
export -f wait_build
TAIL=4 stage build 300 wait_build

stage check-cuda 60 $PY benchmarks/gpu_check.py check --backends cuda direct $TINY --out "$WORK/check.jsonl"

memcheck() {
  if [ $DRY = 0 ] && command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
      $PY benchmarks/gpu_check.py sanitize-one triton triton-fft cuda
  else
    echo "no compute-sanitizer or no GPU: running the calls without it"
    $PY benchmarks/gpu_check.py sanitize-one triton triton-fft cuda $TINY
  fi
}
export -f memcheck
stage memcheck 90 memcheck

# ---------------------------------------------------------------- 4 overhead and timings
if [ $DRY = 1 ]; then
  stage overhead 60 $PY benchmarks/overhead.py --quick --out "$WORK/overhead_cpu"
else
  stage overhead 60 $PY benchmarks/overhead.py --batches 9 --calls 100 --out "$WORK/overhead_cuda"
fi

# benchmark.py with one batch per group of grids, so that each fills the GPU (B*H*N ~ 2^19 .. 2^20, H = 8)
timing() {   # timing NAME D B GRIDS...
  local name=$1 D=$2 B=$3; shift 3
  if [ $DRY = 1 ]; then
    $PY benchmarks/benchmark.py --device cpu --grids "$@" --dims "$D" --batch "$B" --heads 1 --modes fwd fwd+bwd \
      --methods sdpa lisa-direct lisa-auto --repeats 1 --warmup 0 --min-time 0 --rotate 1 \
      --in-process --no-plot --out "$WORK/$name.json"
  else
    $PY benchmarks/benchmark.py --device cuda --grids "$@" --dims "$D" --batch "$B" --heads 8 --dtypes bfloat16 \
      --modes fwd fwd+bwd --methods sdpa-flash sdpa-cudnn sdpa-efficient flash-attn lisa-auto lisa-triton \
      lisa-triton-fft lisa-cuda --repeats 10 --warmup 3 --min-time 0.1 --rotate 2 --max-seconds 2 --no-plot \
      --out "$WORK/$name.json"
  fi
}
export -f timing
if [ $DRY = 1 ]; then
  stage timing-d64-a 60 timing timing_d64_a 8 1 3x3
  stage timing-d64-b 60 timing timing_d64_b 8 1 2x2x2
else
  stage timing-d64-a 90 timing timing_d64_a 64 256 14x14
  stage timing-d64-b 90 timing timing_d64_b 64 16 32x32 64x64
  stage timing-d64-c 120 timing timing_d64_c 64 1 128x128 256x256 16x64x64
  if [ "$(left)" -gt 120 ]; then
    stage timing-d128 90 timing timing_d128 128 16 32x32 64x64
  else
    printf '%-12s %-8s %5ss  %s\n' timing-d128 skipped 0 "too little time left" | tee -a "$WORK/stages.txt"
  fi
fi

# ---------------------------------------------------------------- 5 the cost-model fit (dry run), the targets
# a timing stage cut short by its cap leaves only benchmark.py's running file, <name>.json.tmp: use it then
RESULTS=""
for f in "$WORK"/timing_*.json "$WORK"/timing_*.json.tmp; do
  [ -f "$f" ] || continue
  case $f in *.tmp) [ -f "${f%.tmp}" ] && continue ;; esac
  RESULTS="$RESULTS $f"
done
$PY benchmarks/gpu_check.py summary $RESULTS --merge "$WORK/timings_merged.json" --out "$WORK/targets.txt" \
  > /dev/null 2>&1
stage fit 30 $PY benchmarks/fit_cost_model.py "$WORK/timings_merged.json" --device-class sm_90 --dry-run
pack
echo
echo "=== stages (total ${SECONDS}s of ${BUDGET}s); results: $DEST/gpu_session.tar.gz, $DEST/summary.txt"
cat "$WORK/stages.txt"
echo
cat "$WORK/targets.txt" 2> /dev/null || echo "(no targets table)"
