"""Choosing a backend: the checks that say why one cannot run an input, and the cost model behind ``backend="auto"``.

Each backend (a record of :mod:`lisa_kernels.backends`) has a *can-run* check that returns ``None`` or a one-line
reason, and (for the fast exact paths) a time estimate from a small cost model whose constants are data
(``cost_model.json``) per device class ("cpu", "sm_80" for A100-class GPUs, "sm_90" for H100-class; each says
whether it was measured):

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
from . import direct as _direct_module
from . import fft as _fft_module
from ._device import COST_CLASSES
from ._problem import Problem
from .backends import AUTO_CANDIDATES, BY_NAME, REGISTRY
from .direct import direct_how  # noqa: F401  (it was here)
from .fft import FLOAT32_MAX_ROW_RANGE, fft_sizes

__all__ = ["Estimate", "Explanation", "backend_reason", "estimate_seconds", "choose_among",
           "run_backend", "DEVICE_CLASSES"]

_MODEL_PATH = os.path.join(os.path.dirname(__file__), "cost_model.json")
with open(_MODEL_PATH) as _f:
    COST_MODEL = json.load(_f)

# explain()'s order: the backends auto never picks, then its candidates in its order of preference on a tie
# (AUTO_CANDIDATES, from lisa_kernels.backends)
EXPLAIN_ORDER = tuple(b.name for b in REGISTRY if b.auto is None) + AUTO_CANDIDATES


DEVICE_CLASSES = COST_CLASSES


def _device_class(device: torch.device) -> str:
    """The cost model's class of a device: "cpu" for anything but a GPU; for a GPU its
    :attr:`~lisa_kernels._device.GPU.cost_class`: the class fitted to its architecture (Ampere sm_80, Hopper sm_90),
    else a borrowed one (Blackwell: sm_90; Ada, consumer Ampere and Blackwell, AMD: sm_80), which
    :class:`Explanation` names as borrowed."""
    gpu = _device.gpu_of(device)
    return "cpu" if gpu is None else gpu.cost_class


def backend_reason(name: str, p: Problem) -> Optional[str]:
    """None if backend ``name`` can run problem ``p``, else a one-line reason (its record's check)."""
    backend = BY_NAME.get(name)
    if backend is None:
        raise ValueError(f"unknown backend {name!r}")
    return backend.reason(p)


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
            t *= 2.0                       # causal FFTs run in float64 (backends._fft_path)
    else:
        return None
    if backward:
        t *= 1.0 + c["backward_factor"]
    return t * c.get("dtype_factor", {}).get(dtype_name(p.dtype), 1.0)


def model_backends(consts: dict) -> Dict[str, dict]:
    """The backend entries of one device class, each with its ``kind`` filled in (default: its name)."""
    return {name: {"kind": name, **c} for name, c in consts.items() if isinstance(c, dict)}


# (the factors on the CPU estimates where the compiled code does not run: each backend's cpu_factor)
FFT_TORCH_CHUNKS_FACTOR = _fft_module.TORCH_CHUNKS_FACTOR
DIRECT_TORCH_OPS_FACTOR = _direct_module.TORCH_OPS_FACTOR


def estimate_seconds(name: str, p: Problem, backward: bool, device_class: Optional[str] = None) -> Optional[float]:
    """Cost-model estimate of one call (forward, plus backward if asked); None for unmodelled backends.

    ``device_class`` defaults to the class of ``p.device``. Extra tokens add
    4 B H E N (Dk + Dv) / flops_per_s of the class's direct entry.
    """
    cls = device_class or _device_class(p.device)
    consts = COST_MODEL[cls]
    backend = BY_NAME.get(name)
    c = model_backends(consts).get(name if backend is None else backend.cost)
    t = None if c is None else backend_seconds(c, p, backward)
    if t is None:
        return None
    if cls == "cpu" and backend is not None and backend.cpu_factor is not None:
        t *= backend.cpu_factor(p, backward)
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


def explain_problem(p: Problem, backward: bool, details: bool = True) -> Explanation:
    """Every backend's estimate and can-run reason; the choice is :func:`choose_among` the runnable ones.
    ``details=False`` (the choice alone, as ``auto`` needs it) leaves out the texts that only ``explain()`` prints:
    which implementation the direct path runs, and the fft crossover (a search over grid sizes)."""
    gpu = _device.gpu_of(p.device)
    cls = "cpu" if gpu is None else gpu.cost_class
    estimates = {}
    for name in EXPLAIN_ORDER:
        how = BY_NAME[name].how
        reason = backend_reason(name, p)
        if reason is None and backward and BY_NAME[name].grad_reason is not None:
            reason = BY_NAME[name].grad_reason(p)
        estimates[name] = Estimate(name, estimate_seconds(name, p, backward, cls), reason,
                                   how(p) if details and how is not None else "")
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
        names = [n for n in AUTO_CANDIDATES if BY_NAME[n].cost in kinds and backend_reason(n, p) is None]
    kind = {n: kinds.get(BY_NAME[n].cost if n in BY_NAME else n, {}).get("kind") for n in names}
    ffts = [n for n in names if kind[n] in _FFT_KINDS]
    directs = [n for n in names if kind[n] in _DIRECT_KINDS]
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


# the runners of the backends, by name (tests replace them)
_RUNNERS: Dict[str, Callable] = {b.name: b.run for b in REGISTRY}


def run_backend(name: str, q, k, v, rpe, rpe_extra, p: Problem) -> torch.Tensor:
    reason = backend_reason(name, p)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this input: {reason}")
    return _RUNNERS[name](q, k, v, rpe, rpe_extra, p)
