"""Fused direct LiSA in Triton, tiled like FlashAttention: never an N x N matrix in memory.

One program owns a tile of BLOCK_M queries of one (batch, head, group m) and loops over key tiles:

    A    = phi(Q_tile) phi(K_tile)^T                      tl.dot, fp32 accumulation
    W    = A * r[idx(i, j)]                                 r = exp(log table) of (H, M, T + 3), gathered per pair
    acc += W V_tile[:, group m];   den += rowsum(W)
    out  = acc / (den + eps)                                (or acc if not normalize)

``idx(i, j)`` is the linear-table entry of offset p_i - p_j (per axis ``p_i - p_j + S - 1``, row-major in the
table), or ``T + kind`` for pairs with an extra token (kind 0: extra query, 1: extra key, 2: both). The table
is :func:`lisa_kernels._compose.linear_log_table` flattened, so circular boundaries are unrolled and causal
masking is both a -inf entry and a skipped key range.

Backward (normalize folded in by PyTorch beforehand: gnum = g / (den + eps), gden = -sum_c g out / (den + eps)):

    dW   = gnum V^T + gden                         dA = dW * r
    dQ  += dA phi(K)           (dq kernel, per query tile)
    dK  += dA^T phi(Q),  dV += W^T gnum             (dkv kernel, per key tile)
    dlogtab[idx] += dW * W     (atomics in the dq kernel; summed over batch)

Grids are handled as 3D: a 1D grid (S,) is (1, 1, S), a 2D grid (S1, S2) is (1, S1, S2).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False

from ._compose import linear_log_table
from ._validate import Problem

__all__ = ["HAS_TRITON", "triton_direct_reason", "lisa_direct_fwd", "lisa_direct_bwd", "full_log_table"]

MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reason(p: Problem) -> Optional[str]:
    """None if Triton kernels can run on ``p``'s device (a GPU, or the CPU interpreter), else why not."""
    if not HAS_TRITON:
        return "triton is not installed"
    if p.device.type != "cuda" and not (p.device.type == "cpu" and _interpreting()):
        return f"inputs are on {p.device}: Triton needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"
    return None


def triton_direct_reason(p: Problem) -> Optional[str]:
    """None if the Triton direct kernel can run ``p``, else why not."""
    reason = triton_device_reason(p)
    if reason is not None:
        return reason
    if p.dtype == torch.float64:
        return "float64 is not supported by the Triton kernels (use 'direct' or 'fft')"
    if max(p.Dk, p.Dv // p.M) > MAX_HEAD_DIM:
        return f"head dim {max(p.Dk, p.Dv // p.M)} is over the kernel's limit of {MAX_HEAD_DIM}"
    return None


if HAS_TRITON:

    @triton.jit
    def _phi(x, FEATURE: tl.constexpr):
        if FEATURE == 0:   # elu(x) + 1
            return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
        else:              # relu
            return tl.maximum(x, 0.0)

    @triton.jit
    def _dphi(x, FEATURE: tl.constexpr):
        if FEATURE == 0:
            return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
        else:
            return tl.where(x > 0, 1.0, 0.0)

    @triton.jit
    def _load_rows(X, b, h, sb, sh, sn, sc, offs_n, offs_c, mask_n, mask_c):
        """X[b, h, offs_n, offs_c] in fp32, 0 outside the masks."""
        return tl.load(X + b * sb + h * sh + offs_n[:, None] * sn + offs_c[None, :] * sc,
                       mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _load_grads(GN, GD, pid_bh, N, M, G, m, offs_m, offs_g, mask_m, mask_g):
        """gnum (B, H, N, M, G) and gden (B, H, N, M) of group m for the rows offs_m (contiguous fp32)."""
        gn = tl.load(GN + ((pid_bh * N + offs_m[:, None]) * M + m) * G + offs_g[None, :],
                     mask=mask_m[:, None] & mask_g[None, :], other=0.0)
        gd = tl.load(GD + (pid_bh * N + offs_m) * M + m, mask=mask_m, other=0.0)
        return gn, gd

    @triton.jit
    def _features(x, mask_d, scale, FEATURE: tl.constexpr):
        """phi(scale * x), 0 in the padded feature columns (phi(0) = 1 for elu1)."""
        return tl.where(mask_d[None, :], _phi(x * scale, FEATURE), 0.0)

    @triton.jit
    def _coords(t, E, S2, S3):
        g = tl.maximum(t - E, 0)
        return g // (S2 * S3), (g // S3) % S2, g % S3

    @triton.jit
    def _table_index(tq, tk, E, S1, S2, S3, T):
        """Entry of the (T + 3) table for query tokens tq[:, None] and key tokens tk[None, :]."""
        q1, q2, q3 = _coords(tq, E, S2, S3)
        k1, k2, k3 = _coords(tk, E, S2, S3)
        idx = ((q1[:, None] - k1[None, :] + S1 - 1) * (2 * S2 - 1)
               + (q2[:, None] - k2[None, :] + S2 - 1)) * (2 * S3 - 1) + (q3[:, None] - k3[None, :] + S3 - 1)
        qx = (tq < E)[:, None]
        kx = (tk < E)[None, :]
        kind = tl.where(qx & kx, 2, tl.where(qx, 0, 1))
        return tl.where(qx | kx, T + kind, idx)

    @triton.jit
    def lisa_direct_fwd_kernel(
        Q, K, V, R, Out, Den,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        H, N, DK, G, M, E, S1, S2, S3, T, scale, eps,
        FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        pid_m, pid_bh, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_DK)
        offs_g = tl.arange(0, BLOCK_G)
        mask_m, mask_d, mask_g = offs_m < N, offs_d < DK, offs_g < G

        q = _load_rows(Q, b, h, sqb, sqh, sqn, sqd, offs_m, offs_d, mask_m, mask_d)
        fq = _features(q, mask_d, scale, FEATURE)
        if not DOT_FP32:
            fq = fq.to(Q.dtype.element_ty)
        acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
        den = tl.zeros((BLOCK_M,), dtype=tl.float32)
        r_base = R + (h * M + m) * (T + 3)
        hi = N
        if CAUSAL:
            hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            kk = _load_rows(K, b, h, skb, skh, skn, skd, offs_n, offs_d, mask_n, mask_d)
            fk = _features(kk, mask_d, 1.0, FEATURE)
            vv = _load_rows(V, b, h, svb, svh, svn, svd, offs_n, m * G + offs_g, mask_n, mask_g)
            if not DOT_FP32:
                fk = fk.to(Q.dtype.element_ty)
                vv = vv.to(V.dtype.element_ty)
            A = tl.dot(fq, tl.trans(fk))
            valid = mask_m[:, None] & mask_n[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            idx = _table_index(offs_m, offs_n, E, S1, S2, S3, T)
            r = tl.load(r_base + idx, mask=valid, other=0.0)
            W = tl.where(valid, A * r, 0.0)
            den += tl.sum(W, 1)
            acc += tl.dot(W.to(vv.dtype), vv)
        if NORMALIZE:
            acc = acc / (den[:, None] + eps)
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + (m * G + offs_g)[None, :] * sod,
                 acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_g[None, :])
        tl.store(Den + (pid_bh * N + offs_m) * M + m, den, mask=mask_m)

    @triton.jit
    def lisa_direct_bwd_dq_kernel(
        Q, K, V, R, GN, GD, DQ, DR,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        H, N, DK, G, M, E, S1, S2, S3, T, scale,
        FEATURE: tl.constexpr, CAUSAL: tl.constexpr, TABLE_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        """dQ (per group, summed by the caller) and, if TABLE_GRAD, the log-table gradient (atomics), per query
        tile."""
        pid_m, pid_bh, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_DK)
        offs_g = tl.arange(0, BLOCK_G)
        mask_m, mask_d, mask_g = offs_m < N, offs_d < DK, offs_g < G
        q = _load_rows(Q, b, h, sqb, sqh, sqn, sqd, offs_m, offs_d, mask_m, mask_d)
        fq = _features(q, mask_d, scale, FEATURE)
        gn, gd = _load_grads(GN, GD, pid_bh, N, M, G, m, offs_m, offs_g, mask_m, mask_g)
        dfq = tl.zeros((BLOCK_M, BLOCK_DK), dtype=tl.float32)
        r_base = R + (h * M + m) * (T + 3)
        dr_base = DR + (h * M + m) * (T + 3)
        hi = N
        if CAUSAL:
            hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            kk = _load_rows(K, b, h, skb, skh, skn, skd, offs_n, offs_d, mask_n, mask_d)
            fk = _features(kk, mask_d, 1.0, FEATURE)
            vv = _load_rows(V, b, h, svb, svh, svn, svd, offs_n, m * G + offs_g, mask_n, mask_g)
            A = tl.dot(fq, tl.trans(fk))
            valid = mask_m[:, None] & mask_n[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            idx = _table_index(offs_m, offs_n, E, S1, S2, S3, T)
            r = tl.load(r_base + idx, mask=valid, other=0.0)
            dW = tl.where(valid, tl.dot(gn, tl.trans(vv)) + gd[:, None], 0.0)
            dA = dW * r
            dfq += tl.dot(dA, fk)
            if TABLE_GRAD:
                tl.atomic_add(dr_base + idx, dW * A * r, mask=valid)
        dq = dfq * _dphi(q * scale, FEATURE) * scale
        tl.store(DQ + ((m * tl.num_programs(1) + pid_bh) * N + offs_m[:, None]) * DK + offs_d[None, :],
                 dq, mask=mask_m[:, None] & mask_d[None, :])

    @triton.jit
    def lisa_direct_bwd_dkv_kernel(
        Q, K, V, R, GN, GD, DK_, DV,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        H, N, DK, G, M, E, S1, S2, S3, T, scale,
        FEATURE: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        """dK (per group, summed by the caller) and dV of group m, per key tile."""
        pid_n, pid_bh, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = pid_bh // H, pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_DK)
        offs_g = tl.arange(0, BLOCK_G)
        mask_n, mask_d, mask_g = offs_n < N, offs_d < DK, offs_g < G
        kk = _load_rows(K, b, h, skb, skh, skn, skd, offs_n, offs_d, mask_n, mask_d)
        fk = _features(kk, mask_d, 1.0, FEATURE)
        vv = _load_rows(V, b, h, svb, svh, svn, svd, offs_n, m * G + offs_g, mask_n, mask_g)
        dfk = tl.zeros((BLOCK_N, BLOCK_DK), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
        r_base = R + (h * M + m) * (T + 3)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        for start_m in range(lo, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            q = _load_rows(Q, b, h, sqb, sqh, sqn, sqd, offs_m, offs_d, mask_m, mask_d)
            fq = _features(q, mask_d, scale, FEATURE)
            gn, gd = _load_grads(GN, GD, pid_bh, N, M, G, m, offs_m, offs_g, mask_m, mask_g)
            At = tl.dot(fk, tl.trans(fq))                                   # (BLOCK_N, BLOCK_M)
            valid = mask_n[:, None] & mask_m[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            idx = _table_index(offs_m, offs_n, E, S1, S2, S3, T)           # (BLOCK_M, BLOCK_N)
            rt = tl.trans(tl.load(r_base + idx, mask=tl.trans(valid), other=0.0))
            Wt = tl.where(valid, At * rt, 0.0)
            dv += tl.dot(Wt, gn)
            dWt = tl.where(valid, tl.dot(vv, tl.trans(gn)) + gd[None, :], 0.0)
            dfk += tl.dot(dWt * rt, fq)
        dk = dfk * _dphi(kk, FEATURE)
        tl.store(DK_ + ((m * tl.num_programs(1) + pid_bh) * N + offs_n[:, None]) * DK + offs_d[None, :],
                 dk, mask=mask_n[:, None] & mask_d[None, :])
        tl.store(DV + (pid_bh * N + offs_n[:, None]) * (M * G) + m * G + offs_g[None, :],
                 dv, mask=mask_n[:, None] & mask_g[None, :])


def _grid3(grid):
    return (1,) * (3 - len(grid)) + tuple(grid)


def _blocks(p: Problem):
    bm = bn = 16 if _interpreting() else 64
    return bm, bn, max(16, triton.next_power_of_2(p.Dk)), max(16, triton.next_power_of_2(p.Dv // p.M))


def lisa_direct_fwd(q, k, v, r, p: Problem):
    """out (B, H, N, Dv) in q's dtype and den (B, H, N, M) fp32, from the (H, M, T + 3) weight table r."""
    B, H, N, Dk = q.shape
    M, G = p.M, p.Dv // p.M
    S1, S2, S3 = _grid3(p.grid)
    T = r.shape[-1] - 3
    out = torch.empty(B, H, N, p.Dv, device=q.device, dtype=q.dtype)
    den = torch.empty(B, H, N, M, device=q.device, dtype=torch.float32)
    BM, BN, BDK, BG = _blocks(p)
    # fp32 inputs multiply in fp32; fp16/bf16 use tensor cores (the interpreter's bf16 dot is broken: fp32 there)
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _interpreting())
    lisa_direct_fwd_kernel[(triton.cdiv(N, BM), B * H, M)](
        q, k, v, r, out, den, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, Dk, G, M, p.num_extra, S1, S2, S3, T, p.scale, p.eps,
        FEATURE=0 if p.feature_map == "elu1" else 1, NORMALIZE=p.normalize, CAUSAL=p.causal, DOT_FP32=dot_fp32,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_DK=BDK, BLOCK_G=BG)
    return out, den


def lisa_direct_bwd(q, k, v, r, out, den, grad_out, p: Problem, deterministic: bool = False):
    """dq, dk, dv (fp32) and the gradient of the log table (H, M, T + 3).

    The kernels accumulate the table gradient with atomics (fast, not bitwise reproducible); with
    ``deterministic=True`` it is computed by :func:`_table_grad_deterministic` instead (fixed order)."""
    B, H, N, Dk = q.shape
    M, G = p.M, p.Dv // p.M
    S1, S2, S3 = _grid3(p.grid)
    T = r.shape[-1] - 3
    g = grad_out.float().reshape(B, H, N, M, G)
    if p.normalize:
        inv = 1.0 / (den + p.eps)                                            # (B, H, N, M)
        gn = (g * inv[..., None]).contiguous()
        gd = (-(g * out.float().reshape(B, H, N, M, G)).sum(-1) * inv).contiguous()
    else:
        gn, gd = g.contiguous(), torch.zeros(B, H, N, M, device=q.device, dtype=torch.float32)
    dq = torch.empty(M, B, H, N, Dk, device=q.device, dtype=torch.float32)
    dk = torch.empty(M, B, H, N, Dk, device=q.device, dtype=torch.float32)
    dv = torch.empty(B, H, N, p.Dv, device=q.device, dtype=torch.float32)
    dr = torch.zeros_like(r)
    BM, BN, BDK, BG = _blocks(p)
    common = dict(FEATURE=0 if p.feature_map == "elu1" else 1, CAUSAL=p.causal,
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_DK=BDK, BLOCK_G=BG)
    sizes = (H, N, Dk, G, M, p.num_extra, S1, S2, S3, T, p.scale)
    strides = (*q.stride(), *k.stride(), *v.stride())
    lisa_direct_bwd_dq_kernel[(triton.cdiv(N, BM), B * H, M)](q, k, v, r, gn, gd, dq, dr, *strides, *sizes,
                                                              TABLE_GRAD=not deterministic, **common)
    lisa_direct_bwd_dkv_kernel[(triton.cdiv(N, BN), B * H, M)](q, k, v, r, gn, gd, dk, dv, *strides, *sizes, **common)
    if deterministic:
        dr = _table_grad_deterministic(q, k, v, r, gn, gd, p)
    return dq.sum(0), dk.sum(0), dv, dr


def _table_grad_deterministic(q, k, v, r, gn, gd, p: Problem) -> torch.Tensor:
    """The (H, M, T + 3) log-table gradient r * sum over pairs of A_ij (gnum_i . v_j + gden_i), in a fixed order.

    Grid pairs: the direct path's backward (blocked matrix products and anti-diagonal sums); pairs with an
    extra token: three small dense sums, O(N E D).
    """
    from .direct import direct_core_backward     # (import here: direct is not needed by the forward kernels)
    from .reference import feature_map
    B, H, N, _ = q.shape
    E, M, G, T = p.num_extra, p.M, p.Dv // p.M, r.shape[-1] - 3
    fq = feature_map(q.float() * p.scale, p.feature_map)
    fk = feature_map(k.float(), p.feature_map)
    vf = v.float()
    table = tuple(2 * s - 1 for s in p.grid)
    grid_p = dataclasses.replace(p, N=N - E, num_extra=0, dtype=torch.float32)
    _, _, _, d_grid = direct_core_backward(fq[:, :, E:], fk[:, :, E:], vf[:, :, E:],
                                           torch.log(r[..., :T]).reshape(H, M, *table),
                                           gn[:, :, E:].reshape(B, H, N - E, p.Dv), gd[:, :, E:], grid_p)
    d_extra = r.new_zeros(H, M, 3)
    if E > 0:
        vg = vf.reshape(B, H, N, M, G)

        def pair_sum(rows, cols, causal_mask=None):      # sum_b,i,j A_ij (gnum_i . v_j + gden_i), per (h, m)
            A = fq[:, :, rows] @ fk[:, :, cols].transpose(-1, -2)                                # (B, H, I, J)
            dW = torch.einsum("bhimg,bhjmg->bhmij", gn[:, :, rows], vg[:, :, cols]) \
                + gd[:, :, rows].transpose(2, 3)[..., None]                                       # (B, H, M, I, J)
            prod = dW * A[:, :, None]
            if causal_mask is not None:
                prod = prod.masked_fill(causal_mask, 0.0)
            return prod.sum(dim=(0, 3, 4))                                                        # (H, M)

        x, g = slice(0, E), slice(E, N)
        if not p.causal:                                  # extra queries see grid keys only without causal
            d_extra[..., 0] = pair_sum(x, g)
        d_extra[..., 1] = pair_sum(g, x)
        mask = torch.ones(E, E, dtype=torch.bool, device=q.device).triu(1) if p.causal else None
        d_extra[..., 2] = pair_sum(x, x, mask)
        d_extra = d_extra * r[..., T:]
    return torch.cat([d_grid.reshape(H, M, T), d_extra], dim=-1)


def full_log_table(rpe, rpe_extra, p: Problem) -> torch.Tensor:
    """(H, M, T + 3): the linear log table flattened, then the three extra-token log-weights."""
    table = linear_log_table(rpe, p).reshape(p.H, p.M, -1)
    extra = rpe_extra if rpe_extra is not None else table.new_zeros(p.H, p.M, 3)
    return torch.cat([table, extra.to(table.dtype)], dim=-1)
