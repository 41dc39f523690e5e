"""The one place where the arguments of :func:`lisa_kernels.lisa_attention` are checked.

Every rule of docs/operator.md is checked here, before any backend runs, and every violation raises a
``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value or shape) whose message
names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

from ._problem import Problem
from .backends import NAMES as _BACKEND_NAMES

__all__ = ["Problem", "check_inputs", "FEATURE_MAPS", "BOUNDARIES", "BACKENDS", "FLOAT_DTYPES"]

FEATURE_MAPS = ("elu1", "relu")
BOUNDARIES = ("zero", "circular")
BACKENDS = ("auto",) + _BACKEND_NAMES          # every record of lisa_kernels.backends, in its order
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in "
                        f"(float16, bfloat16, float32, float64), got {t.dtype}")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")


def check_grid(grid, N: Optional[int] = None, num_extra: int = 0) -> Tuple[int, ...]:
    """Validate ``grid`` (1 to 3 positive ints) and, if N is given, that E + prod(grid) == N."""
    if isinstance(grid, torch.Size):
        grid = tuple(grid)
    if _is_int(grid):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)):
        raise TypeError(f"grid must be a tuple of 1 to 3 positive ints, got {grid!r} of type {type(grid).__name__}")
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"grid must have 1 to 3 axes (sequence, image or video), got {len(grid)} axes: {tuple(grid)}")
    for s in grid:
        if not _is_int(s):
            raise TypeError(f"grid must hold ints, got {tuple(grid)!r} (element {s!r} of type {type(s).__name__})")
        if s < 1:
            raise ValueError(f"grid sizes must be positive, got {tuple(grid)}")
    grid = tuple(int(s) for s in grid)
    if N is not None and num_extra + math.prod(grid) != N:
        raise ValueError(f"grid {grid} with num_extra={num_extra} describes {num_extra + math.prod(grid)} tokens, "
                         f"but q, k, v have N={N} tokens (expected N = num_extra + prod(grid))")
    return grid


def check_inputs(q, k, v, rpe, *, grid, num_extra=0, rpe_extra=None, feature_map="elu1", normalize=True,
                 eps=1e-6, boundary="zero", causal=False, backend="auto", scale=1.0) -> Problem:
    """Check every argument of ``lisa_attention`` and return the problem's sizes; raises on the first violation."""
    # kinds and dtypes
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, N, D), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    _check_tensor("rpe", rpe)
    if rpe.dtype != q.dtype:
        raise TypeError(f"rpe must have the dtype of q ({q.dtype}), got {rpe.dtype}")
    if rpe.device != q.device:
        raise ValueError(f"rpe must be on the device of q ({q.device}), got {rpe.device}")

    # options
    _check_choice("feature_map", feature_map, FEATURE_MAPS)
    _check_choice("boundary", boundary, BOUNDARIES)
    _check_choice("backend", backend, BACKENDS)
    _check_bool("normalize", normalize)
    _check_bool("causal", causal)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r} of type {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {scale!r} of type {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")

    # shapes of q, k, v
    B, H, N, Dk = q.shape
    if tuple(k.shape) != (B, H, N, Dk):
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, N):
        raise ValueError(f"v must have shape (B, H, N, Dv) = ({B}, {H}, {N}, Dv) like q, got {tuple(v.shape)}")
    Dv = v.shape[3]
    for name, n in (("batch size B", B), ("number of heads H", H), ("number of tokens N", N),
                    ("head dim Dk of q and k", Dk), ("head dim Dv of v", Dv)):
        if n == 0:
            raise ValueError(f"the {name} must be positive, got 0 (shapes q {tuple(q.shape)}, v {tuple(v.shape)})")

    # grid and extra tokens
    if not _is_int(num_extra):
        raise TypeError(f"num_extra must be an int >= 0, got {num_extra!r} of type {type(num_extra).__name__}")
    if num_extra < 0:
        raise ValueError(f"num_extra must be >= 0, got {num_extra}")
    grid = check_grid(grid, N, int(num_extra))
    if causal and len(grid) != 1:
        raise ValueError(f"causal=True needs a 1D grid (a sequence), got grid {grid}")

    # rpe tables
    if rpe.dim() != 2 + len(grid):
        raise ValueError(f"rpe must have {2 + len(grid)} dimensions (H, M, offsets per axis) for a "
                         f"{len(grid)}D grid, got shape {tuple(rpe.shape)}")
    M = rpe.shape[1]
    table = tuple(s if boundary == "circular" else 2 * s - 1 for s in grid)
    expected = "S per axis" if boundary == "circular" else "2*S-1 per axis"
    if rpe.shape[0] != H or M < 1 or tuple(rpe.shape[2:]) != table:
        raise ValueError(f"rpe must have shape (H, M, {expected}) = ({H}, M, {', '.join(map(str, table))}) "
                         f"for grid {grid} and boundary={boundary!r}, got {tuple(rpe.shape)}")
    if Dv % M != 0:
        raise ValueError(f"v's head dim Dv={Dv} must be divisible by the number of RPE groups M={M} "
                         f"(rpe.shape[1])")
    if rpe_extra is not None:
        _check_tensor("rpe_extra", rpe_extra)
        if rpe_extra.dtype != q.dtype:
            raise TypeError(f"rpe_extra must have the dtype of q ({q.dtype}), got {rpe_extra.dtype}")
        if rpe_extra.device != q.device:
            raise ValueError(f"rpe_extra must be on the device of q ({q.device}), got {rpe_extra.device}")
        if tuple(rpe_extra.shape) != (H, M, 3):
            raise ValueError(f"rpe_extra must have shape (H, M, 3) = ({H}, {M}, 3), got {tuple(rpe_extra.shape)}")

    return Problem(B=B, H=H, N=N, Dk=Dk, Dv=Dv, M=M, grid=grid, num_extra=int(num_extra),
                   feature_map=feature_map, normalize=normalize, eps=float(eps), boundary=boundary,
                   causal=causal, scale=float(scale), dtype=q.dtype, device=q.device)
