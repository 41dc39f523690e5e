"""The backends of :func:`lisa_kernels.lisa_attention`: one record each, in one list (:data:`REGISTRY`).

Everything else is derived from this list: the names ``backend=`` accepts (``lisa_kernels.BACKENDS``, with
"auto"), ``auto``'s candidates and their order on a tie, :func:`lisa_kernels.explain`,
:func:`lisa_kernels.available_backends`, the benchmarks' method names, the cost-model fitting, and the tests that
loop over backends. docs/backends.md ("Adding a backend") says what a new backend brings: one module (its
can-run check and how it runs) and one record here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from . import direct, fft, flex
from ._compose import compose
from ._problem import Problem
from .cuda_fft import cuda_reason
from .ops import (cuda_fft_core, direct_core, direct_cpu_attention, direct_dense_attention, fft_core,
                  triton_direct_attention, triton_fft_core)
from .reference import reference_lisa_attention, reference_reason
from .triton_direct import triton_direct_reason
from .triton_fft import triton_fft_reason

__all__ = ["Backend", "REGISTRY", "NAMES", "BY_NAME", "AUTO_CANDIDATES", "runs_anywhere"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend of :func:`lisa_kernels.lisa_attention`.

    name:         the value of ``backend=``.
    computes:     one line: what it computes, and with what (docs/backends.md's table has a row per record).
    reason:       ``reason(p)``: None where it can run the problem ``p``, else a one-line reason (explain() prints
                  it; calling the backend anyway raises a ValueError with it).
    run:          ``run(q, k, v, rpe, rpe_extra, p) -> out``, for a ``p`` that ``reason`` accepts.
    form:         "dense", "direct" or "fft": how it forms the sums (the benchmarks' FLOP count follows it).
    cost:         the key of its constants in each device class of cost_model.json (their ``kind`` names the
                  formula); None: no estimate (``auto`` then never picks it).
    auto:         its place in ``auto``'s preference where estimates are equal (0 first); None: ``auto`` never
                  picks it.
    gpu_kernels:  its own GPU kernels: "triton", "cuda" (the extension's), or "" (PyTorch's only).
    how:          ``how(p)``: which of its implementations runs ``p`` (explain()), where it has a choice.
    cpu_factor:   ``cpu_factor(p, backward)``: a factor on its estimate in the CPU class, for where its compiled
                  code does not run (the CPU constants are fitted to it).
    grad_reason:  ``grad_reason(p)``: None where it has a backward for ``p`` (None: everywhere it runs), else a
                  one-line reason: its forward runs, a gradient asked of it raises NotImplementedError with the
                  reason, and ``auto`` does not pick it where gradients are needed.
    """

    name: str
    computes: str
    reason: Callable[[Problem], Optional[str]]
    run: Callable[..., torch.Tensor]
    form: str
    cost: Optional[str] = None
    auto: Optional[int] = None
    gpu_kernels: str = ""
    how: Optional[Callable[[Problem], str]] = None
    cpu_factor: Optional[Callable[[Problem, bool], float]] = None
    grad_reason: Optional[Callable[[Problem], Optional[str]]] = None


def runs_anywhere(p: Problem) -> Optional[str]:
    """The can-run check of a backend that runs every valid input."""
    return None


def _fft_path(core):
    """A runner for an FFT core: circular tables go to it unpadded unless causal masking needs the linear form.

    Causal problems convolve in float64: an FFT's round-off is relative to the whole sequence, while the first
    rows of a causal output sum only a few terms (in float32 their error grows like eps * N).
    """
    def run(q, k, v, rpe, rpe_extra, p: Problem):
        return compose(core, q, k, v, rpe, rpe_extra, p, circular_core=p.boundary == "circular" and not p.causal,
                       core_dtype=torch.float64 if p.causal else None)
    return run


def _direct_path(q, k, v, rpe, rpe_extra, p: Problem):
    """The direct path: the dense form where :func:`~lisa_kernels.direct.direct_dense_first` says so (small problems
    without the fused kernel, tiny ones with it); else on the CPU with the extension built its fused kernel
    (csrc/direct_cpu.cpp); else the blocked core inside compose."""
    if direct.direct_dense_first(p):
        return direct_dense_attention(q, k, v, rpe, rpe_extra, p)
    if direct.direct_cpu_reason(p) is None:
        return direct_cpu_attention(q, k, v, rpe, rpe_extra, p)
    return compose(direct_core, q, k, v, rpe, rpe_extra, p)


REGISTRY: Tuple[Backend, ...] = (
    Backend("reference", "the definition written out densely: the (B, H, M, N, N) weights, whole; every other "
            "backend is tested against it", reference_reason, reference_lisa_attention, form="dense"),
    Backend("direct", "exact, queries against all keys in blocks: the extension's fused kernel on a CPU, else "
            "PyTorch ops", runs_anywhere, _direct_path, form="direct", cost="direct", auto=3,
            how=direct.direct_how, cpu_factor=direct.cpu_cost_factor),
    Backend("fft", "exact, zero-padded FFT convolutions per channel (torch.fft; on a CPU the extension's compiled "
            "loop)", runs_anywhere, _fft_path(fft_core), form="fft", cost="fft", auto=4,
            cpu_factor=fft.cpu_cost_factor),
    Backend("triton", "the direct form as fused Triton kernels, tiled like FlashAttention", triton_direct_reason,
            triton_direct_attention, form="direct", cost="triton", auto=1, gpu_kernels="triton"),
    Backend("triton-fft", "the fft path with Triton kernels around torch.fft", triton_fft_reason,
            _fft_path(triton_fft_core), form="fft", cost="triton-fft", auto=2, gpu_kernels="triton"),
    Backend("cuda", "the fft path with the compiled extension's fused CUDA passes around cuFFT", cuda_reason,
            _fft_path(cuda_fft_core), form="fft", cost="cuda", auto=0, gpu_kernels="cuda"),
    Backend("flex", "the direct form through PyTorch's FlexAttention: the log-weights as a score_mod on "
            "log(phi(q).phi(k)), causal as a block mask", flex.flex_reason, flex.flex_attention_lisa, form="direct",
            cost="flex", auto=5, grad_reason=flex.flex_grad_reason),
)

NAMES: Tuple[str, ...] = tuple(b.name for b in REGISTRY)
BY_NAME: Dict[str, Backend] = {b.name: b for b in REGISTRY}
# the backends auto chooses among, in order of preference on a tie
AUTO_CANDIDATES: Tuple[str, ...] = tuple(b.name for b in sorted((b for b in REGISTRY if b.auto is not None),
                                                                key=lambda b: b.auto))
