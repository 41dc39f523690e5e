#!/usr/bin/env bash
# One GPU session's work in as few calls as possible: build the extension, run the whole test suite on the GPU,
# run the GPU sweep, and fit the cost model of this GPU's class to it (dry run: the printout says how the fitted
# constants do; commit them with `python benchmarks/fit_cost_model.py <results>.json` on the results copied back).
#
#   bash benchmarks/gpu_session.sh                 # all stages: env build test sweep fit
#   bash benchmarks/gpu_session.sh env build test  # some of them, in this order
#
# Logs and results go to $OUT if it is set (a folder that is copied back), else to benchmarks/results/.
# Extra arguments for the sweep: SWEEP_ARGS="--grids 64x64 --dims 64" bash benchmarks/gpu_session.sh sweep
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
STAGES=${*:-env build test sweep fit}
STAMP=$(date +%Y-%m-%d)
RESULT="$DEST/cuda_${STAMP}.json"
export PYTHONUNBUFFERED=1
status=0

for stage in $STAGES; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    env)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        $PY -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
      } 2>&1 | tee "$DEST/env.txt" ;;
    build)
      MAX_JOBS=${MAX_JOBS:-16} LISA_BUILD_CUDA=1 $PY setup.py build_ext --inplace > "$DEST/build.log" 2>&1 \
        && echo "built: $(ls lisa_kernels/_C*.so)" || { echo "build FAILED (see build.log)"; tail -20 "$DEST/build.log"; status=1; } ;;
    test)
      LISA_REQUIRE_EXTENSION=1 $PY -m pytest tests -q -rs -p no:cacheprovider -x --junitxml="$DEST/tests.xml" \
        > "$DEST/tests.log" 2>&1 || status=1
      tail -25 "$DEST/tests.log" ;;
    sweep)
      # shellcheck disable=SC2086
      $PY benchmarks/benchmark.py --out "$RESULT" ${SWEEP_ARGS:-} > "$DEST/sweep.log" 2>&1 || status=1
      grep -A40 "^Targets" "$DEST/sweep.log" || tail -30 "$DEST/sweep.log" ;;
    fit)
      if [ -f "$RESULT" ]; then $PY benchmarks/fit_cost_model.py "$RESULT" --dry-run 2>&1 | tail -40 | tee "$DEST/fit.log"
      else echo "no $RESULT: run the sweep stage first"; fi ;;
    *) echo "unknown stage $stage (env build test sweep fit)"; status=1 ;;
  esac
done
exit $status
