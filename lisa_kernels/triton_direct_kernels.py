"""The Triton kernels of ``backend="triton"``: fused direct LiSA, tiled like FlashAttention (never an N x N
matrix in memory). :mod:`lisa_kernels.triton_direct` builds their inputs and launches them; each kernel's math
is in its docstring.

Shared notation. ``fq = phi(scale q)``, ``fk = phi(k)`` (zero-padded to (NPAD, DKP), in the dtype of the dots),
``A = fq fk^T``. RPE groups m = 0..M-1 are handled in chunks of MC groups per program; group m owns the value
columns ``v_m`` (G of them, padded to BLOCK_G). The weight of pair (i, j) in group m is
``r'_m[AIX_i + NBX_j]``, ``r'_m = exp(log r_m - max_m)`` on the extended table: the per-token indices of
:func:`lisa_kernels._triton_layout.layout` make AIX_i + NBX_j the linear-table entry of offset p_i - p_j for grid
pairs, and send pairs with an extra token to three constant regions (the entries 0, 1, 2 of ``rpe_extra``, docs/operator.md; causal included).
The gathers read *pair tables* (:func:`_pair_table`): one vector load brings the weights of two neighbouring
tokens for all MC groups of a chunk. Padded tokens index a finite entry and have zero features, so no tile
carries a mask; causal (1D) masking is the table's zero weights plus shorter loops.

Subtracting ``max_m`` keeps every weight in (0, 1]: it cancels in ``num / (den + eps)`` (eps is scaled by
e^-max too) and in every gradient below, so fp16/bf16 tiles cannot overflow. Dots: bf16 takes bf16 operands
with fp32 accumulation everywhere (MODE 0); fp16 takes fp16 for A and tf32 for every dot with a weight-side or
gradient-side operand (MODE 1), whose range fp16 lacks; fp32 takes tf32x3 (MODE 2, fp32-accurate).
With bf16 dots the weights that enter a dot as an operand (the forward's W_m, dK/dV's W'^T) are packed bf16x2
products round(round(A) round(r'_m)) (:func:`_wmul`): two pairs per instruction and no conversion per group, at
the cost of rounding A and r' to bf16 first (the forward reads a bf16 copy of its pair table, R16).
The constexpr ISA, set by the launcher from the GPU, picks what only some targets have: 0 NVIDIA (and the
interpreter): those products in inline PTX, tf32x3; 1 AMD gfx942 and 2 other AMD GPUs: the same products in
portable Triton, exact fp32 dots ("ieee") for MODE 2, and for MODE 1 too where the GPU has no tf32 (2) (:func:`_dot`).

Backward units (``normalize`` folded in): ``s = 1 / (den' + eps e^-max)``, ``g' = s g`` (the upstream gradient of
a group, scaled), ``gd = -s g . out``; then ``dW'_ij = g'_i . v_j + gd_i`` is the gradient of the weight
``W'_ij = A_ij r'_ij``, and with ``dA = sum_m dW'_m r'_m``:

    dV_m = W'_m^T g'_m        dfk = dA^T fq        dfq = dA fk        dlog r_m[e] = r'_m[e] sum_{(i,j) at e} A dW'_m

The table gradient is reduced without atomics, in a fixed order, by the kernels of
:mod:`lisa_kernels.triton_table_grad_kernels` (pairs that share an offset lie on token diagonals): the backward
is deterministic.
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
def _dot(a, b, acc, MODE: tl.constexpr, ISA: tl.constexpr):
    """acc + a @ b, fp32 accumulation: a cast to b's 16-bit dtype (MODE 0), or both in tf32 (1) or fp32-accurate
    (2): tf32x3 on NVIDIA (ISA 0), exact fp32 products on AMD ("ieee": CDNA's fp32 MFMA). AMD GPUs without tf32
    (ISA 2: all but gfx942) take ieee in MODE 1 too. MODE // 2 * 2 is the mode of the products of two feature
    operands."""
    if MODE == 0:
        return tl.dot(a.to(b.dtype), b, acc)
    elif MODE == 1 and ISA < 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif ISA == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")

@triton.jit
def _bf16_products(a, b, ISA: tl.constexpr):
    """round(round(a) round(b)) in bf16, elementwise (a fp32, b fp32 or bf16; round: to nearest even). NVIDIA
    (ISA 0): inline PTX, packed bf16x2 (cvt.rn.bf16x2.f32 of each operand pair, then fma.rn.bf16x2 with a -0
    addend: the product of two bf16 rounded once, signed zeros kept; unlike mul.bf16x2 (sm_90) it exists on
    sm_80). Elsewhere the same value portably: the product of two bf16 is exact in fp32 (above its subnormals),
    then rounded once."""
    if ISA == 0:
        if b.dtype == tl.bfloat16:
            return tl.inline_asm_elementwise("{ .reg .b32 t, z; cvt.rn.bf16x2.f32 t, $2, $1; mov.b32 z, 0x80008000; "
                                             "fma.rn.bf16x2 $0, t, $3, z; }",
                                             "=r,r,r,r", [a, b], dtype=tl.bfloat16, is_pure=True, pack=2)
        return tl.inline_asm_elementwise("{ .reg .b32 a, r, z; cvt.rn.bf16x2.f32 a, $2, $1; "
                                         "cvt.rn.bf16x2.f32 r, $4, $3; mov.b32 z, 0x80008000; "
                                         "fma.rn.bf16x2 $0, a, r, z; }", "=r,r,r,r,r", [a, b],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    return (a.to(tl.bfloat16).to(tl.float32) * b.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)

@triton.jit
def _split_groups(x, MCP: tl.constexpr):
    """(R, C, MCP) -> MCP tensors (R, C): the weights of the groups of a chunk from one vector gather."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if MCP == 1:
        x0 = tl.reshape(x, (R, C))
        return x0, x0, x0, x0
    elif MCP == 2:
        x0, x1 = tl.split(x)
        return x0, x1, x0, x1
    else:
        e, o = tl.split(tl.reshape(x, (R, C, 2, 2)))     # slots 0, 2 | 1, 3
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        return x0, x1, x2, x3

@triton.jit
def _load_pairs(tab, ridx, cidx, W: tl.constexpr, TRANS: tl.constexpr):
    """The W values at entry ridx_r + cidx_c of a pair table, (R, C, W). TRANS builds the pointers with the
    columns first, then transposes: Triton 3.6 and 3.8 lay a gather out in opposite orders, and the launcher
    picks the one whose per-iteration index is the cheap one."""
    if TRANS:
        ptr = (tab + cidx * W)[:, None, None] + (ridx * W)[None, :, None] + tl.arange(0, W)[None, None, :]
        return tl.permute(tl.load(ptr), (1, 0, 2))
    else:
        ptr = (tab + ridx * W)[:, None, None] + (cidx * W)[None, :, None] + tl.arange(0, W)[None, None, :]
        return tl.load(ptr)

@triton.jit
def _gather(tab, ridx, cidx, MCP: tl.constexpr, TRANS: tl.constexpr):
    """The chunk's weights of pairs (row r, column c) from a pair table (see _prep_kernel): cidx indexes pairs
    of columns, the load at entry ridx_r + cidx_c brings the 2 MCP weights of columns 2c and 2c + 1; returns
    (R, 2 C, MCP)."""
    R: tl.constexpr = ridx.shape[0]
    C: tl.constexpr = cidx.shape[0]
    x = _load_pairs(tab, ridx, cidx, 2 * MCP, TRANS)
    return tl.reshape(x, (R, 2 * C, MCP))

@triton.jit
def _gather16(tab, ridx, cidx, MCP: tl.constexpr, TRANS: tl.constexpr):
    """_gather from the layout of R16 (_pair_table: the two columns of a group side by side; bf16 with bf16 dots,
    and in fp32 where tests run that layout at other modes)."""
    R: tl.constexpr = ridx.shape[0]
    C: tl.constexpr = cidx.shape[0]
    x = _load_pairs(tab, ridx, cidx, 2 * MCP, TRANS)
    x = tl.permute(tl.reshape(x, (R, C, MCP, 2)), (0, 1, 3, 2))
    return tl.reshape(x, (R, 2 * C, MCP))

@triton.jit
def _lookup(tab, idx, MCP: tl.constexpr):
    """r' of the chunk's MCP groups at entries idx (R, C): (R, C, MCP), from slot 0 of a pair table."""
    return tl.load((tab + idx * (2 * MCP))[:, :, None] + tl.arange(0, MCP)[None, None, :])

@triton.jit
def _tile(base, rows, W: tl.constexpr):
    """A (len(rows), W) tile of a row-major buffer of row length W."""
    return tl.load(base + rows[:, None] * W + tl.arange(0, W)[None, :])

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
def _value_rows(V, VP, b, h, bh, svb, svh, svn, svd, offs, N, M: tl.constexpr, G: tl.constexpr,
                BLOCK_G: tl.constexpr, NPAD: tl.constexpr, ONES: tl.constexpr):
    """VP[bh, offs, m, :] = v of group m, zero-padded to BLOCK_G columns and NPAD rows (mask-free tiles); with
    ONES, column G holds 1 (the forward's row sums ride on the value dot)."""
    offs_g = tl.arange(0, BLOCK_G)
    mask = (offs < N)[:, None] & (offs_g < G)[None, :]
    for gm in tl.static_range(M):
        x = tl.load(V + b * svb + h * svh + offs[:, None] * svn + (gm * G + offs_g)[None, :] * svd, mask=mask,
                    other=0.0)
        if ONES:     # (in fp32: the interpreter has no bf16 scalar constants)
            x = tl.where(offs_g[None, :] == G, 1.0, x.to(tl.float32))
        tl.store(VP + ((bh * NPAD + offs) * M + gm)[:, None] * BLOCK_G + offs_g[None, :], x.to(VP.dtype.element_ty))

@triton.jit
def _token_block(pid, H, NPAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """(b, h, bh, offs): the BLOCK_T tokens of a preparation program ``pid``. (Computed from scalars only, apart
    from the calls that write: torch's analysis of what a kernel writes, which Inductor reads, takes a helper's
    results to derive from all of its arguments.)"""
    NTB: tl.constexpr = NPAD // BLOCK_T
    bh = pid // NTB
    return bh // H, bh % H, bh, (pid % NTB) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _token_rows(b, h, bh, offs, Q, K, V, FQ, FK, VP, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                N, DK, scale, FEATURE: tl.constexpr, M: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                DKP: tl.constexpr, NPAD: tl.constexpr, ONES: tl.constexpr = False):
    """Features of q and k and the padded values for the tokens ``offs`` of (b, h)."""
    _feature_rows(Q, FQ, b, h, bh, sqb, sqh, sqn, sqd, offs, N, DK, scale, FEATURE, DKP, NPAD)
    _feature_rows(K, FK, b, h, bh, skb, skh, skn, skd, offs, N, DK, 1.0, FEATURE, DKP, NPAD)
    _value_rows(V, VP, b, h, bh, svb, svh, svn, svd, offs, N, M, G, BLOCK_G, NPAD, ONES)

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
def _prep_kernel(Q, K, V, FQ, FK, VP, RPE, REX, R, R16, MX, DELTAS,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 H, N, DK, scale, n_feat,
                 FEATURE: tl.constexpr, HAS_REX: tl.constexpr, M: tl.constexpr, MC: tl.constexpr,
                 MCP: tl.constexpr, ND: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, TAB16: tl.constexpr,
                 ONES: tl.constexpr,
                 S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr,
                 L3: tl.constexpr, E: tl.constexpr, T: tl.constexpr, TX: tl.constexpr, TXP: tl.constexpr,
                 R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                 R2LO: tl.constexpr, R2HI: tl.constexpr, R2MID: tl.constexpr,
                 CIRC: tl.constexpr, CAUSAL: tl.constexpr,
                 DKP: tl.constexpr, NPAD: tl.constexpr, BLOCK_T: tl.constexpr, TBLOCK: tl.constexpr):
    """Programs [0, n_feat): fq, fk and the padded values of BLOCK_T tokens of one (b, h). Then one program per
    (h, chunk): max_m = max_t log r_m[t] and the chunk's pair table for pairs of neighbouring keys (_pair_table;
    the padding slots of MCP > MC hold 0), with TAB16 also its copy for the forward (R16). ONES: see _fwd_kernel."""
    pid = tl.program_id(0)
    if pid < n_feat:
        b, h, bh, offs = _token_block(pid, H, NPAD, BLOCK_T)
        _token_rows(b, h, bh, offs, Q, K, V, FQ, FK, VP, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    N, DK, scale, FEATURE, M, G, BLOCK_G, DKP, NPAD, ONES)
    else:
        _pair_table(pid - n_feat, RPE, REX, R, R16, TAB16, MX, DELTAS, True, HAS_REX, M, MC, MCP, ND, S1, S2, S3,
                    L1, L2, L3, E, T, TX, TXP, R1LO, R1HI, R0LO, R0HI, R2LO, R2HI, R2MID, CIRC, CAUSAL, TBLOCK)

@triton.jit
def _pair_table(hc, RPE, REX, R, R16, TAB16: tl.constexpr, MX, DELTAS, WRITE_MAX: tl.constexpr, HAS_REX: tl.constexpr,
                M: tl.constexpr,
                MC: tl.constexpr, MCP: tl.constexpr, ND: tl.constexpr,
                S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr,
                L3: tl.constexpr, E: tl.constexpr, T: tl.constexpr, TX: tl.constexpr, TXP: tl.constexpr,
                R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                R2LO: tl.constexpr, R2HI: tl.constexpr, R2MID: tl.constexpr,
                CIRC: tl.constexpr, CAUSAL: tl.constexpr, TBLOCK: tl.constexpr):
    """The pair table of (head, chunk) hc: for each delta d_c of DELTAS (the steps between the table entries of
    neighbouring tokens that the kernels read in pairs) and entry t, R[hc, c, t, s, m] = r'_m[t + s d_c], s = 0, 1,
    with r'_m = exp(log r_m - max_m) (0 off the table). One load at entry t of copy c then brings the weights of
    two neighbouring tokens for every group of the chunk. With WRITE_MAX it computes max_m (MX) first. With TAB16
    it writes the table in bf16 to R16 too, the two tokens of a group side by side (R16[hc, c, t, m, s]): one
    32-bit word is a bf16x2 operand of the forward's packed products (_wmul)."""
    NCH: tl.constexpr = M // MC
    h = hc // NCH
    W: tl.constexpr = 2 * MCP
    for j in tl.static_range(MCP):
        out = R + hc * (ND * TXP * W) + j
        out16 = R16 + hc * (ND * TXP * W) + 2 * j
        if j < MC:
            hm = h * M + (hc % NCH) * MC + j
            rpe_hm = RPE + hm * (L1 * L2 * L3)
            rex_hm = REX + hm * 3
            if WRITE_MAX:
                mx = tl.full((TBLOCK,), float("-inf"), tl.float32)
                for t0 in range(0, TXP, TBLOCK):
                    t = t0 + tl.arange(0, TBLOCK)
                    mx = tl.maximum(mx, _table_values(rpe_hm, rex_hm, t, HAS_REX, S1, S2, S3, L1, L2, L3, E, T, TX,
                                                      R1LO, R1HI, R0LO, R0HI, R2LO, R2HI, R2MID, CIRC, CAUSAL))
                m = tl.max(mx, 0)
                tl.store(MX + hm, m)
            else:
                m = tl.load(MX + hm)
            for c in range(ND):
                d = tl.load(DELTAS + c)
                for t0 in range(0, TXP, TBLOCK):
                    t = t0 + tl.arange(0, TBLOCK)
                    for s in tl.static_range(2):
                        ts = t + s * d
                        ts = tl.where((ts >= 0) & (ts < TXP), ts, TX)       # (entry TX: weight 0, no load)
                        val = _table_values(rpe_hm, rex_hm, ts, HAS_REX, S1, S2, S3, L1, L2, L3, E, T, TX,
                                            R1LO, R1HI, R0LO, R0HI, R2LO, R2HI, R2MID, CIRC, CAUSAL)
                        rv = tl.exp(val - m)
                        tl.store(out + (c * TXP + t) * W + s * MCP, rv)
                        if TAB16:
                            tl.store(out16 + (c * TXP + t) * W + s, rv.to(R16.dtype.element_ty))
        else:
            for c in range(ND):
                for t0 in range(0, TXP, TBLOCK):
                    t = t0 + tl.arange(0, TBLOCK)
                    for s in tl.static_range(2):
                        tl.store(out + (c * TXP + t) * W + s * MCP, tl.zeros((TBLOCK,), tl.float32))
                        if TAB16:
                            tl.store(out16 + (c * TXP + t) * W + s, tl.zeros((TBLOCK,), R16.dtype.element_ty))

# ------------------------------------------------------------ forward

@triton.jit
def _wmul(A, r, MODE: tl.constexpr, ISA: tl.constexpr):
    """The weights W = A r of a group in the dtype of the dots. bf16 dots (MODE 0; r in bf16): round(round(A) r)
    (_bf16_products; on NVIDIA two pairs per instruction and no conversion: ptxas computes round(A) once for all
    groups); else the fp32 product."""
    if MODE == 0:
        return _bf16_products(A, r, ISA)
    else:
        return A * r

@triton.jit
def _fwd_group(acc, den, A, r, vt, ones, MODE: tl.constexpr, ISA: tl.constexpr, ONES: tl.constexpr):
    W = _wmul(A, r, MODE, ISA)
    if ONES:         # (the row sums come with the values: vt's column G is 1)
        return _dot(W, vt, acc, MODE, ISA), den
    return _dot(W, vt, acc, MODE, ISA), _dot(W, ones, den, MODE, ISA)

@triton.jit
def _fwd_store(acc, den, gm, Out, Res, Den, MX, b, h, bh, N, M: tl.constexpr, sob, soh, son, sod, eps, offs_m,
               G: tl.constexpr, BLOCK_G: tl.constexpr, NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr,
               ONES: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    if ONES:
        d = tl.sum(tl.where(offs_g[None, :] == G, acc, 0.0), 1)
    else:
        d = tl.max(den, 1)               # (the 16 columns of the ones-dot are equal)
    mx = tl.load(MX + h * M + gm)
    if NORMALIZE:
        acc = acc * (1.0 / (d + eps * tl.exp(-mx)))[:, None]
    else:
        acc = acc * tl.exp(mx)
    row = offs_m < N
    mask = row[:, None] & (offs_g < G)[None, :]
    o = acc.to(Out.dtype.element_ty)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + (gm * G + offs_g)[None, :] * sod, o, mask=mask)
    if RESIDUAL:   # out - round(out), so that the backward's g . out is as exact as the fp32 accumulators
        tl.store(Res + ((bh * N + offs_m) * M + gm)[:, None] * G + offs_g[None, :],
                 (acc - o.to(tl.float32)).to(Res.dtype.element_ty), mask=mask)
    tl.store(Den + (bh * N + offs_m) * M + gm, d, mask=row)

@triton.jit
def _fwd_kernel(FQ, FK, VP, R, R16, AIX, NB2, MX, Out, Res, Den,
                sob, soh, son, sod, H, N, eps,
                M: tl.constexpr, MC: tl.constexpr, MCP: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr, NDK: tl.constexpr,
                CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, MODE: tl.constexpr, RESIDUAL: tl.constexpr,
                TAB16: tl.constexpr, ONES: tl.constexpr, GATHER_T: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, ISA: tl.constexpr):
    """One program per (query tile, batch * head, group chunk); for every key tile

        A = fq fk^T                      one tensor-core dot for all groups of the chunk
        r = R[AIX_i + NB2_j]             one vector load for 2 keys and all groups (pair table; with TAB16, R16)
        W_m = A r_m,  acc_m += W_m v_m,  den_m += W_m 1       (the row sums ride on a 16-column ones-dot, or
                                                               with ONES on v_m's column G, which holds 1)
        out_m = acc_m / (den_m + eps e^-max_m)                (acc_m e^max_m if not normalize)"""
    pid_m, bh, mc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    NCH: tl.constexpr = M // MC
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    fq = _tile(FQ + bh * NPAD * DKP, offs_m, DKP)
    tab = R + (h * NCH + mc) * (NDK * TXP * 2 * MCP)
    tab16 = R16 + (h * NCH + mc) * (NDK * TXP * 2 * MCP)
    ai = tl.load(AIX + offs_m)
    vbase = VP + (bh * NPAD * M + mc * MC) * BLOCK_G
    ones = tl.full((BLOCK_N, 16), 1.0, FQ.dtype.element_ty)
    acc0 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_G), tl.float32)
    den0 = tl.zeros((BLOCK_M, 16), tl.float32)
    den1 = tl.zeros((BLOCK_M, 16), tl.float32)
    den2 = tl.zeros((BLOCK_M, 16), tl.float32)
    den3 = tl.zeros((BLOCK_M, 16), tl.float32)
    hi = N
    if CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
    tl.assume(hi > 0)     # (N >= 1; without it ptxas serialized this loop's wgmma: kernel_report.py flags that)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        fk = _tile(FK + bh * NPAD * DKP, offs_n, DKP)
        A = _dot(fq, tl.trans(fk), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), MODE // 2 * 2, ISA)
        nb2 = tl.load(NB2 + start_n // 2 + tl.arange(0, BLOCK_N // 2))
        if TAB16:
            r0, r1, r2, r3 = _split_groups(_gather16(tab16, ai, nb2, MCP, GATHER_T), MCP)
        else:
            r0, r1, r2, r3 = _split_groups(_gather(tab, ai, nb2, MCP, GATHER_T), MCP)
        acc0, den0 = _fwd_group(acc0, den0, A, r0, _tile(vbase, offs_n * M, BLOCK_G), ones, MODE, ISA, ONES)
        if MC > 1:
            acc1, den1 = _fwd_group(acc1, den1, A, r1, _tile(vbase + BLOCK_G, offs_n * M, BLOCK_G), ones, MODE,
                                    ISA, ONES)
        if MC > 2:
            acc2, den2 = _fwd_group(acc2, den2, A, r2, _tile(vbase + 2 * BLOCK_G, offs_n * M, BLOCK_G), ones, MODE,
                                    ISA, ONES)
        if MC > 3:
            acc3, den3 = _fwd_group(acc3, den3, A, r3, _tile(vbase + 3 * BLOCK_G, offs_n * M, BLOCK_G), ones, MODE,
                                    ISA, ONES)
    m0 = mc * MC
    _fwd_store(acc0, den0, m0, Out, Res, Den, MX, b, h, bh, N, M, sob, soh, son, sod, eps, offs_m, G, BLOCK_G,
               NORMALIZE, RESIDUAL, ONES)
    if MC > 1:
        _fwd_store(acc1, den1, m0 + 1, Out, Res, Den, MX, b, h, bh, N, M, sob, soh, son, sod, eps, offs_m, G,
                   BLOCK_G, NORMALIZE, RESIDUAL, ONES)
    if MC > 2:
        _fwd_store(acc2, den2, m0 + 2, Out, Res, Den, MX, b, h, bh, N, M, sob, soh, son, sod, eps, offs_m, G,
                   BLOCK_G, NORMALIZE, RESIDUAL, ONES)
    if MC > 3:
        _fwd_store(acc3, den3, m0 + 3, Out, Res, Den, MX, b, h, bh, N, M, sob, soh, son, sod, eps, offs_m, G,
                   BLOCK_G, NORMALIZE, RESIDUAL, ONES)

# ------------------------------------------------------------ backward

@triton.jit
def _bwd_prep_kernel(Q, K, V, GO, O, RES, DEN, MX, FQ, FK, VP, GP, GDX, GD, RPE, REX, RQ, DELTAS,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
                     sob, soh, son, sod, H, N, DK, scale, eps, n_feat,
                     FEATURE: tl.constexpr, HAS_REX: tl.constexpr, M: tl.constexpr, MC: tl.constexpr,
                     MCP: tl.constexpr, ND: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                     NORMALIZE: tl.constexpr, RESIDUAL: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr,
                     S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr,
                     L3: tl.constexpr, E: tl.constexpr, T: tl.constexpr, TX: tl.constexpr, TXP: tl.constexpr,
                     R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                     R2LO: tl.constexpr, R2HI: tl.constexpr, R2MID: tl.constexpr,
                     CIRC: tl.constexpr, CAUSAL: tl.constexpr, TBLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Programs [0, n_feat): for BLOCK_T tokens of one (b, h), fq, fk, the padded values and per group
    s = 1/(den' + eps e^-max) (e^max if not normalize), gd = -s g . out (0), g' = s g (GP), gd (GD, fp32) and
    gd in column 0 of a 16-wide block (GDX: the operand that adds gd to a dot through a ones row). Then one
    program per (head, chunk) builds the pair table of query pairs (RQ, for the dK/dV kernel)."""
    pid = tl.program_id(0)
    if pid < n_feat:
        b, h, bh, offs = _token_block(pid, H, NPAD, BLOCK_T)
        _token_rows(b, h, bh, offs, Q, K, V, FQ, FK, VP, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    N, DK, scale, FEATURE, M, G, BLOCK_G, DKP, NPAD)
        row = offs < N
        offs_g = tl.arange(0, BLOCK_G)
        mask = row[:, None] & (offs_g < G)[None, :]
        c16 = tl.arange(0, 16)
        for gm in tl.static_range(M):
            mx = tl.load(MX + h * M + gm)
            g = tl.load(GO + b * sgb + h * sgh + offs[:, None] * sgn + (gm * G + offs_g)[None, :] * sgd,
                        mask=mask, other=0.0).to(tl.float32)
            if NORMALIZE:
                den = tl.load(DEN + (bh * N + offs) * M + gm, mask=row, other=1.0)
                s = 1.0 / (den + eps * tl.exp(-mx))
                o = tl.load(O + b * sob + h * soh + offs[:, None] * son + (gm * G + offs_g)[None, :] * sod,
                            mask=mask, other=0.0).to(tl.float32)
                if RESIDUAL:
                    o += tl.load(RES + ((bh * N + offs) * M + gm)[:, None] * G + offs_g[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
                gd = tl.where(row, -s * tl.sum(g * o, 1), 0.0)
            else:
                s = tl.zeros((BLOCK_T,), tl.float32) + tl.exp(mx)
                gd = tl.zeros((BLOCK_T,), tl.float32)
            slot = (bh * NPAD + offs) * M + gm
            tl.store(GP + slot[:, None] * BLOCK_G + offs_g[None, :], (g * s[:, None]).to(GP.dtype.element_ty))
            tl.store(GDX + slot[:, None] * 16 + c16[None, :],
                     tl.where(c16[None, :] == 0, gd[:, None], 0.0).to(GDX.dtype.element_ty))
            tl.store(GD + slot, gd)
    else:
        _pair_table(pid - n_feat, RPE, REX, RQ, RQ, False, MX, DELTAS, False, HAS_REX, M, MC, MCP, ND, S1, S2, S3,
                    L1, L2, L3, E, T, TX, TXP, R1LO, R1HI, R0LO, R0HI, R2LO, R2HI, R2MID, CIRC, CAUSAL, TBLOCK)

@triton.jit
def _dW(gp, vt, gdx, onesT, MODE: tl.constexpr, ISA: tl.constexpr, GD_DOT: tl.constexpr):
    """dW' = g' v^T + gd 1^T for a (rows of g', columns of v) tile. With GD_DOT gd rides on a second 16-deep dot
    through the ones row (no instruction per pair; bf16 dots, where the loop is issue-bound: the launcher's
    _gd_dot); else gd (column 0 of gdx) is added, one add per pair and no tensor work."""
    zero = tl.zeros((gp.shape[0], vt.shape[0]), tl.float32)
    if GD_DOT:
        return _dot(gp, tl.trans(vt), _dot(gdx, onesT, zero, MODE, ISA), MODE, ISA)
    return _dot(gp, tl.trans(vt), zero, MODE, ISA) + tl.sum(gdx.to(tl.float32), 1)[:, None]

@triton.jit
def _dkv_group(dv, dAt, At, rt, gp, gdx, vt, onesx, MODE: tl.constexpr, ISA: tl.constexpr, GD_DOT: tl.constexpr,
               PACKED: tl.constexpr):
    if PACKED:       # (bf16 dots, several groups: as _wmul, round(round(A^T) round(r^T)))
        Wt = _bf16_products(At, rt, ISA)
    else:
        Wt = At * rt
    dv = _dot(Wt, gp, dv, MODE, ISA)
    if GD_DOT:
        Dt = _dot(vt, tl.trans(gp), _dot(onesx, tl.trans(gdx), tl.zeros(At.shape, tl.float32), MODE, ISA), MODE, ISA)
    else:
        Dt = _dot(vt, tl.trans(gp), tl.zeros(At.shape, tl.float32), MODE, ISA) + tl.sum(gdx.to(tl.float32), 1)[None, :]
    return dv, dAt + Dt * rt

@triton.jit
def _store_dv(dv, DV, b, h, gm, sdvb, sdvh, sdvn, sdvd, offs_n, N, G: tl.constexpr, BLOCK_G: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + (gm * G + offs_g)[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_g < G)[None, :])

@triton.jit
def _bwd_dkv_kernel(FQ, FK, VP, GP, GDX, K, RQ, AI2, NBX, DKB, DV,
                    skb, skh, skn, skd, sdc, sdb, sdh, sdn, sdvb, sdvh, sdvn, sdvd, H, N, DK,
                    FEATURE: tl.constexpr, M: tl.constexpr, MC: tl.constexpr, MCP: tl.constexpr, G: tl.constexpr,
                    BLOCK_G: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr,
                    NDQ: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr, GD_DOT: tl.constexpr,
                    GATHER_T: tl.constexpr, ISA: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """dK and dV of one key tile (all groups of a chunk), looping over query tiles:

        A^T = fk fq^T,  r^T = RQ[NBX + AI2] (one load for 2 queries, all groups: a pair table of query pairs)
        per group:  W'^T = A^T r_m^T,  dV_m += W'^T g'_m,  dW'^T = v_m g'_m^T + 1 gd_m^T,  dA^T += dW'^T r_m^T
        dfk += dA^T fq;   dK = dfk phi'(k)"""
    pid_n, bh, mc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    NCH: tl.constexpr = M // MC
    PACKED: tl.constexpr = MODE == 0 and MC > 1     # (W'^T by _dkv_group; one group: the same count either way)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    fk = _tile(FK + bh * NPAD * DKP, offs_n, DKP)
    tab = RQ + (h * NCH + mc) * (NDQ * TXP * 2 * MCP)
    nb = tl.load(NBX + offs_n)
    slot0 = bh * NPAD * M + mc * MC
    vbase = VP + slot0 * BLOCK_G
    gbase = GP + slot0 * BLOCK_G
    xbase = GDX + slot0 * 16
    v0 = _tile(vbase, offs_n * M, BLOCK_G)
    v1, v2, v3 = v0, v0, v0
    if MC > 1:
        v1 = _tile(vbase + BLOCK_G, offs_n * M, BLOCK_G)
    if MC > 2:
        v2 = _tile(vbase + 2 * BLOCK_G, offs_n * M, BLOCK_G)
    if MC > 3:
        v3 = _tile(vbase + 3 * BLOCK_G, offs_n * M, BLOCK_G)
    onesx = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, tl.zeros((BLOCK_N, 16), tl.float32)).to(GP.dtype.element_ty)
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
        fq = _tile(FQ + bh * NPAD * DKP, offs_m, DKP)
        At = _dot(fk, tl.trans(fq), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), MODE // 2 * 2, ISA)
        ai2 = tl.load(AI2 + start_m // 2 + tl.arange(0, BLOCK_M // 2))
        r0, r1, r2, r3 = _split_groups(_gather(tab, nb, ai2, MCP, GATHER_T), MCP)
        dv0, dAt = _dkv_group(dv0, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), At, r0,
                              _tile(gbase, offs_m * M, BLOCK_G), _tile(xbase, offs_m * M, 16), v0, onesx, MODE, ISA,
                              GD_DOT, PACKED)
        if MC > 1:
            dv1, dAt = _dkv_group(dv1, dAt, At, r1, _tile(gbase + BLOCK_G, offs_m * M, BLOCK_G),
                                  _tile(xbase + 16, offs_m * M, 16), v1, onesx, MODE, ISA, GD_DOT, PACKED)
        if MC > 2:
            dv2, dAt = _dkv_group(dv2, dAt, At, r2, _tile(gbase + 2 * BLOCK_G, offs_m * M, BLOCK_G),
                                  _tile(xbase + 32, offs_m * M, 16), v2, onesx, MODE, ISA, GD_DOT, PACKED)
        if MC > 3:
            dv3, dAt = _dkv_group(dv3, dAt, At, r3, _tile(gbase + 3 * BLOCK_G, offs_m * M, BLOCK_G),
                                  _tile(xbase + 48, offs_m * M, 16), v3, onesx, MODE, ISA, GD_DOT, PACKED)
        dfk = _dot(dAt, fq, dfk, MODE, ISA)
    offs_d = tl.arange(0, DKP)
    mask = (offs_n < N)[:, None] & (offs_d < DK)[None, :]
    kk = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DKB + mc * sdc + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :],
             (dfk * _dphi(kk, FEATURE)).to(DKB.dtype.element_ty), mask=mask)
    m0 = mc * MC
    _store_dv(dv0, DV, b, h, m0, sdvb, sdvh, sdvn, sdvd, offs_n, N, G, BLOCK_G)
    if MC > 1:
        _store_dv(dv1, DV, b, h, m0 + 1, sdvb, sdvh, sdvn, sdvd, offs_n, N, G, BLOCK_G)
    if MC > 2:
        _store_dv(dv2, DV, b, h, m0 + 2, sdvb, sdvh, sdvn, sdvd, offs_n, N, G, BLOCK_G)
    if MC > 3:
        _store_dv(dv3, DV, b, h, m0 + 3, sdvb, sdvh, sdvn, sdvd, offs_n, N, G, BLOCK_G)

@triton.jit
def _parallel_exact(dfq, f, par):
    """dfq with its component along f (per row) replaced by the one whose dot with f is par."""
    n2 = tl.sum(f * f, 1)
    coef = (par - tl.sum(f * dfq, 1)) / tl.where(n2 > 0, n2, 1.0)
    return dfq + coef[:, None] * f

@triton.jit
def _eps_gd(GD, MX, row, gm, h, M: tl.constexpr, eps):
    return tl.load(GD + row + gm) * (eps * tl.exp(-tl.load(MX + h * M + gm)))

@triton.jit
def _bwd_dq_kernel(FQ, FK, VP, GP, GDX, GD, MX, Q, R, AIX, NB2, DQ,
                   sqb, sqh, sqn, sqd, sdc, sdb, sdh, sdn, H, N, DK, scale, eps,
                   FEATURE: tl.constexpr, M: tl.constexpr, MC: tl.constexpr, MCP: tl.constexpr, G: tl.constexpr,
                   BLOCK_G: tl.constexpr, DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr,
                   NDK: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr, GD_DOT: tl.constexpr,
                   NORMALIZE: tl.constexpr,
                   GATHER_T: tl.constexpr, ISA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile (all groups of a chunk), looping over key tiles; A itself is not needed:

        per group:  dW' = g'_m v_m^T + gd_m 1^T,   dA += dW' r_m      (r: one load for 2 keys, all groups)
        dfq += dA fk;   dQ = dfq phi'(scale q) scale

    With normalize a query's output does not change when its features are scaled, so the component of dfq along
    fq is exactly fq . dfq = -sum_m gd_m eps e^-max_m (tiny); summed pair by pair it is a cancellation of O(1)
    terms. It is set to that value (for Dk = 1 it is all of dfq)."""
    pid_m, bh, mc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    NCH: tl.constexpr = M // MC
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tab = R + (h * NCH + mc) * (NDK * TXP * 2 * MCP)
    ai = tl.load(AIX + offs_m)
    slot0 = bh * NPAD * M + mc * MC
    vbase = VP + slot0 * BLOCK_G
    gbase = GP + slot0 * BLOCK_G
    xbase = GDX + slot0 * 16
    g0 = _tile(gbase, offs_m * M, BLOCK_G)
    x0 = _tile(xbase, offs_m * M, 16)
    g1, g2, g3, x1, x2, x3 = g0, g0, g0, x0, x0, x0
    if MC > 1:
        g1 = _tile(gbase + BLOCK_G, offs_m * M, BLOCK_G)
        x1 = _tile(xbase + 16, offs_m * M, 16)
    if MC > 2:
        g2 = _tile(gbase + 2 * BLOCK_G, offs_m * M, BLOCK_G)
        x2 = _tile(xbase + 32, offs_m * M, 16)
    if MC > 3:
        g3 = _tile(gbase + 3 * BLOCK_G, offs_m * M, BLOCK_G)
        x3 = _tile(xbase + 48, offs_m * M, 16)
    onesT = tl.where(tl.arange(0, 16)[:, None] == 0, 1.0, tl.zeros((16, BLOCK_N), tl.float32)).to(GP.dtype.element_ty)
    dfq = tl.zeros((BLOCK_M, DKP), tl.float32)
    hi = N
    if CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
    tl.assume(hi > 0)     # (as in _fwd_kernel: no serialized wgmma)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        fk = _tile(FK + bh * NPAD * DKP, offs_n, DKP)
        nb2 = tl.load(NB2 + start_n // 2 + tl.arange(0, BLOCK_N // 2))
        r0, r1, r2, r3 = _split_groups(_gather(tab, ai, nb2, MCP, GATHER_T), MCP)
        dA = _dW(g0, _tile(vbase, offs_n * M, BLOCK_G), x0, onesT, MODE, ISA, GD_DOT) * r0
        if MC > 1:
            dA += _dW(g1, _tile(vbase + BLOCK_G, offs_n * M, BLOCK_G), x1, onesT, MODE, ISA, GD_DOT) * r1
        if MC > 2:
            dA += _dW(g2, _tile(vbase + 2 * BLOCK_G, offs_n * M, BLOCK_G), x2, onesT, MODE, ISA, GD_DOT) * r2
        if MC > 3:
            dA += _dW(g3, _tile(vbase + 3 * BLOCK_G, offs_n * M, BLOCK_G), x3, onesT, MODE, ISA, GD_DOT) * r3
        dfq = _dot(dA, fk, dfq, MODE, ISA)
    if NORMALIZE:
        row = (bh * NPAD + offs_m) * M + mc * MC
        par = -_eps_gd(GD, MX, row, mc * MC, h, M, eps)
        if MC > 1:
            par -= _eps_gd(GD, MX, row, mc * MC + 1, h, M, eps)
        if MC > 2:
            par -= _eps_gd(GD, MX, row, mc * MC + 2, h, M, eps)
        if MC > 3:
            par -= _eps_gd(GD, MX, row, mc * MC + 3, h, M, eps)
        dfq = _parallel_exact(dfq, _tile(FQ + bh * NPAD * DKP, offs_m, DKP).to(tl.float32), par)
    offs_d = tl.arange(0, DKP)
    mask = (offs_m < N)[:, None] & (offs_d < DK)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask,
                other=0.0).to(tl.float32)
    dq = dfq * _dphi(q * scale, FEATURE) * scale
    tl.store(DQ + mc * sdc + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)
