"""The Triton kernels of ``backend="triton"``'s table gradient (d rpe, d rpe_extra), without atomics and in a fixed
order: :func:`_bwd_walk_kernel` sums ``A dW'`` along token diagonals in registers, :func:`_bwd_extra_kernel` the
pairs with an extra token, :func:`_table_fold_kernel` adds the walkers' sums up by table entry and
:func:`_table_grad_kernel` folds the linear table onto circular ones. The notation and the other kernels are in
:mod:`lisa_kernels.triton_direct_kernels`; :mod:`lisa_kernels.triton_direct` launches them.
"""


import triton
import triton.language as tl

from .triton_direct_kernels import _dot, _dW, _lookup, _split_groups, _tile


@triton.jit
def _shifted(base, start, off, shift, IDENT: tl.constexpr):
    """The tile of the next group of a chunk: ``shift`` elements further in every row (start: the rows' first
    elements, a scalar with IDENT, else one per row)."""
    if IDENT:
        return tl.load(base + start + shift + off)
    else:                                   # (off: the column offsets, broadcast over the rows)
        return tl.load(base + (start + shift)[:, None] + off)

@triton.jit
def _bwd_walk_kernel(FQ, FK, VP, GP, GDX, WIX, SCR, B, H, n_walk,
                     M: tl.constexpr, MC: tl.constexpr, MCP: tl.constexpr, MCW: tl.constexpr, BLOCK_G: tl.constexpr,
                     DKP: tl.constexpr, NPAD: tl.constexpr, TW: tl.constexpr, LW: tl.constexpr,
                     E: tl.constexpr, IDENT: tl.constexpr, WT: tl.constexpr,
                     CAUSAL: tl.constexpr, MODE: tl.constexpr, GD_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, ISA: tl.constexpr):
    """The table gradient's sums, without atomics. Grid tokens (extra tokens left out; a padded layout where
    :func:`layout` chose one, WIX maps it to token rows) are cut into 64-token tiles. The pairs that share a table
    entry have the same token difference k = i - j, so they lie on one token diagonal of tiles: tiles (I, I - D)
    hold the same k at the same position (a, b) (k = 64 D + a - b), and on 2D/3D grids also the same entry when
    the tiles' rows start at the same column coordinates, which holds for I = phase (mod LW) (IDENT: the walker
    layout is the token rows from E on, no padding). One program per
    (walker D, phase) and (head, chunk) walks those tiles for every batch element and sums, per element,

        ACC_m[a, b] += A_ij (g'_i . v_j + gd_i)      (= dlog r_m / r'_m of that pair; A is shared by the chunk)

    into registers, then stores ACC_m once; :func:`_table_fold_kernel` sums it by entry (r'_m factored out:
    one FFMA per pair and group). A program takes MCW groups of its chunk (fewer live accumulators; A is then
    computed once per MCW groups), and BLOCK_N of the WT = 64 keys of a tile (BLOCK_M = WT queries): a narrower
    tile for fp32 dots, whose operands take more registers."""
    w, hps = tl.program_id(0), tl.program_id(1)
    NSPLIT: tl.constexpr = WT // BLOCK_N
    hp = hps // NSPLIT
    cs = (hps % NSPLIT) * BLOCK_N                  # the program's first key column in the tile
    NPART: tl.constexpr = MC // MCW
    hc = hp // NPART
    s0 = (hp % NPART) * MCW                        # the program's first slot in the chunk
    h = hc // (M // MC)
    mc = hc % (M // MC)
    D = w // LW - (TW - 1)
    phase = w % LW
    lo_i = tl.maximum(D, 0)
    hi_i = tl.minimum(TW, TW + D)
    first = lo_i + (phase - lo_i % LW + LW) % LW
    n_it = tl.maximum((hi_i - first + LW - 1) // LW, 0)
    if CAUSAL:
        n_it = tl.where(D < 0, 0, n_it)
    c16 = tl.arange(0, 16)
    onesT = tl.where(c16[:, None] == 0, 1.0, tl.zeros((16, BLOCK_N), tl.float32)).to(GP.dtype.element_ty)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    rq = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_N)
    off_fq = rq[:, None] * DKP + tl.arange(0, DKP)[None, :]             # loop-invariant tile offsets
    off_fk = rk[:, None] * DKP + tl.arange(0, DKP)[None, :]
    if IDENT:
        off_g = rq[:, None] * (M * BLOCK_G) + tl.arange(0, BLOCK_G)[None, :]
        off_v = rk[:, None] * (M * BLOCK_G) + tl.arange(0, BLOCK_G)[None, :]
        off_x = rq[:, None] * (M * 16) + c16[None, :]
    else:                                           # (rows come from WIX: per-row starts)
        off_g = tl.arange(0, BLOCK_G)[None, :] + 0 * rq[:, None]
        off_v = tl.arange(0, BLOCK_G)[None, :] + 0 * rk[:, None]
        off_x = c16[None, :] + 0 * rq[:, None]
    b = 0
    it = 0
    for step in range(B * n_it):                    # (one loop over batch elements and tiles)
        ti = first + it * LW
        if IDENT:                                   # rows E + 64 ti + a: a scalar base per tile
            qrow = (b * H + h) * NPAD + E + ti * WT
            krow = (b * H + h) * NPAD + E + (ti - D) * WT + cs
            fq = tl.load(FQ + qrow * DKP + off_fq)
            fk = tl.load(FK + krow * DKP + off_fk)
            gq = (qrow * M + mc * MC + s0) * BLOCK_G
            vk = (krow * M + mc * MC + s0) * BLOCK_G
            xq = (qrow * M + mc * MC + s0) * 16
            gp0 = tl.load(GP + gq + off_g)
            v0 = tl.load(VP + vk + off_v)
            x0 = tl.load(GDX + xq + off_x)
        else:
            bh = b * H + h
            qrows = bh * NPAD + tl.load(WIX + ti * WT + rq)
            krows = bh * NPAD + tl.load(WIX + (ti - D) * WT + cs + rk)
            fq = _tile(FQ, qrows, DKP)
            fk = _tile(FK, krows, DKP)
            gq = (qrows * M + mc * MC + s0) * BLOCK_G
            vk = (krows * M + mc * MC + s0) * BLOCK_G
            xq = (qrows * M + mc * MC + s0) * 16
            gp0 = tl.load(GP + gq[:, None] + tl.arange(0, BLOCK_G)[None, :])
            v0 = tl.load(VP + vk[:, None] + tl.arange(0, BLOCK_G)[None, :])
            x0 = tl.load(GDX + xq[:, None] + c16[None, :])
        A = _dot(fq, tl.trans(fk), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), MODE // 2 * 2, ISA)
        acc0 += A * _dW(gp0, v0, x0, onesT, MODE, ISA, GD_DOT)
        if MCW > 1:
            acc1 += A * _dW(_shifted(GP, gq, off_g, BLOCK_G, IDENT), _shifted(VP, vk, off_v, BLOCK_G, IDENT),
                            _shifted(GDX, xq, off_x, 16, IDENT), onesT, MODE, ISA, GD_DOT)
        if MCW > 2:
            acc2 += A * _dW(_shifted(GP, gq, off_g, 2 * BLOCK_G, IDENT), _shifted(VP, vk, off_v, 2 * BLOCK_G, IDENT),
                            _shifted(GDX, xq, off_x, 32, IDENT), onesT, MODE, ISA, GD_DOT)
        if MCW > 3:
            acc3 += A * _dW(_shifted(GP, gq, off_g, 3 * BLOCK_G, IDENT), _shifted(VP, vk, off_v, 3 * BLOCK_G, IDENT),
                            _shifted(GDX, xq, off_x, 48, IDENT), onesT, MODE, ISA, GD_DOT)
        it += 1
        wrap = it == n_it
        b = tl.where(wrap, b + 1, b)
        it = tl.where(wrap, 0, it)
    ab = tl.arange(0, BLOCK_M)[:, None] * WT + cs + tl.arange(0, BLOCK_N)[None, :]
    out = SCR + ((hc * MCP + s0) * n_walk + w) * (WT * WT)
    tl.store(out + ab, acc0)
    if MCW > 1:
        tl.store(out + n_walk * (WT * WT) + ab, acc1)
    if MCW > 2:
        tl.store(out + 2 * n_walk * (WT * WT) + ab, acc2)
    if MCW > 3:
        tl.store(out + 3 * n_walk * (WT * WT) + ab, acc3)

@triton.jit
def _bwd_extra_kernel(FQ, FK, VP, GP, GDX, R, AIX, NBX, SX, N,
                      H, M: tl.constexpr, MC: tl.constexpr, MCP: tl.constexpr, BLOCK_G: tl.constexpr,
                      DKP: tl.constexpr, NPAD: tl.constexpr, TXP: tl.constexpr, NDK: tl.constexpr, E: tl.constexpr,
                      EP: tl.constexpr,
                      KIND0: tl.constexpr, MODE: tl.constexpr, GD_DOT: tl.constexpr, BLOCK: tl.constexpr,
                      ISA: tl.constexpr):
    """The rpe_extra gradient's sums over the pairs with an extra token: one program per (batch * head, chunk,
    token tile) writes SX[.., kind, m] = sum of A r' (g' . v + gd) over the tile's pairs of each kind (0: extra
    query, grid key (only with KIND0: otherwise the fold takes it from the row identity); 1: grid query, extra
    key; 2: both extra). O(N E) pairs: tl.dot of a token tile with the EP (>= E, >= 16) extra tokens."""
    bh, mc, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = bh % H
    NCH: tl.constexpr = M // MC
    NT: tl.constexpr = NPAD // BLOCK
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    ex = tl.arange(0, EP)
    xrow = tl.where(ex < E, ex, NPAD - 1)           # (rows past E index a zero row: NPAD > N)
    fbase_q = FQ + bh * NPAD * DKP
    fbase_k = FK + bh * NPAD * DKP
    slot0 = bh * NPAD * M + mc * MC
    tab = R + (h * NCH + mc) * (NDK * TXP * 2 * MCP)
    c16 = tl.arange(0, 16)
    ones_x = tl.where(c16[:, None] == 0, 1.0, tl.zeros((16, EP), tl.float32)).to(GP.dtype.element_ty)
    ones_t = tl.where(c16[:, None] == 0, 1.0, tl.zeros((16, BLOCK), tl.float32)).to(GP.dtype.element_ty)
    # kinds 1 and 2: the tile's queries with the extra keys
    A = _dot(_tile(fbase_q, offs, DKP), tl.trans(_tile(fbase_k, xrow, DKP)), tl.zeros((BLOCK, EP), tl.float32),
             MODE // 2 * 2, ISA)
    r = _lookup(tab, tl.load(AIX + offs)[:, None] + tl.load(NBX + xrow)[None, :], MCP)
    r0, r1, r2, r3 = _split_groups(r, MCP)
    key_x = (ex < E)[None, :]
    k1 = (offs >= E)[:, None] & (offs < N)[:, None] & key_x
    k2 = (offs < E)[:, None] & key_x
    out = SX + ((bh * NCH + mc) * NT + tile) * 3 * MCP
    for j in tl.static_range(MC):
        rj = r0 if j == 0 else (r1 if j == 1 else (r2 if j == 2 else r3))
        X = A * rj * _dW(_tile(GP + (slot0 + j) * BLOCK_G, offs * M, BLOCK_G),
                         _tile(VP + (slot0 + j) * BLOCK_G, xrow * M, BLOCK_G),
                         _tile(GDX + (slot0 + j) * 16, offs * M, 16), ones_x, MODE, ISA, GD_DOT)
        tl.store(out + MCP + j, tl.sum(tl.sum(tl.where(k1, X, 0.0), 1), 0))
        tl.store(out + 2 * MCP + j, tl.sum(tl.sum(tl.where(k2, X, 0.0), 1), 0))
    # kind 0: the extra queries with the tile's grid keys
    for j in tl.static_range(MC):
        if KIND0:
            A0 = _dot(_tile(fbase_q, xrow, DKP), tl.trans(_tile(fbase_k, offs, DKP)),
                      tl.zeros((EP, BLOCK), tl.float32), MODE // 2 * 2, ISA)
            q0, q1, q2, q3 = _split_groups(_lookup(tab, tl.load(AIX + xrow)[:, None] + tl.load(NBX + offs)[None, :],
                                                   MCP), MCP)
            rj = q0 if j == 0 else (q1 if j == 1 else (q2 if j == 2 else q3))
            X0 = A0 * rj * _dW(_tile(GP + (slot0 + j) * BLOCK_G, xrow * M, BLOCK_G),
                               _tile(VP + (slot0 + j) * BLOCK_G, offs * M, BLOCK_G),
                               _tile(GDX + (slot0 + j) * 16, xrow * M, 16), ones_t, MODE, ISA, GD_DOT)
            k0 = (ex < E)[:, None] & (offs >= E)[None, :] & (offs < N)[None, :]
            tl.store(out + j, tl.sum(tl.sum(tl.where(k0, X0, 0.0), 1), 0))
        else:
            tl.store(out + j, 0.0)

@triton.jit
def _offsets(k, q3, q2, NDIM: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr):
    """(d1, d2, d3): the grid offset of token difference k (walker layout) in class (q3, q2): per inner axis the
    offset is d or d - P (P the layout's row length there); the outermost axis takes the rest."""
    if NDIM == 1:
        return k * 0, k * 0, k
    d3 = (k % P3 + P3) % P3 - q3 * P3
    kk = (k - d3) // P3                                 # (exact)
    if NDIM == 2:
        return k * 0, kk, d3
    d2 = (kk % P2 + P2) % P2 - q2 * P2
    return (kk - d2) // P2, d2, d3

@triton.jit
def _table_fold_kernel(SCR, SX, R, GD, MX, DR, DREX, B, H, eps, n_walk, n_fold,
                       M: tl.constexpr, MC: tl.constexpr, MCP: tl.constexpr, TXP: tl.constexpr, NDK: tl.constexpr,
                       S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, NDIM: tl.constexpr, T: tl.constexpr,
                       P2: tl.constexpr, P3: tl.constexpr, TW: tl.constexpr, LW: tl.constexpr, E: tl.constexpr,
                       NPAD: tl.constexpr, NT: tl.constexpr, R0LO: tl.constexpr, R1LO: tl.constexpr,
                       R2LO: tl.constexpr, EXTRA: tl.constexpr, IDENTITY0: tl.constexpr, FINAL: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Programs [0, n_fold) = (head * group, block of 64 token differences kappa): the entries of the linear
    table. Token difference k = 64 kappa + c sits at (a, a - c) of walker kappa (a >= c) and at (a, a - c + 64)
    of walker kappa + 1 (a < c), in every phase. Its pairs fall into 1 (1D), 2 (2D) or 4 (3D) entries, told
    apart by the column coordinates of the query (per inner axis the offset is d or d - P), so the sum per
    (k, class) is a masked column sum, and DR[entry] = r'_m[entry] * sum: every entry is written by one program,
    in a fixed order. Then, with EXTRA, one program per (head * group) sums the extra-token kinds (kernel
    _bwd_extra_kernel) into the first entry of their regions; with IDENTITY0 kind 0 comes from the row identity
    (with normalize the pairs of an extra query sum to exactly -gd eps e^-max) minus kind 2. FINAL (a zero
    boundary: the linear table is rpe's): DR is d rpe itself (row T apart, its dtype) and the kinds go to DREX."""
    pid = tl.program_id(0)
    NCH: tl.constexpr = M // MC
    if pid < n_fold:
        hm = pid // (2 * TW)
        kappa = pid % (2 * TW) - TW
        h = hm // M
        m = hm % M
        hc = h * NCH + m // MC
        a = tl.arange(0, BLOCK)[:, None]
        c = tl.arange(0, BLOCK)[None, :]
        k = kappa * BLOCK + c
        base = SCR + (hc * MCP + m % MC) * n_walk * (BLOCK * BLOCK)
        s0 = tl.zeros((BLOCK,), tl.float32)
        s1 = tl.zeros((BLOCK,), tl.float32)
        s2 = tl.zeros((BLOCK,), tl.float32)
        s3 = tl.zeros((BLOCK,), tl.float32)
        for phase in range(LW):
            w_lo = (kappa + TW - 1) * LW + phase            # walker D = kappa
            w_hi = w_lo + LW                                 # walker D = kappa + 1
            z = tl.load(base + w_lo * (BLOCK * BLOCK) + a * BLOCK + (a - c), mask=(a >= c) & (kappa > -TW),
                        other=0.0)
            z += tl.load(base + w_hi * (BLOCK * BLOCK) + a * BLOCK + (a - c + BLOCK), mask=(a < c) & (kappa < TW - 1),
                         other=0.0)
            gq = phase * BLOCK + a                          # the query's place in the row pattern of this phase
            cls = a * 0
            if NDIM > 1:
                k3 = (k % P3 + P3) % P3
                q3 = ((gq % P3) < k3).to(tl.int32)
                cls = q3
                if NDIM > 2:
                    kk = (k - (k3 - q3 * P3)) // P3
                    cls += 2 * ((((gq // P3) % P2) < ((kk % P2 + P2) % P2)).to(tl.int32))
            s0 += tl.sum(tl.where(cls == 0, z, 0.0), 0)
            s1 += tl.sum(tl.where(cls == 1, z, 0.0), 0)
            s2 += tl.sum(tl.where(cls == 2, z, 0.0), 0)
            s3 += tl.sum(tl.where(cls == 3, z, 0.0), 0)
        kc = kappa * BLOCK + tl.arange(0, BLOCK)
        W2: tl.constexpr = 2 * S2 - 1
        W3: tl.constexpr = 2 * S3 - 1
        tab = R + hc * (NDK * TXP * 2 * MCP) + m % MC
        NCLS: tl.constexpr = 1 if NDIM == 1 else (2 if NDIM == 2 else 4)
        for q in tl.static_range(NCLS):
            d1, d2, d3 = _offsets(kc, q % 2, q // 2, NDIM, P2, P3)
            ok = (d1 > -S1) & (d1 < S1) & (d2 > -S2) & (d2 < S2) & (d3 > -S3) & (d3 < S3)
            entry = tl.where(ok, ((d1 + S1 - 1) * W2 + d2 + S2 - 1) * W3 + d3 + S3 - 1, 0)
            sq = s0 if q == 0 else (s1 if q == 1 else (s2 if q == 2 else s3))
            val = sq * tl.load(tab + entry * (2 * MCP), mask=ok, other=0.0)
            if FINAL:
                tl.store(DR + hm * T + entry, val.to(DR.dtype.element_ty), mask=ok)
            else:
                tl.store(DR + hm * TXP + entry, val, mask=ok)
    else:
        if EXTRA:
            hm = pid - n_fold
            h = hm // M
            m = hm % M
            t = tl.arange(0, BLOCK)
            a0 = tl.zeros((BLOCK,), tl.float32)
            a1 = tl.zeros((BLOCK,), tl.float32)
            a2 = tl.zeros((BLOCK,), tl.float32)
            for b in range(B):
                for t0 in range(0, NT, BLOCK):
                    tt = t0 + t
                    src = SX + (((b * H + h) * NCH + m // MC) * NT + tt) * 3 * MCP + m % MC
                    ok = tt < NT
                    a0 += tl.load(src, mask=ok, other=0.0)
                    a1 += tl.load(src + MCP, mask=ok, other=0.0)
                    a2 += tl.load(src + 2 * MCP, mask=ok, other=0.0)
            kind2 = tl.sum(a2, 0)
            kind0 = tl.sum(a0, 0)
            if IDENTITY0:
                rows = tl.zeros((BLOCK,), tl.float32)
                for b in range(B):
                    for e0 in range(0, E, BLOCK):
                        rows += tl.load(GD + ((b * H + h) * NPAD + e0 + t) * M + m, mask=e0 + t < E, other=0.0)
                kind0 = -tl.sum(rows, 0) * (eps * tl.exp(-tl.load(MX + hm))) - kind2
            if FINAL:
                tl.store(DREX + hm * 3 + 0, kind0.to(DREX.dtype.element_ty))
                tl.store(DREX + hm * 3 + 1, tl.sum(a1, 0).to(DREX.dtype.element_ty))
                tl.store(DREX + hm * 3 + 2, kind2.to(DREX.dtype.element_ty))
            else:
                tl.store(DR + hm * TXP + R0LO, kind0)
                tl.store(DR + hm * TXP + R1LO, tl.sum(a1, 0))
                tl.store(DR + hm * TXP + R2LO, kind2)

@triton.jit
def _table_grad_kernel(DR, DRPE, DREX,
                       S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, L1: tl.constexpr,
                       L2: tl.constexpr, L3: tl.constexpr, ROW: tl.constexpr, HAS_REX: tl.constexpr,
                       R1LO: tl.constexpr, R1HI: tl.constexpr, R0LO: tl.constexpr, R0HI: tl.constexpr,
                       R2LO: tl.constexpr, R2HI: tl.constexpr, CIRC: tl.constexpr, BLOCK: tl.constexpr):
    """d rpe[h, m] from the extended-table gradient DR[h * M + m]: the linear part as is, or for circular
    tables the sum over the (up to 2 per axis) linear offsets d = c and d = c - S of each entry c; and
    d rpe_extra[h, m, kind] from the first entry of its region, where _table_fold_kernel put the kind's sum.
    Every entry read here was written by the fold (nothing relies on a zeroed buffer)."""
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
        tl.store(DREX + hm * 3 + 0, tl.load(base + R0LO).to(DREX.dtype.element_ty))
        tl.store(DREX + hm * 3 + 1, tl.load(base + R1LO).to(DREX.dtype.element_ty))
        tl.store(DREX + hm * 3 + 2, tl.load(base + R2LO).to(DREX.dtype.element_ty))
