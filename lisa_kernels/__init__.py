"""lisa_kernels: Lightweight Structure-Aware Attention (LiSA, arXiv 2211.16289) for PyTorch.

    out = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(14, 14))      # where F.scaled_dot_product_attention was

Shapes follow ``F.scaled_dot_product_attention``: q, k (B, H, N, Dk), v (B, H, N, Dv) -> (B, H, N, Dv).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Optional, Sequence, Union

import torch

from . import dispatch as _dispatch
from . import export as _export
from ._config import Config, get_config, set_config
from ._validate import BACKENDS, check_inputs
from .dispatch import Estimate, Explanation, backend_reason, explain_problem, fft_precision_text, run_backend

__version__ = "0.1.0"
__all__ = ["lisa_attention", "explain", "available_backends", "clear_cache", "get_config", "set_config", "Config",
           "Estimate", "Explanation", "BACKENDS", "__version__"]

Grid = Union[int, Sequence[int]]


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- the per-signature plan cache
#
# Validating the arguments and evaluating the cost model take longer than the kernels on small inputs, and a
# model calls attention with the same signature on every step. So the validated Problem and the backend that
# runs it (auto's choice, after its can-run check) are kept per *signature*: everything the checks and the
# choice read. For each tensor: its type, shape, strides, dtype, device and requires_grad; every option with
# its type (True == 1 and 2.0 == 2 in Python, but the checks tell them apart); the grid with its element types;
# grad mode and the deterministic flag; the settings (reference_max_bytes decides whether the reference can
# run, direct_block_bytes the direct path's form); and the identity of the can-run function and of the cost
# model's entries (so that replacing them, as tests do, is seen). Only signatures that passed every check are
# stored, so a cached call skips no check whose outcome could differ. Under torch.compile the cache is
# bypassed (dynamo traces the checks themselves, and guards on what they read).

_PLAN_CACHE_SIZE = 256
_PLANS: "collections.OrderedDict" = collections.OrderedDict()
_PLANS_LOCK = threading.Lock()
_GRID_TYPES = (tuple, list, torch.Size)


def _tensor_signature(t):
    return (type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def _signature(q, k, v, rpe, rpe_extra, grid, options):
    """The plan-cache key of a call, or None where the call is not cacheable (then it is checked in full)."""
    if type(grid) in _GRID_TYPES:
        grid_key = (type(grid), tuple(grid), tuple(map(type, grid)))
    elif type(grid) is int:
        grid_key = (int, grid)
    else:
        return None
    cfg = get_config()
    try:
        return (_tensor_signature(q), _tensor_signature(k), _tensor_signature(v), _tensor_signature(rpe),
                None if rpe_extra is None else _tensor_signature(rpe_extra), grid_key, options,
                tuple(map(type, options)), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
                cfg.reference_max_bytes, cfg.fft_workspace_bytes, cfg.direct_block_bytes,
                _dispatch.backend_reason, tuple(map(id, _dispatch.COST_MODEL.values())))
    except (AttributeError, TypeError):       # not tensors, or unhashable options: the full checks say why
        return None


def _plan(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal, backend, scale):
    """(Problem, backend name) for a call: validated, auto resolved, can-run checked; raises like the checks."""
    p = check_inputs(q, k, v, rpe, grid=grid, num_extra=num_extra, rpe_extra=rpe_extra, feature_map=feature_map,
                     normalize=normalize, eps=eps, boundary=boundary, causal=causal, backend=backend, scale=scale)
    if backend == "auto":
        backend = _dispatch.explain_problem(p, _needs_grad(q, k, v, rpe, rpe_extra), details=False).chosen
    reason = _dispatch.backend_reason(backend, p)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run this input: {reason}")
    return p, backend


def _example_batch(p):
    """``p`` itself, or under torch.export with a symbolic batch, ``p`` at the example input's batch: auto's choice
    is made once for the exported program, without a guard on the batch (which would break dynamic batch)."""
    if isinstance(p.B, int) or not torch.compiler.is_exporting():
        return p
    hint = getattr(getattr(p.B, "node", None), "hint", None)
    return dataclasses.replace(p, B=int(hint) if isinstance(hint, int) else 1)


def clear_cache() -> None:
    """Forget every cached call plan (validated problem and backend choice); they are rebuilt on the next call."""
    _PLANS.clear()


def lisa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe: torch.Tensor, *, grid: Grid,
                   num_extra: int = 0, rpe_extra: Optional[torch.Tensor] = None, feature_map: str = "elu1",
                   normalize: bool = True, eps: float = 1e-6, boundary: str = "zero", causal: bool = False,
                   backend: str = "auto", scale: float = 1.0) -> torch.Tensor:
    """LiSA attention, as defined in docs/operator.md.

    For grid tokens i, j at positions p_i, p_j and RPE group m = g(c) of value channel c::

        W^m_ij   = phi(q_i) . phi(k_j) * exp(rpe[h, m, p_i - p_j])       (exp(rpe_extra[h, m, kind]) for extra tokens)
        out_i[c] = sum_j W^m_ij v_j[c] / (sum_j W^m_ij + eps)              (numerator only if normalize=False)

    Args:
        q, k: (B, H, N, Dk); v: (B, H, N, Dv), one floating dtype, one device. N = num_extra + prod(grid);
            the first ``num_extra`` tokens (CLS, registers) are not on the grid.
        rpe: (H, M, 2*S1-1, ...) log-weights per offset, or (H, M, S1, ...) with ``boundary="circular"``;
            Dv must be divisible by M.
        grid: (S1,), (S1, S2) or (S1, S2, S3): sequence, image or video (T, H, W), row-major.
        rpe_extra: (H, M, 3) log-weights of extra->grid, grid->extra, extra->extra pairs; None means 0.
        feature_map: "elu1" (elu(x) + 1) or "relu".
        boundary: "zero" (exact Toeplitz / linear convolution) or "circular" (offsets wrap around).
        causal: W_ij = 0 for j > i; 1D grids only.
        backend: "auto" (the cheapest that can run the input, by the cost model; see :func:`explain`), or a name of
            :data:`BACKENDS`: one per record of :data:`lisa_kernels.backends.REGISTRY` (docs/backends.md).
        scale: multiplies q before the feature map (default 1).

    Returns:
        (B, H, N, Dv) in the dtype of q.
    """
    if torch.compiler.is_compiling():
        p = check_inputs(q, k, v, rpe, grid=grid, num_extra=num_extra, rpe_extra=rpe_extra, feature_map=feature_map,
                         normalize=normalize, eps=eps, boundary=boundary, causal=causal, backend=backend,
                         scale=scale)
        if _export.is_onnx_exporting():      # ONNX has no translation of the custom ops: plain torch ops
            return _export.export_attention(q, k, v, rpe, rpe_extra if p.num_extra else None, p)
        if backend == "auto":
            backend = explain_problem(_example_batch(p), _needs_grad(q, k, v, rpe, rpe_extra), details=False).chosen
        return run_backend(backend, q, k, v, rpe, rpe_extra, p)
    options = (num_extra, feature_map, normalize, eps, boundary, causal, backend, scale)
    key = _signature(q, k, v, rpe, rpe_extra, grid, options)
    plan = None if key is None else _PLANS.get(key)
    if plan is None:
        plan = _plan(q, k, v, rpe, rpe_extra, grid, *options)
        if key is not None:
            with _PLANS_LOCK:
                _PLANS[key] = plan
                if len(_PLANS) > _PLAN_CACHE_SIZE:
                    _PLANS.popitem(last=False)          # the least recently used
    else:
        with _PLANS_LOCK:
            if key in _PLANS:                           # (another thread may have evicted it since the get)
                _PLANS.move_to_end(key)
    p, name = plan
    return _dispatch._RUNNERS[name](q, k, v, rpe, rpe_extra, p)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe: torch.Tensor, *, grid: Grid,
            backward: Optional[bool] = None, **options) -> Explanation:
    """What ``backend="auto"`` picks for these inputs, with each backend's estimate or why it cannot run.

    Takes the arguments of :func:`lisa_attention`. ``backward`` (default: whether autograd would need
    gradients of the inputs) adds the backward pass to the estimates. ``print(explain(...))`` shows a table,
    the grid from which the FFT form wins, and whether this rpe table makes the fft backend compute in float64
    (``Explanation.precision``: its rows' weight masses spread over ``fft.FLOAT32_MAX_ROW_RANGE`` nats).
    """
    p = check_inputs(q, k, v, rpe, grid=grid, **options)
    if backward is None:
        backward = _needs_grad(q, k, v, rpe, options.get("rpe_extra"))
    expl = explain_problem(p, backward)
    return dataclasses.replace(expl, precision=fft_precision_text(rpe, p))


def available_backends(device: Union[str, torch.device] = "cpu") -> dict:
    """Each backend's status on a device for a small float32 problem: None if it can run, else the reason."""
    device = torch.device(device)
    x = torch.zeros(1, 1, 4, 4, device=device)
    p = check_inputs(x, x, x, torch.zeros(1, 1, 7, device=device), grid=(4,))
    return {name: backend_reason(name, p) for name in BACKENDS if name != "auto"}


def _register_timm_models_on_import() -> None:
    """Register ``lisa_kernels.models`` in timm's registry: now if timm is imported, else when it is.

    ``import lisa_kernels`` must not pay for importing timm (about 1.7 s), yet ``timm.create_model("lisa_vit_...")``
    should work after it in either import order. So: if timm is already in ``sys.modules``, import
    ``lisa_kernels.models`` now; otherwise add a one-shot finder to ``sys.meta_path`` that lets the normal
    finders locate timm and runs the registration right after timm's own module code. A failure to register
    warns and never breaks ``import timm``. ``import lisa_kernels.models`` registers explicitly.
    """
    import importlib.abc
    import importlib.util
    import sys
    import warnings

    def register() -> None:
        try:
            from . import models  # noqa: F401
        except (ImportError, AttributeError, TypeError) as e:  # timm too old or broken: warn, keep timm usable
            warnings.warn(f"lisa_kernels: could not register the LiSA models with timm: {e}", stacklevel=2)

    if "timm" in sys.modules:
        register()
        return

    class _TimmFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != "timm":
                return None
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec("timm")   # the normal finders (this one is gone)
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            exec_module = loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                register()

            loader.exec_module = exec_then_register
            return spec

    if importlib.util.find_spec("timm") is not None and not any(
            type(f).__name__ == "_TimmFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())


_register_timm_models_on_import()
