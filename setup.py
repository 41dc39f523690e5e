"""Build script: the pure-Python package always; the compiled extension ``lisa_kernels._C`` wherever it can be built.

Which build you get (``pip install --no-build-isolation .``, so that the build sees the installed torch):
  - torch is a CUDA build and a CUDA toolkit (nvcc) is found: the CUDA extension, with the CPU sources inside
    (csrc/*.cu and csrc/*.cpp; backend="cuda" and the compiled CPU loops);
  - a CPU-only torch (e.g. torch==2.13.0+cpu), or no CUDA toolkit, and a C++ compiler: the CPU extension
    (csrc/*.cpp only: the fused direct kernel, the fft loop, the dense forward);
  - no C++ compiler, no torch installed, or a failed compile: the pure-Python package, with the reason printed;
    every backend but "cuda" works, more slowly.
A plain `pip install .` builds in an isolated environment without torch; there the build uses the torch installed
in this interpreter's own site-packages (the one the package will run with), and says so.

Environment variables:
  LISA_BUILD_EXT    "auto" (default): build the extension where possible, else fall back to the pure-Python
                    package and say why; "0": never build it; "1": it must build (fail loudly if it cannot).
  LISA_BUILD_CUDA   "auto" (default): the CUDA extension where torch is a CUDA build and a CUDA toolkit is found,
                    else the CPU extension; "0": the CPU extension even where CUDA could be built; "1": the
                    CUDA extension or fail loudly.
  LISA_CUDA_ARCHS   GPU architectures, default "8.0;9.0a" (sets TORCH_CUDA_ARCH_LIST).
  MAX_JOBS          parallel compile jobs (used by torch's ninja build).
  CXX               the C++ compiler (default: the one torch's build uses, c++).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# -fopenmp: at::parallel_for's OpenMP loop is inlined from ATen's headers (and `omp simd` loops vectorize);
# -fno-trapping-math: lets GCC vectorize loops with selects (x > 0 ? a : b); nothing here reads FP exception flags
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]


def log(msg):
    print(f"[lisa_kernels setup] {msg}", file=sys.stderr)


def _mode(name):
    raw = os.environ.get(name, "auto").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return "0"
    if raw in ("1", "true", "yes", "on"):
        return "1"
    return "auto"


def _guess_cuda_home():
    """Point CUDA_HOME at the toolkit of the nvcc on PATH (torch would guess its parent's parent, wrong for links)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    # the toolkit of the nvcc on PATH; /usr/local/cuda where that nvcc is a wrapper script outside its toolkit
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            log(f"CUDA_HOME not set: using {home} (the toolkit of the nvcc on PATH)")
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


def _cxx_compiler():
    """The C++ compiler the build would use, or None."""
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx)


def _import_torch():
    """torch as the build sees it; where pip's build isolation hides it, the torch of this interpreter's own
    site-packages (the one the installed package will run with). None if there is none."""
    try:
        import torch
        return torch
    except ImportError:
        pass
    import sysconfig
    found = [path for path in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
             if os.path.isdir(os.path.join(path, "torch")) and path not in sys.path]
    if not found:
        return None
    sys.path.extend(found)
    try:
        import torch
    except ImportError as exc:
        log(f"torch in {found} does not import in the build environment ({exc})")
        return None
    log(f"torch is not installed in the build environment (pip's build isolation): building against torch "
        f"{torch.__version__} of {os.path.dirname(os.path.dirname(torch.__file__))}, the one the package will run "
        f"with ('pip install --no-build-isolation .' avoids this)")
    return torch


def _cuda_reason(torch, cuda_home):
    """None if the CUDA extension can be built, else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        return "no CUDA toolkit found (no nvcc on PATH and CUDA_HOME not set)"
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return f"no nvcc in the CUDA toolkit at {cuda_home}"
    return None


def extension():
    """(the extension, its build command class), or (None, None) with the reason printed."""
    build = _mode("LISA_BUILD_EXT")
    want_cuda = _mode("LISA_BUILD_CUDA")

    def skip(reason):
        if build == "1" or want_cuda == "1":
            raise RuntimeError(f"lisa_kernels: the compiled extension was required but cannot be built: {reason}")
        log(f"not building the compiled extension lisa_kernels._C: {reason}. The pure-Python package is installed; "
            f"every backend but 'cuda' works without it, more slowly (reinstall with a C++ compiler and "
            f"'pip install --no-build-isolation .' to build it)")
        return None, None

    if build == "0":
        log("LISA_BUILD_EXT=0: installing the pure-Python package (no compiled extension)")
        return None, None
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp_sources:
        return skip("csrc/ holds no sources")
    if _cxx_compiler() is None:
        return skip(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH; set CXX)")
    if want_cuda != "0":
        _guess_cuda_home()
    torch = _import_torch()
    if torch is None:
        return skip("torch is not installed (neither in the build environment nor in this interpreter's "
                    "site-packages; install torch first, then 'pip install --no-build-isolation .')")
    from torch.utils import cpp_extension

    cuda_reason = "LISA_BUILD_CUDA=0" if want_cuda == "0" else _cuda_reason(torch, cpp_extension.CUDA_HOME)
    if cuda_reason is None and not cu_sources:
        cuda_reason = "csrc/ holds no CUDA sources"
    includes = [os.path.join(HERE, "csrc")]
    if cuda_reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("LISA_CUDA_ARCHS", "8.0;9.0a"))
        includes += _wheel_cuda_includes()
        sources = cu_sources + cpp_sources
        log(f"building the CUDA extension lisa_kernels._C from {len(sources)} sources for archs "
            f"{os.environ['TORCH_CUDA_ARCH_LIST']}; include dirs {includes}; "
            f"MAX_JOBS={os.environ.get('MAX_JOBS', 'torch default')}")
        ext = cpp_extension.CUDAExtension("lisa_kernels._C", sources, include_dirs=includes,
                                          define_macros=[("LISA_WITH_CUDA", None)],
                                          extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++20"]})
    else:
        if want_cuda == "1":
            return skip(f"LISA_BUILD_CUDA=1 but {cuda_reason}")
        log(f"building the CPU extension lisa_kernels._C from {len(cpp_sources)} C++ sources (no CUDA kernels: "
            f"{cuda_reason})")
        ext = cpp_extension.CppExtension("lisa_kernels._C", cpp_sources, include_dirs=includes,
                                         extra_compile_args=CXX_FLAGS, extra_link_args=["-fopenmp"])

    class BuildExt(cpp_extension.BuildExtension):
        """torch's build, except that with LISA_BUILD_EXT=auto a failed compile installs the pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as exc:      # compiler errors surface as several exception types
                if build == "1" or want_cuda == "1":
                    raise
                log(f"building lisa_kernels._C failed ({type(exc).__name__}: {exc}); installing the pure-Python "
                    f"package without it (set LISA_BUILD_EXT=1 to make this an error)")
                self.extensions = []

    return ext, BuildExt


ext, build_ext = extension()
setup(
    packages=["lisa_kernels"],
    package_data={"lisa_kernels": ["cost_model.json", "py.typed"]},
    ext_modules=[ext] if ext is not None else [],
    cmdclass={"build_ext": build_ext} if build_ext is not None else {},
)
