"""``backend="flex"``: the operator through PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

A pair's weight is a softmax term: ``W^m_ij = A_ij exp(L^m_ij) = exp(log A_ij + L^m_ij)``. So, for each group m
(a head of FlexAttention: heads become ``M*H``, group-major, with ``phi(scale q)`` and ``phi(k)`` repeated per
group and ``v`` split by group)::

    score_ij = log(phi(scale q_i) . phi(k_j)) + L^m_ij              a score_mod on FlexAttention's q.k (scale 1)
    out_i    = sum_j softmax_j(score_i.) v_j = sum_j W_ij v_j / sum_j W_ij

and the options become:

    eps > 0          one virtual key after the N real ones, score log(eps), value 0: it adds eps to the sum
    normalize=False  out_i * exp(lse_i), from the log-sum-exp FlexAttention returns; where it returns none (its
                     compiled CPU kernel) one virtual key of weight w_i = exp(max L) phi(q_i) . mean_j phi(k_j)
                     and a ones channel give O = [num, w] / (den + w), so num = O[:Dv] w / O[Dv]
                     (w >= den / N, so O[Dv] >= 1 / (N + 1); this route computes in float32)
    causal           a block mask (j <= i, and the virtual key), so that masked blocks are skipped
    circular         the table expanded to the zero boundary's 2S-1 entries per axis (a gather, differentiable)

``L^m_ij`` is one gather from a flat table per head and group: the grid table, then ``rpe_extra``'s three
entries, then the virtual key's. A grid pair's entry is ``c0 + lin(p_i) - lin(p_j)`` (``lin``: a token's
position dotted with the flat table's strides; ``c0 = T0 // 2``, the entry of offset 0, T0 = prod(2S-1)), so the
score_mod reads one small int32 vector per token.

The forward up to FlexAttention (feature maps, table, virtual key, FlexAttention) is compiled and cached per
shape (``torch.compile(dynamic=False)``, under its own recompile limit); the epilogue runs after it (the compiled
CPU kernel takes no fused epilogue). Gradients reach q, k, v, rpe and rpe_extra through FlexAttention's backward
(the table is a captured buffer); its compiled CPU kernel has none, so on the CPU the forward runs and asking for
a gradient raises ``NotImplementedError`` (:func:`flex_grad_reason`; ``auto`` never picks it there for training).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Optional, Tuple

import torch

from . import _device
from ._problem import Problem
from .reference import feature_map, grid_positions

__all__ = ["flex_reason", "flex_grad_reason", "flex_attention_lisa", "COMPILE"]

# False: run FlexAttention eagerly (PyTorch's math implementation of the same score_mod): the tests use it to
# check the gradients on the CPU, where the compiled kernels have no backward
COMPILE = True
# distinct shapes (and option sets) compiled before dynamo runs the core uncompiled, with its warning (its default,
# 8, is one model's worth); not fullgraph, so that the limit is not an error
_RECOMPILE_LIMIT = 64
# whether FlexAttention's compiled CPU kernel can run here, as Inductor decides it (AVX2 without
# ATEN_CPU_CAPABILITY=default, not macOS, no XPU); read once: dynamo does not trace the check
_CPU_AVX2 = (torch.cpu._is_avx2_supported() and os.environ.get("ATEN_CPU_CAPABILITY") != "default"
             and sys.platform != "darwin" and not torch.xpu.is_available())
# the widest head FlexAttention's GPU kernels are tuned for (q.k, and v per group)
GPU_MAX_HEAD_DIM = 256


def _flex():
    """torch.nn.attention.flex_attention (imported on first use: it takes a quarter of a second)."""
    from torch.nn.attention import flex_attention as module
    return module


def flex_reason(p: Problem) -> Optional[str]:
    """None if FlexAttention can run ``p`` (forward), else why not."""
    if p.dtype == torch.float64:
        return "FlexAttention's kernels take float16, bfloat16 and float32, not float64 (use 'direct' or 'fft')"
    if p.device.type == "cpu" and COMPILE and not _CPU_AVX2:
        return ("FlexAttention's compiled CPU kernel needs an x86 CPU with AVX2 (not ATEN_CPU_CAPABILITY=default, "
                "macOS or an XPU machine)")
    if p.device.type not in ("cpu", "cuda"):
        return f"FlexAttention runs on CPU and CUDA (ROCm) devices, not {p.device.type}"
    if p.device.type == "cuda":
        from .triton_direct import HAS_TRITON
        gpu = _device.gpu_of(p.device)
        if not HAS_TRITON:
            return "FlexAttention's GPU kernels are Triton kernels, and triton is not installed"
        if gpu is not None and gpu.backend == "cuda" and gpu.arch < 80 and p.dtype == torch.bfloat16:
            return f"bfloat16 needs sm_80 or newer in Triton; {gpu.architecture} has no bf16 matrix units"
        if gpu is not None and gpu.backend == "cuda" and gpu.arch < 75:
            return f"Triton (FlexAttention's GPU kernels) needs sm_75 or newer, not {gpu.architecture}"
        if max(p.Dk, p.Dv // p.M) > GPU_MAX_HEAD_DIM:
            return f"head dim over FlexAttention's GPU limit of {GPU_MAX_HEAD_DIM}"
    return None


def flex_grad_reason(p: Problem) -> Optional[str]:
    """None if gradients of ``p`` can be had through FlexAttention, else why not (its forward still runs)."""
    if p.device.type == "cpu" and COMPILE:
        return ("FlexAttention has no backward on the CPU (its compiled CPU kernel is inference only): use "
                "backend='direct' or 'auto' to train on a CPU")
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return ("torch.use_deterministic_algorithms(True) is set, and FlexAttention's backward sums the rpe table's "
                "gradient with atomic adds (its order varies): use backend='triton' or 'direct', which do not")
    return None


def _min_head_dim(device: torch.device) -> int:
    """The narrowest head dim FlexAttention takes on ``device``: its GPU kernels' dots need 16 (narrower ones are
    zero-padded, which is exact), its CPU kernel any."""
    return 1 if device.type == "cpu" else 16


# ---------------------------------------------------------------- the log-weight table and the token index

def _zero_form(rpe: torch.Tensor, p: Problem) -> torch.Tensor:
    """``rpe`` with 2S-1 entries per axis: a circular table (S entries, offset delta at delta mod S) expanded."""
    if p.boundary != "circular":
        return rpe
    for axis, s in enumerate(p.grid):
        index = torch.remainder(torch.arange(-(s - 1), s, device=rpe.device), s)
        rpe = rpe.index_select(2 + axis, index)
    return rpe


def _table(rpe, rpe_extra, p: Problem, virtual: Optional[torch.Tensor]) -> torch.Tensor:
    """The flat log-weights per group and head, (M*H, T), row m * H + h: the grid table (zero form), then
    rpe_extra's three entries (0 without it), then the virtual key's (if any)."""
    grid = _zero_form(rpe, p).transpose(0, 1).reshape(p.M * p.H, -1)
    extra = (rpe_extra.transpose(0, 1).reshape(p.M * p.H, 3) if rpe_extra is not None
             else grid.new_zeros(p.M * p.H, 3))
    parts = [grid, extra.to(grid.dtype)] + ([virtual.reshape(-1, 1).to(grid.dtype)] if virtual is not None else [])
    return torch.cat(parts, dim=1)


@torch.compiler.assume_constant_result
def _token_lin_constant(grid: Tuple[int, ...], num_extra: int, nk: int, device: torch.device) -> torch.Tensor:
    """:func:`_token_lin`, a constant of the graph when traced (Inductor's CPU FlexAttention takes no index
    computed inside the graph)."""
    return _token_lin(grid, num_extra, nk, device)


@functools.lru_cache(maxsize=64)
def _token_lin(grid: Tuple[int, ...], num_extra: int, nk: int, device: torch.device) -> torch.Tensor:
    """lin(p_t) for every token (0 for extra and virtual tokens): position dotted with the flat table's strides,
    so that a grid pair's entry is c0 + lin_i - lin_j. (Cached: a constant of the shape.)"""
    strides = [math.prod(2 * s - 1 for s in grid[a + 1:]) for a in range(len(grid))]
    lin = torch.zeros(nk, dtype=torch.int32, device=device)
    positions = grid_positions(grid, device)                                   # (Ng, d), row-major
    lin[num_extra:num_extra + len(positions)] = (positions * torch.tensor(strides, device=device)).sum(-1).int()
    return lin


def _score_mod(table, lin, E: int, N: int, T0: int, virtual: str):
    """score_ij = log(s_ij) + table[h, entry(i, j)], s_ij = phi(q_i) . phi(k_j) >= 0.

    log is taken as where(s <= 0, -inf, log(where(s <= 0, 1, s))), so that a zero kernel (relu) gives weight 0 and
    a zero gradient (not 0 * inf). The virtual key (index N): score table[h, T0 + 3] ("eps"), or log(s) plus it
    ("w": its key is mean phi(k))."""
    def score_mod(score, b, h, q_idx, kv_idx):
        qe, ke = q_idx < E, kv_idx < E
        entry = T0 + torch.where(qe, torch.where(ke, 2, 0), 1)                     # pairs with an extra token
        entry = torch.where(qe | ke, entry, lin[q_idx] - lin[kv_idx] + (T0 // 2))  # grid pairs: c0 = T0 // 2
        if virtual != "none":
            entry = torch.where(kv_idx == N, T0 + 3, entry)
        zero = score <= 0                      # (False for NaN: a NaN row's scores stay NaN)
        log_s = torch.where(zero, -float("inf"), torch.log(torch.where(zero, 1.0, score)))
        logw = table[h, entry]
        if virtual == "eps":
            return torch.where(kv_idx == N, logw, log_s + logw)
        return log_s + logw
    return score_mod


@functools.lru_cache(maxsize=64)
def _causal_block_mask(n: int, nk: int, device: torch.device, block: int = 128):
    """Keys j <= i, and the virtual key (index n, when nk = n + 1) for every query: blocks of 128 x 128, those below
    the diagonal whole ("full": no mask evaluated), the diagonal ones and the virtual key's partial, the rest skipped.
    Built from the block indices, O((n / 128)^2), where create_block_mask would evaluate all n x nk pairs."""
    nq, nkb = -(-n // block), -(-nk // block)
    qb = torch.arange(nq)[:, None]
    kb = torch.arange(nkb)[None, :]
    virtual = (nk > n) & (kb == n // block)
    partial = (kb == qb) | virtual
    full = (kb < qb) & ~partial

    def blocks(mask):                           # (1, 1, nq) counts and (1, 1, nq, nkb) indices, the blocks first
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        return (mask.sum(1).to(torch.int32)[None, None].to(device),
                order.to(torch.int32)[None, None].contiguous().to(device))

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx >= n)
    return _flex().BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                            seq_lengths=(n, nk))


# ---------------------------------------------------------------- calling FlexAttention

@functools.lru_cache(maxsize=1)
def _compiled_core():
    """:func:`_flex_core` compiled (feature maps and table fused before FlexAttention by Inductor); dynamo keeps one
    graph per shape and option set."""
    return torch.compile(_flex_core, dynamic=False)


@functools.lru_cache(maxsize=1)
def _recompile_limits() -> dict:
    """The dynamo settings the compiled core runs under (the names this torch has)."""
    limits = {"recompile_limit": _RECOMPILE_LIMIT, "accumulated_recompile_limit": 16 * _RECOMPILE_LIMIT}
    return {name: n for name, n in limits.items() if hasattr(torch._dynamo.config, name)}


def _run_forward(q, k, v, rpe, rpe_extra, p: Problem) -> torch.Tensor:
    """The forward: the core compiled (cached per shape) unless :data:`COMPILE` is False or we are inside a compile,
    then the epilogue."""
    use_lse, virtual, nk = _route(p)
    lin = _token_lin_constant(tuple(p.grid), p.num_extra, nk, q.device)
    block_mask = _causal_block_mask(p.N, nk, q.device) if p.causal else None
    if not COMPILE or torch.compiler.is_compiling():
        out, lse, w, empty = _flex_core(q, k, v, rpe, rpe_extra, p, lin, block_mask)
    else:
        with torch._dynamo.config.patch(**_recompile_limits()):
            out, lse, w, empty = _compiled_core()(q, k, v, rpe, rpe_extra, p, lin, block_mask)
    return _epilogue(out, lse, w, empty, p, q.dtype)


class _ForwardOnly(torch.autograd.Function):
    """The forward (autograd off inside), recorded so that a gradient asked of it raises with the reason."""

    @staticmethod
    def forward(ctx, reason, p, q, k, v, rpe, rpe_extra):
        ctx.reason = reason
        return _run_forward(q, k, v, rpe, rpe_extra, p)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"backend='flex': {ctx.reason}")


def flex_attention_lisa(q, k, v, rpe, rpe_extra, p: Problem) -> torch.Tensor:
    """LiSA attention through FlexAttention (the module docstring has the math); (B, H, N, Dv) in q's dtype."""
    inputs = [t for t in (q, k, v, rpe, rpe_extra) if t is not None]
    grad_reason = flex_grad_reason(p)
    if grad_reason is not None and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        if torch.compiler.is_compiling():    # (dynamo cannot trace a backward that raises: a graph break, or this)
            raise NotImplementedError(f"backend='flex' inside torch.compile with inputs that require grad: "
                                      f"{grad_reason}; call it under torch.no_grad() for its forward")
        return _ForwardOnly.apply(grad_reason, p, q, k, v, rpe, rpe_extra)
    return _run_forward(q, k, v, rpe, rpe_extra, p)


def _route(p: Problem):
    """(use_lse, virtual, nk): whether normalize=False reads FlexAttention's log-sum-exp (everywhere but its compiled
    CPU kernel), the virtual key ("eps", "w" or "none"), and the number of keys with it."""
    use_lse = not p.normalize and not (p.device.type == "cpu" and COMPILE)
    virtual = "eps" if p.normalize and p.eps > 0 else ("w" if not p.normalize and not use_lse else "none")
    return use_lse, virtual, p.N + (virtual != "none")


def _flex_core(q, k, v, rpe, rpe_extra, p: Problem, lin, block_mask):
    """Features, table, virtual key, then FlexAttention: (its output, its log-sum-exp or None, w or None, empty or
    None): w the virtual key's weight per row ("w" route), empty the rows of zero weight (where eps = 0). Heads are
    group-major (m * H + h). Nothing after FlexAttention: its compiled CPU kernel takes no fused epilogue
    (Inductor: "Unsupported for `epilogue_nodes` in CppFlexAttentionTemplate")."""
    B, H, N, M, E = p.B, p.H, p.N, p.M, p.num_extra
    G = p.Dv // M
    dtype = q.dtype
    use_lse, virtual, nk = _route(p)

    heads = torch.arange(H, device=q.device).repeat(M)

    def per_group(x):                          # (B, H, n, D) -> (B, M*H, n, D), the same for every group
        # (a gather: Inductor's FlexAttention lowering takes no view of a 5-D expand or repeat)
        return x if M == 1 else x.index_select(1, heads)

    qf = feature_map(q.float() * p.scale, p.feature_map)
    kf = feature_map(k.float(), p.feature_map)
    empty = None
    if p.normalize and p.eps == 0:           # rows of zero weight (relu): 0 / 0 in the formula, 0 in FlexAttention
        seen = kf.cumsum(dim=2) if p.causal else kf.sum(dim=2, keepdim=True)
        empty = (qf * seen).sum(-1) == 0     # (B, H, N)
    vg = v.reshape(B, H, N, M, G).permute(0, 3, 1, 2, 4).reshape(B, M * H, N, G)
    table_extent = math.prod([2 * s - 1 for s in p.grid])
    virtual_logw, w = None, None
    if virtual == "eps":
        virtual_logw = rpe.new_full((M * H,), math.log(p.eps), dtype=torch.float32)
        kf = torch.cat([kf, kf.new_zeros(B, H, 1, p.Dk)], dim=2)
        vg = torch.cat([vg, vg.new_zeros(B, M * H, 1, G)], dim=2)
    table = _table(rpe.float(), None if rpe_extra is None else rpe_extra.float(), p, virtual_logw)
    if virtual == "w":
        # the virtual key's weight w_i = exp(max L) phi(q_i) . mean_j phi(k_j), so that w_i >= den_i / N
        table = torch.cat([table, table.amax(dim=1, keepdim=True)], dim=1)
        kmean = kf.mean(dim=2, keepdim=True)
        w = torch.exp(table[:, -1]).view(1, M * H, 1) * per_group((qf * kmean).sum(-1, keepdim=True))[..., 0]
        kf = torch.cat([kf, kmean], dim=2)
        vg = torch.cat([torch.cat([vg, vg.new_zeros(B, M * H, N, 1)], dim=3),
                        torch.cat([vg.new_zeros(B, M * H, 1, G), vg.new_ones(B, M * H, 1, 1)], dim=3)], dim=2)
    if virtual == "w":                       # O[:G] = num / (den + w) can be far below 1: kept in float32
        dtype = torch.float32
    qf, kf, vg = per_group(qf.to(dtype)), per_group(kf.to(dtype)), vg.to(dtype)
    least = _min_head_dim(q.device)          # zero features add nothing to q.k; zero value channels are dropped
    pad_k, pad_v = max(0, least - p.Dk), max(0, least - vg.shape[-1])
    if pad_k:
        qf, kf = torch.nn.functional.pad(qf, (0, pad_k)), torch.nn.functional.pad(kf, (0, pad_k))
    if pad_v:
        vg = torch.nn.functional.pad(vg, (0, pad_v))
    score_mod = _score_mod(table, lin, E, N, table_extent, virtual)
    module = _flex()
    aux = module.AuxRequest(lse=True) if use_lse else None
    result = module.flex_attention(qf.contiguous(), kf.contiguous(), vg.contiguous(), score_mod=score_mod,
                                   block_mask=block_mask, scale=1.0, return_aux=aux)
    out, lse = (result[0], result[1].lse) if use_lse else (result, None)
    return out, lse, w, empty


def _epilogue(out, lse, w, empty, p: Problem, dtype) -> torch.Tensor:
    """FlexAttention's output (B, M*H, nq, G') -> (B, H, N, Dv): normalize=False's numerator, O * sum_j W_ij (from the
    log-sum-exp, or on the "w" route O[:G] w / O[G]), NaN for rows of zero weight where eps = 0 (the formula's
    0 / 0), padding dropped, groups back into channels. It works on the token-major view (B, N, H*M, G'): inside a
    user's compiled graph, Inductor then does not fuse it into FlexAttention's CPU kernel (which takes no epilogue)."""
    B, H, N, M = p.B, p.H, p.N, p.M
    G = p.Dv // M
    o = out.transpose(1, 2)
    if lse is not None:
        o = o[..., :G].float() * torch.exp(lse.transpose(1, 2))[..., None]
    elif w is not None:
        w = w.transpose(1, 2)
        o = torch.where((w > 0)[..., None], o[..., :G].float() * (w / o[..., G].float())[..., None], 0.0)
    else:
        o = o[..., :G]
    if empty is not None:
        o = torch.where(empty.transpose(1, 2).repeat(1, 1, M)[..., None], float("nan"), o)
    return o.to(dtype).reshape(B, N, M, H, G).permute(0, 3, 1, 2, 4).reshape(B, H, N, p.Dv)
