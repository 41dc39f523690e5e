"""What every fast backend shares: feature maps, extra tokens, normalisation, the RPE table they consume.

A fast backend only implements the grid-to-grid *core*: for grid tokens i, j and group m,

    num_i[c] = sum_j r^m(p_i - p_j) (phi(q_i) . phi(k_j)) v_j[c]        (c in group m)
    den_i[m] = sum_j r^m(p_i - p_j) (phi(q_i) . phi(k_j))

with ``r = exp(logtab)`` read from a *linear* table (offsets -(S-1)..S-1 per axis, the layout of
``boundary="zero"``) or, for the FFT path only, a *circular* one (offsets 0..S-1, wrapping).
:func:`linear_log_table` turns any rpe into the linear table: circular tables are unrolled
(entry ``delta`` reads ``rpe[delta mod S]``) and causal masking sets the log-weights of offsets
``delta < 0`` to ``-inf`` (weight 0, gradient 0).

:func:`compose` adds what is cheap and exact around the core, with ordinary autograd: the pairs that
involve one of the ``E`` extra tokens (plain sums, O(N E D)), then ``num / (den + eps)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._problem import Problem
from .reference import feature_map

__all__ = ["compute_dtype", "linear_log_table", "compose"]

Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Problem, bool],
                Tuple[torch.Tensor, torch.Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_log_table(rpe: torch.Tensor, p: Problem) -> torch.Tensor:
    """The (H, M, 2S1-1, ...) log table over offsets -(S-1)..(S-1), circular unrolled, causal masked."""
    table = rpe
    if p.boundary == "circular":
        for axis, s in enumerate(p.grid):
            idx = torch.remainder(torch.arange(-(s - 1), s, device=rpe.device), s)
            table = table.index_select(2 + axis, idx)
    if p.causal:  # 1D only: W_ij = 0 for j > i, i.e. offsets p_i - p_j < 0
        S = p.grid[0]
        keep = torch.arange(2 * S - 1, device=rpe.device) >= S - 1
        table = table.masked_fill(~keep, float("-inf"))
    return table


def _extra_terms(fq, fk, v, rpe_extra, p: Problem):
    """Numerator and denominator terms of the pairs that involve an extra token (exact, O(N E D))."""
    B, H, N, E, M = p.B, p.H, p.N, p.num_extra, p.M
    G = p.Dv // M
    if rpe_extra is None:
        w = fq.new_ones(H, M, 3)
    else:
        w = torch.exp(rpe_extra.to(fq.dtype))
    vg = v.reshape(B, H, N, M, G).transpose(2, 3)                        # (B, H, M, N, G)

    # rows of the extra queries, against every key: weight w0 for grid keys, w2 for extra keys
    A = fq[:, :, :E] @ fk.transpose(-1, -2)                             # (B, H, E, N)
    wrow = torch.cat([w[:, :, 2:3].expand(H, M, E), w[:, :, 0:1].expand(H, M, N - E)], dim=-1)  # (H, M, N)
    W = A[:, :, None] * wrow[None, :, :, None, :]                       # (B, H, M, E, N)
    if p.causal:
        W = W.masked_fill(torch.ones(E, N, dtype=torch.bool, device=fq.device).triu(1), 0.0)
    num_x = (W @ vg).transpose(2, 3).reshape(B, H, E, p.Dv)             # (B, H, E, Dv)
    den_x = W.sum(-1).transpose(2, 3)                                   # (B, H, E, M)

    # grid queries against the extra keys: weight w1 (never masked: extra tokens come first)
    A = fq[:, :, E:] @ fk[:, :, :E].transpose(-1, -2)                   # (B, H, Ng, E)
    W = A[:, :, None] * w[None, :, :, 1, None, None]                     # (B, H, M, Ng, E)
    num_g = (W @ vg[:, :, :, :E]).transpose(2, 3).reshape(B, H, N - E, p.Dv)
    den_g = W.sum(-1).transpose(2, 3)                                   # (B, H, Ng, M)
    return num_x, den_x, num_g, den_g


def compose(core: Core, q, k, v, rpe, rpe_extra: Optional[torch.Tensor], p: Problem,
            circular_core: bool = False, core_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LiSA attention from a grid-to-grid core; (B, H, N, Dk/Dv) in, (B, H, N, Dv) out, in q's dtype.

    ``circular_core=True`` hands the core the circular rpe table itself (FFT without padding), which is
    only allowed for ``boundary="circular"`` without causal masking. ``core_dtype`` runs the core in another
    precision than the rest (the FFT paths use float64 for causal problems, see dispatch._fft_path).
    """
    ct = compute_dtype(p.dtype)
    fq = feature_map(q.to(ct) * p.scale, p.feature_map)
    fk = feature_map(k.to(ct), p.feature_map)
    vc = v.to(ct)
    table = rpe.to(ct) if circular_core else linear_log_table(rpe.to(ct), p)
    E = p.num_extra
    inputs = (fq[:, :, E:], fk[:, :, E:], vc[:, :, E:], table)
    if core_dtype is not None and core_dtype != ct:
        inputs = tuple(t.to(core_dtype) for t in inputs)
    num, den = core(*inputs, p, circular_core)
    num, den = num.to(ct), den.to(ct)
    if E > 0:
        num_x, den_x, num_g, den_g = _extra_terms(fq, fk, vc, rpe_extra, p)
        num = torch.cat([num_x, num + num_g], dim=2)
        den = torch.cat([den_x, den + den_g], dim=2)
    if p.normalize:
        G = p.Dv // p.M
        num = num / (den.repeat_interleave(G, dim=-1) + p.eps)
    return num.to(p.dtype)
