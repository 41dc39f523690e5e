"""The Triton kernels of ``backend="triton"``: fused direct LiSA, tiled like FlashAttention (never an N x N
matrix in memory). :mod:`lisa_kernels.triton_direct` builds their inputs and launches them.

Forward, two launches:

1. ``_prep_kernel``: the features ``fq = phi(scale q)``, ``fk = phi(k)`` once per token, in the dtype the dots
   take, zero-padded to (NPAD, DKP); and per (head, group) the *extended weight table*
   ``r' = exp(log r - max)`` (``max`` = the largest log-weight of that (head, group), kept in ``mx``).
2. ``_fwd_kernel``: one program per (query tile, batch * head, group chunk); for every key tile

       A    = fq_tile fk_tile^T                          one tensor-core dot for all groups of the chunk
       W_m  = A * r'_m[AIX_i + NBX_j]                    one add and one gathered load per pair, no masks
       acc_m += W_m V_m,   den_m += rowsum(W_m)
       out_m = acc_m / (den_m + eps e^-max_m)            (acc_m e^max_m if not normalize)

The pair index is separable: per token ``AIX`` (queries) and ``NBX`` (keys, negated) from :func:`lisa_kernels.triton_direct.layout`,
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
(:func:`lisa_kernels.triton_direct._table_grad_deterministic`). Grids are handled as 3D: (S,) is (1, 1, S) and (S1, S2) is (1, S1, S2).
The grid and the number of extra tokens are compile-time constants (one compiled variant per grid).
"""


import triton
import triton.language as tl


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
def _parallel_exact(dfq, f, par):
    """dfq with its component along f (per row) replaced by par / |f|: f . result = par."""
    n2 = tl.sum(f * f, 1)
    coef = (par - tl.sum(f * dfq, 1)) / tl.where(n2 > 0, n2, 1.0)
    return dfq + coef[:, None] * f

@triton.jit
def _bwd_dq_kernel(FQ, FK, V, GO, Q, RD, AIX, NBX, SC, GD, MX, DQ,
                   svb, svh, svn, svd, sgb, sgh, sgn, sgd, sqb, sqh, sqn, sqd, sdc, sdb, sdh, sdn,
                   H, N, DK, scale, eps,
                   FEATURE: tl.constexpr, M: tl.constexpr, MC: tl.constexpr, G: tl.constexpr,
                   BLOCK_G: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr,
                   CAUSAL: tl.constexpr, TABLE_GRAD: tl.constexpr, MODE: tl.constexpr, NORMALIZE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile (all groups of a chunk) and the table gradient dlog r[idx] += dA_m A.

    With ``normalize`` the output of a query does not change when its features are scaled, so the component
    of dfq along fq is exactly fq . dfq = -sum_m gd_m eps e^-max_m (tiny); summed pair by pair it is a
    cancellation of O(1) terms. It is set to its exact value (for Dk = 1 it is all of dfq)."""
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
    if NORMALIZE:
        par = -gd0 * (eps * tl.exp(-tl.load(MX + h * M + m0)))
        if MC > 1:
            par -= gd1 * (eps * tl.exp(-tl.load(MX + h * M + m0 + 1)))
        if MC > 2:
            par -= gd2 * (eps * tl.exp(-tl.load(MX + h * M + m0 + 2)))
        if MC > 3:
            par -= gd3 * (eps * tl.exp(-tl.load(MX + h * M + m0 + 3)))
        dfq = _parallel_exact(dfq, fq.to(tl.float32), par)
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
