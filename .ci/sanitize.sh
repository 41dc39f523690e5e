#!/usr/bin/env bash
# The C++ CPU kernels (csrc/*.cpp) built with AddressSanitizer and UndefinedBehaviorSanitizer (gcc), then their tests:
# an out-of-bounds access, a use after free or undefined behaviour (overflow, misaligned load, bad shift) in
# lisa_kernels._C stops the run. Runs in the venv it is started from (torch with headers), on a copy of the tree.
#
#   .ci/sanitize.sh            # about 4 minutes on 2 cores (the build), then about 20 s of tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
echo "== build the CPU extension with $flags"
( cd "$src" && CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" LISA_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py build_ext --inplace > build.log 2>&1 ) || { tail -30 "$src/build.log"; exit 1; }
"$PY" - "$src" <<'PY'
import glob, subprocess, sys
so = glob.glob(f"{sys.argv[1]}/lisa_kernels/_C*.so")[0]
syms = subprocess.run(["nm", "-D", so], capture_output=True, text=True, check=True).stdout
assert "__asan_report" in syms and "__ubsan_handle" in syms, "the extension is not instrumented"
print(f"instrumented: {so.rsplit('/', 1)[-1]}")
PY
echo "== the C++ kernels' tests under the sanitizers"
cd "$src/tests"
# leaks: CPython keeps its interned objects to exit; the runtimes come first, before python's own libraries
export PYTHONPATH="$src" LD_PRELOAD="$asan $ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$PY" -c "import sys, lisa_kernels._C as c; assert c.__file__.startswith(sys.argv[1]), c.__file__" "$src"
"$PY" -m pytest -q -p no:cacheprovider test_direct_cpu.py test_dense_cpp.py test_fft_cpu.py
