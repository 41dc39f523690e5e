"""The yardstick of ``kernel_report.py``: a textbook FlashAttention-2 (softmax attention) in Triton.

Forward, one program per (query tile, batch * head), online softmax in base 2:

    s = (q k^T) * scale * log2(e);   m' = max(m, rowmax(s));   p = 2^(s - m')
    l = l 2^(m - m') + rowsum(p);    acc = acc 2^(m - m') + p v;     out = acc / l,  lse = m + log2(l)

Backward as in FlashAttention-2: ``delta = rowsum(dO * O)``, then a dK/dV kernel (per key tile, over query
tiles) and a dQ kernel (per query tile, over key tiles), each recomputing ``p = 2^(s - lse)``:

    dV += p^T dO;   dp = dO V^T;   ds = p (dp - delta);   dK += ds^T Q * scale;   dQ += ds K * scale

``EVEN`` (N a multiple of both block sizes) drops the ragged-edge masks, as the textbook loop has none. It is
tested against ``F.scaled_dot_product_attention`` (tests/test_kernel_report.py), so the yardstick is a real
FlashAttention-2 and its compiled loop a fair one to compare with.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from lisa_kernels.triton_direct import Launch

LOG2E = 1.4426950408889634


@triton.jit
def fa2_fwd_kernel(Q, K, V, Out, LSE, N, qk_scale, D: tl.constexpr, EVEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    base = bh * N * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m < N)[:, None] | EVEN, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < N)[:, None] | EVEN
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if not EVEN:
            s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    rows = (offs_m < N) | EVEN
    tl.store(Out + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
             mask=rows[:, None])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=rows)


@triton.jit
def fa2_bwd_delta_kernel(Out, DO, Delta, N, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    ptr = bh * N * D + offs_m[:, None] * D + offs_d[None, :]
    mask = (offs_m < N)[:, None]
    o = tl.load(Out + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def fa2_bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, N, qk_scale, sm_scale, D: tl.constexpr,
                        EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    base = bh * N * D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_mask = (offs_n < N)[:, None] | EVEN
    k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m < N)[:, None] | EVEN
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=(offs_m < N) | EVEN, other=float("inf"))
        delta = tl.load(Delta + bh * N + offs_m, mask=(offs_m < N) | EVEN, other=0.0)
        pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def fa2_bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, N, qk_scale, sm_scale, D: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    base = bh * N * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_mask = (offs_m < N)[:, None] | EVEN
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * N + offs_m, mask=(offs_m < N) | EVEN, other=float("inf"))
    delta = tl.load(Delta + bh * N + offs_m, mask=(offs_m < N) | EVEN, other=0.0)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < N)[:, None] | EVEN
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if not EVEN:
            p = tl.where((offs_n < N)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(DQ + base + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) compiled by the report: the shapes FlashAttention-2 uses at D=64
CONFIGS = {"fwd": [(64, 64, 4, 2), (128, 64, 8, 2)], "dkdv": [(64, 64, 4, 2), (32, 64, 4, 2)],
           "dq": [(64, 64, 4, 2), (64, 32, 4, 2)]}


def launches(B, H, N, D, dtype, device="meta", q=None, k=None, v=None, do=None, interpret=False):
    """The yardstick's launches (pass "fwd" / "bwd", Launch) on given or placeholder (B, H, N, D) tensors."""
    mk = functools.partial(torch.empty, device=device if q is None else q.device, dtype=dtype)
    q, k, v = (mk(B, H, N, D) if t is None else t for t in (q, k, v))
    do = mk(B, H, N, D) if do is None else do
    out, dq, dk, dv = mk(B, H, N, D), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(D)
    even = not interpret and N % 128 == 0
    fwd = Launch("fa2_fwd", fa2_fwd_kernel, dict(Q=q, K=k, V=v, Out=out, LSE=lse, N=N, qk_scale=sm_scale * LOG2E,
                                                 D=D, EVEN=even),
                 lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H), tuned="fwd")
    dl = Launch("fa2_bwd_delta", fa2_bwd_delta_kernel, dict(Out=out, DO=do, Delta=delta, N=N, D=D, BLOCK_M=64),
                (triton.cdiv(N, 64), B * H))
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, Delta=delta, N=N, qk_scale=sm_scale * LOG2E, sm_scale=sm_scale,
                  D=D, EVEN=even)
    dkdv = Launch("fa2_bwd_dkdv", fa2_bwd_dkdv_kernel, dict(**common, DK=dk, DV=dv),
                  lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H), tuned="dkdv")
    dqk = Launch("fa2_bwd_dq", fa2_bwd_dq_kernel, dict(**common, DQ=dq),
                 lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H), tuned="dq")
    for launch in (fwd, dkdv, dqk):
        launch.block_configs = CONFIGS[launch.tuned]
    return [("fwd", fwd), ("bwd", dl), ("bwd", dkdv), ("bwd", dqk)], dict(out=out, dq=dq, dk=dk, dv=dv)


def run(q, k, v, do):
    """Forward and backward of the yardstick on real tensors: (out, dq, dk, dv). For its test."""
    interpret = q.device.type == "cpu"
    B, H, N, D = q.shape
    plan, res = launches(B, H, N, D, q.dtype, q=q.contiguous(), k=k.contiguous(), v=v.contiguous(),
                         do=do.contiguous(), interpret=interpret)
    for _, launch in plan:
        if launch.tuned is None:
            launch.kernel[launch.grid](**launch.args)
            continue
        cfg = launch.configs(interpreting=interpret)[0]
        launch.kernel[launch.grid(cfg)](**launch.args, **cfg)
    return res["out"], res["dq"], res["dk"], res["dv"]
