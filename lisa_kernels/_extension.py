"""The compiled extension ``lisa_kernels._C``, loaded here and nowhere else.

It is built at install time from ``csrc/`` where a C++ compiler is found (setup.py), with its CUDA kernels where a
CUDA toolkit and a CUDA build of torch are found too. What it provides, and who uses it:

    direct_cpu_forward, direct_cpu_backward     csrc/direct_cpu.cpp   "direct" on a CPU: the fused kernel
    dense_forward, dense_loop_max_work          csrc/dense.cpp        "direct"'s dense form, forwards without autograd
    fft_cpu_forward, fft_cpu_backward,          csrc/fft_cpu.cpp      "fft" on a CPU: the compiled loop
      fft_cpu_workspace_bytes
    torch.ops.lisa_kernels.fft_* (on import)    csrc/fft_passes.*     "cuda": the fused passes around cuFFT
                                                                      (with CPU versions, for the tests)
    with_cuda                                   csrc/ops.cpp          whether the CUDA kernels were built

Where it is not built, ``C`` is None, ``HAS_EXTENSION`` is False and :func:`extension_reason` says why in one line;
the backends then run PyTorch ops instead (``cuda`` cannot run at all).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["C", "HAS_EXTENSION", "HAS_CUDA_KERNELS", "extension_reason", "cuda_extension_reason", "provides"]

try:
    from . import _C as C  # registers torch.ops.lisa_kernels.*
    IMPORT_ERROR: Optional[ImportError] = None
except ImportError as exc:  # not built: no C++ compiler at install time, or pip's build isolation hid torch
    C, IMPORT_ERROR = None, exc

HAS_EXTENSION = C is not None
HAS_CUDA_KERNELS = HAS_EXTENSION and bool(getattr(C, "with_cuda", False))


def provides(name: str):
    """The extension's entry point ``name`` (a function or constant of the table above), or None where the
    extension is not built or this build has no such entry."""
    return getattr(C, name, None) if HAS_EXTENSION else None


def extension_reason() -> Optional[str]:
    """None if the compiled extension is importable, else why not (one line)."""
    if HAS_EXTENSION:
        return None
    return (f"the compiled extension lisa_kernels._C is not built ({IMPORT_ERROR}); reinstall with a C++ compiler "
            f"(and a CUDA toolkit for the GPU kernels) and 'pip install --no-build-isolation .' (docs/backends.md, "
            f"'The compiled extension')")


def cuda_extension_reason() -> Optional[str]:
    """None if the compiled extension has its CUDA kernels (``backend="cuda"``), else why not (one line)."""
    if not HAS_EXTENSION:
        return extension_reason()
    if not HAS_CUDA_KERNELS:
        return ("lisa_kernels._C was built without its CUDA kernels (no CUDA toolkit, or a CPU-only torch, at "
                "install time); reinstall with a CUDA toolkit and 'pip install --no-build-isolation .'")
    return None
