"""``backend="cuda"``: the FFT path with the compiled extension's fused passes around cuFFT.

The chunk loop and the backward are those of :mod:`lisa_kernels.fft`; this module only supplies the
per-chunk passes, each one kernel of ``lisa_kernels._C`` (``torch.ops.lisa_kernels.fft_*``):

    spectrum   fft_form (phi(k) (x) [v, 1] written straight into the zero-padded field) + the pruned transforms
               of fft.rfftn_pruned (cuFFT: the last axis on the nonzero rows only, then the other axes)
    multiply_  fft_multiply_ (in-place complex product with the RPE spectrum of the chunk's head and group)
    inverse    fft.irfftn_cropped (cuFFT, cropped to the grid between axes), made contiguous
    contract   fft_contract_d / fft_contract_mc (contraction with phi(q), [gnum, gden], [v, 1] or phi(k)) of the
               cropped field, read as a field whose FFT size is the grid
    corr       fft_corr (sum over d and c of Hhat conj(Uhat), a fixed order: deterministic)

The same ops have CPU implementations that run the same element functions (csrc/fft_passes.h), so the
kernels' arithmetic is tested on machines without a GPU (``backend="cuda"`` itself needs CUDA tensors).
cuFFT plans are cached by torch per device and shape (``torch.backends.cuda.cufft_plan_cache``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _device
from ._extension import HAS_CUDA_KERNELS, HAS_EXTENSION, cuda_extension_reason, extension_reason
from ._problem import Problem
from .fft import irfftn_cropped, rfftn_pruned

__all__ = ["extension_reason", "cuda_extension_reason", "cuda_reason", "ExtensionPasses", "HAS_EXTENSION",
           "HAS_CUDA_KERNELS"]


def cuda_reason(p: Problem) -> Optional[str]:
    """None if ``backend="cuda"`` can run ``p`` (CUDA tensors, the extension built with its CUDA kernels), else why
    not (one line)."""
    if p.device.type != "cuda" and _device.gpu_of(p.device) is None:
        return f"inputs are on {p.device}, not a CUDA device"
    return cuda_extension_reason()


def _spectrum_shape(sizes):
    return list(sizes[:-1]) + [sizes[-1] // 2 + 1]


if HAS_EXTENSION:   # fake (meta) implementations of the compiled ops, for torch.compile and opcheck
    @torch.library.register_fake("lisa_kernels::fft_form")
    def _(a, bt, chunk, grid, sizes):
        return a.new_empty([chunk[1], chunk[3], chunk[5], chunk[7]] + list(sizes))

    @torch.library.register_fake("lisa_kernels::fft_multiply_")
    def _(xh, kh, chunk, grid, sizes, conj):
        return None

    @torch.library.register_fake("lisa_kernels::fft_contract_d")
    def _(y, a, chunk, grid, sizes):
        return y.new_empty([chunk[1], chunk[5], chunk[7], math.prod(grid)])

    @torch.library.register_fake("lisa_kernels::fft_contract_mc")
    def _(y, bt, chunk, grid, sizes):
        return y.new_empty([chunk[1], chunk[3], math.prod(grid)])

    @torch.library.register_fake("lisa_kernels::fft_corr")
    def _(hh, uh, chunk, grid, sizes):
        return hh.new_empty([chunk[1], chunk[5]] + _spectrum_shape(sizes))


def _chunk_ints(chunk, H: int):
    return [x for s in chunk for x in (s.start, s.stop - s.start)] + [H]


class ExtensionPasses:
    """The per-chunk passes of :class:`lisa_kernels.fft.TorchPasses`, as compiled kernels."""

    name = "cuda"

    @staticmethod
    def spectrum(a, b, chunk, grid, sizes):
        """The padded field (fft_form), transformed pruned (:func:`lisa_kernels.fft.rfftn_pruned`: the last axis
        on the rows that can be nonzero, then the other axes), contiguous for the kernels that index it flat."""
        X = torch.ops.lisa_kernels.fft_form(a.contiguous(), b.contiguous(), _chunk_ints(chunk, 1),
                                            list(grid), list(sizes))
        d = len(grid)
        for ax in range(d - 1):
            X = X.narrow(ax - d, 0, grid[ax])
        return rfftn_pruned(X, sizes).contiguous()

    @staticmethod
    def multiply_(Xh, Khat, chunk, grid, sizes, conj: bool):
        torch.ops.lisa_kernels.fft_multiply_(Xh, Khat.contiguous(), _chunk_ints(chunk, Khat.shape[0]),
                                             list(grid), list(sizes), conj)

    @staticmethod
    def inverse(Xh, grid, sizes):
        """Inverse transform cropped to the grid between axes (:func:`lisa_kernels.fft.irfftn_cropped`):
        (..., S...) contiguous, which the contractions read as a field of FFT size = grid."""
        return irfftn_cropped(Xh, sizes, grid).contiguous()

    @staticmethod
    def contract_d(Y, a, chunk, grid, sizes):
        return torch.ops.lisa_kernels.fft_contract_d(Y, a.contiguous(), _chunk_ints(chunk, 1), list(grid),
                                                     list(grid))

    @staticmethod
    def contract_mc(Y, b, chunk, grid, sizes):
        return torch.ops.lisa_kernels.fft_contract_mc(Y, b.contiguous(), _chunk_ints(chunk, 1), list(grid),
                                                      list(grid))

    @staticmethod
    def corr(Hh, Uh, chunk, grid, sizes):
        return torch.ops.lisa_kernels.fft_corr(Hh, Uh, _chunk_ints(chunk, 1), list(grid), list(sizes))
