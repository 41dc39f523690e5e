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

For programs that already hold the package's custom ops (``torch.export.export`` keeps them), see
:func:`decomposition_table` and :func:`onnx_translation_table`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._problem import Problem

__all__ = ["KEY_BLOCK", "export_attention", "is_onnx_exporting", "decomposition_table", "onnx_translation_table",
           "CUSTOM_OPS"]

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


def _coords(n: Tensor, grid: Sequence[int], axis: int) -> Tensor:
    """Coordinate on ``axis`` of grid token number n (row-major); n < 0 (the extra tokens) gives 0."""
    step = math.prod(grid[axis + 1:])
    return torch.where(n < 0, torch.zeros_like(n), torch.div(n, step, rounding_mode="floor") % grid[axis])


def _pair_index(grid: Tuple[int, ...], E: int, boundary: str, causal: bool, j0: int, j1: int, device
                ) -> Tensor:
    """(N, j1 - j0) index of every pair (query i, key j in [j0, j1)) into the extended weight table
    [rpe's T entries, rpe_extra's 3 (extra->grid, grid->extra, extra->extra), a 0 for masked pairs].
    Built from aranges (no tensor constants: the graph stays functional, for run_decompositions too)."""
    circular = boundary == "circular"
    sizes = tuple(grid) if circular else tuple(2 * s - 1 for s in grid)
    T = math.prod(sizes)
    N = E + math.prod(grid)
    iq = torch.arange(N, device=device)
    jk = torch.arange(j0, j1, device=device)
    nq, nk = iq - E, jk - E                                                   # grid token numbers
    idx = None
    stride = T
    for a, s in enumerate(grid):
        stride //= sizes[a]
        delta = _coords(nq, grid, a)[:, None] - _coords(nk, grid, a)[None, :]   # p_i - p_j on this axis
        off = torch.remainder(delta, s) if circular else delta + (s - 1)
        term = off * stride
        idx = term if idx is None else idx + term
    if E:
        kind = (nq < 0).long()[:, None] + 2 * (nk < 0).long()[None, :]      # 0 grid-grid, 1 extra q, 2 extra k, 3 both
        idx = torch.where(kind == 0, idx, kind + (T - 1))
    if causal:
        idx = torch.where(jk[None, :] > iq[:, None], torch.full_like(idx, T + 3), idx)
    return idx


def _weight_table(rpe: Tensor, rpe_extra: Optional[Tensor], E: int, ct) -> Tensor:
    """(H, M, T + 4): exp(rpe) (T entries), exp(rpe_extra) or 1 (3), and 0 for the masked pairs (1)."""
    H, M = rpe.shape[0], rpe.shape[1]
    rt = [torch.exp(rpe.to(ct).reshape(H, M, -1))]
    rt.append(torch.exp(rpe_extra.to(ct)) if (E and rpe_extra is not None) else rt[0].new_ones(H, M, 3))
    rt.append(rt[0].new_zeros(H, M, 1))
    return torch.cat(rt, dim=-1)


def _blocked_sums(fq: Tensor, fk: Tensor, v: Tensor, rt: Tensor, grid, E: int, boundary: str, causal: bool,
                  block: int, need_den: bool):
    """num (B, H, M, N, G) = sum_j W_ij v_j and den (B, H, M, N, 1) = sum_j W_ij (None unless need_den), with
    W^m_ij = (fq_i . fk_j) rt[h, m, index(i, j)], summed over blocks of ``block`` keys."""
    H, N, M = fq.shape[1], fq.shape[2], rt.shape[1]
    vg = v.reshape(v.shape[0], H, N, M, v.shape[-1] // M).transpose(2, 3)      # (B, H, M, N, G)
    num = den = None
    for j0 in range(0, N, block):
        j1 = min(N, j0 + block)
        idx = _pair_index(tuple(grid), E, boundary, causal, j0, j1, fq.device)  # (N, j1 - j0)
        R = rt[:, :, idx]                                                        # (H, M, N, j1 - j0)
        A = fq @ fk[:, :, j0:j1].transpose(-1, -2)                               # (B, H, N, j1 - j0)
        W = A[:, :, None] * R[None]                                              # (B, H, M, N, j1 - j0)
        n_ = W @ vg[:, :, :, j0:j1]                                              # (B, H, M, N, G)
        num = n_ if num is None else num + n_
        if need_den:
            d_ = W.sum(-1, keepdim=True)
            den = d_ if den is None else den + d_
    return num, den


def _block(key_block: Optional[int]) -> int:
    block = int(key_block or KEY_BLOCK)
    if block < 1:
        raise ValueError(f"key_block must be >= 1, got {block}")
    return block


def _attention(q, k, v, rpe, rpe_extra, grid, E, feature_map, normalize, eps, boundary, causal, scale,
               key_block=None):
    """(out (B, H, N, Dv) in q's dtype, den + eps (B, H, N, M) in the compute dtype, or None)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = _phi(q.to(ct) * scale, feature_map)                                     # (B, H, N, Dk)
    fk = _phi(k.to(ct), feature_map)
    rt = _weight_table(rpe, rpe_extra if E else None, E, ct)
    num, den = _blocked_sums(fq, fk, v.to(ct), rt, grid, E, boundary, causal, _block(key_block), normalize)
    if normalize:
        den = den + eps
        num = num / den
        den = den.squeeze(-1).transpose(2, 3)                                    # (B, H, N, M)
    B, H, N, Dv = v.shape[0], v.shape[1], v.shape[2], v.shape[3]
    return num.transpose(2, 3).reshape(B, H, N, Dv).to(q.dtype), den


def export_attention(q: Tensor, k: Tensor, v: Tensor, rpe: Tensor, rpe_extra: Optional[Tensor], p: Problem,
                     key_block: Optional[int] = None) -> Tensor:
    """LiSA attention (docs/operator.md) in plain, exportable torch ops, blocked over keys; (B, H, N, Dv)."""
    return _attention(q, k, v, rpe, rpe_extra, p.grid, p.num_extra, p.feature_map, p.normalize, p.eps,
                      p.boundary, p.causal, p.scale, key_block)[0]


# ---------------------------------------------------------------- the package's custom ops, decomposed
#
# For exporters that meet the custom ops themselves (a program from torch.export.export, lowered later): each
# forward op of lisa_kernels.ops written in plain torch ops. They are for inference: the outputs that only the
# backward reads (the fused kernels' saved state) are placeholders of the right shape and dtype, zeros.

CUSTOM_OPS = ("direct_dense", "direct_cpu", "triton_direct", "direct_core", "fft_core")
"""The forward custom ops (namespace ``lisa_kernels``) that the tables below cover; every backend's graph is
made of them (their ``*_backward`` twins only appear in training graphs)."""


def _ops():
    from . import ops  # noqa: F401  (registers the custom ops)
    return torch.ops.lisa_kernels


def _decomp_direct_dense(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                         scale):
    return _attention(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                      scale)[0]


def _decomp_direct_cpu(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                       scale):
    out, den = _attention(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                          scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_c = out.to(ct) if q.dtype != ct else q.new_empty(0, dtype=ct)
    inv = torch.reciprocal(den) if normalize else q.new_empty(0, dtype=ct)
    return out, out_c, inv


def _decomp_triton_direct(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, causal, boundary,
                          scale):
    from .triton_direct import saved_table_shape
    out = _attention(q, k, v, rpe, rpe_extra, grid, num_extra, feature_map, normalize, eps, boundary, causal,
                     scale)[0]
    B, H, N, Dv = v.shape
    M = rpe.shape[1]
    f32 = dict(dtype=torch.float32)
    res = q.new_zeros(B, H, N, Dv) if q.dtype != torch.float32 else q.new_zeros(0)
    return (out, res, q.new_zeros(B, H, N, M, **f32),
            q.new_zeros(saved_table_shape(grid, num_extra, boundary, causal, H, M, q.shape[-1]), **f32),
            q.new_zeros(H * M, **f32))


def _core(fq, fk, v, logtab, grid, causal, circular):
    """num (B, H, ng, Dv), den (B, H, ng, M) of a grid-to-grid core (features already mapped, log table)."""
    H, M = logtab.shape[0], logtab.shape[1]
    rt = torch.cat([torch.exp(logtab.reshape(H, M, -1)), logtab.new_ones(H, M, 3), logtab.new_zeros(H, M, 1)], -1)
    num, den = _blocked_sums(fq, fk, v, rt.to(fq.dtype), grid, 0, "circular" if circular else "zero", causal,
                             _block(None), True)
    B, ng, Dv = v.shape[0], v.shape[2], v.shape[3]
    return num.transpose(2, 3).reshape(B, H, ng, Dv), den.squeeze(-1).transpose(2, 3)


def _decomp_direct_core(fq, fk, v, logtab, grid, causal):
    return _core(fq, fk, v, logtab, grid, causal, False)


def _decomp_fft_core(fq, fk, v, logtab, grid, causal, circular, passes):
    num, den = _core(fq, fk, v, logtab, grid, causal, circular)
    B, H, ng = fq.shape[0], fq.shape[1], fq.shape[2]
    below = torch.zeros(B * H, logtab.shape[1], ng, dtype=torch.bool, device=fq.device)   # exact: nothing below
    return num, den, below


def decomposition_table(base: Optional[Dict] = None) -> Dict:
    """A decomposition table for ``ExportedProgram.run_decompositions`` that replaces the package's custom ops
    by plain torch ops (the form :func:`export_attention` uses)::

        ep = torch.export.export(model, (x,), dynamic_shapes=...)        # keeps lisa_kernels.direct_cpu, ...
        ep = ep.run_decompositions(lisa_kernels.export.decomposition_table())

    ``base`` (default: ``torch.export.default_decompositions()``, the core ATen set, where it exists) is
    extended with the package's entries; pass ``{}`` to decompose the custom ops only.
    """
    if base is None:
        default = getattr(torch.export, "default_decompositions", None)
        base = default() if default is not None else {}
    ops = _ops()
    table = base
    table[ops.direct_dense.default] = _decomp_direct_dense
    table[ops.direct_cpu.default] = _decomp_direct_cpu
    table[ops.triton_direct.default] = _decomp_triton_direct
    table[ops.direct_core.default] = _decomp_direct_core
    table[ops.fft_core.default] = _decomp_fft_core
    return table


def onnx_translation_table() -> Dict:
    """A ``custom_translation_table`` for ``torch.onnx.export`` that translates the package's forward custom ops
    (:data:`CUSTOM_OPS`) into standard ONNX ops (opset 18; the form of :func:`export_attention`), for programs
    that hold them::

        ep = torch.export.export(model, (x,), dynamic_shapes=...)        # keeps lisa_kernels.direct_cpu, ...
        onnx_program = torch.onnx.export(ep, dynamo=True,
                                         custom_translation_table=lisa_kernels.export.onnx_translation_table())

    For inference: outputs that only a backward reads are zeros (lisa_kernels._onnx_translation). Needs
    onnxscript, which torch.onnx's exporter needs too."""
    from . import _onnx_translation
    ops = _ops()
    return {getattr(ops, name).default: getattr(_onnx_translation, name) for name in CUSTOM_OPS}
