"""Build script: the pure-Python package always; the CUDA extension ``lisa_kernels._C`` where it can be built.

Environment variables:
  LISA_BUILD_CUDA   "auto" (default): build when torch is importable, is a CUDA build and a CUDA toolkit
                    is found; "0": never; "1": always (fail loudly if it cannot).
  LISA_CUDA_ARCHS   GPU architectures, default "8.0;9.0a" (sets TORCH_CUDA_ARCH_LIST).
  MAX_JOBS          parallel compile jobs (used by torch's ninja build).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[lisa_kernels setup] {msg}", file=sys.stderr)


def _guess_cuda_home():
    """Point CUDA_HOME at the toolkit of the nvcc on PATH (torch would guess its parent's parent, wrong for links)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            log(f"CUDA_HOME not set: using {home}")
            return


def _wheel_cuda_includes():
    """Headers of the NVIDIA wheels torch depends on (cuBLAS, cuSPARSE, cuFFT...), for toolkits without them."""
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                dirs.append(path)
    return dirs[:1]


def cuda_extension():
    """The CUDA extension and its build command, or (None, None) with the reason printed."""
    mode = os.environ.get("LISA_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        log("LISA_BUILD_CUDA=0: building the pure-Python package (no CUDA extension)")
        return None, None
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    reason = None
    _guess_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = ("torch is not importable in the build environment (pip's build isolation hides it; "
                  "use 'pip install --no-build-isolation .' to build the CUDA extension)")
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        elif not sources:
            reason = "csrc/ holds no sources"
    if reason is not None:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError(f"LISA_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        log(f"not building the CUDA extension: {reason}; the reference, direct and fft backends work without it")
        return None, None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("LISA_CUDA_ARCHS", "8.0;9.0a"))
    log(f"building lisa_kernels._C from {len(sources)} sources for archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    includes = [os.path.join(HERE, "csrc")] + _wheel_cuda_includes()
    log(f"include dirs: {includes}; MAX_JOBS={os.environ.get('MAX_JOBS', 'torch default')}")
    ext = CUDAExtension("lisa_kernels._C", sources, include_dirs=includes,
                        define_macros=[("LISA_WITH_CUDA", None)],
                        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp"], "nvcc": ["-O3", "-std=c++20"]})
    return ext, BuildExtension


ext, build_ext = cuda_extension()
setup(
    packages=["lisa_kernels"],
    package_data={"lisa_kernels": ["cost_model.json", "py.typed"]},
    ext_modules=[ext] if ext is not None else [],
    cmdclass={"build_ext": build_ext} if build_ext is not None else {},
)
