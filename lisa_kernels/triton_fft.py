"""The FFT path with Triton kernels around the transforms: a drop-in replacement for :func:`fft.fft_core`.

The math is that of :mod:`lisa_kernels.fft` (same chunk plan, same kernel spectrum ``Khat = FFT(K^m)``);
the transforms stay ``torch.fft`` (cuFFT on a GPU) and the Triton kernels fuse everything around them, so
that a chunk ``(b, d, m, c)`` of the field makes few passes over memory. Per chunk of the forward:

    1. lisa_fft_form_kernel       U[b, d, m, c, l] = phi(k)[b, n(l), d] * [v, 1][b, n(l), m, c]  (0 in the padding)
                                  one pass: reads fk and v, writes the zero-padded field of the FFT sizes
    2. fft.rfftn_pruned          Uhat = FFT(U)    (rfft of the last axis on the S nonzero rows only, then the
                                                   other axes: U's padding is already 0 along the last axis)
    3. lisa_fft_spectral_kernel   Uhat *= Khat[head(b), m]           (in place, broadcast over d and c)
    4. fft.irfftn_cropped        F = IFFT(Uhat)   (axis by axis, cropped to the grid between axes)
    5. lisa_fft_contract_kernel   [num, den][b, n, m, c] (+)= sum_d F[b, d, m, c, l(n)] phi(q)[b, n, d]
                                  one pass: crops to the grid, contracts over the chunk's d, writes num/den
                                  in their final (B, H, Ng, Dv) / (B, H, Ng, M) layout

After the loop, as in fft_core, rows whose den is below the FFT's round-off (fft._below_noise_floor) are
set to exactly 0 (num and den) and treated as constants by the backward (their gnum, gden are zeroed).

``n(l)``: the grid token at padded position ``l`` (row-major over the grid), ``l(n)`` its inverse.
The backward mirrors :class:`fft.FFTCoreFunction` with H = phi(q) (x) [gnum, gden] (same chunk loop):

    Uhat = FFT(form(fk, [v, 1])),  Hhat = FFT(form(fq, [gnum, gden]))                        (kernel 1)
    dKhat[h, m] += sum_{b of head h, d, c} Hhat * conj(Uhat)        lisa_fft_corr_kernel      (deterministic)
    F = IFFT(Uhat * Khat)                                             lisa_fft_spectral_kernel
    dphi(q)[b, n, d] (+)= sum_{m, c} F[b, d, m, c, l(n)] [gnum, gden][b, n, m, c]   lisa_fft_contract_mc_kernel
    Q = IFFT(Hhat * conj(Khat))                                       lisa_fft_spectral_kernel (CONJ)
    dphi(k)[b, n, d] (+)= sum_{m, c} Q[b, d, m, c, l(n)] [v, 1][b, n, m, c]         lisa_fft_contract_mc_kernel
    dv[b, n, m, c]   (+)= sum_d Q[b, d, m, c, l(n)] phi(k)[b, n, d]                 lisa_fft_contract_kernel
    after the loop: dK = irfftn(dKhat), dr = _kernel_grad(dK), dlogtab = dr * r

Memory: the inputs and outputs, O((Dk + Dv) N), plus the chunk workspace, which is allocated once per call
(the largest chunk of the plan: one padded real buffer and one spectrum buffer in the forward, two of each
in the backward) and reused by every chunk: the form kernel writes every element of its buffer, padding
included, so the buffer never needs zeroing. The pruned transforms of :mod:`lisa_kernels.fft` (shared with
the torch path) return their spectra and cropped fields as new tensors; the contractions read the cropped
field with the grid as its "padded" size (l(n) = n). With :data:`PRUNED` False the transforms are the
full ``rfftn`` / ``irfftn`` of the padded buffers, written with ``out=`` (the earlier layout, kept for
measuring one against the other on a GPU).
The whole Dk x (Dv + M) x N field never exists. Outputs are written, not zeroed then added: the first chunk
that reaches an output element stores it, later chunks add to it (chunks run in order, one launch at a
time, and each output element belongs to one program of a launch: no atomics, deterministic).

Kernel indices are int64 (large chunks), blocks are powers of two with masks, one config per kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # without triton
    HAS_TRITON = False

from ._problem import Problem
from .triton_direct import triton_device_reason
from .fft import (_below_noise_floor, _chunks, _kernel_grad, _kernel_spectrum, _max_shift, fft_chunk_plan, fft_sizes,
                  irfftn_cropped, rfftn_pruned)

__all__ = ["HAS_TRITON", "triton_fft_reason", "triton_fft_forward", "triton_fft_backward"]


def triton_fft_reason(p: Problem) -> Optional[str]:
    """None if the Triton FFT core can run ``p``, else a one-line reason."""
    reason = triton_device_reason(p)
    if reason is not None:
        return reason
    if p.dtype == torch.float64:
        return "float64 is not supported by the Triton FFT kernels (use 'fft')"
    if p.causal:
        return "causal problems need float64 FFTs, which the Triton FFT kernels do not have (use 'fft' or 'cuda')"
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {p.dtype} is not supported by the Triton FFT kernels"
    return None


def _empty(*shape, device, dtype):
    """Every kernel output and workspace buffer comes from here (tests replace it by a NaN fill)."""
    return torch.empty(*shape, device=device, dtype=dtype)


if HAS_TRITON:

    @triton.jit
    def lisa_fft_form_kernel(
        U, A, X, LAST,
        sab, san, sad, sxb, sxn, sxc, slb, sln, slm,
        b0, d0, m0, c0, ND, NM, NC, G, S1, S2, S3, L1, L2, L3, total,
        HAS_LAST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """U[bi, di, mi, ci, l] = a[b, n(l), d] * x[b, n(l), m, c] for l inside the grid, 0 in the padding.

        U is the chunk's contiguous (ND, NM, NC, L1, L2, L3)-per-row real field (flat index), with
        b = b0 + bi, d = d0 + di, m = m0 + mi, c = c0 + ci and x[.., c] = X[.., m G + c] for c < G,
        the extra column x[.., G] = LAST[.., m] (or 1 without LAST). Every element is written.
        """
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        P = L1 * L2 * L3
        s = offs % P
        t = offs // P
        ci = t % NC
        t = t // NC
        mi = t % NM
        t = t // NM
        di = t % ND
        bi = t // ND
        l3 = s % L3
        l2 = (s // L3) % L2
        l1 = s // (L3 * L2)
        inside = mask & (l1 < S1) & (l2 < S2) & (l3 < S3)
        n = (l1 * S2 + l2) * S3 + l3
        b = b0 + bi
        m = m0 + mi
        c = c0 + ci
        a = tl.load(A + b * sab + n * san + (d0 + di) * sad, mask=inside, other=0.0)
        isv = c < G
        x = tl.load(X + b * sxb + n * sxn + (m * G + c) * sxc, mask=inside & isv, other=0.0)
        if HAS_LAST:
            last = tl.load(LAST + b * slb + n * sln + m * slm, mask=inside & (c >= G), other=0.0)
            x = tl.where(isv, x, last)
        else:
            x = tl.where(isv, x, 1.0)
        tl.store(U + offs, tl.where(inside, a * x, 0.0), mask=mask)

    @triton.jit
    def lisa_fft_spectral_kernel(
        X, K, b0, m0, ND, NM, NC, H, M, PF, total,
        CONJ: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """X[bi, di, mi, ci, f] *= Khat[h, m, f]  (or conj(Khat[h, m, f]) with CONJ), in place.

        X: the chunk's spectrum as interleaved (re, im) float32, PF complex frequencies per channel;
        K: Khat (H, M, PF) as interleaved (re, im); h = (b0 + bi) mod H, m = m0 + mi. The chunk's indices in
        int32 unless its float offsets reach 2^31 (IDX64): 64-bit divisions cost registers (ptxas spilled around
        them); K's index is widened to int64 for its multiply (Khat may be larger than the chunk).
        """
        if IDX64:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        f = offs % PF
        t = offs // PF // NC
        mi = t % NM
        bi = t // NM // ND
        h = (b0 + bi) % H
        kidx = (h * M + m0 + mi).to(tl.int64) * PF + f
        xr = tl.load(X + 2 * offs, mask=mask, other=0.0)
        xi = tl.load(X + 2 * offs + 1, mask=mask, other=0.0)
        kr = tl.load(K + 2 * kidx, mask=mask, other=0.0)
        ki = tl.load(K + 2 * kidx + 1, mask=mask, other=0.0)
        if CONJ:
            ki = -ki
        tl.store(X + 2 * offs, xr * kr - xi * ki, mask=mask)
        tl.store(X + 2 * offs + 1, xr * ki + xi * kr, mask=mask)

    @triton.jit
    def _crop_index(offs_n, S2, S3, L2, L3):
        """Padded position l(n) of grid token n (row-major over (S1, S2, S3) and (L1, L2, L3))."""
        s3 = offs_n % S3
        s2 = (offs_n // S3) % S2
        s1 = offs_n // (S3 * S2)
        return (s1 * L2 + s2) * L3 + s3

    @triton.jit
    def lisa_fft_contract_kernel(
        F, A, NUM, DEN,
        sab, san, sad, snb, snn, snc, sdb, sdn, sdm,
        b0, d0, m0, c0, ND, NM, NC, G, S2, S3, L1, L2, L3, NG,
        HAS_DEN: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """out[b, n, m, c] (+)= sum_di F[bi, di, mi, ci, l(n)] * a[b, n, d0 + di]   (contraction over d)

        F: the chunk's (ND, NM, NC, L1, L2, L3)-per-row real field after the inverse FFT, cropped here to the
        grid through l(n); out = NUM[b, n, m G + c] for c < G, DEN[b, n, m] for c = G (only with HAS_DEN).
        Forward: F, a = phi(q) -> num, den.  Backward: Q, a = phi(k) -> dv.
        One program: BLOCK_N tokens x BLOCK_C channels of one (bi, mi).
        """
        pid_n = tl.program_id(0)
        pid_bm = tl.program_id(1).to(tl.int64)
        pid_c = tl.program_id(2)
        bi = pid_bm // NM
        mi = pid_bm % NM
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c = c0 + offs_c
        mask_n = offs_n < NG
        mask_c = offs_c < NC
        if not HAS_DEN:
            mask_c = mask_c & (c < G)
        mask = mask_c[:, None] & mask_n[None, :]
        P = L1 * L2 * L3
        l = _crop_index(offs_n, S2, S3, L2, L3)
        b = b0 + bi
        m = m0 + mi
        acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        for di in range(0, ND):
            row = ((bi * ND + di) * NM + mi) * NC + offs_c
            fv = tl.load(F + row[:, None] * P + l[None, :], mask=mask, other=0.0)
            av = tl.load(A + b * sab + offs_n * san + (d0 + di) * sad, mask=mask_n, other=0.0)
            acc += fv * av[None, :]
        isv = c < G
        num_ptr = NUM + b * snb + offs_n[None, :] * snn + (m * G + c)[:, None] * snc
        num_mask = mask & isv[:, None]
        out = acc
        if ACCUMULATE:
            out = out + tl.load(num_ptr, mask=num_mask, other=0.0)
        tl.store(num_ptr, out, mask=num_mask)
        if HAS_DEN:
            den_ptr = DEN + b * sdb + offs_n[None, :] * sdn + (m * sdm + 0 * offs_c)[:, None]
            den_mask = mask & (c == G)[:, None]
            out = acc
            if ACCUMULATE:
                out = out + tl.load(den_ptr, mask=den_mask, other=0.0)
            tl.store(den_ptr, out, mask=den_mask)

    @triton.jit
    def lisa_fft_contract_mc_kernel(
        F, X, LAST, OUT,
        sxb, sxn, sxc, slb, sln, slm, sob, son, sod,
        b0, d0, m0, c0, ND, NM, NC, G, S2, S3, L1, L2, L3, NG, NDB,
        HAS_LAST: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """out[b, n, d0 + di] (+)= sum_{mi, ci} F[bi, di, mi, ci, l(n)] * x[b, n, m, c]   (contraction over m, c)

        x[.., c] = X[.., m G + c] for c < G, x[.., G] = LAST[.., m] (or 1 without LAST).
        Backward only: F, x = [gnum, gden] -> dphi(q);  Q, x = [v, 1] -> dphi(k).
        One program: BLOCK_N tokens x BLOCK_D feature channels of one bi (NDB blocks of d per bi).
        """
        pid_n = tl.program_id(0)
        pid_bd = tl.program_id(1).to(tl.int64)
        bi = pid_bd // NDB
        offs_d = (pid_bd % NDB) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_d = offs_d < ND
        mask_n = offs_n < NG
        mask = mask_d[:, None] & mask_n[None, :]
        P = L1 * L2 * L3
        l = _crop_index(offs_n, S2, S3, L2, L3)
        b = b0 + bi
        acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for mc in range(0, NM * NC):
            mi = mc // NC
            ci = mc % NC
            m = m0 + mi
            c = c0 + ci
            row = ((bi * ND + offs_d) * NM + mi) * NC + ci
            fv = tl.load(F + row[:, None] * P + l[None, :], mask=mask, other=0.0)
            isv = c < G
            xv = tl.load(X + b * sxb + offs_n * sxn + (m * G + c) * sxc, mask=mask_n & isv, other=0.0)
            if HAS_LAST:
                lv = tl.load(LAST + b * slb + offs_n * sln + m * slm, mask=mask_n & (c >= G), other=0.0)
                xv = tl.where(isv, xv, lv)
            else:
                xv = tl.where(isv, xv, 1.0)
            acc += fv * xv[None, :]
        out_ptr = OUT + b * sob + offs_n[None, :] * son + (d0 + offs_d)[:, None] * sod
        out = acc
        if ACCUMULATE:
            out = out + tl.load(out_ptr, mask=mask, other=0.0)
        tl.store(out_ptr, out, mask=mask)

    @triton.jit
    def lisa_fft_corr_kernel(
        HH, UH, DKH, b0, NB, ND, NM, NC, H, M, PF,
        BLOCK_X: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        """dKhat[h, m0 + mi, f] += sum_{bi: (b0 + bi) mod H = h} sum_{di, ci} HH[bi, di, mi, ci, f] conj(UH[...])

        (the spectrum of the RPE gradient, a correlation). HH, UH: the chunk's spectra, DKH: dKhat (H, M, PF),
        all interleaved (re, im). m0 is folded into DKH by the caller. One program per (frequency block, h, mi)
        loops over the chunk's b of head h and all its (d, c): each element of dKhat has one owner, no atomics.
        """
        pid_f = tl.program_id(0)
        h = tl.program_id(1)
        mi = tl.program_id(2)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < PF
        acc_r = tl.zeros((BLOCK_F,), dtype=tl.float32)
        acc_i = tl.zeros((BLOCK_F,), dtype=tl.float32)
        start = (h - b0 % H + H) % H
        NX = ND * NC
        for bi in range(start, NB, H):
            for x0 in range(0, NX, BLOCK_X):
                offs_x = x0 + tl.arange(0, BLOCK_X)
                di = offs_x // NC
                ci = offs_x % NC
                row = ((bi * ND + di) * NM + mi) * NC + ci
                idx = 2 * (row.to(tl.int64)[:, None] * PF + offs_f[None, :])
                mask = (offs_x < NX)[:, None] & mask_f[None, :]
                hr = tl.load(HH + idx, mask=mask, other=0.0)
                hi = tl.load(HH + idx + 1, mask=mask, other=0.0)
                ur = tl.load(UH + idx, mask=mask, other=0.0)
                ui = tl.load(UH + idx + 1, mask=mask, other=0.0)
                acc_r += tl.sum(hr * ur + hi * ui, 0)
                acc_i += tl.sum(hi * ur - hr * ui, 0)
        kidx = 2 * ((h * M + mi).to(tl.int64) * PF + offs_f)
        tl.store(DKH + kidx, tl.load(DKH + kidx, mask=mask_f, other=0.0) + acc_r, mask=mask_f)
        tl.store(DKH + kidx + 1, tl.load(DKH + kidx + 1, mask=mask_f, other=0.0) + acc_i, mask=mask_f)


# --------------------------------------------------------------------------------------------- launchers

_BLOCK_FLAT = 1024      # form / spectral: elements per program
_BLOCK_N = 128          # contractions / correlation: tokens or frequencies per program
_BLOCK_CH = 16          # contractions / correlation: channels per program


def _pow2(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


def _grid3(t):
    return (1,) * (3 - len(t)) + tuple(t)


class _Chunk:
    """One chunk (sb, sd, sm, sc) of the plan, with the shapes of its padded field and spectrum."""

    def __init__(self, sl, sizes):
        sb, sd, sm, sc = sl
        self.b0, self.d0, self.m0, self.c0 = sb.start, sd.start, sm.start, sc.start
        self.nb, self.nd = sb.stop - sb.start, sd.stop - sd.start
        self.nm, self.nc = sm.stop - sm.start, sc.stop - sc.start
        rows = (self.nb, self.nd, self.nm, self.nc)
        self.field_shape = rows + tuple(sizes)
        self.spec_shape = rows + tuple(sizes[:-1]) + (sizes[-1] // 2 + 1,)


class _Workspace:
    """Flat real and complex buffers sized for the plan's largest chunk, allocated once per call."""

    def __init__(self, plan, sizes, count: int, device):
        rows = plan.bh * plan.d * plan.groups * plan.channels
        real = rows * math.prod(sizes)
        spec = rows * math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
        self.reals = [_empty(real, device=device, dtype=torch.float32) for _ in range(count)]
        self._spec_numel, self._device = spec, device
        self.specs = [None] * count           # allocated on first use (only the unpruned transforms write them)

    def real(self, i: int, ch: _Chunk) -> torch.Tensor:
        return self.reals[i][:math.prod(ch.field_shape)].view(ch.field_shape)

    def spec(self, i: int, ch: _Chunk) -> torch.Tensor:
        if self.specs[i] is None:
            self.specs[i] = _empty(self._spec_numel, device=self._device, dtype=torch.complex64)
        return self.specs[i][:math.prod(ch.spec_shape)].view(ch.spec_shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, Ng, D) -> (B*H, Ng, D), a view where possible (the kernels take strides)."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def _form(U, a, x, last, ch: _Chunk, p: Problem, sizes):
    """Kernel 1: the chunk's padded field a (x) [x, last or 1] into U."""
    S1, S2, S3 = _grid3(p.grid)
    L1, L2, L3 = _grid3(sizes)
    total = U.numel()
    lt = last if last is not None else x
    lisa_fft_form_kernel[(triton.cdiv(total, _BLOCK_FLAT),)](
        U, a, x, lt, *a.stride(), *x.stride(), *lt.stride(),
        ch.b0, ch.d0, ch.m0, ch.c0, ch.nd, ch.nm, ch.nc, p.Dv // p.M, S1, S2, S3, L1, L2, L3, total,
        HAS_LAST=last is not None, BLOCK=_BLOCK_FLAT)


_INT32_LIMIT = 2**31      # float offsets from here on take int64 indices (lisa_fft_spectral_kernel's IDX64)


def _spectral(Xhat, Kr, ch: _Chunk, p: Problem, conj: bool):
    """Kernel 2: Xhat *= Khat (or conj(Khat)) in place; Kr = view_as_real(Khat), contiguous."""
    pf = math.prod(ch.spec_shape[4:])
    total = Xhat.numel()
    lisa_fft_spectral_kernel[(triton.cdiv(total, _BLOCK_FLAT),)](
        torch.view_as_real(Xhat), Kr, ch.b0, ch.m0, ch.nd, ch.nm, ch.nc, p.H, p.M, pf, total,
        CONJ=conj, IDX64=2 * (total + _BLOCK_FLAT) >= _INT32_LIMIT, BLOCK=_BLOCK_FLAT)


def _contract(Fld, a, num, den, ch: _Chunk, p: Problem, sizes):
    """Kernel 3a: num/den (+)= sum over the chunk's d of Fld (cropped) * a; accumulates unless d0 == 0."""
    _, S2, S3 = _grid3(p.grid)
    L1, L2, L3 = _grid3(sizes)
    ng = p.num_grid
    bn, bc = _pow2(ng, _BLOCK_N), _pow2(ch.nc, _BLOCK_CH)
    dt = den if den is not None else num
    lisa_fft_contract_kernel[(triton.cdiv(ng, bn), ch.nb * ch.nm, triton.cdiv(ch.nc, bc))](
        Fld, a, num, dt, *a.stride(), *num.stride(), *dt.stride(),
        ch.b0, ch.d0, ch.m0, ch.c0, ch.nd, ch.nm, ch.nc, p.Dv // p.M, S2, S3, L1, L2, L3, ng,
        HAS_DEN=den is not None, ACCUMULATE=ch.d0 > 0, BLOCK_C=bc, BLOCK_N=bn)


def _contract_mc(Fld, x, last, out, ch: _Chunk, p: Problem, sizes):
    """Kernel 3b: out (+)= sum over the chunk's (m, c) of Fld (cropped) * [x, last or 1]."""
    _, S2, S3 = _grid3(p.grid)
    L1, L2, L3 = _grid3(sizes)
    ng = p.num_grid
    bn, bd = _pow2(ng, _BLOCK_N), _pow2(ch.nd, _BLOCK_CH)
    ndb = triton.cdiv(ch.nd, bd)
    lt = last if last is not None else x
    lisa_fft_contract_mc_kernel[(triton.cdiv(ng, bn), ch.nb * ndb)](
        Fld, x, lt, out, *x.stride(), *lt.stride(), *out.stride(),
        ch.b0, ch.d0, ch.m0, ch.c0, ch.nd, ch.nm, ch.nc, p.Dv // p.M, S2, S3, L1, L2, L3, ng, ndb,
        HAS_LAST=last is not None, ACCUMULATE=ch.m0 > 0 or ch.c0 > 0, BLOCK_D=bd, BLOCK_N=bn)


def _corr(Hhat, Uhat, dKr, ch: _Chunk, p: Problem):
    """Kernel 4: dKhat[:, m0:m0+nm] += sum over the chunk's (b of each head, d, c) of Hhat conj(Uhat)."""
    pf = math.prod(ch.spec_shape[4:])
    bf, bx = _pow2(pf, _BLOCK_N), _pow2(ch.nd * ch.nc, _BLOCK_CH)
    lisa_fft_corr_kernel[(triton.cdiv(pf, bf), p.H, ch.nm)](
        torch.view_as_real(Hhat), torch.view_as_real(Uhat), dKr[:, ch.m0:], ch.b0, ch.nb, ch.nd, ch.nm,
        ch.nc, p.H, p.M, pf, BLOCK_X=bx, BLOCK_F=bf)


def _dims(sizes):
    return tuple(range(-len(sizes), 0))


PRUNED = True   # pruned transforms (fewer flops; measured on the CPU only, under the interpreter for correctness)


def _forward_fft(U, ws, i, ch, p: Problem, sizes):
    """Spectrum of the chunk's padded field U (zero outside the grid)."""
    if not PRUNED:
        return torch.fft.rfftn(U, dim=_dims(sizes), out=ws.spec(i, ch))
    d = len(sizes)
    view = U[(Ellipsis,) + tuple(slice(0, s) for s in p.grid[:-1]) + (slice(None),)] if d > 1 else U
    return rfftn_pruned(view, sizes).contiguous()      # the kernels index it flat


def _inverse_fft(Xhat, U, p: Problem, sizes):
    """(field, the sizes its contractions index it with): cropped to the grid, or the full padded inverse."""
    if not PRUNED:
        return torch.fft.irfftn(Xhat, s=sizes, dim=_dims(sizes), out=U), sizes
    return irfftn_cropped(Xhat, sizes, p.grid).contiguous(), tuple(p.grid)


def triton_fft_forward(fq, fk, v, logtab, p: Problem, circular: bool):
    """Grid-to-grid core (fq, fk, v, logtab) -> (num, den, below (BH, M, Ng)), float32; see the module docstring."""
    if fq.dtype != torch.float32:
        raise ValueError(f"the Triton FFT core computes in float32, got {fq.dtype} "
                         f"(compose upcasts float16 / bfloat16; use backend='fft' for float64)")
    B, H, ng, Dk = fq.shape
    sizes = fft_sizes(p.grid, circular)
    shift = _max_shift(logtab, H, p.M)                                   # kernel exp(logtab - max) <= 1
    r = torch.exp(logtab - shift.view(shift.shape + (1,) * (logtab.dim() - 2)))
    Khat = _kernel_spectrum(r, p.grid, sizes, circular).contiguous()     # (H, M, L..., L_d/2+1)
    Kr = torch.view_as_real(Khat)
    fq_, fk_, v_ = _rows(fq), _rows(fk), _rows(v)
    num = _empty(B, H, ng, p.Dv, device=fq.device, dtype=torch.float32)
    den = _empty(B, H, ng, p.M, device=fq.device, dtype=torch.float32)
    num_, den_ = _rows(num), _rows(den)
    plan = fft_chunk_plan(p, circular)
    ws = _Workspace(plan, sizes, 1, fq.device)
    for sl in _chunks(p, plan):
        ch = _Chunk(sl, sizes)
        U = ws.real(0, ch)
        _form(U, fk_, v_, None, ch, p, sizes)
        Uhat = _forward_fft(U, ws, 0, ch, p, sizes)
        _spectral(Uhat, Kr, ch, p, conj=False)
        Fld, fsizes = _inverse_fft(Uhat, U, p, sizes)
        _contract(Fld, fq_, num_, den_, ch, p, fsizes)
    # like fft_core: rows whose den is below the FFT's round-off are exactly 0 (num and den), constants
    below = _below_noise_floor(den_.transpose(1, 2), fq_, fk_, r, p, sizes).transpose(1, 2)  # (BH, Ng, M)
    num_.view(B * H, ng, p.M, p.Dv // p.M).masked_fill_(below[..., None], 0.0)
    den_.masked_fill_(below, 0.0)
    scale = torch.exp(shift)                                               # (H, M): back to exp(logtab)
    num.view(B, H, ng, p.M, p.Dv // p.M).mul_(scale[None, :, None, :, None])
    den.mul_(scale[None, :, None, :])
    return num, den, below.transpose(1, 2)


def triton_fft_backward(fq, fk, v, logtab, below, gnum, gden, p: Problem, circular: bool):
    """Gradients (dfq, dfk, dv, dlogtab) of triton_fft_forward; ``below`` is its (BH, M, Ng) mask."""
    B, H, ng, Dk = fq.shape
    sizes = fft_sizes(p.grid, circular)
    shift = _max_shift(logtab, H, p.M)
    r = torch.exp(logtab - shift.view(shift.shape + (1,) * (logtab.dim() - 2)))
    Khat = _kernel_spectrum(r, p.grid, sizes, circular).contiguous()
    below = below.transpose(1, 2)                                          # (BH, Ng, M)
    M, G = p.M, p.Dv // p.M
    gn_ = gnum.float().reshape(B * H, ng, M, G).masked_fill(below[..., None], 0.0).view(B * H, ng, p.Dv)
    gd_ = gden.float().reshape(B * H, ng, M).masked_fill(below, 0.0)     # snapped outputs are constants
    # num = exp(shift) num'(r'): the loop runs on r' with the incoming gradients scaled by exp(shift)
    scale = torch.exp(shift).repeat(B, 1)                                  # (B*H, M)
    gn_ = (gn_.view(B * H, ng, M, G) * scale[:, None, :, None]).view(B * H, ng, p.Dv)
    gd_ = gd_ * scale[:, None, :]
    Kr = torch.view_as_real(Khat)
    fq_, fk_, v_ = _rows(fq), _rows(fk), _rows(v)
    dfq = _empty(B, H, ng, Dk, device=fq.device, dtype=torch.float32)
    dfk = _empty(B, H, ng, Dk, device=fq.device, dtype=torch.float32)
    dv = _empty(B, H, ng, p.Dv, device=fq.device, dtype=torch.float32)
    dfq_, dfk_, dv_ = _rows(dfq), _rows(dfk), _rows(dv)
    dKhat = torch.zeros_like(Khat)                                        # accumulated over all b
    dKr = torch.view_as_real(dKhat)
    plan = fft_chunk_plan(p, circular, backward=True)
    ws = _Workspace(plan, sizes, 2, fq.device)
    for sl in _chunks(p, plan):
        ch = _Chunk(sl, sizes)
        U, Hf = ws.real(0, ch), ws.real(1, ch)
        _form(U, fk_, v_, None, ch, p, sizes)
        Uhat = _forward_fft(U, ws, 0, ch, p, sizes)
        _form(Hf, fq_, gn_, gd_, ch, p, sizes)
        Hhat = _forward_fft(Hf, ws, 1, ch, p, sizes)
        _corr(Hhat, Uhat, dKr, ch, p)                                       # RPE gradient spectrum
        _spectral(Uhat, Kr, ch, p, conj=False)
        Fld, fsizes = _inverse_fft(Uhat, U, p, sizes)                       # F, recomputed
        _contract_mc(Fld, gn_, gd_, dfq_, ch, p, fsizes)                     # dphi(q)
        _spectral(Hhat, Kr, ch, p, conj=True)
        Q, fsizes = _inverse_fft(Hhat, Hf, p, sizes)                        # the adjoint convolution
        _contract_mc(Q, v_, None, dfk_, ch, p, fsizes)                       # dphi(k)
        _contract(Q, fk_, dv_, None, ch, p, fsizes)                          # dv
    dK = torch.fft.irfftn(dKhat, s=sizes, dim=tuple(range(2, 2 + len(sizes))))
    dr = _kernel_grad(dK, p.grid, circular)
    return dfq, dfk, dv, dr * r
