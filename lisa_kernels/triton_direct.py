"""Host side of ``backend="triton"``: the extended-table layout, the per-token indices, the launch configs
(autotuned on a GPU, spilling ones pruned) and the forward / backward launches of the kernels in
:mod:`lisa_kernels.triton_direct_kernels`, whose docstring has the math.

Forward: ``_prep_kernel`` (features, extended table) then ``_fwd_kernel``. Backward: ``_bwd_prep_kernel``,
``_bwd_dkv_kernel``, ``_bwd_dq_kernel`` and ``_table_grad_kernel`` (or, with
``torch.use_deterministic_algorithms(True)``, a fixed-order table gradient, :func:`_table_grad_deterministic`).
:func:`kernel_launches` lists the launches of a problem for ``benchmarks/kernel_report.py``.
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
    from ._triton_compat import patch_interpreter
    patch_interpreter()          # Triton 3.6's interpreter and NumPy >= 2.4: runtime loop bounds (see there)
    from .triton_direct_kernels import (_bwd_dkv_kernel, _bwd_dq_kernel, _bwd_prep_kernel, _fwd_kernel,
                                        _prep_kernel, _table_grad_kernel)


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
    dqa = dict(FQ=fq, FK=fk, V=v, GO=g, Q=q, RD=rd, AIX=aix, NBX=nbx, SC=sc, GD=gd, MX=mx, DQ=dq, **strides_vg,
               sqb=q.stride(0), sqh=q.stride(1), sqn=q.stride(2), sqd=q.stride(3),
               sdc=sdc, sdb=dq.stride(-4), sdh=dq.stride(-3), sdn=dq.stride(-2),
               H=H, N=N, DK=Dk, scale=p.scale, eps=p.eps, FEATURE=feature, TABLE_GRAD=not deterministic,
               NORMALIZE=p.normalize, **c)
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
    if drex is not None and p.normalize and not p.causal:
        # The pairs of an extra query carry kind 0 (grid keys) and kind 2 (extra keys); with normalize their
        # sum over a query is exactly -gd eps e^-max (see _bwd_dq_kernel), so kind 0 = that - kind 2, without
        # the cancellation of O(1) terms that a direct sum has where the row is all kind 0.
        E = p.num_extra
        row = -(gd.reshape(q.shape[0], p.H, -1, p.M)[:, :, :E].sum(dim=(0, 2))
                * (p.eps * torch.exp(-mx.reshape(p.H, p.M))))
        drex = drex.clone()
        drex[..., 0] = (row - drex[..., 2].float()).to(drex.dtype)
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
