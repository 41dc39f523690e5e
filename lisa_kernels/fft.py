"""The log-linear FFT path, chunked so that its workspace stays within ``fft_workspace_bytes``.

For each (batch, head), feature channel d and extended value channel c of group m
(the values of the group, then a column of ones for the denominator):

    U[d, c]_j  = phi(k_j)[d] * [v_j, 1][c]                  (grid field, Dk x (Dv + M) channels)
    F[d, c]    = IFFT( FFT(U[d, c]) * FFT(K^m) )              (convolution with r^m over the grid)
    [num, den]_i[c] = sum_d phi(q_i)[d] F[d, c]_i

``K^m`` is r^m laid on a circular grid of size L per axis: for ``boundary="zero"`` (and causal) the linear
table (offsets -(S-1)..S-1) is placed at ``delta mod L`` with ``L >= 2S-1`` (a fast FFT size), which makes
the circular convolution exact; for ``boundary="circular"`` ``L = S`` and no padding is needed.
The spectrum FFT(K) is computed once per call and saved for the backward.

Only chunks of the field exist at any time: a range of (batch, head) pairs, of feature channels d, and of
value channels c, sized so that one chunk's FFT workspace stays within the budget (on the CPU, at most
CPU_CHUNK_TARGET_BYTES per chunk, which is faster). The transforms are pruned: the field is nonzero on S of
the L points per axis and only S outputs are kept, so the forward transform runs the last axis (rfft, n=L)
on the nonzero rows only and then the other axes, and the inverse crops to S after each axis
(:func:`rfftn_pruned`, :func:`irfftn_cropped`; shared with the triton-fft path).

On CPU float32/float64 tensors, where the compiled extension is built and its workspace (a few channels per
thread) fits the budget, the same loop runs in C++ (csrc/fft_cpu.cpp, ``_C.fft_cpu_forward/backward``): per
(batch*head, group, value channel) and block of feature channels, the field is formed into a padded buffer,
transformed (the same pruned ATen transforms), multiplied and contracted while it is in cache, with no chunk
tensors and none of torch.fft's copies for strided axes (2-3x faster on a 2-core CPU at 128x128 to 256x256).

Precision: the kernel is exp(logtab - max) (<= 1, no overflow inside the transforms; num and den are scaled
back by exp(max), exactly). A float32 FFT's round-off is relative to the largest row, so rows whose RPE
weights are far smaller than other rows' lose accuracy like exp(spread); :func:`fft_needs_float64` measures
that spread on the tiny table (row_log_mass: the log of the weight mass each row sees) and runs such calls in
float64 (torch passes). Below the threshold the per-row float32 error stays under 1e-4 of each row's own
magnitude (tests/test_fft_accuracy.py).

The backward is the same loop with H = phi(q) (x) [gnum, gden]:

    dphi(q)_i[d] = sum_c [gnum, gden]_i[c] F[d, c]_i        (F recomputed)
    Q[d, c]      = IFFT( FFT(H[d, c]) * conj(FFT(K^m)) )    (correlation: the adjoint convolution)
    dphi(k)_j[d] = sum_c Q[d, c]_j [v_j, 1][c],    dv_j[c] = sum_d Q[d, c]_j phi(k_j)[d]
    dK^m         = IFFT( sum_{b, d, c in m} FFT(H[d, c]) * conj(FFT(U[d, c])) )   (the RPE gradient is a
                                                                                  correlation, by FFT)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, List, Tuple

import torch

from . import _extension
from ._config import get_config
from ._problem import Problem

__all__ = ["fft_core_forward", "fft_core_backward", "TorchPasses", "fft_sizes", "fft_chunk_plan", "next_fast_len",
           "rfftn_pruned", "rfftn_pruned_buffered", "irfftn_cropped", "PaddedBuffers"]


def next_fast_len(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast for pocketfft and cuFFT)."""
    m = max(1, n)
    while True:
        x = m
        for f in (2, 3, 5):
            while x % f == 0:
                x //= f
        if x == 1:
            return m
        m += 1


def fft_sizes(grid: Tuple[int, ...], circular: bool) -> Tuple[int, ...]:
    """FFT size per axis: S (circular table) or a fast size >= 2S - 1 (linear table: exact convolution)."""
    if circular:
        return tuple(grid)
    return tuple(1 if s == 1 else next_fast_len(2 * s - 1) for s in grid)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    bh: int             # (batch, head) pairs per chunk
    d: int              # feature channels per chunk
    groups: int         # RPE groups per chunk (all M, or 1)
    channels: int       # extended value channels per group per chunk (all G + 1, or fewer)
    bytes_per_unit: int  # workspace of one (bh, d, channel) unit
    workspace: int      # estimated workspace of one chunk


def _unit_bytes(p: Problem, sizes, backward: bool) -> int:
    """Workspace of one channel of one feature dim of one (batch, head): padded real, spectra, crops."""
    itemsize = 8 if p.dtype == torch.float64 else 4
    real = math.prod(sizes)
    half = math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)
    ng = math.prod(p.grid)
    # forward: padded input, its spectrum (complex), inverse output, the cropped copy and the input field
    per = 2 * real + 2 * half + 2 * ng
    if backward:   # also the second field H, its spectrum, and the correlation output
        per += 2 * real + 4 * half + 2 * ng
    return itemsize * per


# On the CPU a chunk is cut at this size even under a larger budget: measured on a 2-core CPU (128x128 and
# 256x256, D=32), chunks of 16-64 MiB ran about 1.5x faster than 256 MiB ones. Bigger ones miss the caches
# and, above glibc's largest mmap threshold (32 MiB), are fresh mappings that page-fault on every chunk.
CPU_CHUNK_TARGET_BYTES = 32 * 2**20


def fft_chunk_plan(p: Problem, circular: bool, backward: bool = False, budget: int = None) -> ChunkPlan:
    """How the field is cut: the largest chunks whose workspace stays within the budget.

    Without an explicit ``budget`` it is ``fft_workspace_bytes``, capped at :data:`CPU_CHUNK_TARGET_BYTES` on
    the CPU (a GPU takes the whole budget: bigger batches of transforms pay there)."""
    if budget is None:
        budget = get_config().fft_workspace_bytes
        if p.device.type == "cpu":
            budget = min(budget, CPU_CHUNK_TARGET_BYTES)
    sizes = fft_sizes(p.grid, circular)
    unit = _unit_bytes(p, sizes, backward)
    G1 = p.Dv // p.M + 1
    C = p.M * G1
    cap = max(1, budget // unit)
    if cap >= C:
        per_bh = cap // C
        if per_bh >= p.Dk:
            plan = (min(p.B * p.H, per_bh // p.Dk), p.Dk, p.M, G1)
        else:
            plan = (1, per_bh, p.M, G1)
    else:
        plan = (1, 1, 1, min(G1, cap))
    bh, d, g, c = plan
    return ChunkPlan(bh, d, g, c, unit, unit * bh * d * g * c)


def _chunks(p: Problem, plan: ChunkPlan) -> Iterator[Tuple[slice, slice, slice, slice]]:
    G1 = p.Dv // p.M + 1
    for b0 in range(0, p.B * p.H, plan.bh):
        for d0 in range(0, p.Dk, plan.d):
            for m0 in range(0, p.M, plan.groups):
                for c0 in range(0, G1, plan.channels):
                    yield (slice(b0, min(b0 + plan.bh, p.B * p.H)), slice(d0, min(d0 + plan.d, p.Dk)),
                           slice(m0, min(m0 + plan.groups, p.M)), slice(c0, min(c0 + plan.channels, G1)))


def _kernel_spectrum(r: torch.Tensor, grid, sizes, circular: bool) -> torch.Tensor:
    """FFT of K: r (H, M, table...) laid at offset delta mod L per axis -> (H, M, L..., L_d // 2 + 1)."""
    d = len(grid)
    dims = tuple(range(2, 2 + d))
    if circular:
        return torch.fft.rfftn(r, dim=dims)
    K = r.new_zeros(r.shape[:2] + tuple(sizes))
    K[(slice(None), slice(None)) + tuple(slice(0, 2 * s - 1) for s in grid)] = r
    return torch.fft.rfftn(K.roll(shifts=tuple(-(s - 1) for s in grid), dims=dims), dim=dims)


def _kernel_grad(dK: torch.Tensor, grid, circular: bool) -> torch.Tensor:
    """Adjoint of the placement in _kernel_spectrum: (H, M, L...) -> (H, M, table...)."""
    if circular:
        return dK
    d = len(grid)
    dK = dK.roll(shifts=tuple(s - 1 for s in grid), dims=tuple(range(2, 2 + d)))
    return dK[(slice(None), slice(None)) + tuple(slice(0, 2 * s - 1) for s in grid)]


def rfftn_pruned(x: torch.Tensor, sizes) -> torch.Tensor:
    """Real FFT of the last d = len(sizes) axes, zero-padded to ``sizes``, skipping the zero rows.

    ``x`` (..., S1, .., Sd) holds the field (its last axis may also be already padded to Ld). Instead of
    ``rfftn(x, s=sizes)`` on the padded volume, the last axis is transformed (rfft, n=Ld) on the S1..S(d-1)
    nonzero rows only, then each other axis (fft, n=La) from the last to the first: every stage touches
    only lines that can hold a nonzero value. At L = 2S this is 3/4 of the work of rfftn in 2D and
    about 3.5/6 in 3D, and there is no padded copy of the real field.
    """
    d = len(sizes)
    X = torch.fft.rfft(x, n=sizes[-1], dim=-1)
    for a in range(d - 2, -1, -1):
        X = torch.fft.fft(X, n=sizes[a], dim=a - d)
    return X


def irfftn_cropped(X: torch.Tensor, sizes, grid) -> torch.Tensor:
    """Inverse of :func:`rfftn_pruned` keeping only the first S entries per axis -> (..., S1, .., Sd).

    Done axis by axis from the first, cropping after each inverse transform, so that the later (and the
    real) transforms run on the kept rows only."""
    d = len(grid)
    for a in range(d - 1):
        dim = a - d
        X = torch.fft.ifft(X, dim=dim)
        if grid[a] < X.shape[dim]:
            X = X.narrow(dim, 0, grid[a])
    x = torch.fft.irfft(X, n=sizes[-1], dim=-1)
    return x.narrow(-1, 0, grid[-1]) if grid[-1] < sizes[-1] else x


class PaddedBuffers:
    """The zero-padded buffers of one call's chunks, reused from chunk to chunk.

    ``torch.fft.rfft(x, n=L)`` and ``fft(x, n=L)`` pad by filling a fresh zero tensor and copying ``x`` into it,
    every chunk: two passes over the padded volume per axis (at 128x128, D=32 fills and copies were a quarter
    of the fft path's CPU time, part of them torch.fft's own copies for strided axes; removing the padding's
    share saved 7-16% of the time at 64x64 to 256x256 and 8x32x32). Here the field is formed straight into a padded real buffer and each transform writes into the
    kept region of a padded buffer for the next axis; only kept regions are ever written, so the padding stays
    zero. One buffer per stage (replaced when the chunk shape changes, i.e. for the last chunk): a few
    chunk-sized buffers live for the duration of the call, as the transforms' own temporaries did before."""

    def __init__(self):
        self._bufs = {}

    def zeros(self, stage, shape, dtype, device) -> torch.Tensor:
        buf = self._bufs.get(stage)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.zeros(shape, dtype=dtype, device=device)
            self._bufs[stage] = buf
        return buf


def rfftn_pruned_buffered(form_field, lead, grid, sizes, dtype, device, bufs: PaddedBuffers) -> torch.Tensor:
    """:func:`rfftn_pruned` of the field that ``form_field(out)`` writes into ``out`` (..., S1, .., Sd).

    The same transforms in the same order (last axis on the nonzero rows, then each other axis from the last to
    the first), with the padding held in ``bufs`` instead of made per call; returns a fresh tensor."""
    d = len(grid)
    real = bufs.zeros("real", tuple(lead) + tuple(grid[:-1]) + (sizes[-1],), dtype, device)
    form_field(real.narrow(-1, 0, grid[-1]))
    if d == 1:
        return torch.fft.rfft(real, dim=-1)
    cdtype = torch.promote_types(dtype, torch.complex64)
    half = sizes[-1] // 2 + 1

    def padded(a):      # axes < a kept (S), axis a padded (L), later axes transformed (L), the last half
        return bufs.zeros(("spec", a), tuple(lead) + tuple(grid[:a]) + tuple(sizes[a:-1]) + (half,), cdtype, device)

    buf = padded(d - 2)
    torch.fft.rfft(real, dim=-1, out=buf.narrow(-2, 0, grid[d - 2]))
    X = torch.fft.fft(buf, dim=-2)
    for a in range(d - 3, -1, -1):
        buf = padded(a)
        buf.narrow(a - d, 0, grid[a]).copy_(X)
        X = torch.fft.fft(buf, dim=a - d)
    return X


def _field(a: torch.Tensor, b: torch.Tensor, grid) -> torch.Tensor:
    """a (bh, Ng, d) and b (bh, Ng, m, c) -> the product field (bh, d, m, c, S...) laid on the grid."""
    X = a.permute(0, 2, 1)[:, :, None, None, :] * b.permute(0, 2, 3, 1)[:, None]
    return X.view(X.shape[:4] + tuple(grid))


class TorchPasses:
    """The per-chunk passes of the FFT path in plain PyTorch (any device).

    A chunk is (sb, sd, sm, sc): slices of (batch*head, feature dim d, group m, extended value channel c).
    ``a`` is a (BH, Ng, Dk) tensor (phi(k) or phi(q)), ``b`` a (BH, Ng, M, G+1) tensor ([v, 1] or [gnum, gden]).
    Other backends (the CUDA extension, Triton) provide the same methods; ``inverse`` may return any layout
    that their own contractions read.
    """

    name = "torch"

    def __init__(self, buffers: "PaddedBuffers" = None):
        self.buffers = buffers

    @classmethod
    def for_call(cls) -> "TorchPasses":
        """The passes of one core call: spectra formed through that call's reused padded buffers."""
        return cls(PaddedBuffers())

    def spectrum(self, a, b, chunk, grid, sizes):
        """FFT of the field a[.., d] * b[.., m, c], zero-padded: (nb, nd, nm, nc, L..., L_d // 2 + 1)."""
        sb, sd, sm, sc = chunk
        a, b = a[sb, :, sd], b[sb, :, sm, sc]
        if self.buffers is None:
            return rfftn_pruned(_field(a, b, grid), sizes)
        A = a.permute(0, 2, 1)[:, :, None, None, :].unflatten(-1, grid)       # (nb, nd, 1, 1, S...)
        Bf = b.permute(0, 2, 3, 1)[:, None].unflatten(-1, grid)               # (nb, 1, nm, nc, S...)
        lead = (a.shape[0], a.shape[2], b.shape[2], b.shape[3])
        return rfftn_pruned_buffered(lambda out: torch.mul(A, Bf, out=out), lead, grid, sizes, a.dtype, a.device,
                                     self.buffers)

    @staticmethod
    def multiply_(Xh, Khat, chunk, grid, sizes, conj: bool):
        """Xh[b, d, m, c] *= Khat[head(b), m] (or its conjugate), in place; head(b) = b mod H."""
        sb, _, sm, _ = chunk
        heads = torch.arange(sb.start, sb.stop, device=Xh.device) % Khat.shape[0]
        K = Khat[heads][:, None, sm, None]
        Xh *= torch.conj_physical(K) if conj else K  # a lazy .conj() view goes wrong under AOT

    @staticmethod
    def inverse(Xh, grid, sizes):
        """Inverse FFT, cropped to the grid: (nb, nd, nm, nc, S...), a strided view (no copy)."""
        return irfftn_cropped(Xh, sizes, grid)

    @staticmethod
    def contract_d(Y, a, chunk, grid, sizes):
        """sum_d Y[b, d, m, c, s] a[b, s, d] -> (nb, nm, nc, Ng); Y is read in its cropped layout (no copy)."""
        sb, sd, _, _ = chunk
        at = a[sb, :, sd].transpose(1, 2)                                   # (nb, nd, Ng)
        at = at.reshape(at.shape[:2] + (1, 1) + tuple(grid))
        out = (Y * at).sum(1)
        return out.reshape(out.shape[:3] + (-1,))

    @staticmethod
    def contract_mc(Y, b, chunk, grid, sizes):
        """sum_{m, c} Y[b, d, m, c, s] b[b, s, m, c] -> (nb, nd, Ng); Y is read in its cropped layout."""
        sb, _, sm, sc = chunk
        bt = b[sb, :, sm, sc].permute(0, 2, 3, 1)                          # (nb, nm, nc, Ng)
        bt = bt.reshape(bt.shape[:3] + tuple(grid))
        out = (Y * bt[:, None]).sum(dim=(2, 3))
        return out.reshape(out.shape[:2] + (-1,))

    @staticmethod
    def corr(Hh, Uh, chunk, grid, sizes):
        """sum_{d, c} Hh conj(Uh) -> (nb, nm, L..., L_d // 2 + 1): the spectrum of the RPE-gradient correlation."""
        return (Hh * torch.conj_physical(Uh)).sum(dim=(1, 3))


def _add_per_head(acc: torch.Tensor, x: torch.Tensor, b0: int) -> None:
    """acc[(b0 + i) % H] += x[i] for the rows i of x, in a fixed order (deterministic, unlike index_add_ on CUDA)."""
    H, nb = acc.shape[0], x.shape[0]
    if b0 % H == 0 and nb % H == 0:
        acc += x.view((nb // H, H) + x.shape[1:]).sum(0)
    else:
        for i in range(nb):
            acc[(b0 + i) % H] += x[i]


def _sliding_logsumexp(x: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """log sum exp of every window of ``width`` consecutive entries along ``dim`` (n - width + 1 of them).

    Doubling blocks (lse of 1, 2, 4, ... entries), then one block per set bit of ``width``: O(n log width)
    logaddexps on the small table, stable for any range of log-weights (-inf included)."""
    n = x.shape[dim]
    out_len = n - width + 1
    blocks, k, res, off = x, 1, None, 0
    while True:
        if width & k:
            part = blocks.narrow(dim, off, out_len)
            res = part if res is None else torch.logaddexp(res, part)
            off += k
        if 2 * k > width:
            return res
        m = blocks.shape[dim] - k
        blocks = torch.logaddexp(blocks.narrow(dim, 0, m), blocks.narrow(dim, k, m))
        k *= 2


def row_log_mass(logtab: torch.Tensor, grid) -> torch.Tensor:
    """(H, M, 2S-1, ...) linear log table -> (H, M, S...): log of the sum of the weights each grid row sees.

    Row i at p_i meets offsets p_i - p_j, i.e. the table window [p_i, p_i + S - 1] per axis; a box sum is a
    sliding sum per axis in turn (in log space)."""
    x = logtab.detach().to(torch.float64)
    for a, S in enumerate(grid):
        x = _sliding_logsumexp(x, 2 + a, S)
    return x


def table_row_range(logtab: torch.Tensor, grid, circular: bool) -> torch.Tensor:
    """The largest spread (in nats) between the weight masses of two rows of one (head, group), a 0-dim tensor.

    A float32 FFT's round-off in row i is about eps_32 * (the largest row's magnitude), so its error relative
    to row i's own magnitude grows like exp(spread). Circular tables give every row the same mass (0)."""
    if circular:
        return logtab.new_zeros((), dtype=torch.float64)
    w = row_log_mass(logtab, grid).flatten(2)
    finite = torch.isfinite(w)
    hi = w.masked_fill(~finite, float("-inf")).amax(-1)
    lo = w.masked_fill(~finite, float("inf")).amin(-1)
    return (hi - lo).clamp_min(0).nan_to_num(0.0, posinf=0.0, neginf=0.0).amax()


# A float32 FFT call switches to float64 when the table's row spread exceeds this (nats). Measured per-row
# float32 errors (1D, 2D, 3D grids; tests/test_fft_accuracy.py) are about 3e-7 * exp(spread) of each row's own
# magnitude: 1.6e-5 at a spread of 4, 1 (all lost) at 12; below this threshold they stay under 1e-4.
FLOAT32_MAX_ROW_RANGE = 5.5


def fft_needs_float64(logtab: torch.Tensor, grid, circular: bool, dtype: torch.dtype) -> bool:
    """Whether a float32 FFT convolution of this table would lose the small rows (see :func:`table_row_range`).

    Reads one number back from the device (``.item()`` on the reduced tiny table: a host sync on a GPU)."""
    if dtype == torch.float64:
        return False
    return bool(table_row_range(logtab, grid, circular).item() > FLOAT32_MAX_ROW_RANGE)


def _max_shift(logtab: torch.Tensor, H: int, M: int) -> torch.Tensor:
    """(H, M) max log-weight per (head, group), 0 where a table has no finite entry: r = exp(logtab - shift) <= 1
    cannot overflow, and the outputs are scaled back by exp(shift)."""
    mx = logtab.detach().reshape(H, M, -1).amax(-1)
    return torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))


def _below_noise_floor(den, fq_, fk_, r, p: Problem, sizes) -> torch.Tensor:
    """Where a denominator is below the FFT's round-off (BH, M, Ng): those rows are set to exactly 0.

    The FFT computes each den_i with an absolute error of about eps_machine * log2(P) times the bound
    B_i = sum_d phi(q_i)[d] * sum_j phi(k_j)[d] * max r. A den_i that small cannot be told from 0 (with
    "relu" it often is exactly 0, e.g. the first tokens of a causal sequence), and num / (den + eps)
    would divide that round-off by eps; snapping both to 0 returns the exact answer in that case.
    """
    BH, ng, _ = fq_.shape
    H = p.H
    rmax = r.reshape(H, p.M, -1).amax(-1)                                   # (H, M)
    bound = fq_ @ fk_.sum(1)[:, :, None]                                    # (BH, Ng, 1)
    heads = torch.arange(BH, device=fq_.device) % H
    bound = bound.transpose(1, 2) * rmax[heads][:, :, None]                  # (BH, M, Ng)
    tol = 16 * torch.finfo(fq_.dtype).eps * math.log2(max(2, math.prod(sizes)))
    return den.abs() <= tol * bound


def _in_float64(fn, tensors, out_dtype):
    """Run ``fn`` on float64 copies of the floating tensors; its floating outputs back in ``out_dtype``."""
    res = fn(*[t.to(torch.float64) if t is not None and t.is_floating_point() else t for t in tensors])
    return tuple(t.to(out_dtype) if t is not None and t.is_floating_point() else t for t in res)


# The compiled CPU loop (csrc/fft_cpu.cpp), used by the torch passes for CPU float32/float64 tensors; set to None
# to run the batched torch.fft chunks instead (tests compare the two).
_C_FFT_CPU = _extension.C if _extension.provides("fft_cpu_forward") else None


def cpu_loop_fits(p: Problem, sizes, itemsize: int, backward: bool) -> bool:
    """Whether the compiled CPU loop is built and its workspace (a few channels per thread) fits
    ``fft_workspace_bytes`` (also read by the cost model, lisa_kernels.dispatch)."""
    if _C_FFT_CPU is None:
        return False
    ws = _C_FFT_CPU.fft_cpu_workspace_bytes(list(p.grid), list(sizes), p.H, p.M, p.Dk, itemsize, backward)
    return ws <= get_config().fft_workspace_bytes


def _use_cpu_loop(passes, t: torch.Tensor, p: Problem, sizes, backward: bool) -> bool:
    """Whether the torch passes run as the compiled CPU loop: CPU float32/float64 tensors and the loop fits."""
    return (passes is TorchPasses and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and cpu_loop_fits(p, sizes, t.element_size(), backward))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(BH, Ng, ...) -> (BH, ..., Ng) contiguous: one channel's grid values contiguous, for the CPU loop."""
    return x.movedim(1, -1).contiguous()


def fft_core_forward(fq, fk, v, logtab, p: Problem, circular: bool, passes=TorchPasses):
    """Grid-to-grid core of the fft path: (fq, fk, v, logtab) -> (num, den, below); see the module docstring.

    ``below`` (BH, M, Ng) marks the rows snapped to 0 (:func:`_below_noise_floor`); the backward needs it.
    The kernel is exp(logtab - shift) with the per-(head, group) max log-weight as shift (so it is <= 1), and
    num, den are scaled back by exp(shift). With the torch passes, a float32 call whose table spreads the rows'
    weight masses too far (:func:`fft_needs_float64`) runs in float64.
    """
    if passes is TorchPasses and fft_needs_float64(logtab, p.grid, circular, fq.dtype):
        return _in_float64(lambda *t: fft_core_forward(*t, p, circular, passes), (fq, fk, v, logtab), fq.dtype)
    sizes = fft_sizes(p.grid, circular)
    cpu_loop = _use_cpu_loop(passes, fq, p, sizes, backward=False)
    if passes is TorchPasses:
        passes = TorchPasses.for_call()
    B, H, ng, Dk = fq.shape
    M, G1 = p.M, p.Dv // p.M + 1
    shift = _max_shift(logtab, H, M)                                    # (H, M)
    r = torch.exp(logtab - shift.view(shift.shape + (1,) * (logtab.dim() - 2)))
    Khat = _kernel_spectrum(r, p.grid, sizes, circular)                 # (H, M, L..., L_d/2+1)
    fq_, fk_ = fq.reshape(B * H, ng, Dk), fk.reshape(B * H, ng, Dk)
    ve = _ones_column(v, M)                                             # (BH, Ng, M, G+1)
    if cpu_loop:        # the same loop in C++, one channel at a time (csrc/fft_cpu.cpp)
        out = _C_FFT_CPU.fft_cpu_forward(_channels_last(fk_), _channels_last(ve), _channels_last(fq_),
                                         Khat / math.prod(sizes), list(p.grid), list(sizes))
    else:
        out = fq.new_zeros(B * H, M, G1, ng)
    for chunk in () if cpu_loop else _chunks(p, fft_chunk_plan(p, circular)):
        sb, sd, sm, sc = chunk
        Uhat = passes.spectrum(fk_, ve, chunk, p.grid, sizes)               # (b, d, m, c, L...)
        passes.multiply_(Uhat, Khat, chunk, p.grid, sizes, conj=False)
        Fld = passes.inverse(Uhat, p.grid, sizes)
        del Uhat
        out[sb, sm, sc] += passes.contract_d(Fld, fq_, chunk, p.grid, sizes)
        del Fld
    below = _below_noise_floor(out[:, :, -1], fq_, fk_, r, p, sizes)       # (BH, M, Ng)
    out.masked_fill_(below[:, :, None], 0.0)
    heads = torch.arange(B * H, device=fq.device) % H
    out *= torch.exp(shift)[heads][:, :, None, None]
    out = out.permute(0, 3, 1, 2).reshape(B, H, ng, M, G1)
    return out[..., :-1].reshape(B, H, ng, p.Dv), out[..., -1].contiguous(), below


def fft_core_backward(fq, fk, v, logtab, below, gnum, gden, p: Problem, circular: bool, passes=TorchPasses):
    """Gradients (dfq, dfk, dv, dlogtab) of fft_core_forward: the same chunked loop, see the module docstring.

    With the shifted kernel r' = exp(logtab - shift) (shift a constant), num = exp(shift) num'(r'): the loop
    runs on r' with the incoming gradients scaled by exp(shift), which gives the exact gradients."""
    if passes is TorchPasses and fft_needs_float64(logtab, p.grid, circular, fq.dtype):
        return _in_float64(lambda *t: fft_core_backward(*t, p, circular, passes),
                           (fq, fk, v, logtab, below, gnum, gden), fq.dtype)
    sizes = fft_sizes(p.grid, circular)
    cpu_loop = _use_cpu_loop(passes, fq, p, sizes, backward=True)
    if passes is TorchPasses:
        passes = TorchPasses.for_call()
    B, H, ng, Dk = fq.shape
    M, G1 = p.M, p.Dv // p.M + 1
    shift = _max_shift(logtab, H, M)
    r = torch.exp(logtab - shift.view(shift.shape + (1,) * (logtab.dim() - 2)))
    Khat = _kernel_spectrum(r, p.grid, sizes, circular)
    fq_, fk_ = fq.reshape(B * H, ng, Dk), fk.reshape(B * H, ng, Dk)
    ve = _ones_column(v, M)
    ge = torch.cat([gnum.reshape(B, H, ng, M, G1 - 1), gden[..., None]], -1).reshape(B * H, ng, M, G1)
    ge = ge.masked_fill(below.transpose(1, 2)[..., None], 0.0)       # snapped outputs are constants
    heads = torch.arange(B * H, device=fq.device) % H
    ge = ge * torch.exp(shift)[heads][:, None, :, None]
    if cpu_loop:        # the same loop in C++, one channel at a time (csrc/fft_cpu.cpp)
        dfq, dfk, dve, dKhat = _C_FFT_CPU.fft_cpu_backward(
            _channels_last(fk_), _channels_last(ve), _channels_last(fq_), _channels_last(ge),
            Khat / math.prod(sizes), list(p.grid), list(sizes))
    else:
        dfq, dfk = fq.new_zeros(B * H, Dk, ng), fq.new_zeros(B * H, Dk, ng)
        dve = fq.new_zeros(B * H, M, G1, ng)
        dKhat = torch.zeros_like(Khat)
    for chunk in () if cpu_loop else _chunks(p, fft_chunk_plan(p, circular, backward=True)):
        sb, sd, sm, sc = chunk
        Uhat = passes.spectrum(fk_, ve, chunk, p.grid, sizes)
        Hhat = passes.spectrum(fq_, ge, chunk, p.grid, sizes)
        # RPE gradient: sum over the chunk's (b of one head, d, c) of H (*) U (a correlation)
        _add_per_head(dKhat[:, sm], passes.corr(Hhat, Uhat, chunk, p.grid, sizes), sb.start)
        passes.multiply_(Uhat, Khat, chunk, p.grid, sizes, conj=False)
        Fld = passes.inverse(Uhat, p.grid, sizes)
        del Uhat
        dfq[sb, sd] += passes.contract_mc(Fld, ge, chunk, p.grid, sizes)
        del Fld
        passes.multiply_(Hhat, Khat, chunk, p.grid, sizes, conj=True)
        Q = passes.inverse(Hhat, p.grid, sizes)
        del Hhat
        dfk[sb, sd] += passes.contract_mc(Q, ve, chunk, p.grid, sizes)
        dve[sb, sm, sc] += passes.contract_d(Q, fk_, chunk, p.grid, sizes)
        del Q
    dK = torch.fft.irfftn(dKhat, s=sizes, dim=tuple(range(2, 2 + len(sizes))))
    dr = _kernel_grad(dK, p.grid, circular)
    dv = dve.permute(0, 3, 1, 2)[..., :-1].reshape(B, H, ng, p.Dv)
    return (dfq.transpose(1, 2).reshape(B, H, ng, Dk), dfk.transpose(1, 2).reshape(B, H, ng, Dk),
            dv, dr * r)


def _ones_column(v: torch.Tensor, M: int) -> torch.Tensor:
    """(B, H, Ng, Dv) -> (B*H, Ng, M, G + 1): each group's values with a column of ones appended."""
    B, H, N, Dv = v.shape
    vg = v.reshape(B * H, N, M, Dv // M)
    return torch.cat([vg, vg.new_ones(B * H, N, M, 1)], dim=-1)


# The CPU cost model's "fft" constants are fitted to the compiled loop (csrc/fft_cpu.cpp). Where it does not run
# (extension not built, or a workspace budget below its needs) the batched torch.fft chunks do the same work in about
# this much more time (measured 2026-12-02 on the 2-core CPU, same process, fwd and fwd+bwd at 128x128 to 256x256 and
# 16x64x64: 1.7x to 4x).
TORCH_CHUNKS_FACTOR = 2.5


def _cpu_loop_used(p: Problem, backward: bool) -> bool:
    if _C_FFT_CPU is None:
        return False
    if torch.compiler.is_compiling():     # dynamo cannot trace the pybind estimate: assume the default budget
        return True
    itemsize = 8 if p.dtype == torch.float64 or p.causal else 4      # the core's dtype (causal: float64)
    sizes = fft_sizes(p.grid, p.boundary == "circular" and not p.causal)
    return cpu_loop_fits(p, sizes, itemsize, backward)


def cpu_cost_factor(p: Problem, backward: bool) -> float:
    """The factor on the CPU cost model's "fft" estimate: 1 where the compiled loop runs ``p``, else
    :data:`TORCH_CHUNKS_FACTOR`."""
    return 1.0 if _cpu_loop_used(p, backward) else TORCH_CHUNKS_FACTOR
