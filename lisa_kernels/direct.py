"""The exact direct path: blocks of queries against all keys, as dense matrix products. O(N^2 D) time.

For a block of grid queries, with the keys taken in *reversed* order ``j' = Ng - 1 - j``:

    A        = phi(Q_blk) phi(K_rev)^T                                    (bq, Ng)   matmul
    W^m      = A * R^m,   R^m[i, j'] = r^m[i_1 + j'_1, ..., i_d + j'_d]    (bq, Ng)   one elementwise pass
    [num, den]^m = W^m [V_rev^m, 1]                                        (bq, G+1)  matmul

Reversing the keys turns the linear-table index ``p_i - p_j + S - 1`` into ``i_a + j'_a`` per axis, so
``R^m`` is a strided (Hankel) *view* of the small table ``r = exp(logtab)``: nothing is gathered and no
N x N index is built. Blocks are slabs of rows of the grid (a range along one axis with the leading axes
fixed), sized so that one (B, H, M, bq, Ng) weight tile stays within ``direct_block_bytes``.

The backward recomputes A and W block by block (nothing N x N is saved):

    dW^m = [gnum, gden]^m [V_rev^m, 1]^T     dA = sum_m dW^m * R^m
    dQ   = dA K_rev,  dK_rev += dA^T Q,      d[V_rev, 1]^m += W^m^T [gnum, gden]^m
    dr[u] += sum over pairs with i + j' = u of sum_b dW^m * A       (anti-diagonal sums, via a skewed view)
    dlogtab = dr * r
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator, Tuple

import torch

from ._config import get_config
from ._validate import Problem

__all__ = ["direct_core_forward", "direct_core_backward"]


@dataclasses.dataclass(frozen=True)
class _Slab:
    """A block of grid queries: axes < k fixed at ``lead``, rows [a0, a0 + rows) of axis k, later axes whole.

    Keys: on 1D causal grids only the reversed keys [key0, Ng) are visited (those with j <= i).
    """

    start: int          # first query (flattened grid index)
    length: int         # number of queries
    k: int
    lead: Tuple[int, ...]
    a0: int
    rows: int
    key0: int           # first reversed key visited
    keys: int           # number of keys visited


def _slabs(grid: Tuple[int, ...], block: int, causal: bool) -> Iterator[_Slab]:
    d = len(grid)
    tails = [math.prod(grid[a + 1:]) for a in range(d)]
    k = next(a for a in range(d) if tails[a] <= block)
    rows = max(1, min(grid[k], block // tails[k]))
    ng = math.prod(grid)
    for lead in itertools.product(*[range(s) for s in grid[:k]]):
        base = sum(i * tails[a] for a, i in enumerate(lead))
        for a0 in range(0, grid[k], rows):
            r = min(rows, grid[k] - a0)
            start, length = base + a0 * tails[k], r * tails[k]
            key0 = ng - (start + length) if causal else 0
            yield _Slab(start, length, k, tuple(lead), a0, r, key0, ng - key0)


def _query_shape(grid, s: _Slab) -> Tuple[int, ...]:
    return (s.rows,) + tuple(grid[s.k + 1:])


def _key_shape(grid, s: _Slab) -> Tuple[int, ...]:
    return (s.keys,) if s.key0 else tuple(grid)


def _weight_view(r: torch.Tensor, grid, s: _Slab) -> torch.Tensor:
    """R[h, m, query..., key...] = r[h, m, i_1 + j'_1, ...] as a strided view of the table r."""
    st = r.stride()[2:]
    offset = r.storage_offset() + sum(i * st[a] for a, i in enumerate(s.lead)) + s.a0 * st[s.k] + s.key0 * st[0]
    size = r.shape[:2] + _query_shape(grid, s) + _key_shape(grid, s)
    stride = r.stride()[:2] + tuple(st[s.k:]) + tuple(st)
    return r.as_strided(size, stride, offset)


def _add_antidiagonal_sums(dr: torch.Tensor, dR: torch.Tensor, grid, s: _Slab) -> None:
    """dr[h, m, i + j'] += dR[h, m, i, j'] summed over the block's queries i (the adjoint of _weight_view)."""
    d, k = len(grid), s.k
    qshape, kshape = _query_shape(grid, s), _key_shape(grid, s)
    # u_a - (lead_a or a0) ranges over: S_a for a < k, rows + keys_a - 1 for a == k, 2 S_a - 1 for a > k
    ushape = tuple(kshape[a] if a < k else qshape[a - k] + kshape[a] - 1 for a in range(d))
    Y = dR.new_zeros(dR.shape[:2] + qshape + ushape)
    ys = Y.stride()
    yq, yu = ys[2:2 + len(qshape)], ys[2 + len(qshape):]
    view = Y.as_strided(dR.shape, ys[:2] + tuple(yq[a] + yu[k + a] for a in range(len(qshape))) + tuple(yu))
    view.copy_(dR)
    Z = Y.sum(dim=tuple(range(2, 2 + len(qshape))))
    starts = [s.lead[a] if a < k else (s.a0 if a == k else 0) for a in range(d)]
    starts[0] += s.key0
    target = dr
    for a in range(d):
        target = target.narrow(2 + a, starts[a], ushape[a])
    target.add_(Z)


def _block_queries(p: Problem, ng: int, factor: int) -> int:
    itemsize = 8 if p.dtype == torch.float64 else 4
    per_query = p.B * p.H * p.M * ng * itemsize * factor
    return max(1, get_config().direct_block_bytes // per_query)


def _buffer(buf: torch.Tensor, shape) -> torch.Tensor:
    return buf[:math.prod(shape)].view(shape)


def _ones_column(v: torch.Tensor, M: int) -> torch.Tensor:
    """(B, H, Ng, Dv) -> (B, H, M, Ng, G + 1): each group's values with a column of ones appended."""
    B, H, N, Dv = v.shape
    vg = v.reshape(B, H, N, M, Dv // M).transpose(2, 3)
    return torch.cat([vg, vg.new_ones(B, H, M, N, 1)], dim=-1)


def direct_core_forward(fq, fk, v, logtab, p: Problem):
    """Grid-to-grid core of the direct path: (fq, fk, v, logtab) -> (num, den); see the module docstring."""
    B, H, ng, _ = fq.shape
    M, G = p.M, p.Dv // p.M
    r = torch.exp(logtab).contiguous()
    fk_rev = fk.flip(2)
    ve_rev = _ones_column(v, M).flip(3)
    out = fq.new_empty(B, H, M, ng, G + 1)
    bq = _block_queries(p, ng, 1 if M == 1 else 2)
    slabs = list(_slabs(p.grid, bq, p.causal))
    size = max(s.length * s.keys for s in slabs)
    A_buf = fq.new_empty(B * H * size)             # reused by every block: no page faults per block
    W_buf = A_buf if M == 1 else fq.new_empty(B * H * M * size)
    for s in slabs:
        A = _buffer(A_buf, (B, H, s.length, s.keys))
        torch.matmul(fq[:, :, s.start:s.start + s.length], fk_rev[:, :, s.key0:].transpose(-1, -2), out=A)
        R = _weight_view(r, p.grid, s)
        W = _buffer(W_buf, (B, H, M) + R.shape[2:])
        torch.mul(A.view((B, H, 1) + R.shape[2:]), R, out=W)  # in place when M == 1
        out[:, :, :, s.start:s.start + s.length] = W.view(B, H, M, s.length, s.keys) @ ve_rev[:, :, :, s.key0:]
    num = out[..., :G].transpose(2, 3).reshape(B, H, ng, p.Dv)
    den = out[..., G].transpose(2, 3).contiguous()
    return num, den


def direct_core_backward(fq, fk, v, logtab, gnum, gden, p: Problem):
    """Gradients (dfq, dfk, dv, dlogtab) of direct_core_forward, recomputing each block's tiles."""
    r = torch.exp(logtab).contiguous()
    B, H, ng, Dk = fq.shape
    M, G = p.M, p.Dv // p.M
    if gnum is None:
        gnum = fq.new_zeros(B, H, ng, p.Dv)
    if gden is None:
        gden = fq.new_zeros(B, H, ng, M)
    ge = torch.cat([gnum.reshape(B, H, ng, M, G).transpose(2, 3), gden.transpose(2, 3)[..., None]], dim=-1)
    fk_rev = fk.flip(2)
    ve_rev = _ones_column(v, M).flip(3)
    dfq = torch.empty_like(fq)
    dfk_rev = torch.zeros_like(fk)
    dve_rev = torch.zeros_like(ve_rev)
    dr = torch.zeros_like(r)
    slabs = list(_slabs(p.grid, _block_queries(p, ng, 4), p.causal))
    size = max(s.length * s.keys for s in slabs)
    A_buf, W_buf, dW_buf = (fq.new_empty(B * H * M * size) for _ in range(3))
    for s in slabs:
        sl = slice(s.start, s.start + s.length)
        R = _weight_view(r, p.grid, s)
        shape = (B, H, M) + R.shape[2:]
        A = _buffer(A_buf, (B, H, s.length, s.keys))
        torch.matmul(fq[:, :, sl], fk_rev[:, :, s.key0:].transpose(-1, -2), out=A)
        A = A.view((B, H, 1) + R.shape[2:])
        W = torch.mul(A, R, out=_buffer(W_buf, shape))
        dW = _buffer(dW_buf, (B, H, M, s.length, s.keys))
        torch.matmul(ge[:, :, :, sl], ve_rev[:, :, :, s.key0:].transpose(-1, -2), out=dW)
        dW = dW.view(shape)
        dve_rev[:, :, :, s.key0:] += W.view(B, H, M, s.length, s.keys).transpose(-1, -2) @ ge[:, :, :, sl]
        dA = torch.mul(dW, R, out=W).view(B, H, M, s.length, s.keys)          # W's buffer is free now
        dA = dA[:, :, 0] if M == 1 else dA.sum(2)
        dfq[:, :, sl] = dA @ fk_rev[:, :, s.key0:]
        dfk_rev[:, :, s.key0:] += dA.transpose(-1, -2) @ fq[:, :, sl]
        dR = dW.mul_(A)
        _add_antidiagonal_sums(dr, dR[0] if B == 1 else dR.sum(0), p.grid, s)
    dv = dve_rev.flip(3)[..., :G].transpose(2, 3).reshape(B, H, ng, p.Dv)
    return dfq, dfk_rev.flip(2), dv, dr * r
