"""The geometry of ``backend="triton"``: where each pair of tokens reads its weight in the extended table
(:class:`Layout`), the per-token indices the kernels gather with (:class:`TokenIndex`), and the walker layout of
the table gradient. Pure index arithmetic on the grid, extra tokens and options; no kernel runs here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Tuple

import torch

from ._problem import Problem

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every pair of tokens reads its weight in the extended (.., TXP) table, and how the table gradient's
    walkers (:func:`lisa_kernels.triton_table_grad_kernels._bwd_walk_kernel`) lay out the grid tokens.

    Grid token with coordinates y: a = (y1 W2 + y2) W3 + y3 (W = 2S - 1), C = a of the last token.
      grid query AIX = a + C, grid key NBX = -a        -> entry a_i - a_j + C, the linear table [0, T)
      extra key j: NBX = XS - j                        -> region R1 (kind 1: grid query, extra key)
      extra query i: AIX = YS + i                      -> region R0 with grid keys (kind 0), R2 with extra
                                                          keys at YS + XS + (i - j) (kind 2; causal: i >= j)
      padded key: NBX = -C, padded query: AIX = C      -> finite entries; their features are zero

    Walker layout: the grid tokens only, row-major with the inner axes' lengths P3 >= S3 (2D, 3D) and P2 >= S2
    (3D) chosen so that the pattern of column coordinates repeats every LW <= 8 tiles of 64 tokens (P = S when
    that holds already, as for every power-of-2 row up to 64 and for 14); TW tiles of them. WIX maps a walker
    token to its token row (NPAD - 1, a zero row, for padding)."""

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
    NDIM: int                   # 1, 2 or 3: the grid's dimensions (leading 1s dropped)
    P2: int
    P3: int
    TW: int
    LW: int

    @property
    def W(self) -> Tuple[int, int, int]:
        return tuple(2 * s - 1 for s in self.S)


TOKEN_PAD = 128               # NPAD is a multiple of every block size
WALK_TILE = 64                # the walkers' tiles (the fold kernel assumes square ones)
WALK_MAX_PHASES = 8
WALK_GROUPS = 2               # groups per walker program (its accumulators: 64 x 64 fp32 each); 1 with fp32 dots


def _grid3(grid):
    return (1,) * (3 - len(grid)) + tuple(grid)


def _phases(period: int) -> int:
    return period // math.gcd(period, WALK_TILE)


def _walker_rows(S, ndim):
    """(P2, P3, LW): the walker layout's inner row lengths and its number of phases."""
    if ndim == 1:
        return 1, 1, 1
    P3 = next(p for p in range(S[2], 2 * S[2] + WALK_TILE) if _phases(p) <= WALK_MAX_PHASES)
    if ndim == 2:
        return S[1], P3, _phases(P3)
    # a plane that no small padding brings to <= 8 phases keeps its rows (more phases: more walkers, more
    # workspace, see _walk_workspace)
    P2 = next((p for p in range(S[1], 2 * S[1] + WALK_TILE) if _phases(p * P3) <= WALK_MAX_PHASES), S[1])
    return P2, P3, _phases(P2 * P3)


@functools.lru_cache(maxsize=256)
def _layout_of(grid: Tuple[int, ...], E: int, circular: bool, causal: bool) -> Layout:
    S = _grid3(grid)
    ndim = max(1, 3 - next((i for i, s in enumerate(S) if s > 1), 3))
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
    TXP = 1 << (TX - 1).bit_length() if TX <= 4096 else -(-TX // 1024) * 1024
    P2, P3, LW = _walker_rows(S, ndim)
    NGW = S[0] * P2 * P3 if ndim == 3 else (S[1] * P3 if ndim == 2 else S[2])
    TW = -(-NGW // WALK_TILE)
    # rows up to E + 64 TW are read by the walkers; row NPAD - 1 must be a zero row where the walker layout is
    # padded or extra tokens exist (both index it)
    zero_row = E > 0 or (ndim > 1 and (P3 != S[2] or P2 != S[1]))
    NPAD = -(-(max(N, E + WALK_TILE * TW) + int(zero_row)) // TOKEN_PAD) * TOKEN_PAD
    return Layout(S=S, L=L, E=E, N=N, NPAD=NPAD, T=T, C=C, XS=XS, YS=YS, TX=TX, TXP=TXP, R1=R1, R0=R0, R2=R2,
                  circular=circular, causal=causal, NDIM=ndim, P2=P2, P3=P3, TW=TW, LW=LW)


def _walk_ident(lay: Layout) -> bool:
    """The walker layout is the token rows from E on (no padding): the walkers compute their rows."""
    return lay.NDIM == 1 or (lay.P3 == lay.S[2] and lay.P2 == lay.S[1])


def layout(p: Problem) -> Layout:
    return _layout_of(tuple(p.grid), p.num_extra, p.boundary == "circular", p.causal)


@dataclasses.dataclass(frozen=True)
class TokenIndex:
    """Per-token indices of a layout (int32 tensors on the device).

    AIX, NBX (NPAD,): the query and (negated) key indices of the extended table. WIX (TW * 64,): the walker
    layout's token rows. The gathers read the weights of two neighbouring tokens with one load from a pair table
    (copy c holds (r'[t], r'[t + d_c]) at entry t): NB2 (NPAD / 2,) is NBX of key 2p plus c TXP, where d_c is the
    step NBX[2p + 1] - NBX[2p] (DK lists the steps); AI2 and DQ likewise for query pairs (AIX)."""

    AIX: torch.Tensor
    NBX: torch.Tensor
    WIX: torch.Tensor
    NB2: torch.Tensor
    DK: torch.Tensor
    AI2: torch.Tensor
    DQ: torch.Tensor


_INDEX_CACHE: Dict[tuple, TokenIndex] = {}


def _pair_index(idx: torch.Tensor, TXP: int):
    """(pair index, steps): idx[2p] + c TXP with c the position of the step idx[2p + 1] - idx[2p] in the steps."""
    steps = idx[1::2] - idx[0::2]
    deltas, which = torch.unique(steps, sorted=True, return_inverse=True)
    return idx[0::2] + which * TXP, deltas


@functools.lru_cache(maxsize=256)
def _pair_steps(lay: Layout) -> Tuple[int, int]:
    """(number of key-pair steps, number of query-pair steps): the copies of the two pair tables. Constants of
    the layout, computed on real CPU tensors even where the caller traces (a fake implementation under
    torch.export, whose dispatch modes would make torch.unique data-dependent)."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        ti = _token_index_cpu(lay)
    return len(ti[4]), len(ti[6])


def _token_index_cpu(lay: Layout):
    S, W, E = lay.S, lay.W, lay.E
    ng = math.prod(S)
    g = torch.arange(ng, dtype=torch.int64)
    y1, y2, y3 = g // (S[1] * S[2]), (g // S[2]) % S[1], g % S[2]
    a = (y1 * W[1] + y2) * W[2] + y3
    ext = torch.arange(E, dtype=torch.int64)
    pad = torch.full((lay.NPAD - lay.N,), lay.C, dtype=torch.int64)
    aix = torch.cat([lay.YS + ext, a + lay.C, pad])
    nbx = torch.cat([lay.XS - ext, -a, -pad])
    wix = torch.full((lay.TW * WALK_TILE,), lay.NPAD - 1, dtype=torch.int64)
    if lay.NDIM == 1:
        wix[:ng] = E + g
    elif lay.NDIM == 2:
        wix[y2 * lay.P3 + y3] = E + g
    else:
        wix[(y1 * lay.P2 + y2) * lay.P3 + y3] = E + g
    nb2, dk = _pair_index(nbx, lay.TXP)
    ai2, dq = _pair_index(aix, lay.TXP)
    return aix, nbx, wix, nb2, dk, ai2, dq


def token_index(lay: Layout, device, traced: bool = False) -> TokenIndex:
    """The layout's :class:`TokenIndex` on ``device``; cached. ``traced``: for a trace on fake tensors
    (torch.compile and AOTInductor trace the Triton ops' launches), constants built in the trace, not cached."""
    if traced:
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            values = [t.tolist() for t in _token_index_cpu(lay)]
        return TokenIndex(*(torch.tensor(v, dtype=torch.int32, device=device) for v in values))
    key = (lay, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None:
        return hit
    hit = TokenIndex(*(t.to(torch.int32).to(device) for t in _token_index_cpu(lay)))
    if len(_INDEX_CACHE) > 64:
        _INDEX_CACHE.clear()
    _INDEX_CACHE[key] = hit
    return hit


def _table_constexprs(lay: Layout) -> dict:
    return dict(S1=lay.S[0], S2=lay.S[1], S3=lay.S[2], L1=lay.L[0], L2=lay.L[1], L3=lay.L[2], E=lay.E, T=lay.T,
                TX=lay.TX, TXP=lay.TXP, R1LO=lay.R1[0], R1HI=lay.R1[1], R0LO=lay.R0[0], R0HI=lay.R0[1],
                R2LO=lay.R2[0], R2HI=lay.R2[1], R2MID=lay.YS + lay.XS, CIRC=lay.circular, CAUSAL=lay.causal)
