"""ONNX translations of the package's forward custom ops (:func:`lisa_kernels.export.onnx_translation_table`).

Each function receives the op's arguments as ``torch.onnx``'s exporter traces them (tensors symbolic, the grid
and options as Python values) and builds the same blocked direct form as :mod:`lisa_kernels.export`, in
standard ONNX ops (opset 18): for each block of at most ``KEY_BLOCK`` keys, the (N, block) index of every pair
into the extended weight table [exp(rpe) (T entries), exp(rpe_extra) or 1 (3), 0 for masked pairs (1)] is
computed in the graph from O(N) coordinate constants (no N x N constant), gathered, multiplied by
``phi(q) phi(k)^T`` and accumulated into ``W v`` and ``sum_j W``. The outputs that only a backward reads (the
fused kernels' saved state) are zeros of the op's shapes and dtypes: the translations are for inference.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from . import export as _export


def _const(a: np.ndarray):
    return op.Constant(value=ir.tensor(a))


def _int64(values) -> object:
    return _const(np.asarray(values, dtype=np.int64))


def _compute_type(x):
    return ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _phi(x, feature_map: str):
    return op.Add(op.Elu(x), op.CastLike(op.Constant(value_float=1.0), x)) if feature_map == "elu1" else op.Relu(x)


def _coords(n: np.ndarray, grid: Sequence[int], axis: int) -> np.ndarray:
    """Coordinate on ``axis`` of grid token numbers n (row-major); n < 0 (the extra tokens) gives 0."""
    return np.where(n < 0, 0, (n // math.prod(grid[axis + 1:])) % grid[axis])


def _pair_index(grid: Tuple[int, ...], E: int, boundary: str, causal: bool, j0: int, j1: int):
    """(N, j1 - j0) int64 index of pairs (query i, key j in [j0, j1)) into the extended table, as graph ops on
    O(N) constants (the rule of lisa_kernels.export._pair_index)."""
    circular = boundary == "circular"
    sizes = tuple(grid) if circular else tuple(2 * s - 1 for s in grid)
    T = math.prod(sizes)
    N = E + math.prod(grid)
    nq, nk = np.arange(N) - E, np.arange(j0, j1) - E
    idx = None
    stride = T
    for a, s in enumerate(grid):
        stride //= sizes[a]
        delta = op.Sub(_int64(_coords(nq, grid, a)[:, None]), _int64(_coords(nk, grid, a)[None, :]))
        off = op.Mod(delta, _int64(s)) if circular else op.Add(delta, _int64(s - 1))
        term = op.Mul(off, _int64(stride))
        idx = term if idx is None else op.Add(idx, term)
    if E:
        kind = (nq < 0).astype(np.int64)[:, None] + 2 * (nk < 0).astype(np.int64)[None, :]
        idx = op.Where(_const(kind == 0), idx, _int64(kind + (T - 1)))
    if causal:
        later = np.arange(j0, j1)[None, :] > np.arange(N)[:, None]
        idx = op.Where(_const(later), _int64(T + 3), idx)
    return idx


def _weight_table(rpe, rpe_extra, H: int, M: int, ct):
    """(H, M, T + 4): exp(rpe), exp(rpe_extra) or 1 (3 entries), 0 (1 entry), in the compute type."""
    parts = [op.Exp(op.Cast(op.Reshape(rpe, _int64([H, M, -1])), to=ct))]
    if rpe_extra is not None:
        parts.append(op.Exp(op.Cast(rpe_extra, to=ct)))
    else:
        parts.append(op.Cast(op.ConstantOfShape(_int64([H, M, 3]), value=ir.tensor(np.ones(1, np.float32))), to=ct))
    parts.append(op.Cast(op.ConstantOfShape(_int64([H, M, 1])), to=ct))
    return op.Concat(*parts, axis=-1)


def _blocked_sums(fq, fk, v, rt, grid, E: int, boundary: str, causal: bool, N: int, M: int, G: int,
                  need_den: bool):
    """num (B, H, M, N, G) and den (B, H, M, N, 1) (None unless need_den), summed over key blocks."""
    vg = op.Transpose(op.Reshape(v, _int64([0, 0, N, M, G])), perm=[0, 1, 3, 2, 4])      # (B, H, M, N, G)
    num = den = None
    block = _export._block(None)
    for j0 in range(0, N, block):
        j1 = min(N, j0 + block)
        R = op.Gather(rt, _pair_index(tuple(grid), E, boundary, causal, j0, j1), axis=2)     # (H, M, N, blk)
        fkb = op.Slice(fk, _int64([j0]), _int64([j1]), _int64([2]))
        A = op.MatMul(fq, op.Transpose(fkb, perm=[0, 1, 3, 2]))                            # (B, H, N, blk)
        W = op.Mul(op.Unsqueeze(A, _int64([2])), R)                                        # (B, H, M, N, blk)
        n_ = op.MatMul(W, op.Slice(vg, _int64([j0]), _int64([j1]), _int64([3])))
        num = n_ if num is None else op.Add(num, n_)
        if need_den:
            d_ = op.ReduceSum(W, _int64([-1]), keepdims=1)
            den = d_ if den is None else op.Add(den, d_)
    return num, den


def _shape_of(t) -> List[int]:
    return [int(d) for d in t.shape]


def _attention(q, k, v, rpe, rpe_extra, grid, E, feature_map, normalize, eps, boundary, causal, scale):
    """(out (B, H, N, Dv) in q's type, den + eps (B, H, N, M) in the compute type or None, the compute type)."""
    ct = _compute_type(q)
    H, M = _shape_of(rpe)[:2]
    N, Dv = int(v.shape[2]), int(v.shape[3])
    fq = _phi(op.Mul(op.Cast(q, to=ct), op.Cast(op.Constant(value_float=float(scale)), to=ct)), feature_map)
    fk = _phi(op.Cast(k, to=ct), feature_map)
    rt = _weight_table(rpe, rpe_extra if E else None, H, M, ct)
    num, den = _blocked_sums(fq, fk, op.Cast(v, to=ct), rt, grid, E, boundary, causal, N, M, Dv // M, normalize)
    if normalize:
        den = op.Add(den, op.Cast(op.Constant(value_float=float(eps)), to=ct))
        num = op.Div(num, den)
        den = op.Transpose(op.Squeeze(den, _int64([-1])), perm=[0, 1, 3, 2])             # (B, H, N, M)
    out = op.Reshape(op.Transpose(num, perm=[0, 1, 3, 2, 4]), _int64([0, 0, N, Dv]))
    return op.CastLike(out, q), den, ct


def _empty(ct):
    return op.Cast(op.ConstantOfShape(_int64([0])), to=ct)


def _zeros_like_shape(shape, ct):
    return op.Cast(op.ConstantOfShape(shape), to=ct)


def direct_dense(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal, scale):
    return _attention(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                      scale)[0]


def direct_cpu(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal, scale):
    """(out, out_c, inv) of the CPU kernel's shapes: out_c the output in the compute type for 16-bit inputs
    (else empty), inv = 1 / (den + eps) where normalize (else empty; the kernel's own is max-shifted: only its
    backward reads it)."""
    out, den, ct = _attention(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary,
                              causal, scale)
    out_c = op.Cast(out, to=ct) if q.dtype != ct else _empty(ct)
    inv = op.Reciprocal(den) if normalize else _empty(ct)
    return out, out_c, inv


def triton_direct(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, causal, boundary, scale):
    """(out, res, den', r', mx): the output, and zeros where the Triton kernels save state for their backward."""
    from .triton_direct import saved_table_shape
    out = _attention(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                     scale)[0]
    f32 = ir.DataType.FLOAT
    H, M = _shape_of(rpe)[:2]
    bhn = op.Slice(op.Shape(v), _int64([0]), _int64([3]))
    res = _empty(f32) if q.dtype == f32 else op.CastLike(_zeros_like_shape(op.Shape(v), f32), q)
    return (out, res, _zeros_like_shape(op.Concat(bhn, _int64([M]), axis=0), f32),
            _zeros_like_shape(_int64(saved_table_shape(grid, num_extra, boundary, causal, H, M, int(q.shape[-1]))),
                              f32),
            _zeros_like_shape(_int64([H * M]), f32))


def _core(fq, fk, v, logtab, grid, causal: bool, circular: bool):
    """num (B, H, ng, Dv), den (B, H, ng, M) of a grid-to-grid core (features already mapped, log table)."""
    H, M = _shape_of(logtab)[:2]
    N, Dv = int(v.shape[2]), int(v.shape[3])
    rt = op.CastLike(_weight_table(logtab, None, H, M, _compute_type(fq)), fq)
    num, den = _blocked_sums(fq, fk, v, rt, grid, 0, "circular" if circular else "zero", causal, N, M, Dv // M, True)
    num = op.Reshape(op.Transpose(num, perm=[0, 1, 3, 2, 4]), _int64([0, 0, N, Dv]))
    return num, op.Transpose(op.Squeeze(den, _int64([-1])), perm=[0, 1, 3, 2])


def direct_core(fq, fk, v, logtab, grid, causal):
    return _core(fq, fk, v, logtab, grid, causal, False)


def fft_core(fq, fk, v, logtab, grid, causal, circular, passes):
    """(num, den, below): ``below`` (B H, M, ng), the FFT's round-off mask, is all false: the form is exact."""
    num, den = _core(fq, fk, v, logtab, grid, causal, circular)
    M = _shape_of(logtab)[1]
    bh = op.ReduceProd(op.Slice(op.Shape(fq), _int64([0]), _int64([2])), keepdims=1)
    shape = op.Concat(bh, _int64([M, int(fq.shape[2])]), axis=0)
    return num, den, op.Cast(op.ConstantOfShape(shape), to=ir.DataType.BOOL)
