"""The bf16 Triton kernels' weight rounding, emulated on a CPU: how much the packed bf16x2 weight products
(``round(round(A) round(r'))``, :func:`lisa_kernels.triton_direct_kernels._wmul`) add to the forward's error,
against the fp32 product rounded once (``round(A r')``, the kernels before) and against the same computation done
by PyTorch in bf16 (``backend="reference"`` on bf16 inputs, the yardstick of docs/precision.md).

The kernel model: features phi(q), phi(k) rounded to bf16, A their fp32 dot, r' = exp(log r - max) per group,
W per group as above, values in bf16, out = (W v) / (W 1) accumulated in fp32. Errors are the largest absolute
error against the float64 reference, relative to the largest output.

    python benchmarks/bf16_weight_rounding.py          # 32x32 grid, D = 64, M = 4 (~1 min on a CPU)
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lisa_kernels as L  # noqa: E402


def main(side: int = 32, M: int = 4, G: int = 16, Dk: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = (side, side)
    N = math.prod(grid)
    q = torch.randn(1, 1, N, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, N, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, N, G * M, generator=g, dtype=torch.float64)
    rpe = 0.5 * torch.randn(1, M, 2 * side - 1, 2 * side - 1, generator=g, dtype=torch.float64)
    bf = lambda t: t.to(torch.bfloat16)      # noqa: E731
    exact = L.lisa_attention(q, k, v, rpe, grid=grid, backend="reference")[0, 0]
    torch_bf16 = L.lisa_attention(bf(q), bf(k), bf(v), bf(rpe), grid=grid, backend="reference")[0, 0].double()
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0.0)))   # noqa: E731
    A = (bf(phi(q[0, 0].float())).float() @ bf(phi(k[0, 0].float())).float().T)
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    off = pos[:, None, :] - pos[None, :, :] + side - 1
    scale = exact.abs().max().item()
    print(f"grid {side}x{side}, D = {Dk}, M = {M}, G = {G}: largest error / largest output")
    print(f"  PyTorch in bf16 (reference backend)       {(torch_bf16 - exact).abs().max().item() / scale:.2e}")
    for name in ("fp32 product, rounded once", "packed bf16x2 products"):
        out = torch.empty(N, G * M, dtype=torch.float64)
        for m in range(M):
            lr = rpe[0, m].float()
            r = torch.exp(lr - lr.max())[off[..., 0], off[..., 1]]
            W = bf(A * r) if name.startswith("fp32") else bf(bf(A).float() * bf(r).float())
            acc = W.float() @ bf(v[0, 0, :, m * G:(m + 1) * G].float()).float()
            out[:, m * G:(m + 1) * G] = (acc / W.float().sum(1)[:, None]).double()
        print(f"  kernel model, {name:28s} {(out - exact).abs().max().item() / scale:.2e}")


if __name__ == "__main__":
    main()
