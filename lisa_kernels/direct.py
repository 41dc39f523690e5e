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

import collections
import dataclasses
import itertools
import math
from typing import Iterator, Optional, Tuple

import torch

from . import _extension
from ._config import get_config
from ._problem import Problem

__all__ = ["direct_core_forward", "direct_core_backward", "direct_cpu_built", "direct_cpu_reason",
           "direct_dense_first", "direct_how", "cpu_cost_factor", "TORCH_OPS_FACTOR"]


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


# ---------------------------------------------------------------- the dense single-block form (small problems)
#
# When the whole (B, H, M, N, N) weight tensor fits in the block budget, the blocked loop above would run a
# single block anyway, plus the extra-token terms, the table building and the normalisation as separate
# steps. The dense form does all of it in a dozen aten ops: every pair (i, j) of the N tokens, extra tokens
# included, reads its weight from one table
#
#     table = [rpe flattened (T entries) | rpe_extra (3, if E > 0) | -inf (1, if causal)]
#     R[h, m, i, j] = exp(table[h, m, index[i, j]])                   (index: (N, N) ints, cached per grid)
#
# so that  W = (phi(Q) phi(K)^T) * R,  out = W V / (W 1 + eps).  The backward recomputes W (nothing N x N is
# saved between the passes) and scatters the weight gradient back onto the table with one index_add_.

_DENSE_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_DENSE_CACHE_SIZE = 64


def _dense_cached(key, build):
    """A small LRU of index and constant tensors (a few per grid and device)."""
    hit = _DENSE_CACHE.get(key)
    if hit is None:
        hit = build()
        _DENSE_CACHE[key] = hit
        while len(_DENSE_CACHE) > _DENSE_CACHE_SIZE:
            _DENSE_CACHE.popitem(last=False)
    return hit


def dense_table_size(table_shape, num_extra: int, causal: bool) -> int:
    """Entries per (h, m) of the dense form's table: the rpe's, 3 extra-token slots if E > 0, 1 mask slot if causal."""
    return math.prod(table_shape) + (3 if num_extra else 0) + (1 if causal else 0)


def _build_dense_index(grid, num_extra: int, boundary: str, causal: bool, device) -> torch.Tensor:
    d, E = len(grid), num_extra
    ng = math.prod(grid)
    axes = torch.meshgrid(*[torch.arange(s) for s in grid], indexing="ij")
    pos = torch.stack([a.reshape(-1) for a in axes], dim=-1)                 # (Ng, d)
    delta = pos[:, None, :] - pos[None, :, :]                               # (Ng, Ng, d): p_i - p_j
    size = torch.tensor(grid)
    if boundary == "circular":
        idx, shape = torch.remainder(delta, size), tuple(grid)
    else:
        idx, shape = delta + size - 1, tuple(2 * s - 1 for s in grid)
    flat = torch.zeros(ng, ng, dtype=torch.long)
    for a in range(d):
        flat = flat * shape[a] + idx[..., a]
    T = math.prod(shape)
    N = E + ng
    full = torch.full((N, N), T + 2, dtype=torch.long)                     # extra -> extra
    full[E:, E:] = flat
    full[:E, E:] = T                                                        # extra query, grid key
    full[E:, :E] = T + 1                                                    # grid query, extra key
    if causal:
        full.masked_fill_(torch.ones(N, N, dtype=torch.bool).triu(1), T + (3 if E else 0))
    return full.reshape(-1).to(device)


def dense_index(grid, E: int, boundary: str, causal: bool, device) -> torch.Tensor:
    """The dense form's (N*N,) table index of every pair (i, j), cached per (grid, options, device)."""
    return _dense_cached(("index", grid, E, boundary, causal, device),
                         lambda: _build_dense_index(grid, E, boundary, causal, device))


def _dense_weights(rpe, rpe_extra, grid, E, boundary, causal, ct):
    """(exp(table) (H, M, T'), R (H, M, N*N) = exp(table)[..., index], index (N*N,))."""
    device = rpe.device
    index = dense_index(grid, E, boundary, causal, device)
    H, M = rpe.shape[0], rpe.shape[1]
    table = rpe.reshape(H, M, -1)
    if table.dtype is not ct:
        table = table.to(ct)
    if E or causal:
        parts = [table]
        if E:
            if rpe_extra is None:
                parts.append(_dense_cached(("zeros", H, M, ct, device),
                                           lambda: torch.zeros(H, M, 3, dtype=ct, device=device)))
            else:
                parts.append(rpe_extra if rpe_extra.dtype is ct else rpe_extra.to(ct))
        if causal:
            parts.append(_dense_cached(("-inf", H, M, ct, device),
                                       lambda: torch.full((H, M, 1), float("-inf"), dtype=ct, device=device)))
        table = torch.cat(parts, dim=-1)
    rt = torch.exp(table)
    return rt, rt.index_select(-1, index), index


def _constant(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor (usable with tensors on any device): adding a Python float wraps it in a new tensor
    on every call, which costs several times the addition itself on small inputs."""
    return _dense_cached(("constant", value, dtype), lambda: torch.tensor(value, dtype=dtype))


def _phi(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "elu1":
        return torch.nn.functional.elu(x).add_(_constant(1.0, x.dtype))
    return torch.relu(x)


def _dphi(fx: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi'(x) from phi(x): elu1 -> min(phi, 1) (1 for x > 0, exp(x) = phi otherwise); relu -> [phi > 0]."""
    if feature_map == "elu1":
        return fx.clamp(max=1.0)
    return (fx > 0).to(fx.dtype)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_features(q, k, feature_map, scale, ct):
    qc = q if q.dtype is ct else q.to(ct)
    if scale != 1.0:
        qc = qc * _constant(scale, ct)
    return _phi(qc, feature_map), _phi(k if k.dtype is ct else k.to(ct), feature_map)


def _dense_pass(q, k, v, rpe, rpe_extra, grid, E, feature_map, normalize, eps, boundary, causal, scale, keep):
    """The forward; with ``keep`` also what the backward needs (the tiles are only as large as one block)."""
    ct = _compute_dtype(q.dtype)
    B, H, N, _ = q.shape
    Dv, M = v.shape[-1], rpe.shape[1]
    fq, fk = _dense_features(q, k, feature_map, scale, ct)
    A = torch.matmul(fq, fk.transpose(-1, -2))                              # (B, H, N, N)
    rt, R, index = _dense_weights(rpe, rpe_extra, grid, E, boundary, causal, ct)
    vc = v if v.dtype is ct else v.to(ct)
    if M == 1:
        R = R.view(H, N, N)
        W = A * R if keep else A.mul_(R)                                    # (B, H, N, N)
        vg = vc
    else:
        R = R.view(H, M, N, N)
        W = A.unsqueeze(2) * R                                              # (B, H, M, N, N)
        vg = vc.reshape(B, H, N, M, Dv // M).transpose(2, 3)                # (B, H, M, N, G)
    num = torch.matmul(W, vg)
    inv = None
    if normalize:
        den = W.sum(-1, keepdim=True).add_(_constant(eps, ct))
        if keep:
            inv = den.reciprocal_()
            num.mul_(inv)
        else:
            num.div_(den)
    out = num if M == 1 else num.transpose(2, 3).reshape(B, H, N, Dv)
    out = out if out.dtype is q.dtype else out.to(q.dtype)
    if not keep:
        return out, None
    return out, (fq, fk, vg, A, W, R, rt, index, num, inv)


def _dense_grads(parts, grad_out, feature_map, scale, dtypes):
    """(dq, dk, dv, dtable) from the forward's parts and the output's gradient."""
    fq, fk, vg, A, W, R, rt, index, out, inv = parts
    ct = fq.dtype
    B, H, N, _ = fq.shape
    M = rt.shape[1]
    go = grad_out if grad_out.dtype is ct else grad_out.to(ct)
    if M > 1:
        go = go.reshape(B, H, N, M, -1).transpose(2, 3)                     # (B, H, M, N, G)
    gnum = go if inv is None else go * inv
    dW = torch.matmul(gnum, vg.transpose(-1, -2))
    if inv is not None:
        dW.sub_((gnum * out).sum(-1, keepdim=True))                         # d/d den = -out / (den + eps)
    dv = torch.matmul(W.transpose(-1, -2), gnum)
    if M == 1:
        dA = dW * R
        dR = dW.mul_(A)
    else:
        dv = dv.transpose(2, 3).reshape(B, H, N, -1)
        dA = (dW * R).sum(2)
        dR = dW.mul_(A.unsqueeze(2))
    dR = dR[0] if B == 1 else dR.sum(0)                                     # (H, [M,] N, N)
    dtable = torch.zeros_like(rt).index_add_(-1, index, dR.mul_(R).view(H, M, N * N))
    dfq = torch.matmul(dA, fk).mul_(_dphi(fq, feature_map))
    if scale != 1.0:
        dfq.mul_(_constant(scale, ct))
    dfk = torch.matmul(dA.transpose(-1, -2), fq).mul_(_dphi(fk, feature_map))
    dq_t, dk_t, dv_t = dtypes
    return (dfq if dq_t is ct else dfq.to(dq_t), dfk if dk_t is ct else dfk.to(dk_t),
            dv if dv_t is ct else dv.to(dv_t), dtable)


def dense_forward(q, k, v, rpe, rpe_extra, grid, E: int, feature_map: str, normalize: bool, eps: float,
                  boundary: str, causal: bool, scale: float) -> torch.Tensor:
    """The whole LiSA attention (extra tokens, causal mask, normalisation) of a small problem, (B, H, N, Dv)."""
    return _dense_pass(q, k, v, rpe, rpe_extra, grid, E, feature_map, normalize, eps, boundary, causal, scale,
                       False)[0]


def dense_forward_saving(q, k, v, rpe, rpe_extra, grid, E: int, feature_map: str, normalize: bool, eps: float,
                         boundary: str, causal: bool, scale: float):
    """:func:`dense_forward` and the parts that :func:`dense_backward_from` takes (no recomputation)."""
    return _dense_pass(q, k, v, rpe, rpe_extra, grid, E, feature_map, normalize, eps, boundary, causal, scale, True)


def dense_backward_from(parts, grad_out, feature_map: str, scale: float, dtypes):
    """Gradients (dq, dk, dv, dtable) from the parts that :func:`dense_forward_saving` kept."""
    return _dense_grads(parts, grad_out, feature_map, scale, dtypes)


def dense_backward(q, k, v, rpe, rpe_extra, grad_out, grid, E: int, feature_map: str, normalize: bool, eps: float,
                   boundary: str, causal: bool, scale: float):
    """Gradients (dq, dk, dv, dtable) of :func:`dense_forward`, recomputing the forward; dtable is over the
    (H, M, T') table (the rpe's T entries first, then rpe_extra's 3 when E > 0, then the mask slot)."""
    _, parts = _dense_pass(q, k, v, rpe, rpe_extra, grid, E, feature_map, normalize, eps, boundary, causal, scale,
                           True)
    return _dense_grads(parts, grad_out, feature_map, scale, (q.dtype, k.dtype, v.dtype))


# ---------------------------------------------------------------- which form runs: the compiled kernels and the checks
#
# The extension's fused CPU kernel (csrc/direct_cpu.cpp) and one-call dense forward (csrc/dense.cpp), None where they
# are not built (lisa_kernels._extension); lisa_kernels.ops calls them. Tests set _C_DIRECT to None to run the
# PyTorch ops instead.
_C_DIRECT = _extension.C if _extension.provides("direct_cpu_forward") else None
_C_DENSE_FORWARD = _extension.provides("dense_forward")
# multiply-adds B H N^2 (Dk + Dv) up to which the dense forward runs its loop nest (0: none)
_DENSE_LOOP_MAX_WORK = int(_extension.provides("dense_loop_max_work") or 0)


# The CPU cost model's "direct" constants are fitted to the fused kernel. Where it does not run (extension not built)
# the direct path's PyTorch ops (the dense form, the blocked loop) take about this much more time.
TORCH_OPS_FACTOR = 2.0


def direct_cpu_built() -> bool:
    """Whether the extension with the fused direct CPU kernel is built (the CPU cost model's "direct" entry)."""
    return _C_DIRECT is not None


def direct_cpu_reason(p: Problem) -> Optional[str]:
    """None if ``backend="direct"`` runs ``p`` with the fused CPU kernel, else why not (one line)."""
    if p.device.type != "cpu":           # (.type: torch 2.11's dynamo cannot compare devices)
        return f"inputs are on {p.device}, not the CPU"
    if _C_DIRECT is None:
        return _extension.extension_reason() or "this build of lisa_kernels._C has no fused direct CPU kernel"
    return None


def direct_dense_first(p: Problem) -> bool:
    """Whether ``backend="direct"`` runs ``p`` in the dense single-block form
    (:func:`lisa_kernels.ops.direct_dense_attention`): it fits (the (B, H, M, N, N) weights and the backward's three
    more tiles of that size fit in ``direct_block_bytes``: the blocked loop would run one block) and either the fused
    CPU kernel cannot run it (a GPU, or no extension) or it is tiny, B H N^2 (Dk + Dv) at most the extension's
    ``dense_loop_max_work`` (its dense loop nest then takes a forward a few microseconds sooner; a recorded call still
    runs the fused kernel)."""
    itemsize = 8 if p.dtype == torch.float64 else 4
    pairs = p.B * p.H * p.N * p.N
    if not isinstance(pairs, int):      # a symbolic batch (torch.export, dynamic shapes): decide without a guard
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        if not statically_known_true(4 * pairs * p.M * itemsize <= get_config().direct_block_bytes):
            return False
        return _C_DIRECT is None or statically_known_true(pairs * (p.Dk + p.Dv) <= _DENSE_LOOP_MAX_WORK) \
            or p.device.type != "cpu"
    if 4 * pairs * p.M * itemsize > get_config().direct_block_bytes:
        return False
    if _C_DIRECT is None or pairs * (p.Dk + p.Dv) <= _DENSE_LOOP_MAX_WORK:
        return True
    # (last: reading .type costs a quarter of a microsecond, on every call of a tiny problem; comparing devices
    # would cost less, but breaks torch 2.11's dynamo)
    return p.device.type != "cpu"


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
    return f"PyTorch ops, about {TORCH_OPS_FACTOR:g}x the fused kernel's estimate: {reason}"


def cpu_cost_factor(p: Problem, backward: bool) -> float:
    """The factor on the CPU cost model's "direct" estimate: 1 with the fused kernel, else :data:`TORCH_OPS_FACTOR`."""
    return 1.0 if direct_cpu_built() else TORCH_OPS_FACTOR
