"""The exact dense reference: docs/operator.md written out in PyTorch, O(N^2) time and memory.

    A_ij     = phi(q_i) . phi(k_j)
    W^m_ij   = A_ij * exp(rpe[h, m, p_i - p_j + S - 1])        grid token pairs (boundary "zero")
             = A_ij * exp(rpe[h, m, (p_i - p_j) mod S])         grid token pairs (boundary "circular")
             = A_ij * exp(rpe_extra[h, m, kind])                pairs with an extra token
    W^m_ij   = 0 for j > i                                      if causal
    out_i[c] = sum_j W^g(c)_ij v_j[c] / (sum_j W^g(c)_ij + eps)  (or the numerator alone if not normalize)

It builds the whole (B, H, M, N, N) weight tensor, so it refuses inputs larger than
``get_config().reference_max_bytes``; every other backend is tested against it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._config import get_config
from ._problem import Problem

__all__ = ["feature_map", "grid_positions", "reference_lisa_attention", "reference_bytes", "reference_reason"]


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi: ``elu(x) + 1`` ("elu1") or ``relu(x)`` ("relu"); both non-negative."""
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"feature_map must be 'elu1' or 'relu', got {name!r}")


def grid_positions(grid, device=None) -> torch.Tensor:
    """Integer positions (prod(grid), len(grid)) of the grid tokens, in row-major order."""
    axes = [torch.arange(s, device=device) for s in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def reference_bytes(p: Problem) -> int:
    """Bytes of the largest tensor the reference builds: the (B, H, M, N, N) weights."""
    return p.B * p.H * p.M * p.N * p.N * torch.finfo(p.dtype).bits // 8


def _log_weights(rpe: torch.Tensor, rpe_extra: Optional[torch.Tensor], p: Problem) -> torch.Tensor:
    """The (H, M, N, N) log-weights log r_hm for every token pair (i, j), as docs/operator.md defines them."""
    H, M, E, N = p.H, p.M, p.num_extra, p.N
    pos = grid_positions(p.grid, rpe.device)                      # (Ng, d)
    delta = pos[:, None, :] - pos[None, :, :]                      # (Ng, Ng, d): p_i - p_j
    size = torch.tensor(p.grid, device=rpe.device)
    if p.boundary == "circular":
        index = torch.remainder(delta, size)                       # entry d holds offset d mod S
    else:
        index = delta + size - 1                                   # entry d holds offset d - (S - 1)
    grid_logw = rpe[(slice(None), slice(None)) + tuple(index.unbind(-1))]   # (H, M, Ng, Ng)

    logw = rpe.new_zeros(H, M, N, N)
    logw[:, :, E:, E:] = grid_logw
    if E > 0 and rpe_extra is not None:
        logw[:, :, :E, E:] = rpe_extra[:, :, 0, None, None]       # extra query -> grid key
        logw[:, :, E:, :E] = rpe_extra[:, :, 1, None, None]       # grid query -> extra key
        logw[:, :, :E, :E] = rpe_extra[:, :, 2, None, None]       # extra -> extra
    return logw


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def reference_reason(p: Problem) -> Optional[str]:
    """None if the reference may build this problem's weights, else why not (and what to use instead)."""
    need, limit = reference_bytes(p), get_config().reference_max_bytes
    if need <= limit:
        return None
    return (f"its dense (B, H, M, N, N) = ({p.B}, {p.H}, {p.M}, {p.N}, {p.N}) weights need {_size(need)}, over "
            f"reference_max_bytes = {_size(limit)}; use backend='direct' or 'fft' (the same result in far less "
            f"memory), or raise the limit with lisa_kernels.set_config(reference_max_bytes=...) or "
            f"LISA_REFERENCE_MAX_BYTES")


def reference_lisa_attention(q, k, v, rpe, rpe_extra, p: Problem) -> torch.Tensor:
    """Dense LiSA attention; q, k: (B, H, N, Dk), v: (B, H, N, Dv) -> (B, H, N, Dv)."""
    reason = reference_reason(p)
    if reason is not None:
        raise ValueError(f"backend='reference' cannot run this input: {reason}")
    B, H, N, M = p.B, p.H, p.N, p.M
    A = feature_map(q * p.scale, p.feature_map) @ feature_map(k, p.feature_map).transpose(-1, -2)  # (B,H,N,N)
    W = A[:, :, None] * torch.exp(_log_weights(rpe, rpe_extra, p))                                # (B,H,M,N,N)
    if p.causal:
        W = W.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), 0.0)
    vg = v.reshape(B, H, N, M, p.Dv // M).transpose(2, 3)                                          # (B,H,M,N,Dv/M)
    out = W @ vg                                                                                   # (B,H,M,N,Dv/M)
    if p.normalize:
        out = out / (W.sum(-1, keepdim=True) + p.eps)
    return out.transpose(2, 3).reshape(B, H, N, p.Dv)
