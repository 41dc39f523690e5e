#!/usr/bin/env bash
# The oldest torch and triton the package supports (pyproject.toml): torch 2.11.0 with triton 3.6.0, the pair of
# the H100/H200 machine benchmarks/gpu_session.sh runs on. In a fresh venv: install the package, building the
# extension against this torch's headers where nvcc exists (for sm_90a only, the GPU machine's arch, to save
# time: the newest environment compiles both archs), then the tests that depend on the torch/triton version:
# the Triton kernels under the interpreter, their compile for every target (tests/test_kernel_report.py),
# the extension, gpu_session.sh --dry-run, the GPU host code under a simulated GPU (tests/test_fake_gpu.py), and the
# Triton ops traced for a simulated GPU as AOTInductor traces them (tests/test_triton_op.py).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${LISA_OLDEST_TORCH:-2.11.0}
TRITON=${LISA_OLDEST_TRITON:-3.6.0}

python3 -m venv .venv-ci-oldest
. .venv-ci-oldest/bin/activate
python -m pip install --quiet --upgrade pip
# pinned for every install below: the test extras' timm pulls torchvision, whose newest release would
# otherwise replace this torch with another
PINS=.venv-ci-oldest/pins.txt
printf 'torch==%s\ntriton==%s\n' "$TORCH" "$TRITON" > "$PINS"
python -m pip install --quiet -c "$PINS" torch triton "setuptools>=77" wheel
if command -v nvcc >/dev/null 2>&1; then
  export LISA_REQUIRE_EXTENSION=1 LISA_CUDA_ARCHS=${LISA_CUDA_ARCHS:-9.0a}
fi
python -m pip install --quiet -c "$PINS" --no-build-isolation ".[test]"
python - <<PY
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}")
assert torch.__version__.split("+")[0] == "$TORCH" and triton.__version__ == "$TRITON", "wrong versions installed"
PY
# (the walker and bitwise-reproducibility cases of test_triton_direct.py, the slowest, run on the newest triton only:
# they run the same kernels as its other cases on larger grids, and the interpreter's semantics are what differ here)
# the simulated GPUs' per-class tests for the GPU machine's H100 and the B200 (the newest stage runs every class);
# FlexAttention's compiled CPU kernel and its math path under this torch; the Triton ops traced as AOTInductor does
LISA_FAKE_GPU_CLASSES="h100 b200" pytest -q -n 2 --dist worksteal tests/test_triton_direct.py \
  tests/test_triton_range.py tests/test_triton_fft.py tests/test_kernel_report.py tests/test_cuda_extension.py \
  tests/test_gpu_session.py tests/test_validation.py tests/test_fake_gpu.py tests/test_flex.py tests/test_triton_op.py \
  -k "not test_triton_table_gradient_walkers and not test_triton_backward_is_bitwise"
