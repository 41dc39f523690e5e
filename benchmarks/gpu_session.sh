#!/usr/bin/env bash
# One GPU session in one command of at most 9 minutes, on a fresh H100/H200 machine (torch, triton and nvcc
# there; no network, no pip). Stages run in priority order, each under its own wall-clock cap (`timeout`), and
# everything is packed after every stage, so whatever has finished comes back even if the command is killed.
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine; results in $OUT (or benchmarks/results/)
#   bash benchmarks/gpu_session.sh --dry-run   # the same stages on the CPU: Triton interpreter, tiny sizes,
#                                              # caps scaled down; 2.5-4 minutes (tests/test_gpu_session.py)
#
# Stages (caps in seconds, GPU run; GPU_STAGES below holds them):
#   1 env       nvidia-smi, versions, the measured ceilings (bf16 matmul, device copy)              30
#   2 build     the CUDA extension for sm_90a only, MAX_JOBS=16, in the background from the start  300
#     warm      gpu_check.py warm, in the background from the start: the run's Triton kernels compiled
#               into Triton's disk cache by 10 processes, in the stages' order (see "Sizing" below); its
#               log (warm.log) and plan.json hold the plan of the run
#   3 check     triton-fft, then triton (bf16, fp16, fp32) against the reference (forward and every
#               gradient; 1D/2D/3D grids, extra tokens, M > 1, causal; poisoned outputs)          240
#     check-flex  flex (FlexAttention) against the reference and triton, bf16 and fp32, forward and
#               gradients; with the timing stages' FlexAttention compiles, 14 processes at once
#               (gpu_check.py flex: Inductor's disk caches then hold them), while the build runs      90
#     check-cuda  the same for cuda and direct, once the build is done                              60
#     memcheck  compute-sanitizer --tool memcheck on one small call of each compiled backend       90
#     check-aoti  a LiSA model (bf16, Triton kernels) exported with a dynamic batch, packaged by
#               AOTInductor and run at other batches vs eager; the model under torch.compile, forward and
#               backward, vs eager (gpu_check.py aoti)                                               75
#   4 overhead  benchmarks/overhead.py: host time, kernel launches, 14x14+1 bf16 vs sdpa-flash      60
#     timing    benchmarks/benchmark.py, bf16, D=64, fwd and fwd+bwd, 14x14 .. 256x256 and 16x64x64
#               at batches that fill the GPU, vs sdpa-flash, sdpa-cudnn, sdpa-efficient, flash-attn,
#               and from 14x14 to 64x64 the FlexAttention peers flex-lisa and flex-rpb; peak memory;
#               the Triton autotune choices (TRITON_PRINT_AUTOTUNING)                   90, 120, 120
#               D=128 (32x32, 64x64) if more than 100 s are left (the plan: not, since the flex
#               timings)                                                                              75
#   5 fit       benchmarks/fit_cost_model.py --device-class sm_90 --dry-run on the timings          30
#     predict   benchmarks/predict.py: per pass (fwd, bwd) of triton, sdpa-flash and flash-attn, kernel_report.py's
#               bound at the GPU's clock against the measured time (predicted.txt, in summary.txt)
# The whole run stops starting stages when its budget (LISA_SESSION_SECONDS, 530) is nearly spent.
#
# Sizing (gpu_check.py plan, which the dry run runs first; plan.json in the results; benchmarks/README.md): the
# stages' Triton work, counted for the GPU run's real cases and Triton 3.6 (2026-12-07): check 358 compiles (218
# autotune candidates over 75 tuning keys, 90 untuned kernels, 50 triton-fft specializations) and 35 gcc-built C
# launchers; overhead 29; timing-d64-a 15, -b 123, -c 313 (the triton-fft kernels specialize on their chunk
# offsets and sizes: 285 of the 313), d128 47: 885 compiles. At 0.5-1.2 s each (measured on a 2-core AMD EPYC,
# gpu_check.py compile-time; the GPU machine's CPU unknown) that is ~830 s in one process: more than the whole
# budget, the check stage alone ~480 s against its 240 s cap. So the warm-up compiles them first on 10 of the 16
# cores (the build's 5 sources take ~5), done at ~140 s; the stages then find most kernels in Triton's disk cache
# (a cache hit ~0.05 s). Estimated with it: check ~115 s, the timing stages 19-91 s, the whole run ~518 s of 530;
# without it the stages would need ~1275 s (cut at their caps: check and overhead cut short, the timings not run).
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
  BUDGET=${LISA_SESSION_SECONDS:-240}
  SCALE=2          # caps divided by this
  TAG=dryrun
else
  BUDGET=${LISA_SESSION_SECONDS:-530}
  SCALE=1
  TAG=gpu
fi
export TRITON_PRINT_AUTOTUNING=1
# The GPU run's stages after env, in order, with their caps (s): NAME:CAP, a timing stage NAME:CAP:D:B:GRIDS
# (benchmark.py at head dim D, batch B, H = 8) and :if-time-S for one that runs only if more than S s are left.
# gpu_check.py plan and warm take the same list (with env first), so the plan counts what the stages run.
# A timing stage may add methods of its own (:+METHOD,...): the FlexAttention peers from 14x14 to 64x64 (the issue's
# triton / flex-lisa targets), compiled beforehand by check-flex.
# Estimated (plan, 10 warm-up processes; FlexAttention's and AOTInductor's compile times guessed): env 20, check
# 115, check-flex 38 (the build's wait), check-cuda 22, memcheck 41, check-aoti 48, overhead 33, timing 33 / 62 / 94,
# fit 13: ~518 s; d128 would start at ~505 s with ~25 s left, under its threshold (100 s, so that its cap, 75 s, and
# fit's 30 s fit within the budget): the flex timings and check-aoti took its place, and it runs where the stages go
# faster than estimated.
GPU_STAGES=(check:240 check-flex:90 build:300 check-cuda:60 memcheck:90 check-aoti:75 overhead:60
            timing-d64-a:90:64:256:14x14:+flex-lisa,flex-rpb timing-d64-b:120:64:16:32x32,64x64:+flex-lisa,flex-rpb
            timing-d64-c:120:64:1:128x128,256x256,16x64x64 timing-d128:75:128:16:32x32,64x64:if-time-100 fit:30)
# the dry run's timing stages (on the CPU, D = 8, B = 1; see timing below)
DRY_STAGES=(timing-d64-a:60:8:1:3x3 timing-d64-b:90:8:1:2x2x2:+flex-lisa,flex-rpb)
DRY_METHODS="sdpa lisa-direct lisa-auto"      # the second dry timing stage's (the first simulates the GPU's)
GPU_METHODS="sdpa-flash sdpa-cudnn sdpa-efficient flash-attn lisa-auto lisa-triton lisa-triton-fft lisa-cuda"
GPU_BENCH="--repeats 10 --warmup 3 --min-time 0.1 --max-seconds 2"
PLAN_ARGS="--stages env:30 ${GPU_STAGES[*]} --budget $BUDGET --methods $GPU_METHODS $GPU_BENCH"
[ $DRY = 1 ] && PLAN_ARGS="--stages env:30 ${GPU_STAGES[*]} --budget 530 --methods $GPU_METHODS $GPU_BENCH"
cap() {   # cap NAME: the stage's cap in GPU_STAGES
  local s; for s in "${GPU_STAGES[@]}"; do [ "${s%%:*}" = "$1" ] && { s=${s#*:}; echo "${s%%:*}"; return; }; done
  echo 60
}
SUMMARY="$WORK/summary.txt"
: > "$WORK/stages.txt"
echo "lisa_kernels GPU session ($TAG), $(date -u +%FT%TZ), budget ${BUDGET}s, work dir $WORK" | tee "$WORK/session.log"

START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export ROOT PY DRY WORK BUDGET SCALE START

pack() {   # everything so far into $DEST (two files), after every stage
  { head -1 "$WORK/session.log"; grep -m1 -E '"gpu"|"torch"' "$WORK/env.json" 2> /dev/null
    cat "$WORK/stages.txt"; echo; [ -f "$WORK/targets.txt" ] && cat "$WORK/targets.txt"
    [ -f "$WORK/predicted.txt" ] && { echo; cat "$WORK/predicted.txt"; }; } > "$SUMMARY"
  cp "$SUMMARY" "$DEST/summary.txt"
  tar -czf "$DEST/gpu_session.tar.gz.part" -C "$WORK" --exclude=build --exclude=triton-cache . 2>/dev/null \
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

start_warm() {   # gpu_check.py warm in the background: the run's Triton kernels into Triton's disk cache
  ( $PY benchmarks/gpu_check.py warm $PLAN_ARGS "$@" > "$WORK/warm.log" 2>&1 &
    echo $! > "$WORK/warm.pid"; wait $!; echo $? > "$WORK/warm.rc" ) &
  echo "=== warm-up started in the background"
}

# ---------------------------------------------------------------- the plan (dry run, first)
if [ $DRY = 1 ]; then
  # the GPU run's plan, for the GPU machine's Triton (3.6): compiles, autotune keys and estimated time per stage
  # (the GPU run's warm-up writes the same, for the installed Triton, into warm.log and plan.json)
  TAIL=16 stage plan 60 $PY benchmarks/gpu_check.py plan $PLAN_ARGS --triton 3.6 --out "$WORK/plan.json"
  export TRITON_CACHE_DIR="$WORK/triton-cache"        # (the dry warm-up's compile: not into ~/.triton)
fi

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

# ---------------------------------------------------------------- the warm-up (background)
# the GPU run: the warm-up from here, on 10 of the 16 cores (the build takes ~5); the dry run: after the check
[ $DRY = 0 ] && start_warm --jobs 10 --plan-out "$WORK/plan.json"

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
# triton-fft first (no autotuning: 50 compiles), then triton bf16 first: the triton checks of the 8 cases x 3 dtypes
# compile 218 autotune candidates over 75 tuning keys (the simulated GPU's count, 2026-12-07, and the plan's) and run
# each once more to time it, besides 90 untuned kernels; the warm-up compiles them in parallel (see Sizing)
# (the dry run's cap: 180 s, not 240 / 2: its 36 interpreted checks take 95-125 s on the 2-core machine under load)
CHECK_CAP=$(cap check); [ $DRY = 1 ] && CHECK_CAP=360
stage check $CHECK_CAP $PY benchmarks/gpu_check.py check --backends triton-fft triton \
  --dtypes bfloat16 float16 float32 $TINY --out "$WORK/check.jsonl"
# the dry run: the warm-up's mechanics, one real compile for sm_90a (started after the check, which the 2-core machine
# runs at its cap's edge)
[ $DRY = 1 ] && start_warm --jobs 1 --limit 1

# flex (FlexAttention) against the reference and against triton on the same inputs, bf16 and fp32, in processes of
# their own beside one call of each timing stage's FlexAttention case (flex-lisa, flex-rpb, lisa-auto where it picks
# flex): each compiles seconds in one process, so 14 at once, while the build still runs; the timing stages then find
# the compiled graphs in Inductor's disk caches. The dry run: one tiny float32 case, the forward (no CPU backward),
# and the second dry timing stage's cases on the CPU, in 2 processes
TIMING_SPECS=""
for spec in "${GPU_STAGES[@]}"; do case $spec in timing-*) TIMING_SPECS="$TIMING_SPECS $spec" ;; esac; done
if [ $DRY = 1 ]; then
  stage check-flex 120 $PY benchmarks/gpu_check.py flex --tiny --stages "${DRY_STAGES[1]}" --methods $DRY_METHODS \
    --device cpu --heads 1 --dtype float32 --jobs 2 --out "$WORK/check.jsonl"
else
  stage check-flex $(cap check-flex) $PY benchmarks/gpu_check.py flex --stages $TIMING_SPECS --methods $GPU_METHODS \
    --jobs 14 --out "$WORK/check.jsonl"
fi

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
TAIL=4 stage build $(cap build) wait_build

stage check-cuda $(cap check-cuda) $PY benchmarks/gpu_check.py check --backends cuda direct $TINY \
  --out "$WORK/check.jsonl"

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
stage memcheck $(cap memcheck) memcheck

# the Triton ops as AOTInductor and torch.compile see them (torch.library.triton_op); the dry run: the exported
# program against eager, without Inductor (the CPU's AOTInductor is tests/test_export.py's)
if [ $DRY = 1 ]; then
  stage check-aoti $(cap check-aoti) $PY benchmarks/gpu_check.py aoti --tiny --no-compile --out "$WORK/check.jsonl"
else
  stage check-aoti $(cap check-aoti) $PY benchmarks/gpu_check.py aoti --out "$WORK/check.jsonl"
fi

# ---------------------------------------------------------------- 4 overhead and timings
if [ $DRY = 1 ]; then
  stage overhead $(cap overhead) $PY benchmarks/overhead.py --quick --out "$WORK/overhead_cpu"
else
  stage overhead $(cap overhead) $PY benchmarks/overhead.py --batches 9 --calls 100 --out "$WORK/overhead_cuda"
fi

# benchmark.py with one batch per group of grids, so that each fills the GPU (B*H*N ~ 2^19 .. 2^20, H = 8)
timing() {   # timing NAME D B EXTRA GRIDS...: EXTRA the stage's own methods (comma-separated), or -
  local name=$1 D=$2 B=$3 extra=${4//,/ }; shift 4
  [ "$extra" = - ] && extra=""
  if [ $DRY = 1 ]; then
    # the first dry timing stage simulates the H100 (benchmark.py --fake-gpu): the GPU run's LiSA methods (lisa-auto
    # picks triton there, so lisa-triton's host code runs; itself left out: 8 s more), their host code and Triton
    # autotuning, kernels interpreted (about 20 s, against 8 s unsimulated); the second runs the CPU's methods (and the
    # FlexAttention peers' forward, compiled by check-flex)
    local methods="$DRY_METHODS" fake=""
    [ "$name" = timing_d64_a ] && methods="sdpa lisa-auto lisa-triton-fft lisa-cuda" fake="--fake-gpu h100"
    $PY benchmarks/benchmark.py --device cpu --grids "$@" --dims "$D" --batch "$B" --heads 1 --modes fwd fwd+bwd \
      --methods $methods $extra $fake --repeats 1 --warmup 0 --min-time 0 --rotate 1 \
      --in-process --no-plot --out "$WORK/$name.json"
  else
    $PY benchmarks/benchmark.py --device cuda --grids "$@" --dims "$D" --batch "$B" --heads 8 --dtypes bfloat16 \
      --modes fwd fwd+bwd --methods $GPU_METHODS $extra $GPU_BENCH --rotate 2 --no-plot --out "$WORK/$name.json"
  fi
}
export -f timing
export GPU_METHODS GPU_BENCH DRY_METHODS
# a timing stage's spec: NAME:CAP:D:B:GRID,...[:+METHOD,...][:if-time-S]
[ $DRY = 1 ] && TIMING_STAGES=("${DRY_STAGES[@]}") || TIMING_STAGES=("${GPU_STAGES[@]}")
for spec in "${TIMING_STAGES[@]}"; do
  case $spec in timing-*) ;; *) continue ;; esac
  IFS=: read -r -a f <<< "$spec"
  name=${f[0]} when="" extra=-
  for x in "${f[@]:5}"; do case $x in if-time-*) when=${x#if-time-} ;; +*) extra=${x#+} ;; esac; done
  if [ -n "$when" ] && [ "$(left)" -le "$when" ]; then
    printf '%-12s %-8s %5ss  %s\n' "$name" skipped 0 "too little time left" | tee -a "$WORK/stages.txt"
    continue
  fi
  stage "$name" "${f[1]}" timing "${name//-/_}" "${f[2]}" "${f[3]}" "$extra" ${f[4]//,/ }
done

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
# predicted (kernel_report.py's bound per pass at the GPU's clock) against measured, triton and FlashAttention-2
# (the dry run: its CPU's float32 timings against SDPA, at an assumed H100's clock: the mechanics only)
PREDICT_ARGS=""; [ $DRY = 1 ] && PREDICT_ARGS="--dtype float32 --flash sdpa"
$PY benchmarks/predict.py $RESULTS --env "$WORK/env.json" $PREDICT_ARGS --out "$WORK/predicted.txt" \
  --json "$WORK/predicted.json" > "$WORK/predict.log" 2>&1 \
  || echo "predict.py failed: see predict.log" >> "$WORK/predicted.txt"
stage fit $(cap fit) $PY benchmarks/fit_cost_model.py "$WORK/timings_merged.json" --device-class sm_90 --dry-run
if [ -f "$WORK/warm.pid" ] && [ ! -f "$WORK/warm.rc" ]; then   # (it ends long before; never past the session)
  kill "$(cat "$WORK/warm.pid")" 2> /dev/null && sleep 2 && echo "warm-up stopped at the end of the session" \
    >> "$WORK/warm.log"
fi
printf '%-12s %-8s %5s   %s\n' warm "rc=$(cat "$WORK/warm.rc" 2> /dev/null || echo stopped)" - \
  "$(grep -E '^warm-up' "$WORK/warm.log" 2> /dev/null | tail -1)" \
  | tee -a "$WORK/stages.txt"
pack
echo
echo "=== stages (total ${SECONDS}s of ${BUDGET}s); results: $DEST/gpu_session.tar.gz, $DEST/summary.txt"
cat "$WORK/stages.txt"
echo
cat "$WORK/targets.txt" 2> /dev/null || echo "(no targets table)"
echo
cat "$WORK/predicted.txt" 2> /dev/null || echo "(no predicted / measured table)"
