"""torch.library custom ops (opcheck) and torch.compile(fullgraph=True) of LiSAAttention and a ViT block.

Every kernel entry point is a custom op with a fake implementation and (for the cores) an autograd
registration (lisa_kernels/ops.py, lisa_kernels/cuda_fft.py); ``opcheck`` tests the schema, the fake
tensor implementation, the autograd registration and AOT dispatch with dynamic shapes. The compile tests
check that dynamo sees no graph break and that the compiled module matches eager, forward and gradients.
"""

import math

import pytest
import torch
import torch.nn as nn

import lisa_kernels  # noqa: F401  (registers the ops)
from lisa_kernels._compose import linear_log_table
from lisa_kernels._validate import check_inputs
from lisa_kernels.cuda_fft import HAS_EXTENSION, extension_reason
from lisa_kernels.nn import LiSAAttention
from lisa_kernels.triton_direct import triton_direct_reason

OPS = torch.ops.lisa_kernels


@pytest.fixture(autouse=True)
def _no_poison(monkeypatch):
    """opcheck and AOTAutograd allocate their own buffers with torch.empty*: tests/conftest.py's NaN poisoning
    (a monkeypatch) would leak into their comparisons, so it is undone here. The ops' own outputs are checked
    for unwritten elements by the backend tests, where the poisoning stays on."""
    monkeypatch.undo()


def _core_args(grid=(4, 3), M=2, B=2, H=2, Dk=5, G=3, causal=False, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    ng = math.prod(grid)
    fq = torch.rand(B, H, ng, Dk, generator=g) + 0.1
    fk = torch.rand(B, H, ng, Dk, generator=g) + 0.1
    v = torch.randn(B, H, ng, G * M, generator=g)
    logtab = 0.5 * torch.randn(H, M, *[2 * s - 1 for s in grid], generator=g)
    if causal:
        p = check_inputs(fq, fk, v, logtab, grid=grid, causal=True)
        logtab = linear_log_table(logtab, p)
    return [t.requires_grad_(requires_grad) for t in (fq, fk, v, logtab)]


@pytest.mark.parametrize("grid,causal", [((4, 3), False), ((7,), True), ((2, 2, 3), False)])
def test_opcheck_direct_core(grid, causal):
    args = _core_args(grid, causal=causal)
    torch.library.opcheck(OPS.direct_core, (*args, list(grid), causal))
    gnum, gden = torch.randn(2, 2, math.prod(grid), 6), torch.randn(2, 2, math.prod(grid), 2)
    plain = [t.detach() for t in args]
    torch.library.opcheck(OPS.direct_core_backward, (*plain, gnum, gden, list(grid), causal))


PASSES = ["torch", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_EXTENSION, reason=f"lisa_kernels._C is not built: {extension_reason()}")), "triton"]


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("grid,causal,circular", [((4, 3), False, False), ((6,), True, False), ((3, 4), False, True)])
def test_opcheck_fft_core(passes, grid, causal, circular):
    if passes == "triton":
        x = torch.zeros(1, 1, 4, 4)
        reason = triton_direct_reason(check_inputs(x, x, x, torch.zeros(1, 1, 7), grid=(4,)))
        if reason is not None:
            pytest.skip(f"Triton cannot run here: {reason}")
    args = _core_args(grid, causal=causal)
    if circular:
        args[3] = (0.5 * torch.randn(2, 2, *grid)).requires_grad_()
    torch.library.opcheck(OPS.fft_core, (*args, list(grid), causal, circular, passes))
    num, den, below = OPS.fft_core(*[t.detach() for t in args], list(grid), causal, circular, passes)
    torch.library.opcheck(OPS.fft_core_backward, (*[t.detach() for t in args], below, torch.randn_like(num),
                                                  torch.randn_like(den), list(grid), causal, circular, passes))


def test_opcheck_triton_direct():
    g = torch.Generator().manual_seed(1)
    B, H, E, grid, M = 2, 2, 1, (3, 4), 2
    N = E + math.prod(grid)
    q, k = torch.randn(B, H, N, 8, generator=g), torch.randn(B, H, N, 8, generator=g)
    v = torch.randn(B, H, N, 4 * M, generator=g)
    rpe, rx = 0.5 * torch.randn(H, M, 5, 7, generator=g), 0.5 * torch.randn(H, M, 3, generator=g)
    p = check_inputs(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx)
    reason = triton_direct_reason(p)
    if reason is not None:
        pytest.skip(f"Triton cannot run here: {reason}")
    options = (list(grid), E, "elu1", True, 1e-6, False, "zero", 1.0)
    args = [t.requires_grad_() for t in (q, k, v, rpe, rx)]
    torch.library.opcheck(OPS.triton_direct, (*args, *options))
    saved = OPS.triton_direct(*[t.detach() for t in args], *options)
    torch.library.opcheck(OPS.triton_direct_backward,
                          (*[t.detach() for t in args], *saved, torch.randn_like(saved[0]), *options))


@pytest.mark.skipif(not HAS_EXTENSION, reason=f"lisa_kernels._C is not built: {extension_reason()}")
def test_opcheck_extension_passes():
    a, bt = torch.randn(2, 6, 3), torch.randn(2, 6, 2, 4)
    chunk, grid, sizes = [0, 2, 0, 3, 0, 2, 0, 4, 2], [2, 3], [3, 5]
    torch.library.opcheck(OPS.fft_form, (a, bt, chunk, grid, sizes))
    X = OPS.fft_form(a, bt, chunk, grid, sizes)
    Xh = torch.fft.rfftn(X, dim=(-2, -1))
    Kh = torch.randn(2, 2, 3, 3, dtype=torch.complex64)
    torch.library.opcheck(OPS.fft_multiply_, (Xh.clone(), Kh, chunk, grid, sizes, True))
    torch.library.opcheck(OPS.fft_contract_d, (X, a, chunk, grid, sizes))
    torch.library.opcheck(OPS.fft_contract_mc, (X, bt, chunk, grid, sizes))
    torch.library.opcheck(OPS.fft_corr, (Xh, Xh.clone(), chunk, grid, sizes))


class Block(nn.Module):
    """A pre-norm ViT block as timm writes it: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, heads, grid, backend):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LiSAAttention(dim, num_heads=heads, qkv_bias=True, grid=grid, num_extra=1, num_rpe=2,
                                  backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


def _compare_compiled(module, x):
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rpe" in name:
                param.normal_(0, 0.5)       # structure matters: not the zero (linear attention) start
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(module, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c = compiled(x1)
    grads_c = torch.autograd.grad(out_c.square().sum(), [x1] + list(module.parameters()))
    out_e = module(x2)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x2] + list(module.parameters()))
    assert torch.allclose(out_c, out_e, rtol=1e-4, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        assert torch.allclose(gc, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "fft"])
def test_compile_lisa_attention_fullgraph(backend):
    torch._dynamo.reset()
    module = LiSAAttention(32, num_heads=2, grid=(4, 5), num_extra=1, num_rpe=2, backend=backend)
    _compare_compiled(module, torch.randn(2, 21, 32))


def test_compile_vit_block_fullgraph():
    torch._dynamo.reset()
    _compare_compiled(Block(32, 2, (3, 4), "direct"), torch.randn(2, 13, 32))
