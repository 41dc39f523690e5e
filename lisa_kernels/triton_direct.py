"""Fused direct LiSA in Triton, tiled like FlashAttention: never an N x N matrix in memory.

Forward, two launches:

1. ``_prep_kernel``: the features ``fq = phi(scale q)``, ``fk = phi(k)`` once per token, in the dtype the dots
   take, zero-padded to (NPAD, DKP); and per (head, group) the *extended weight table*
   ``r' = exp(log r - max)`` (``max`` = the largest log-weight of that (head, group), kept in ``mx``).
2. ``_fwd_kernel``: one program per (query tile, batch * head, group chunk); for every key tile

       A    = fq_tile fk_tile^T                          one tensor-core dot for all groups of the chunk
       W_m  = A * r'_m[AIX_i + NBX_j]                    one add and one gathered load per pair, no masks
       acc_m += W_m V_m,   den_m += rowsum(W_m)
       out_m = acc_m / (den_m + eps e^-max_m)            (acc_m e^max_m if not normalize)

The pair index is separable: per token ``AIX`` (queries) and ``NBX`` (keys, negated) from :func:`_layout`,
so that ``AIX_i + NBX_j`` is the linear-table entry of offset p_i - p_j for grid pairs, and lands in three
small constant regions of the extended table for pairs with an extra token (kind 0, 1, 2 of SPEC.md, the
causal mask of the extra tokens included). Padded tokens index a finite entry and have zero features, so no
tile carries a mask. Causal masking (1D) is the table's -inf entries plus a shorter key loop.

Subtracting ``max`` keeps every weight in (0, 1]: it cancels in ``num / (den + eps)`` exactly (eps is scaled
by e^-max too) and in every gradient below, so fp16/bf16 tiles cannot overflow. bf16 takes bf16 dots with fp32
accumulation everywhere; fp16 takes an fp16 dot for A and g.v, and tf32 for the products with a weight-side
operand (W, dA), whose range fp16 lacks; fp32 takes tf32x3 (fp32-accurate) dots.

Backward, four launches (``normalize`` folded in: s_i = 1/(den_i + eps e^-max), gd_i = -s_i g_i.out_i):

    _bwd_prep_kernel   features again, s, gd per (token, group); zeroes the table gradient
    _bwd_dkv_kernel    per key tile:   W' = A r',  dV += (s W')^T g,  dW' = s (V g^T) + gd,  dK += (dW' r')^T fq
    _bwd_dq_kernel     per query tile: dA = sum_m dW'_m r'_m,  dQ += dA fk,  dlog r[idx] += dA_m A  (atomics)
    _table_grad_kernel the extended-table gradient folded back onto rpe (circular tables: 2^d offsets per entry)
                       and rpe_extra (sums over the three regions)

With ``torch.use_deterministic_algorithms(True)`` the table gradient is summed in a fixed order instead
(:func:`_table_grad_deterministic`). Grids are handled as 3D: (S,) is (1, 1, S) and (S1, S2) is (1, S1, S2).
The grid and the number of extra tokens are compile-time constants (one compiled variant per grid).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Dict, List, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False

from ._compose import linear_log_table
from ._validate import Problem

__all__ = ["HAS_TRITON", "triton_direct_reason", "lisa_direct_fwd", "lisa_direct_bwd", "full_log_table",
           "kernel_launches", "GPU_CONFIGS"]

MAX_HEAD_DIM = 256
MAX_FUSED_GROUPS = 4          # RPE groups that share one A tile in a program


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


# ---------------------------------------------------------------- the extended table and the token indices

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every pair of tokens reads its weight in the extended (H * M, TXP) table.

    Grid token with coordinates y: a = (y1 W2 + y2) W3 + y3 (W = 2S - 1), C = a of the last token.
      grid query AIX = a + C, grid key NBX = -a        -> entry a_i - a_j + C, the linear table [0, T)
      extra key j: NBX = XS - j                        -> region R1 (kind 1: grid query, extra key)
      extra query i: AIX = YS + i                      -> region R0 with grid keys (kind 0), R2 with extra
                                                          keys at YS + XS + (i - j) (kind 2; causal: i >= j)
      padded key: NBX = -C, padded query: AIX = C      -> finite entries; their features are zero
    """

    S: Tuple[int, int, int]
    L: Tuple[int, int, int]     # rpe table sizes per axis (2S - 1, or S circular)
    E: int
    N: int
    NPAD: int
    T: int
    C: int
    XS: int
    YS: int
    TX: int
    TXP: int
    R1: Tuple[int, int]         # inclusive bounds of the regions
    R0: Tuple[int, int]
    R2: Tuple[int, int]
    circular: bool
    causal: bool

    @property
    def W(self) -> Tuple[int, int, int]:
        return tuple(2 * s - 1 for s in self.S)


TOKEN_PAD = 128               # NPAD is a multiple of every block size


def _grid3(grid):
    return (1,) * (3 - len(grid)) + tuple(grid)


@functools.lru_cache(maxsize=256)
def _layout_of(grid: Tuple[int, ...], E: int, circular: bool, causal: bool) -> Layout:
    S = _grid3(grid)
    W = tuple(2 * s - 1 for s in S)
    L = S if circular else W
    T = math.prod(W)
    C = ((S[0] - 1) * W[1] + (S[1] - 1)) * W[2] + (S[2] - 1)
    N = E + math.prod(S)
    if E == 0:
        XS = YS = 0
        TX = T
        R1 = R0 = R2 = (1, 0)            # empty
    else:
        XS = max(C + E, 2 * E - 1)
        R1 = (C - E + 1 + XS, 2 * C + XS)
        YS = R1[1] + 1 + C
        R0 = (YS - C, YS + E - 1)
        R2 = (YS + XS - E + 1, YS + XS + E - 1)
        TX = YS + XS + E
    TXP = triton.next_power_of_2(TX) if TX <= 4096 else -(-TX // 1024) * 1024
    NPAD = -(-N // TOKEN_PAD) * TOKEN_PAD
    return Layout(S=S, L=L, E=E, N=N, NPAD=NPAD, T=T, C=C, XS=XS, YS=YS, TX=TX, TXP=TXP, R1=R1, R0=R0, R2=R2,
                  circular=circular, causal=causal)


def layout(p: Problem) -> Layout:
    return _layout_of(tuple(p.grid), p.num_extra, p.boundary == "circular", p.causal)


_INDEX_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def token_index(lay: Layout, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(AIX, NBX): int32 (NPAD,) per-token query and (negated) key indices of the extended table; cached."""
    key = (lay, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    S, W, E = lay.S, lay.W, lay.E
    ng = math.prod(S)
    g = torch.arange(ng, dtype=torch.int64)
    y1, y2, y3 = g // (S[1] * S[2]), (g // S[2]) % S[1], g % S[2]
    a = (y1 * W[1] + y2) * W[2] + y3
    ext = torch.arange(E, dtype=torch.int64)
    pad = torch.full((lay.NPAD - lay.N,), lay.C, dtype=torch.int64)
    aix = torch.cat([lay.YS + ext, a + lay.C, pad])
    nbx = torch.cat([lay.XS - ext, -a, -pad])
    hit = (aix.to(torch.int32).to(device), nbx.to(torch.int32).to(device))
    if len(_INDEX_CACHE) > 64:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = hit
    return hit


def _table_constexprs(lay: Layout) -> dict:
    return dict(S1=lay.S[0], S2=lay.S[1], S3=lay.S[2], L1=lay.L[0], L2=lay.L[1], L3=lay.L[2], E=lay.E, T=lay.T,
                TX=lay.TX, TXP=lay.TXP, R1LO=lay.R1[0], R1HI=lay.R1[1], R0LO=lay.R0[0], R0HI=lay.R0[1],
                R2LO=lay.R2[0], R2HI=lay.R2[1], R2MID=lay.YS + lay.XS, CIRC=lay.circular, CAUSAL=lay.causal)


# ---------------------------------------------------------------- dtypes of the dots

def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write a result in: the result's own, except bf16 under the interpreter, whose bf16
    casts truncate (a GPU rounds to nearest): there the kernels write fp32 and torch rounds."""
    return torch.float32 if dtype == torch.bfloat16 and _interpreting() else dtype


def _modes(dtype: torch.dtype) -> Tuple[torch.dtype, int]:
    """(feature dtype, dot mode). Mode 0: 16-bit dots (bf16; fp16 where the operands are features/grads);
    mode 1: fp16, weight-side dots in tf32; mode 2: fp32 inputs, tf32x3 dots. The interpreter's bf16 dot is
    broken (TOOLCHAIN.md), so bf16 runs in mode 2 there."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting()):
        return torch.float32, 2
    if dtype == torch.float16:
        return torch.float16, 1
    return torch.bfloat16, 0


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
    def _dot(a, b, acc, MODE: tl.constexpr):
        """acc + a @ b, fp32 accumulation: a cast to b's 16-bit dtype (MODE 0), or both in tf32 (1) or tf32x3 (2,
        fp32-accurate). MODE // 2 * 2 is the mode of the products of two 16-bit inputs (features, g, v)."""
        if MODE == 0:
            return tl.dot(a.to(b.dtype), b, acc)
        elif MODE == 1:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")

    @triton.jit
    def _feature_rows(X, FX, b, h, bh, sxb, sxh, sxn, sxd, offs, N, DK, scale,
                      FEATURE: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr):
        """FX[bh, offs, :] = phi(scale X[b, h, offs, :]), zero in padded rows and columns."""
        offs_d = tl.arange(0, DKP)
        mask = (offs < N)[:, None] & (offs_d < DK)[None, :]
        x = tl.load(X + b * sxb + h * sxh + offs[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0)
        f = tl.where(mask, _phi(x.to(tl.float32) * scale, FEATURE), 0.0)
        tl.store(FX + (bh * NPAD + offs)[:, None] * DKP + offs_d[None, :], f.to(FX.dtype.element_ty))

    @triton.jit
    def _both_features(pid, Q, K, FQ, FK, sqb, sqh, sqn, sqd, skb, skh, skn, skd, H, N, DK, scale,
                       FEATURE: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr, BLOCK_T: tl.constexpr):
        """Features of q and k for the BLOCK_T tokens of feature program ``pid``; returns (b, h, bh, offs)."""
        NTB: tl.constexpr = NPAD // BLOCK_T
        bh = pid // NTB
        b = bh // H
        h = bh % H
        offs = (pid % NTB) * BLOCK_T + tl.arange(0, BLOCK_T)
        _feature_rows(Q, FQ, b, h, bh, sqb, sqh, sqn, sqd, offs, N, DK, scale, FEATURE, DKP, NPAD)
        _feature_rows(K, FK, b, h, bh, skb, skh, skn, skd, offs, N, DK, 1.0, FEATURE, DKP, NPAD)
        return b, h, bh, offs

    @triton.jit
    def _table_values(RPE_hm, REX_hm, t, HAS_REX: tl.constexpr,
                      S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr,
                      L3: tl.constexpr, E: tl.constexpr, T: tl.constexpr, TX: tl.constexpr,
                      R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                      R2LO: tl.constexpr, R2HI: tl.constexpr, R2MID: tl.constexpr,
                      CIRC: tl.constexpr, CAUSAL: tl.constexpr):
        """Log-weights of the extended-table entries t (-inf where the weight is 0 or t is padding)."""
        W2: tl.constexpr = 2 * S2 - 1
        W3: tl.constexpr = 2 * S3 - 1
        in_grid = t < T
        d3 = t % W3
        d2 = (t // W3) % W2
        d1 = t // (W3 * W2)
        if CIRC:
            src = (((d1 + 1) % S1) * L2 + (d2 + 1) % S2) * L3 + (d3 + 1) % S3     # (d - (S - 1)) mod S
        else:
            src = t
        val = tl.load(RPE_hm + src, mask=in_grid, other=0.0).to(tl.float32)
        neg_inf = float("-inf")
        if CAUSAL:
            val = tl.where(d3 < S3 - 1, neg_inf, val)
        val = tl.where(in_grid, val, neg_inf)
        if E > 0:
            if HAS_REX:
                x0 = tl.load(REX_hm + 0).to(tl.float32)
                x1 = tl.load(REX_hm + 1).to(tl.float32)
                x2 = tl.load(REX_hm + 2).to(tl.float32)
            else:
                x0 = 0.0
                x1 = 0.0
                x2 = 0.0
            val = tl.where((t >= R1LO) & (t <= R1HI), x1, val)
            if CAUSAL:   # extra queries come first: they see no grid key, and extra keys j <= i only
                val = tl.where((t >= R2LO) & (t <= R2HI) & (t >= R2MID), x2, val)
            else:
                val = tl.where((t >= R0LO) & (t <= R0HI), x0, val)
                val = tl.where((t >= R2LO) & (t <= R2HI), x2, val)
        return tl.where(t < TX, val, neg_inf)

    @triton.jit
    def _prep_kernel(Q, K, FQ, FK, RPE, REX, R, MX,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                     H, N, DK, scale, n_feat,
                     FEATURE: tl.constexpr, HAS_REX: tl.constexpr, M: tl.constexpr,
                     S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr,
                     L3: tl.constexpr, E: tl.constexpr, T: tl.constexpr, TX: tl.constexpr, TXP: tl.constexpr,
                     R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                     R2LO: tl.constexpr, R2HI: tl.constexpr, R2MID: tl.constexpr,
                     CIRC: tl.constexpr, CAUSAL: tl.constexpr,
                     DKP: tl.constexpr, NPAD: tl.constexpr, BLOCK_T: tl.constexpr, TBLOCK: tl.constexpr):
        """Programs [0, n_feat): features of BLOCK_T tokens of one (b, h). Then one program per (h, m): the
        extended table r' = exp(log r - max) and max."""
        pid = tl.program_id(0)
        if pid < n_feat:
            b, h, bh, offs = _both_features(pid, Q, K, FQ, FK, sqb, sqh, sqn, sqd, skb, skh, skn, skd, H, N, DK,
                                            scale, FEATURE, DKP, NPAD, BLOCK_T)
        else:
            hm = pid - n_feat
            rpe_hm = RPE + hm * (L1 * L2 * L3)
            rex_hm = REX + hm * 3
            mx = tl.full((TBLOCK,), float("-inf"), tl.float32)
            for t0 in range(0, TXP, TBLOCK):
                t = t0 + tl.arange(0, TBLOCK)
                val = _table_values(rpe_hm, rex_hm, t, HAS_REX, S1, S2, S3, L1, L2, L3, E, T, TX,
                                    R1LO, R1HI, R0LO, R0HI, R2LO, R2HI, R2MID, CIRC, CAUSAL)
                mx = tl.maximum(mx, val)
            m = tl.max(mx, 0)
            for t0 in range(0, TXP, TBLOCK):
                t = t0 + tl.arange(0, TBLOCK)
                val = _table_values(rpe_hm, rex_hm, t, HAS_REX, S1, S2, S3, L1, L2, L3, E, T, TX,
                                    R1LO, R1HI, R0LO, R0HI, R2LO, R2HI, R2MID, CIRC, CAUSAL)
                tl.store(R + hm * TXP + t, tl.exp(val - m))
            tl.store(MX + hm, m)

    # ------------------------------------------------------------ forward

    @triton.jit
    def _fwd_step(acc, den, A, rrow, nb, vbase, offs_n, offs_g, N, svn, svd,
                  G: tl.constexpr, MODE: tl.constexpr):
        vv = tl.load(vbase + offs_n[:, None] * svn + offs_g[None, :] * svd,
                     mask=(offs_n < N)[:, None] & (offs_g < G)[None, :], other=0.0)
        W = A * tl.load(rrow[:, None] + nb[None, :])
        den += tl.sum(W, 1)
        acc = _dot(W, vv, acc, MODE)
        return acc, den

    @triton.jit
    def _fwd_store(acc, den, gm, Out, Res, Den, MX, b, h, bh, H, N, M, sob, soh, son, sod, eps, offs_m, offs_g,
                   G: tl.constexpr, NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr):
        mx = tl.load(MX + h * M + gm)
        if NORMALIZE:
            acc = acc * (1.0 / (den + eps * tl.exp(-mx)))[:, None]
        else:
            acc = acc * tl.exp(mx)
        row = offs_m < N
        mask = row[:, None] & (offs_g < G)[None, :]
        o = acc.to(Out.dtype.element_ty)
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + (gm * G + offs_g)[None, :] * sod, o, mask=mask)
        if RESIDUAL:   # out - round(out), so that the backward's g . out is as exact as the fp32 accumulators
            tl.store(Res + ((bh * N + offs_m) * M + gm)[:, None] * G + offs_g[None, :],
                     (acc - o.to(tl.float32)).to(Res.dtype.element_ty), mask=mask)
        tl.store(Den + (bh * N + offs_m) * M + gm, den, mask=row)

    @triton.jit
    def _fwd_kernel(FQ, FK, V, R, AIX, NBX, MX, Out, Res, Den,
                    svb, svh, svn, svd, sob, soh, son, sod, H, N, eps,
                    M: tl.constexpr, MC: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                    DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr,
                    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, MODE: tl.constexpr, RESIDUAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh, mc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DKP)
        offs_g = tl.arange(0, BLOCK_G)
        fq = tl.load(FQ + (bh * NPAD + offs_m)[:, None] * DKP + offs_d[None, :])
        m0 = mc * MC
        rrow0 = R + (h * M + m0) * TXP + tl.load(AIX + offs_m)
        vb0 = V + b * svb + h * svh + m0 * G * svd
        acc0 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
        den0 = tl.zeros((BLOCK_M,), tl.float32)
        den1 = tl.zeros((BLOCK_M,), tl.float32)
        den2 = tl.zeros((BLOCK_M,), tl.float32)
        den3 = tl.zeros((BLOCK_M,), tl.float32)
        hi = N
        if CAUSAL:
            hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            fk = tl.load(FK + (bh * NPAD + offs_n)[:, None] * DKP + offs_d[None, :])
            nb = tl.load(NBX + offs_n)
            A = _dot(fq, tl.trans(fk), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), MODE // 2 * 2)
            acc0, den0 = _fwd_step(acc0, den0, A, rrow0, nb, vb0, offs_n, offs_g, N, svn, svd, G, MODE)
            if MC > 1:
                acc1, den1 = _fwd_step(acc1, den1, A, rrow0 + TXP, nb, vb0 + G * svd, offs_n, offs_g, N, svn, svd,
                                       G, MODE)
            if MC > 2:
                acc2, den2 = _fwd_step(acc2, den2, A, rrow0 + 2 * TXP, nb, vb0 + 2 * G * svd, offs_n, offs_g, N,
                                       svn, svd, G, MODE)
            if MC > 3:
                acc3, den3 = _fwd_step(acc3, den3, A, rrow0 + 3 * TXP, nb, vb0 + 3 * G * svd, offs_n, offs_g, N,
                                       svn, svd, G, MODE)
        _fwd_store(acc0, den0, m0, Out, Res, Den, MX, b, h, bh, H, N, M, sob, soh, son, sod, eps, offs_m, offs_g, G, NORMALIZE, RESIDUAL)
        if MC > 1:
            _fwd_store(acc1, den1, m0 + 1, Out, Res, Den, MX, b, h, bh, H, N, M, sob, soh, son, sod, eps, offs_m,
                       offs_g, G, NORMALIZE, RESIDUAL)
        if MC > 2:
            _fwd_store(acc2, den2, m0 + 2, Out, Res, Den, MX, b, h, bh, H, N, M, sob, soh, son, sod, eps, offs_m,
                       offs_g, G, NORMALIZE, RESIDUAL)
        if MC > 3:
            _fwd_store(acc3, den3, m0 + 3, Out, Res, Den, MX, b, h, bh, H, N, M, sob, soh, son, sod, eps, offs_m,
                       offs_g, G, NORMALIZE, RESIDUAL)

    # ------------------------------------------------------------ backward

    @triton.jit
    def _bwd_prep_kernel(Q, K, GO, O, RES, DEN, MX, FQ, FK, SC, GD, R, RD,
                         sqb, sqh, sqn, sqd, skb, skh, skn, skd, sgb, sgh, sgn, sgd, sob, soh, son, sod,
                         H, N, DK, scale, eps, n_feat, r_size,
                         FEATURE: tl.constexpr, M: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                         NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr,
                         TXP: tl.constexpr, BLOCK_T: tl.constexpr, ZBLOCK: tl.constexpr):
        """Programs [0, n_feat): features, s and gd of BLOCK_T tokens of one (b, h). Then RD (H * M, 2, TXP):
        the table r' beside a zeroed gradient row (one base pointer serves the gather and the atomics)."""
        pid = tl.program_id(0)
        if pid < n_feat:
            b, h, bh, offs = _both_features(pid, Q, K, FQ, FK, sqb, sqh, sqn, sqd, skb, skh, skn, skd, H, N, DK,
                                            scale, FEATURE, DKP, NPAD, BLOCK_T)
            row = offs < N
            offs_g = tl.arange(0, BLOCK_G)
            mask = row[:, None] & (offs_g < G)[None, :]
            for gm in tl.static_range(M):
                mx = tl.load(MX + h * M + gm)
                if NORMALIZE:
                    den = tl.load(DEN + (bh * N + offs) * M + gm, mask=row, other=1.0)
                    s = 1.0 / (den + eps * tl.exp(-mx))
                    g = tl.load(GO + b * sgb + h * sgh + offs[:, None] * sgn + (gm * G + offs_g)[None, :] * sgd,
                                mask=mask, other=0.0).to(tl.float32)
                    o = tl.load(O + b * sob + h * soh + offs[:, None] * son + (gm * G + offs_g)[None, :] * sod,
                                mask=mask, other=0.0).to(tl.float32)
                    if RESIDUAL:
                        o += tl.load(RES + ((bh * N + offs) * M + gm)[:, None] * G + offs_g[None, :], mask=mask,
                                     other=0.0).to(tl.float32)
                    gd = -s * tl.sum(g * o, 1)
                else:
                    s = tl.zeros((BLOCK_T,), tl.float32) + tl.exp(mx)
                    gd = tl.zeros((BLOCK_T,), tl.float32)
                tl.store(SC + (bh * NPAD + offs) * M + gm, tl.where(row, s, 0.0))
                tl.store(GD + (bh * NPAD + offs) * M + gm, tl.where(row, gd, 0.0))
        else:
            z = (pid - n_feat) * ZBLOCK + tl.arange(0, ZBLOCK)
            ok = z < r_size
            dst = RD + (z // TXP) * (2 * TXP) + z % TXP
            tl.store(dst, tl.load(R + z, mask=ok, other=0.0), mask=ok)
            tl.store(dst + TXP, tl.zeros((ZBLOCK,), tl.float32), mask=ok)

    @triton.jit
    def _dq_step(A, g, s, gd, rrow, drow, nb, vbase, offs_n, offs_g, N, svn, svd,
                 G: tl.constexpr, TABLE_GRAD: tl.constexpr, MODE: tl.constexpr):
        vv = tl.load(vbase + offs_n[:, None] * svn + offs_g[None, :] * svd,
                     mask=(offs_n < N)[:, None] & (offs_g < G)[None, :], other=0.0)
        D = _dot(g, tl.trans(vv), tl.zeros(A.shape, tl.float32), MODE // 2 * 2)
        dA = (D * s[:, None] + gd[:, None]) * tl.load(rrow[:, None] + nb[None, :])
        if TABLE_GRAD:
            tl.atomic_add(drow[:, None] + nb[None, :], dA * A, sem="relaxed")
        return dA

    @triton.jit
    def _load_g(GO, b, h, sgb, sgh, sgn, sgd, gm, offs_m, offs_g, N, G: tl.constexpr):
        return tl.load(GO + b * sgb + h * sgh + offs_m[:, None] * sgn + (gm * G + offs_g)[None, :] * sgd,
                       mask=(offs_m < N)[:, None] & (offs_g < G)[None, :], other=0.0)

    @triton.jit
    def _bwd_dq_kernel(FQ, FK, V, GO, Q, RD, AIX, NBX, SC, GD, DQ,
                       svb, svh, svn, svd, sgb, sgh, sgn, sgd, sqb, sqh, sqn, sqd, sdc, sdb, sdh, sdn,
                       H, N, DK, scale,
                       FEATURE: tl.constexpr, M: tl.constexpr, MC: tl.constexpr, G: tl.constexpr,
                       BLOCK_G: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr,
                       CAUSAL: tl.constexpr, TABLE_GRAD: tl.constexpr, MODE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dQ of one query tile (all groups of a chunk) and the table gradient dlog r[idx] += dA_m A."""
        pid_m, bh, mc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DKP)
        offs_g = tl.arange(0, BLOCK_G)
        fq = tl.load(FQ + (bh * NPAD + offs_m)[:, None] * DKP + offs_d[None, :])
        m0 = mc * MC
        ai = tl.load(AIX + offs_m)
        rrow0 = RD + (h * M + m0) * (2 * TXP) + ai        # r' of group m0; its gradient row is TXP further
        drow0 = rrow0 + TXP
        vb0 = V + b * svb + h * svh + m0 * G * svd
        srow = SC + (bh * NPAD + offs_m) * M + m0
        grow = GD + (bh * NPAD + offs_m) * M + m0
        g0 = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0, offs_m, offs_g, N, G)
        s0, gd0 = tl.load(srow), tl.load(grow)
        g1, s1, gd1 = g0, s0, gd0
        g2, s2, gd2 = g0, s0, gd0
        g3, s3, gd3 = g0, s0, gd0
        if MC > 1:
            g1 = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0 + 1, offs_m, offs_g, N, G)
            s1, gd1 = tl.load(srow + 1), tl.load(grow + 1)
        if MC > 2:
            g2 = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0 + 2, offs_m, offs_g, N, G)
            s2, gd2 = tl.load(srow + 2), tl.load(grow + 2)
        if MC > 3:
            g3 = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0 + 3, offs_m, offs_g, N, G)
            s3, gd3 = tl.load(srow + 3), tl.load(grow + 3)
        dfq = tl.zeros((BLOCK_M, DKP), tl.float32)
        hi = N
        if CAUSAL:
            hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            fk = tl.load(FK + (bh * NPAD + offs_n)[:, None] * DKP + offs_d[None, :])
            nb = tl.load(NBX + offs_n)
            A = _dot(fq, tl.trans(fk), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), MODE // 2 * 2)
            dA = _dq_step(A, g0, s0, gd0, rrow0, drow0, nb, vb0, offs_n, offs_g, N, svn, svd, G, TABLE_GRAD, MODE)
            if MC > 1:
                dA += _dq_step(A, g1, s1, gd1, rrow0 + 2 * TXP, drow0 + 2 * TXP, nb, vb0 + G * svd, offs_n, offs_g, N,
                               svn, svd, G, TABLE_GRAD, MODE)
            if MC > 2:
                dA += _dq_step(A, g2, s2, gd2, rrow0 + 4 * TXP, drow0 + 4 * TXP, nb, vb0 + 2 * G * svd, offs_n,
                               offs_g, N, svn, svd, G, TABLE_GRAD, MODE)
            if MC > 3:
                dA += _dq_step(A, g3, s3, gd3, rrow0 + 6 * TXP, drow0 + 6 * TXP, nb, vb0 + 3 * G * svd, offs_n,
                               offs_g, N, svn, svd, G, TABLE_GRAD, MODE)
            dfq = _dot(dA, fk, dfq, MODE)
        mask = (offs_m < N)[:, None] & (offs_d < DK)[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask,
                    other=0.0).to(tl.float32)
        dq = dfq * _dphi(q * scale, FEATURE) * scale
        tl.store(DQ + mc * sdc + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mask)

    @triton.jit
    def _dkv_step(dv, At, g, s, gd, rcol, ai, vv, MODE: tl.constexpr):
        rt = tl.load(rcol[:, None] + ai[None, :])
        Wt = At * rt
        dv = _dot(Wt * s[None, :], g, dv, MODE)
        Dt = _dot(vv, tl.trans(g), tl.zeros(At.shape, tl.float32), MODE // 2 * 2)
        return (Dt * s[None, :] + gd[None, :]) * rt, dv

    @triton.jit
    def _store_dv(dv, DV, b, h, gm, sdvb, sdvh, sdvn, sdvd, offs_n, offs_g, N, G: tl.constexpr):
        tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + (gm * G + offs_g)[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_g < G)[None, :])

    @triton.jit
    def _bwd_dkv_kernel(FQ, FK, V, GO, K, R, AIX, NBX, SC, GD, DKB, DV,
                        svb, svh, svn, svd, sgb, sgh, sgn, sgd, skb, skh, skn, skd, sdc, sdb, sdh, sdn,
                        sdvb, sdvh, sdvn, sdvd, H, N, DK,
                        FEATURE: tl.constexpr, M: tl.constexpr, MC: tl.constexpr, G: tl.constexpr,
                        BLOCK_G: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr,
                        CAUSAL: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dK and dV of one key tile (all groups of a chunk), looping over query tiles."""
        pid_n, bh, mc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, DKP)
        offs_g = tl.arange(0, BLOCK_G)
        fk = tl.load(FK + (bh * NPAD + offs_n)[:, None] * DKP + offs_d[None, :])
        m0 = mc * MC
        rcol0 = R + (h * M + m0) * TXP + tl.load(NBX + offs_n)
        vmask = (offs_n < N)[:, None] & (offs_g < G)[None, :]
        vb0 = V + b * svb + h * svh + offs_n[:, None] * svn + (m0 * G + offs_g)[None, :] * svd
        v0 = tl.load(vb0, mask=vmask, other=0.0)
        v1, v2, v3 = v0, v0, v0
        if MC > 1:
            v1 = tl.load(vb0 + G * svd, mask=vmask, other=0.0)
        if MC > 2:
            v2 = tl.load(vb0 + 2 * G * svd, mask=vmask, other=0.0)
        if MC > 3:
            v3 = tl.load(vb0 + 3 * G * svd, mask=vmask, other=0.0)
        dv0 = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
        dv1 = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
        dv2 = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
        dv3 = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
        dfk = tl.zeros((BLOCK_N, DKP), tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        for start_m in range(lo, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            fq = tl.load(FQ + (bh * NPAD + offs_m)[:, None] * DKP + offs_d[None, :])
            ai = tl.load(AIX + offs_m)
            srow = SC + (bh * NPAD + offs_m) * M + m0
            grow = GD + (bh * NPAD + offs_m) * M + m0
            At = _dot(fk, tl.trans(fq), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), MODE // 2 * 2)
            g = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0, offs_m, offs_g, N, G)
            dAt, dv0 = _dkv_step(dv0, At, g, tl.load(srow), tl.load(grow), rcol0, ai, v0, MODE)
            if MC > 1:
                g = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0 + 1, offs_m, offs_g, N, G)
                d, dv1 = _dkv_step(dv1, At, g, tl.load(srow + 1), tl.load(grow + 1), rcol0 + TXP, ai, v1, MODE)
                dAt += d
            if MC > 2:
                g = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0 + 2, offs_m, offs_g, N, G)
                d, dv2 = _dkv_step(dv2, At, g, tl.load(srow + 2), tl.load(grow + 2), rcol0 + 2 * TXP, ai, v2,
                                   MODE)
                dAt += d
            if MC > 3:
                g = _load_g(GO, b, h, sgb, sgh, sgn, sgd, m0 + 3, offs_m, offs_g, N, G)
                d, dv3 = _dkv_step(dv3, At, g, tl.load(srow + 3), tl.load(grow + 3), rcol0 + 3 * TXP, ai, v3,
                                   MODE)
                dAt += d
            dfk = _dot(dAt, fq, dfk, MODE)
        mask = (offs_n < N)[:, None] & (offs_d < DK)[None, :]
        kk = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(DKB + mc * sdc + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :],
                 (dfk * _dphi(kk, FEATURE)).to(DKB.dtype.element_ty), mask=mask)
        _store_dv(dv0, DV, b, h, m0, sdvb, sdvh, sdvn, sdvd, offs_n, offs_g, N, G)
        if MC > 1:
            _store_dv(dv1, DV, b, h, m0 + 1, sdvb, sdvh, sdvn, sdvd, offs_n, offs_g, N, G)
        if MC > 2:
            _store_dv(dv2, DV, b, h, m0 + 2, sdvb, sdvh, sdvn, sdvd, offs_n, offs_g, N, G)
        if MC > 3:
            _store_dv(dv3, DV, b, h, m0 + 3, sdvb, sdvh, sdvn, sdvd, offs_n, offs_g, N, G)

    @triton.jit
    def _region_sum(base, lo: tl.constexpr, hi: tl.constexpr, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for t0 in range(lo, hi + 1, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            acc += tl.load(base + t, mask=t <= hi, other=0.0)
        return tl.sum(acc, 0)

    @triton.jit
    def _table_grad_kernel(DR, DRPE, DREX,
                           S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr,
                           L2: tl.constexpr, L3: tl.constexpr, ROW: tl.constexpr, HAS_REX: tl.constexpr,
                           R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                           R2LO: tl.constexpr, R2HI: tl.constexpr, CIRC: tl.constexpr, BLOCK: tl.constexpr):
        """d rpe[h, m] from the extended-table gradient DR[h * M + m]: the linear part as is, or for circular
        tables the sum over the (up to 2 per axis) linear offsets d = c and d = c - S of each entry c; and
        d rpe_extra[h, m, kind] as the sum over its region."""
        hm = tl.program_id(0)
        base = DR + hm * ROW
        LL: tl.constexpr = L1 * L2 * L3
        W2: tl.constexpr = 2 * S2 - 1
        W3: tl.constexpr = 2 * S3 - 1
        for c0 in range(0, LL, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            valid = c < LL
            if CIRC:
                c3 = c % L3
                c2 = (c // L3) % L2
                c1 = c // (L3 * L2)
                acc = tl.zeros((BLOCK,), tl.float32)
                for combo in tl.static_range(8):
                    o1 = c1 - S1 * ((combo // 4) % 2)
                    o2 = c2 - S2 * ((combo // 2) % 2)
                    o3 = c3 - S3 * (combo % 2)
                    ok = valid & (o1 > -S1) & (o2 > -S2) & (o3 > -S3)
                    t = ((o1 + S1 - 1) * W2 + (o2 + S2 - 1)) * W3 + (o3 + S3 - 1)
                    acc += tl.load(base + t, mask=ok, other=0.0)
            else:
                acc = tl.load(base + c, mask=valid, other=0.0)
            tl.store(DRPE + hm * LL + c, acc.to(DRPE.dtype.element_ty), mask=valid)
        if HAS_REX:
            tl.store(DREX + hm * 3 + 0, _region_sum(base, R0LO, R0HI, BLOCK).to(DREX.dtype.element_ty))
            tl.store(DREX + hm * 3 + 1, _region_sum(base, R1LO, R1HI, BLOCK).to(DREX.dtype.element_ty))
            tl.store(DREX + hm * 3 + 2, _region_sum(base, R2LO, R2HI, BLOCK).to(DREX.dtype.element_ty))


# ---------------------------------------------------------------- launch configurations

# (BLOCK_M, BLOCK_N, num_warps, num_stages) autotuned on a GPU, per kernel, for "light" programs (one RPE group,
# head dim <= 64) and "heavy" ones (more live state); configs that spill are pruned before tuning
# (:func:`_spill_free`), so only spill-free ones run where one exists. The interpreter takes one small config.
GPU_CONFIGS = {
    "light": {"fwd": [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 3)],
              "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
              "dkv": [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2)]},
    "heavy": {"fwd": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
              "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
              "dkv": [(32, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)]},
}
INTERPRETER_CONFIG = (16, 16, 1, 1)


def gpu_configs(kind: str, DKP: int, MC: int) -> list:
    return GPU_CONFIGS["light" if MC == 1 and DKP <= 64 else "heavy"][kind]


PREP_BLOCK_T = 32


def _group_chunk(M: int, DKP: int) -> int:
    """Groups per program: the largest divisor of M that is at most MAX_FUSED_GROUPS (2 for head dims over 64,
    whose tiles leave fewer registers)."""
    limit = MAX_FUSED_GROUPS if DKP <= 64 else 2
    return next(c for c in range(min(M, limit), 0, -1) if M % c == 0)


@dataclasses.dataclass
class Launch:
    """One kernel launch: the kernel, its arguments (by name) and its grid as a function of the block sizes."""

    name: str
    kernel: object
    args: dict
    grid: object                   # callable(meta) -> tuple, or a tuple
    tuned: Optional[str] = None    # key of GPU_CONFIGS when the block sizes are autotuned
    block_configs: Optional[list] = None     # (BLOCK_M, BLOCK_N, warps, stages) in place of GPU_CONFIGS[tuned]

    def configs(self, interpreting: Optional[bool] = None) -> List[dict]:
        """The launch options (and block sizes, for autotuned kernels) the launcher may use."""
        if self.tuned is None:
            return [dict(num_warps=4, num_stages=1)]
        if _interpreting() if interpreting is None else interpreting:
            blocks = [INTERPRETER_CONFIG]
        else:
            blocks = self.block_configs or gpu_configs(self.tuned, self.args["DKP"], self.args["MC"])
        return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s) for bm, bn, w, s in blocks]


_TUNED: Dict[tuple, object] = {}


def _spill_free(kernel):
    """An ``early_config_prune`` for triton.autotune: compiles each config and keeps those that do not spill
    (all, if none is spill-free, or if the spill count cannot be read)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        scored = []
        for cfg in configs:
            try:
                compiled = kernel.warmup(**args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                         grid=(1,))
                compiled._init_handles()
                spills = int(compiled.n_spills)
            except Exception:      # (an API difference across Triton versions: do not prune)
                return configs
            scored.append((spills, cfg))
        free = [cfg for spills, cfg in scored if spills == 0]
        return free or [min(scored, key=lambda sc: sc[0])[1]]
    return prune


def _tuned_kernel(launch: Launch):
    """The autotuned wrapper of a kernel (GPU only), one per kernel and candidate list."""
    configs = launch.configs()
    key = (launch.name, tuple(tuple(sorted(c.items())) for c in configs))
    fn = _TUNED.get(key)
    if fn is None:
        tconfigs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                                  num_stages=c["num_stages"]) for c in configs]
        restore = ["RD"] if launch.name == "bwd_dq" else None      # its atomics must not pile up while tuning
        fn = triton.autotune(configs=tconfigs, key=["N", "DKP", "BLOCK_G", "MC", "NPAD", "TXP", "MODE", "CAUSAL"],
                             restore_value=restore,
                             prune_configs_by={"early_config_prune": _spill_free(launch.kernel)})(launch.kernel)
        _TUNED[key] = fn
    return fn


def _run(launch: Launch) -> None:
    if launch.tuned is not None and not _interpreting():
        _tuned_kernel(launch)[launch.grid](**launch.args)
        return
    cfg = launch.configs()[0]
    grid = launch.grid(cfg) if callable(launch.grid) else launch.grid
    launch.kernel[grid](**launch.args, **cfg)


def _common(p: Problem, lay: Layout) -> dict:
    M, G = p.M, p.Dv // p.M
    _, mode = _modes(p.dtype)
    DKP = max(16, triton.next_power_of_2(p.Dk))
    return dict(M=M, MC=_group_chunk(M, DKP), G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), DKP=DKP,
                NPAD=lay.NPAD, TXP=lay.TXP, CAUSAL=p.causal, MODE=mode)


def _prep_launch(q, k, rpe, rpe_extra, fq, fk, r, mx, p: Problem, lay: Layout) -> Launch:
    B, H, N, Dk = q.shape
    n_feat = (lay.NPAD // PREP_BLOCK_T) * B * H
    tab = _table_constexprs(lay)
    args = dict(Q=q, K=k, FQ=fq, FK=fk, RPE=rpe, REX=rpe_extra if rpe_extra is not None else rpe, R=r, MX=mx,
                sqb=q.stride(0), sqh=q.stride(1), sqn=q.stride(2), sqd=q.stride(3),
                skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
                H=H, N=N, DK=Dk, scale=p.scale, n_feat=n_feat,
                FEATURE=0 if p.feature_map == "elu1" else 1, HAS_REX=rpe_extra is not None, M=p.M, **tab,
                DKP=fq.shape[-1], NPAD=lay.NPAD, BLOCK_T=PREP_BLOCK_T, TBLOCK=min(1024, lay.TXP))
    return Launch("prep", _prep_kernel, args, (n_feat + H * p.M,))


def _features(q, lay: Layout, p: Problem):
    B, H = q.shape[:2]
    fdt, _ = _modes(p.dtype)
    DKP = max(16, triton.next_power_of_2(p.Dk))
    return (torch.empty(B * H, lay.NPAD, DKP, device=q.device, dtype=fdt),
            torch.empty(B * H, lay.NPAD, DKP, device=q.device, dtype=fdt))


def forward_launches(q, k, v, rpe, rpe_extra, p: Problem):
    """The forward's launches and the tensors they write: (launches, out, den, r, mx)."""
    B, H, N, Dk = q.shape
    lay = layout(p)
    fq, fk = _features(q, lay, p)
    r = torch.empty(H * p.M, lay.TXP, device=q.device, dtype=torch.float32)
    mx = torch.empty(H * p.M, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, N, p.Dv, device=q.device, dtype=_store_dtype(q.dtype))
    den = torch.empty(B, H, N, p.M, device=q.device, dtype=torch.float32)
    residual = out.dtype != torch.float32
    res = torch.empty(B, H, N, p.Dv, device=q.device, dtype=q.dtype) if residual else out.new_empty(0)
    aix, nbx = token_index(lay, q.device)
    c = _common(p, lay)
    fwd = dict(FQ=fq, FK=fk, V=v, R=r, AIX=aix, NBX=nbx, MX=mx, Out=out, Res=res if residual else out, Den=den,
               svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
               sob=out.stride(0), soh=out.stride(1), son=out.stride(2), sod=out.stride(3), H=H, N=N, eps=p.eps,
               NORMALIZE=p.normalize, RESIDUAL=residual, **c)
    chunks = p.M // c["MC"]
    launches = [_prep_launch(q, k, rpe, rpe_extra, fq, fk, r, mx, p, lay),
                Launch("fwd", _fwd_kernel, fwd, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H, chunks),
                       tuned="fwd")]
    return launches, out, res, den, r, mx


def lisa_direct_fwd(q, k, v, rpe, rpe_extra, p: Problem):
    """out (B, H, N, Dv) in q's dtype; for the backward: res = out - round(out) (16-bit inputs; else empty),
    den' (B, H, N, M) fp32, the extended table r' and its log-max mx."""
    launches, out, res, den, r, mx = forward_launches(q, k, v, rpe.contiguous(),
                                                      None if rpe_extra is None else rpe_extra.contiguous(), p)
    for launch in launches:
        _run(launch)
    if out.dtype != q.dtype:          # (interpreter, bf16: see _store_dtype)
        out32, out = out, out.to(q.dtype)
        res = (out32 - out.float()).to(q.dtype)
    return out, res, den, r, mx


def _table_grad_launch(dr, drpe, drex, p: Problem, lay: Layout) -> Launch:
    """dr: (H * M, TXP), rows ``dr.stride(0)`` apart."""
    tab = _table_constexprs(lay)
    args = dict(DR=dr, DRPE=drpe, DREX=drex if drex is not None else drpe, ROW=dr.stride(0), HAS_REX=drex is not None,
                BLOCK=256, **{k: tab[k] for k in ("S1", "S2", "S3", "L1", "L2", "L3", "R1LO", "R1HI", "R0LO", "R0HI",
                                                  "R2LO", "R2HI", "CIRC")})
    return Launch("table_grad", _table_grad_kernel, args, (p.H * p.M,))


def backward_launches(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, p: Problem, deterministic: bool):
    """The backward's launches and the tensors they write: (launches, dq, dk, dv, drpe, drex, sc, gd, fq)."""
    B, H, N, Dk = q.shape
    lay = layout(p)
    c = _common(p, lay)
    chunks = p.M // c["MC"]
    fq, fk = _features(q, lay, p)
    sc = torch.empty(B * H, lay.NPAD, p.M, device=q.device, dtype=torch.float32)
    gd = torch.empty_like(sc)
    rd = torch.empty(H * p.M, 2, lay.TXP, device=q.device, dtype=torch.float32)
    sdt = _store_dtype(q.dtype)
    if chunks == 1:      # written in the input dtypes; several chunks write fp32 partial sums
        dq, dk = (torch.empty(B, H, N, Dk, device=q.device, dtype=sdt) for _ in range(2))
        sdc = 0
    else:
        dq, dk = (torch.empty(chunks, B, H, N, Dk, device=q.device, dtype=torch.float32) for _ in range(2))
        sdc = dq.stride(0)
    dv = torch.empty(B, H, N, p.Dv, device=q.device, dtype=sdt)
    drpe = torch.empty(rpe.shape, device=q.device, dtype=sdt)
    drex = None if rpe_extra is None else torch.empty(rpe_extra.shape, device=q.device, dtype=sdt)
    aix, nbx = token_index(lay, q.device)
    feature = 0 if p.feature_map == "elu1" else 1
    n_feat = (lay.NPAD // PREP_BLOCK_T) * B * H
    zblock = 1024
    n_zero = triton.cdiv(r.numel(), zblock)
    g = grad_out
    residual = res.numel() > 0
    prep = dict(Q=q, K=k, GO=g, O=out, RES=res if residual else out, DEN=den, MX=mx, FQ=fq, FK=fk, SC=sc, GD=gd, R=r, RD=rd,
                sqb=q.stride(0), sqh=q.stride(1), sqn=q.stride(2), sqd=q.stride(3),
                skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
                sgb=g.stride(0), sgh=g.stride(1), sgn=g.stride(2), sgd=g.stride(3),
                sob=out.stride(0), soh=out.stride(1), son=out.stride(2), sod=out.stride(3),
                H=H, N=N, DK=Dk, scale=p.scale, eps=p.eps, n_feat=n_feat, r_size=r.numel(),
                FEATURE=feature, M=p.M, G=c["G"], BLOCK_G=c["BLOCK_G"], NORMALIZE=p.normalize, RESIDUAL=residual,
                DKP=c["DKP"],
                NPAD=lay.NPAD, TXP=lay.TXP, BLOCK_T=PREP_BLOCK_T, ZBLOCK=zblock)
    strides_vg = dict(svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
                      sgb=g.stride(0), sgh=g.stride(1), sgn=g.stride(2), sgd=g.stride(3))
    dkv = dict(FQ=fq, FK=fk, V=v, GO=g, K=k, R=r, AIX=aix, NBX=nbx, SC=sc, GD=gd, DKB=dk, DV=dv, **strides_vg,
               skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
               sdc=sdc, sdb=dk.stride(-4), sdh=dk.stride(-3), sdn=dk.stride(-2),
               sdvb=dv.stride(0), sdvh=dv.stride(1), sdvn=dv.stride(2), sdvd=dv.stride(3),
               H=H, N=N, DK=Dk, FEATURE=feature, **c)
    dqa = dict(FQ=fq, FK=fk, V=v, GO=g, Q=q, RD=rd, AIX=aix, NBX=nbx, SC=sc, GD=gd, DQ=dq, **strides_vg,
               sqb=q.stride(0), sqh=q.stride(1), sqn=q.stride(2), sqd=q.stride(3),
               sdc=sdc, sdb=dq.stride(-4), sdh=dq.stride(-3), sdn=dq.stride(-2),
               H=H, N=N, DK=Dk, scale=p.scale, FEATURE=feature, TABLE_GRAD=not deterministic, **c)
    launches = [Launch("bwd_prep", _bwd_prep_kernel, prep, (n_feat + n_zero,)),
                Launch("bwd_dkv", _bwd_dkv_kernel, dkv, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H, chunks),
                       tuned="dkv"),
                Launch("bwd_dq", _bwd_dq_kernel, dqa, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H, chunks),
                       tuned="dq")]
    if not deterministic:
        launches.append(_table_grad_launch(rd[:, 1], drpe, drex, p, lay))
    return launches, dq, dk, dv, drpe, drex, sc, gd, fq, fk


def lisa_direct_bwd(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, p: Problem,
                    deterministic: bool = False):
    """dq, dk, dv (input dtypes), drpe (rpe's dtype) and drex (rpe_extra's, or None).

    The table gradient is accumulated with atomics (not bitwise reproducible); with ``deterministic=True``
    it is computed by :func:`_table_grad_deterministic` instead (fixed order)."""
    rpe = rpe.contiguous()
    rpe_extra = None if rpe_extra is None else rpe_extra.contiguous()
    launches, dq, dk, dv, drpe, drex, sc, gd, fq, fk = backward_launches(q, k, v, rpe, rpe_extra, out, res, den, r,
                                                                         mx, grad_out, p, deterministic)
    for launch in launches:
        _run(launch)
    if dq.dim() == 5:
        dq, dk = dq.sum(0), dk.sum(0)
    if deterministic:
        drpe, drex = _table_grad_deterministic(q, k, v, rpe, rpe_extra, mx, sc, gd, grad_out, p)
    dq, dk, dv, drpe = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drpe.to(rpe.dtype)   # (no-ops on a GPU)
    return dq, dk, dv, drpe, None if drex is None else drex.to(rpe_extra.dtype)


def kernel_launches(p: Problem, device="meta") -> List[Tuple[str, Launch]]:
    """Every launch of one forward and one backward of ``p`` (pass "fwd" or "bwd"), on placeholder tensors
    of ``device`` (default "meta": nothing is allocated): what ``benchmarks/kernel_report.py`` compiles."""
    B, H, N, Dk = p.B, p.H, p.N, p.Dk
    mk = functools.partial(torch.empty, device=device, dtype=p.dtype)
    q, k, v = mk(B, H, N, Dk), mk(B, H, N, Dk), mk(B, H, N, p.Dv)
    rpe = mk(p.H, p.M, *p.rpe_table_shape)
    rex = mk(p.H, p.M, 3) if p.num_extra else None
    fl, out, res, den, r, mx = forward_launches(q, k, v, rpe, rex, p)
    bl = backward_launches(q, k, v, rpe, rex, out, res, den, r, mx, mk(B, H, N, p.Dv), p, False)[0]
    return [("fwd", x) for x in fl] + [("bwd", x) for x in bl]


# ---------------------------------------------------------------- the deterministic table gradient

def _table_grad_deterministic(q, k, v, rpe, rpe_extra, mx, sc, gd, grad_out, p: Problem):
    """(drpe, drex) in a fixed order: the log-table gradient r' * sum over pairs of A_ij (g'_i . v_j + gd'_i)
    (g' = s g, the scaled units of the kernels) by the direct path's backward (blocked matrix products and
    anti-diagonal sums) for grid pairs and three small dense sums, O(N E D), for pairs with an extra token;
    then folded back onto rpe / rpe_extra by ``_table_grad_kernel`` (fixed order too)."""
    from .direct import direct_core_backward     # (import here: direct is not needed by the forward kernels)
    from .reference import feature_map
    B, H, N, _ = q.shape
    E, M, G = p.num_extra, p.M, p.Dv // p.M
    lay = layout(p)
    s = sc.reshape(B, H, lay.NPAD, M)[:, :, :N]
    gdn = gd.reshape(B, H, lay.NPAD, M)[:, :, :N]
    fq = feature_map(q.float() * p.scale, p.feature_map)
    fk = feature_map(k.float(), p.feature_map)
    vf = v.float()
    gn = grad_out.float().reshape(B, H, N, M, G) * s[..., None]
    logtab = full_log_table(rpe.float(), None if rpe_extra is None else rpe_extra.float(), p)   # (H, M, T + 3)
    shifted = logtab - mx.reshape(H, M, 1)
    T = lay.T
    table = tuple(2 * s_ - 1 for s_ in p.grid)
    grid_p = dataclasses.replace(p, N=N - E, num_extra=0, dtype=torch.float32)
    _, _, _, d_grid = direct_core_backward(fq[:, :, E:], fk[:, :, E:], vf[:, :, E:],
                                           shifted[..., :T].reshape(H, M, *table),
                                           gn[:, :, E:].reshape(B, H, N - E, p.Dv), gdn[:, :, E:], grid_p)
    dr = torch.zeros(H * M, lay.TXP, device=q.device, dtype=torch.float32)
    dr[:, :T] = d_grid.reshape(H * M, T)
    if E > 0 and rpe_extra is not None:
        vg = vf.reshape(B, H, N, M, G)

        def pair_sum(rows, cols, causal_mask=None):      # sum_b,i,j A_ij (gnum_i . v_j + gden_i), per (h, m)
            A = fq[:, :, rows] @ fk[:, :, cols].transpose(-1, -2)                                # (B, H, I, J)
            dW = torch.einsum("bhimg,bhjmg->bhmij", gn[:, :, rows], vg[:, :, cols]) \
                + gdn[:, :, rows].transpose(2, 3)[..., None]                                      # (B, H, M, I, J)
            prod = dW * A[:, :, None]
            if causal_mask is not None:
                prod = prod.masked_fill(causal_mask, 0.0)
            return prod.sum(dim=(0, 3, 4))                                                        # (H, M)

        x, g = slice(0, E), slice(E, N)
        d_extra = logtab.new_zeros(H, M, 3)
        if not p.causal:                                  # extra queries see grid keys only without causal
            d_extra[..., 0] = pair_sum(x, g)
        d_extra[..., 1] = pair_sum(g, x)
        mask = torch.ones(E, E, dtype=torch.bool, device=q.device).triu(1) if p.causal else None
        d_extra[..., 2] = pair_sum(x, x, mask)
        d_extra = (d_extra * torch.exp(shifted[..., T:])).reshape(H * M, 3)
        for kind, region in enumerate((lay.R0, lay.R1, lay.R2)):      # one entry per region carries its sum
            dr[:, region[0]] = d_extra[:, kind]
    sdt = _store_dtype(rpe.dtype)
    drpe = torch.empty(rpe.shape, device=q.device, dtype=sdt)
    drex = None if rpe_extra is None else torch.empty(rpe_extra.shape, device=q.device, dtype=sdt)
    _run(_table_grad_launch(dr, drpe, drex, p, lay))
    return drpe, drex


def full_log_table(rpe, rpe_extra, p: Problem) -> torch.Tensor:
    """(H, M, T + 3): the linear log table flattened, then the three extra-token log-weights."""
    table = linear_log_table(rpe, p).reshape(p.H, p.M, -1)
    extra = rpe_extra if rpe_extra is not None else table.new_zeros(p.H, p.M, 3)
    return torch.cat([table, extra.to(table.dtype)], dim=-1)
