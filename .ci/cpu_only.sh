#!/usr/bin/env bash
# CI, second install: the package from a CPU-only torch, with no CUDA toolkit on PATH, so that setup.py builds the
# CPU extension (csrc/*.cpp alone); then the CPU-kernel tests against that installed build.
#
#   .ci/cpu_only.sh                 # about 3-4 minutes on 2 cores
#
# Environment: LISA_CPU_TORCH (the torch requirement, default torch==2.13.0: a CPU-only wheel on the project's
# machines; elsewhere add LISA_CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu), LISA_CPU_ONLY_VENV (the
# venv's path, default .venv-cpu-only, recreated), LISA_CPU_ONLY_KEEP_VENV=1 (keep it afterwards), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
start=$(date +%s)
venv=${LISA_CPU_ONLY_VENV:-$repo/.venv-cpu-only}
torch_req=${LISA_CPU_TORCH:-torch==2.13.0}
src=$(mktemp -d)
cleanup() {
  rm -rf "$src"
  if [ "${LISA_CPU_ONLY_KEEP_VENV:-0}" != "1" ]; then rm -rf "$venv"; fi
}
trap cleanup EXIT

echo "== fresh venv $venv with $torch_req (CPU-only)"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
index=()
if [ -n "${LISA_CPU_TORCH_INDEX:-}" ]; then index=(--index-url "$LISA_CPU_TORCH_INDEX"); fi
"$venv/bin/python" -m pip install --quiet "${index[@]}" "$torch_req"
"$venv/bin/python" -m pip install --quiet numpy pytest setuptools wheel ninja   # ninja: MAX_JOBS parallel compiles
"$venv/bin/python" - <<'EOF'
import torch
assert torch.version.cuda is None, f"expected a CPU-only torch, got {torch.__version__} (CUDA {torch.version.cuda})"
print(f"torch {torch.__version__}, CPU-only")
EOF

echo "== PATH without nvcc, no CUDA_HOME"
clean_path=""
IFS=: read -r -a dirs <<< "$PATH"
for d in "${dirs[@]}"; do
  if [ -n "$d" ] && [ ! -x "$d/nvcc" ]; then clean_path="${clean_path:+$clean_path:}$d"; fi
done
export PATH="$clean_path"
unset CUDA_HOME CUDA_PATH
if command -v nvcc >/dev/null 2>&1; then echo "nvcc is still on PATH: $(command -v nvcc)"; exit 1; fi

echo "== install the package (a copy of the working tree; --no-build-isolation: the build sees this torch)"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
build_start=$(date +%s)
log="$src.log"
if ! LISA_BUILD_EXT=1 MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install --no-build-isolation --no-deps -v \
    "$src" > "$log" 2>&1; then
  cat "$log"; rm -f "$log"; exit 1
fi
grep -E "\[lisa_kernels setup\]|Successfully installed" "$log" || true
rm -f "$log"
echo "   build and install took $(( $(date +%s) - build_start )) s"
# -I: the installed package, not this checkout
"$venv/bin/python" -I - <<'EOF'
import lisa_kernels
from lisa_kernels import _C
assert "site-packages" in lisa_kernels.__file__, lisa_kernels.__file__
assert _C.with_cuda is False and hasattr(_C, "direct_cpu_forward"), "not the CPU extension"
print(f"lisa_kernels._C built: CPU-only, products by {_C.direct_cpu_gemm()}, at {_C.__file__}")
EOF

echo "== the CPU-kernel tests, against the installed build"
LISA_REQUIRE_EXTENSION=1 "$venv/bin/pytest" -q -p no:cacheprovider tests/test_direct_cpu.py tests/test_dense_cpp.py \
  tests/test_fft_cpu.py tests/test_cuda_extension.py

echo "== CPU-only install and tests took $(( $(date +%s) - start )) s"
