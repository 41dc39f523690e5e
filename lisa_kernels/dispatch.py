"""Backends, the checks that say why one cannot run an input, and the cost model behind ``backend="auto"``.

Each backend has a *can-run* check that returns ``None`` or a one-line reason, and (for the fast exact
paths) a time estimate from a small cost model whose constants are data (``cost_model.json``) per device
class ("cpu", "sm_80" for A100-class GPUs, "sm_90" for H100-class; each says whether it was measured):

    direct:  t = overhead + flops / flops_per_s,   flops = 2 B H Ng K (Dk + Dv + M)      (K keys per query)
    fft:     t = overhead + B H Dk (Dv + M) (s_per_plogp P log2 P + s_per_point Ng)    (P = prod of FFT sizes)
    backward: x (1 + backward_factor) when autograd will need gradients;
    dtype:    x dtype_factor[dtype] where the entry has one (else 1).

``"auto"`` takes the runnable backend with the lowest estimate; :func:`explain` shows every estimate and
every reason. ``benchmarks/fit_cost_model.py`` fits a class's constants to a benchmark results file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _device
from . import fft as _fft_module
from . import ops as _ops
from ._compose import compose
from ._device import COST_CLASSES
from ._validate import Problem
from .cuda_fft import cuda_extension_reason
from .fft import FLOAT32_MAX_ROW_RANGE, fft_sizes
from .ops import (cuda_fft_core, direct_core, direct_cpu_attention, direct_cpu_reason, direct_dense_attention,
                  direct_dense_first, fft_core, triton_direct_attention, triton_fft_core)
from .reference import reference_lisa_attention, reference_reason
from .triton_direct import triton_direct_reason
from .triton_fft import triton_fft_reason

__all__ = ["Estimate", "Explanation", "backend_reason", "estimate_seconds", "choose_among",
           "run_backend", "DEVICE_CLASSES"]

_MODEL_PATH = os.path.join(os.path.dirname(__file__), "cost_model.json")
with open(_MODEL_PATH) as _f:
    COST_MODEL = json.load(_f)

# the backends "auto" chooses among, in order of preference on a tie
AUTO_CANDIDATES = ("cuda", "triton", "triton-fft", "direct", "fft")


DEVICE_CLASSES = COST_CLASSES


def _device_class(device: torch.device) -> str:
    """The cost model's class of a device: "cpu" for anything but a GPU; for a GPU its
    :attr:`~lisa_kernels._device.GPU.cost_class`: the class fitted to its architecture (Ampere sm_80, Hopper sm_90),
    else a borrowed one (Blackwell: sm_90; Ada, consumer Ampere and Blackwell, AMD: sm_80), which
    :class:`Explanation` names as borrowed."""
    gpu = _device.gpu_of(device)
    return "cpu" if gpu is None else gpu.cost_class


def backend_reason(name: str, p: Problem) -> Optional[str]:
    """None if backend ``name`` can run problem ``p``, else a one-line reason."""
    if name == "reference":
        return reference_reason(p)
    if name in ("direct", "fft"):
        return None
    if name == "triton":
        return triton_direct_reason(p)
    if name == "triton-fft":
        return triton_fft_reason(p)
    if name == "cuda":
        if p.device.type != "cuda" and _device.gpu_of(p.device) is None:
            return f"inputs are on {p.device}, not a CUDA device"
        return cuda_extension_reason()
    raise ValueError(f"unknown backend {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the keys of ``dtype_factor``)."""
    return str(dtype).replace("torch.", "")


def backend_seconds(c: dict, p: Problem, backward: bool) -> Optional[float]:
    """One backend's time from its constants ``c`` (an entry of cost_model.json with its ``kind`` filled in, as
    :func:`model_backends` gives them), extra tokens not included.

    direct kind: t = overhead_s + 2 B H Ng K (Dk + Dv + M) / flops_per_s           (K = Ng, or (Ng + 1)/2 causal)
    fft kind:    t = overhead_s + B H Dk (Dv + M) (s_per_plogp P log2 P + s_per_point Ng), x2 if causal and
                 not float64 (causal FFTs run in float64)
    then t x (1 + backward_factor) if backward, x dtype_factor[dtype] (default 1). None for an unknown kind.
    """
    ng, bh = p.num_grid, p.B * p.H
    kind = c.get("kind")
    if kind == "direct":
        keys = (ng + 1) / 2 if p.causal else ng
        t = c["overhead_s"] + 2.0 * bh * ng * keys * (p.Dk + p.Dv + p.M) / c["flops_per_s"]
    elif kind == "fft":
        P = math.prod(fft_sizes(p.grid, p.boundary == "circular" and not p.causal))
        t = c["overhead_s"] + bh * p.Dk * (p.Dv + p.M) * (c["s_per_plogp"] * P * math.log2(max(P, 2))
                                                          + c["s_per_point"] * ng)
        if p.causal and p.dtype != torch.float64:
            t *= 2.0                       # causal FFTs run in float64 (see _fft_path)
    else:
        return None
    if backward:
        t *= 1.0 + c["backward_factor"]
    return t * c.get("dtype_factor", {}).get(dtype_name(p.dtype), 1.0)


def model_backends(consts: dict) -> Dict[str, dict]:
    """The backend entries of one device class, each with its ``kind`` filled in (default: its name)."""
    return {name: {"kind": name, **c} for name, c in consts.items() if isinstance(c, dict)}


# The CPU "fft" constants are fitted to the compiled loop (csrc/fft_cpu.cpp). Where it does not run (extension not
# built, or a workspace budget below its needs) the batched torch.fft chunks do the same work in about this much
# more time (measured 2026-12-02 on the 2-core CPU, same process, fwd and fwd+bwd at 128x128 to 256x256 and
# 16x64x64: 1.7x to 4x).
FFT_TORCH_CHUNKS_FACTOR = 2.5


# The CPU "direct" constants are fitted to the fused kernel (csrc/direct_cpu.cpp). Where it does not run (extension
# not built) the direct path's PyTorch ops (the dense form, the blocked loop) take about this much more time.
DIRECT_TORCH_OPS_FACTOR = 2.0


def _fft_cpu_loop_used(p: Problem, backward: bool) -> bool:
    if _fft_module._C_FFT_CPU is None:
        return False
    if torch.compiler.is_compiling():     # dynamo cannot trace the pybind estimate: assume the default budget
        return True
    itemsize = 8 if p.dtype == torch.float64 or p.causal else 4      # the core's dtype (see _fft_path)
    sizes = fft_sizes(p.grid, p.boundary == "circular" and not p.causal)
    return _fft_module.cpu_loop_fits(p, sizes, itemsize, backward)


def estimate_seconds(name: str, p: Problem, backward: bool, device_class: Optional[str] = None) -> Optional[float]:
    """Cost-model estimate of one call (forward, plus backward if asked); None for unmodelled backends.

    ``device_class`` defaults to the class of ``p.device``. Extra tokens add
    4 B H E N (Dk + Dv) / flops_per_s of the class's direct entry.
    """
    cls = device_class or _device_class(p.device)
    consts = COST_MODEL[cls]
    c = model_backends(consts).get(name)
    t = None if c is None else backend_seconds(c, p, backward)
    if t is None:
        return None
    if name == "fft" and cls == "cpu" and not _fft_cpu_loop_used(p, backward):
        t *= FFT_TORCH_CHUNKS_FACTOR
    if name == "direct" and cls == "cpu" and not _ops.direct_cpu_built():
        t *= DIRECT_TORCH_OPS_FACTOR
    extra = 4.0 * p.B * p.H * p.num_extra * p.N * (p.Dk + p.Dv) / consts["direct"]["flops_per_s"]
    return t + extra


def choose_among(names, p: Problem, backward: bool, device_class: Optional[str] = None) -> str:
    """The name in ``names`` with the lowest estimate (first on a tie; can-run checks are not made here).

    Names without a model are ignored; ValueError if none has one.
    """
    est = {n: estimate_seconds(n, p, backward, device_class) for n in names}
    modelled = [n for n in names if est[n] is not None]
    if not modelled:
        raise ValueError(f"no cost model for any of {list(names)} in device class "
                         f"{device_class or _device_class(p.device)!r}")
    return min(modelled, key=est.__getitem__)


@dataclasses.dataclass(frozen=True)
class Estimate:
    backend: str
    seconds: Optional[float]      # cost-model estimate, None where there is no model
    reason: Optional[str]         # why it cannot run, None if it can
    how: str = ""                 # which implementation runs it, where there is a choice (the direct path on a CPU)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What ``backend="auto"`` would do with an input, and why."""

    chosen: str
    backward: bool
    device_class: str             # the cost model's class whose constants made the estimates
    estimates: Dict[str, Estimate]
    crossover: str = ""           # where the FFT form starts to win for this D, dtype and device class
    precision: str = ""           # what this input's rpe table means for the fft backend's precision (explain())
    device: str = "CPU"           # the device's architecture by name ("NVIDIA Hopper (sm_90)", "AMD CDNA 3 (gfx942)")
    fitted: bool = True           # whether device_class was fitted to that architecture (else borrowed)

    def __str__(self) -> str:
        guess = "" if COST_MODEL[self.device_class].get("measured") else " (unmeasured guess)"
        cls = (f"device class {self.device_class}{guess}" if self.fitted else
               f"no cost constants fitted to it: estimates borrow class {self.device_class}{guess}")
        lines = [f"auto -> {self.chosen!r} ({self.device}, {cls}; "
                 f"{'forward + backward' if self.backward else 'forward only'})"]
        for e in self.estimates.values():
            est = "   n/a   " if e.seconds is None else f"{e.seconds * 1e3:9.2f} ms"
            mark = "*" if e.backend == self.chosen else " "
            status = ('cannot run: ' + e.reason) if e.reason else 'can run' + (f" ({e.how})" if e.how else "")
            lines.append(f" {mark} {e.backend:<10} {est}  {status}")
        if self.crossover:
            lines.append(f"   {self.crossover}")
        if self.precision:
            lines.append(f"   {self.precision}")
        return "\n".join(lines)


def fft_precision_text(rpe: torch.Tensor, p: Problem) -> str:
    """One line on this rpe table and the fft backend: whether its float32 call switches to float64, and why.

    Reads the table's row spread (:func:`lisa_kernels.fft.table_row_range`: sliding log-sum-exps on the small
    table, one host sync on a GPU)."""
    if p.dtype == torch.float64 or rpe.device.type == "meta":     # nothing to switch, or no values to read
        return ""
    if p.causal:
        return "this input: causal, so the fft backends convolve in float64"
    circular = p.boundary == "circular"
    spread = float(_fft_module.table_row_range(rpe.detach(), p.grid, circular))
    if spread > FLOAT32_MAX_ROW_RANGE:
        return (f"this input: its rpe spreads the rows' weight masses over {spread:.1f} nats (> "
                f"{FLOAT32_MAX_ROW_RANGE:g}): backend 'fft' runs it in float64 (about 2x its estimate); "
                "'triton-fft' and 'cuda' would lose the light rows' precision (use 'fft' or 'direct')")
    return (f"this input: its rpe spreads the rows' weight masses over {spread:.1f} nats (<= "
            f"{FLOAT32_MAX_ROW_RANGE:g}): float32 FFTs keep every row's error under 1e-4 of its magnitude")


def direct_how(p: Problem) -> str:
    """Which implementation ``backend="direct"`` runs ``p`` with, on a CPU: the extension's fused kernel, or PyTorch
    ops and why (one line); "" on other devices."""
    if p.device.type != "cpu":
        return ""
    reason = direct_cpu_reason(p)
    if reason is None:
        if direct_dense_first(p):
            return "fused CPU kernel of lisa_kernels._C; a forward without gradients this small: its dense loop nest"
        return "fused CPU kernel of lisa_kernels._C"
    return f"PyTorch ops, {_direct_cpu_model_note()}: {reason}"


def _direct_cpu_model_note() -> str:
    return f"about {DIRECT_TORCH_OPS_FACTOR:g}x the fused kernel's estimate"


def explain_problem(p: Problem, backward: bool, details: bool = True) -> Explanation:
    """Every backend's estimate and can-run reason; the choice is :func:`choose_among` the runnable ones.
    ``details=False`` (the choice alone, as ``auto`` needs it) leaves out the texts that only ``explain()`` prints:
    which implementation the direct path runs, and the fft crossover (a search over grid sizes)."""
    gpu = _device.gpu_of(p.device)
    cls = "cpu" if gpu is None else gpu.cost_class
    estimates = {}
    for name in ("reference",) + AUTO_CANDIDATES:
        estimates[name] = Estimate(name, estimate_seconds(name, p, backward, cls), backend_reason(name, p),
                                   direct_how(p) if details and name == "direct" else "")
    runnable = [n for n in AUTO_CANDIDATES if estimates[n].reason is None]
    modelled = [n for n in runnable if estimates[n].seconds is not None]
    chosen = choose_among(modelled, p, backward, cls) if modelled else runnable[0]
    return Explanation(chosen, backward, cls, estimates, fft_crossover_text(p, backward, cls) if details else "",
                       device="CPU" if gpu is None else gpu.architecture, fitted=gpu is None or gpu.fitted)


_FFT_KINDS, _DIRECT_KINDS = ("fft",), ("direct",)


def fft_crossover(p: Problem, backward: bool, device_class: Optional[str] = None,
                  names: Optional[tuple] = None) -> Optional[Tuple[int, ...]]:
    """The smallest grid of p's shape (scaled uniformly, its largest side in steps of 2^(1/8); same D, dtype,
    batch, heads, options) on which the cost model puts the best FFT-form backend at or below the best
    direct-form one; None if none up to 2^24 tokens. ``names`` (default: every modelled backend of the class that can run ``p``) are the candidates."""
    cls = device_class or _device_class(p.device)
    kinds = model_backends(COST_MODEL[cls])
    if names is None:
        names = [n for n in AUTO_CANDIDATES if n in kinds and backend_reason(n, p) is None]
    ffts = [n for n in names if kinds.get(n, {}).get("kind") in _FFT_KINDS]
    directs = [n for n in names if kinds.get(n, {}).get("kind") in _DIRECT_KINDS]
    if not ffts or not directs:
        return None
    top = max(p.grid)
    for side in sorted({max(2, round(2 ** (e / 8))) for e in range(8, 8 * 24 + 1)}):
        grid = tuple(max(1, round(g * side / top)) for g in p.grid)
        if math.prod(grid) > 2 ** 24:
            return None
        q = dataclasses.replace(p, grid=grid, N=p.num_extra + math.prod(grid))
        best = lambda group: min(estimate_seconds(n, q, backward, cls) for n in group)  # noqa: E731
        if best(ffts) <= best(directs):
            return grid
    return None


def fft_crossover_text(p: Problem, backward: bool, device_class: str) -> str:
    """One line for :class:`Explanation`: the crossover grid, and when a float32 FFT runs in float64."""
    grid = fft_crossover(p, backward, device_class)
    what = (f"D={p.Dk}, {dtype_name(p.dtype)}, {'fwd+bwd' if backward else 'fwd'}, class {device_class}")
    head = ("fft crossover: none up to 2^24 tokens" if grid is None else
            f"fft crossover: the FFT form wins from grid {'x'.join(map(str, grid))} (N={math.prod(grid)})")
    note = ""
    if p.dtype != torch.float64:
        note = (f"; float32 FFTs switch to float64 (about 2x the time) where the rpe table spreads the rows' "
                f"weight masses over {FLOAT32_MAX_ROW_RANGE:g} nats (fft.fft_needs_float64), and causal ones always")
    return f"{head} ({what}){note}"


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
    """The direct path: the dense form where :func:`~lisa_kernels.ops.direct_dense_first` says so (small problems
    without the fused kernel, tiny ones with it); else on the CPU with the extension built its fused kernel
    (csrc/direct_cpu.cpp); else the blocked core inside compose."""
    if direct_dense_first(p):
        return direct_dense_attention(q, k, v, rpe, rpe_extra, p)
    if direct_cpu_reason(p) is None:
        return direct_cpu_attention(q, k, v, rpe, rpe_extra, p)
    return compose(direct_core, q, k, v, rpe, rpe_extra, p)


_RUNNERS: Dict[str, Callable] = {
    "reference": reference_lisa_attention,
    "direct": _direct_path,
    "fft": _fft_path(fft_core),
    "triton": triton_direct_attention,
    "triton-fft": _fft_path(triton_fft_core),
    "cuda": _fft_path(cuda_fft_core),
}


def run_backend(name: str, q, k, v, rpe, rpe_extra, p: Problem) -> torch.Tensor:
    reason = backend_reason(name, p)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this input: {reason}")
    return _RUNNERS[name](q, k, v, rpe, rpe_extra, p)
