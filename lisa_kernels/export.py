"""LiSA attention in plain torch ops, for exporters that cannot keep the package's custom ops (ONNX).

    torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=...)     # no extra argument needed

While ``torch.onnx.export`` traces a model, :func:`lisa_kernels.lisa_attention` runs :func:`export_attention`
instead of a backend: the operator of docs/operator.md written with ops that every ONNX runtime has (MatMul,
Gather, Exp, Elu/Relu, Where, Mod, ReduceSum, Div, Concat; no custom domain, no DFT), exact for every option
(1D/2D/3D grids, extra tokens and ``rpe_extra``, M groups, both feature maps, ``normalize``, ``eps``, both
boundaries, ``causal``, ``scale``).

The form is the direct one, blocked over keys: for each block of at most :data:`KEY_BLOCK` keys (a Python
loop, unrolled at export since N is static) it gathers the block's (H, M, N, block) weights
``exp(L_ij)`` from the tables, with an index computed in the graph from O(N) positions (no N x N constant),
multiplies them by ``phi(q) phi(k)^T`` and accumulates ``W v`` and ``sum_j W``. The largest intermediate is
(B, H, M, N, block) floats: O(N * block) per head and group, not O(N^2). Time is O(N^2 D), as for the direct
backends.

For exporters that take a translation table or a decomposition instead, see :func:`onnx_translation_table`
and :func:`decomposition_table`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._problem import Problem

__all__ = ["KEY_BLOCK", "export_attention", "is_onnx_exporting", "onnx_translation_table",
           "decomposition_table", "CUSTOM_OPS"]

KEY_BLOCK = 256
"""Keys per block of the exported form: its largest intermediate is (B, H, M, N, KEY_BLOCK) floats. Set it
(``lisa_kernels.export.KEY_BLOCK = 128``) before exporting to trade graph size for memory."""


def is_onnx_exporting() -> bool:
    """True while ``torch.onnx.export`` traces a model (the dynamo exporter, or the TorchScript one)."""
    onnx = getattr(torch, "onnx", None)
    fn = getattr(onnx, "is_in_onnx_export", None)
    return bool(fn is not None and fn())


def _phi(x: Tensor, name: str) -> Tensor:
    return F.elu(x) + 1 if name == "elu1" else F.relu(x)


def _positions(grid: Sequence[int], E: int) -> List[List[int]]:
    """Per axis, the coordinate of each of the N tokens (0 for the extra tokens), row-major."""
    ng = math.prod(grid)
    coords = []
    step = ng
    for s in grid:
        step //= s
        coords.append([0] * E + [(n // step) % s for n in range(ng)])
    return coords


def _pair_index(grid: Tuple[int, ...], E: int, boundary: str, causal: bool, j0: int, j1: int, device
                ) -> Tensor:
    """(N, j1 - j0) index of every pair (query i, key j in [j0, j1)) into the extended weight table
    [rpe's T entries, rpe_extra's 3 (extra->grid, grid->extra, extra->extra), a 0 for masked pairs]."""
    circular = boundary == "circular"
    sizes = tuple(grid) if circular else tuple(2 * s - 1 for s in grid)
    T = math.prod(sizes)
    N = E + math.prod(grid)
    coords = _positions(grid, E)
    idx = None
    stride = T
    for a, s in enumerate(grid):
        stride //= sizes[a]
        pq = torch.tensor(coords[a], dtype=torch.long, device=device)
        pk = torch.tensor(coords[a][j0:j1], dtype=torch.long, device=device)
        delta = pq[:, None] - pk[None, :]                                     # p_i - p_j on this axis
        off = torch.remainder(delta, s) if circular else delta + (s - 1)
        term = off * stride
        idx = term if idx is None else idx + term
    if E:
        extra = [1] * E + [0] * (N - E)
        xq = torch.tensor(extra, dtype=torch.long, device=device)
        xk = torch.tensor(extra[j0:j1], dtype=torch.long, device=device)
        kind = xq[:, None] + 2 * xk[None, :]              # 0 grid-grid, 1 extra q, 2 extra k, 3 both
        idx = torch.where(kind == 0, idx, kind + (T - 1))
    if causal:
        qi = torch.arange(N, device=device)
        kj = torch.arange(j0, j1, device=device)
        idx = torch.where(kj[None, :] > qi[:, None], torch.full_like(idx, T + 3), idx)
    return idx


def export_attention(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], p: Problem,
                     key_block: Optional[int] = None) -> Tensor:
    """LiSA attention (docs/operator.md) in plain, exportable torch ops, blocked over keys; (B, H, N, Dv)."""
    block = int(key_block or KEY_BLOCK)
    if block < 1:
        raise ValueError(f"key_block must be >= 1, got {block}")
    H, N, M, E = p.H, p.N, p.M, p.num_extra
    G = p.Dv // M
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = _phi(q.to(ct) * p.scale, p.feature_map)                                # (B, H, N, Dk)
    fk = _phi(k.to(ct), p.feature_map)
    vg = v.to(ct).reshape(v.shape[0], H, N, M, G).transpose(2, 3)               # (B, H, M, N, G)

    # the extended table of weights: exp(rpe) (T), exp(rpe_extra) or 1 (3), 0 for masked pairs (1)
    rt = [torch.exp(rpe.to(ct).reshape(H, M, -1))]
    rt.append(torch.exp(rpe_extra.to(ct)) if (E and rpe_extra is not None) else rt[0].new_ones(H, M, 3))
    rt.append(rt[0].new_zeros(H, M, 1))
    rt = torch.cat(rt, dim=-1)                                                   # (H, M, T + 4)

    num = den = None
    for j0 in range(0, N, block):
        j1 = min(N, j0 + block)
        idx = _pair_index(p.grid, E, p.boundary, p.causal, j0, j1, q.device)    # (N, j1 - j0)
        R = rt[:, :, idx]                                                        # (H, M, N, j1 - j0)
        A = fq @ fk[:, :, j0:j1].transpose(-1, -2)                               # (B, H, N, j1 - j0)
        W = A[:, :, None] * R[None]                                              # (B, H, M, N, j1 - j0)
        n_ = W @ vg[:, :, :, j0:j1]                                              # (B, H, M, N, G)
        num = n_ if num is None else num + n_
        if p.normalize:
            d_ = W.sum(-1, keepdim=True)
            den = d_ if den is None else den + d_
    if p.normalize:
        num = num / (den + p.eps)
    return num.transpose(2, 3).reshape(v.shape[0], H, N, p.Dv).to(q.dtype)
