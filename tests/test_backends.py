"""Every fast CPU backend (those of the registry that run float64 on the CPU, and "auto") against
backend="reference", forward and gradients.

Errors are relative: max|a - b| / max|b|. float64 must agree to 1e-9 and float32 to 1e-4; float16 and
bfloat16 must be within twice the error that the reference itself makes when PyTorch computes it in that
precision (the FlashAttention criterion), plus half an ulp of the dtype.

The reference is checked, in turn, against independent formulas: a loop-by-loop transcription of docs/operator.md
and, for rpe == 0, plain normalized linear attention.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import lisa_kernels
from lisa_test_utils import (CPU_FLOAT64, assert_close_to_reference, attend, cast_inputs, errors, forward_backward,
                             make_inputs, rel_err, table_shape)

FAST = CPU_FLOAT64 + ("auto",)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}

GRIDS = [(7,), (13,), (5, 3), (4, 7), (3, 4, 5), (2, 3, 3)]
EXTRAS = (0, 1, 4)
GROUPS = (1, 2, 4)
# the options not in the grid x E x M product are cycled through: each grid sees all 8 combinations
OPTION_CYCLE = list(itertools.product(("zero", "circular"), (True, False), ("elu1", "relu")))


def _cycled(grid, E, M):
    i = GRIDS.index(grid) * 9 + EXTRAS.index(E) * 3 + GROUPS.index(M)
    boundary, normalize, feature_map = OPTION_CYCLE[i % len(OPTION_CYCLE)]
    causal = len(grid) == 1 and i % 2 == 1
    return dict(boundary=boundary, normalize=normalize, feature_map=feature_map, causal=causal)


@pytest.mark.parametrize("backend", CPU_FLOAT64)
@pytest.mark.parametrize("M", GROUPS)
@pytest.mark.parametrize("E", EXTRAS)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_matches_reference_float64(grid, E, M, backend):
    opts = _cycled(grid, E, M)
    inputs = make_inputs(grid, E=E, M=M, Dk=3, Dv=8, boundary=opts["boundary"], seed=hash((grid, E, M)) % 1000)
    assert_close_to_reference(inputs, backend, TOL[torch.float64], grid=grid, num_extra=E, **opts)


@pytest.mark.parametrize("E, M", [(0, 1), (1, 2), (4, 4)])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_auto_matches_reference_float64(grid, E, M):
    opts = _cycled(grid, E, M)
    inputs = make_inputs(grid, E=E, M=M, Dk=3, Dv=8, boundary=opts["boundary"], seed=hash((grid, E, M)) % 1000)
    assert_close_to_reference(inputs, "auto", TOL[torch.float64], grid=grid, num_extra=E, **opts)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_matches_reference_float32(grid, backend):
    E, M = 1, 2
    opts = _cycled(grid, E, M)
    inputs = make_inputs(grid, E=E, M=M, Dk=4, Dv=6, boundary=opts["boundary"], dtype=torch.float32, seed=3)
    assert_close_to_reference(inputs, backend, TOL[torch.float32], grid=grid, num_extra=E, **opts)


# --------------------------------------------------------------------------- one option at a time

@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("grid", [(6,), (4, 5), (3, 2, 4)], ids=str)
def test_boundary(grid, boundary, backend):
    inputs = make_inputs(grid, E=2, M=2, boundary=boundary, seed=11)
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=2, boundary=boundary)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("feature_map", ["elu1", "relu"])
@pytest.mark.parametrize("E", [0, 3])
@pytest.mark.parametrize("boundary", ["zero", "circular"])
def test_causal(boundary, E, feature_map, backend):
    grid = (11,)
    inputs = make_inputs(grid, E=E, M=2, boundary=boundary, seed=12)
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=E, boundary=boundary, causal=True,
                              feature_map=feature_map)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_causal_ignores_the_future(backend):
    """Changing tokens j > i (q, k and v) leaves out_i unchanged; changing token i changes it."""
    grid, E, t = (10,), 2, 6
    inputs = make_inputs(grid, E=E, M=2, boundary="zero", seed=13, requires_grad=False)
    out = attend(inputs, backend, grid=grid, num_extra=E, causal=True)
    changed = dict(inputs)
    for n in ("q", "k", "v"):
        x = inputs[n].clone()
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:])
        changed[n] = x
    out2 = attend(changed, backend, grid=grid, num_extra=E, causal=True)
    torch.testing.assert_close(out2[:, :, :t + 1], out[:, :, :t + 1], rtol=1e-12, atol=1e-12)
    assert (out2[:, :, t + 1:] - out[:, :, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("grid", [(9,), (3, 5)], ids=str)
def test_normalize(grid, normalize, backend):
    inputs = make_inputs(grid, E=1, M=2, seed=14)
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=1, normalize=normalize)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("feature_map", ["elu1", "relu"])
@pytest.mark.parametrize("grid", [(9,), (3, 5), (2, 2, 3)], ids=str)
def test_feature_map(grid, feature_map, backend):
    inputs = make_inputs(grid, E=1, M=1, Dk=5, seed=15)
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=1, feature_map=feature_map)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("scale, eps", [(0.25, 1e-6), (2.0, 0.0), (1.0, 0.3)])
def test_scale_and_eps(scale, eps, backend):
    grid = (4, 3)
    inputs = make_inputs(grid, E=1, M=2, seed=16)
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=1, scale=scale, eps=eps)


@pytest.mark.parametrize("backend", FAST)
def test_extra_tokens_without_rpe_extra(backend):
    """num_extra > 0 with rpe_extra=None: extra pairs get weight exp(0) = 1."""
    grid = (3, 4)
    inputs = make_inputs(grid, E=3, M=2, seed=17, rpe_extra=False)
    assert inputs["rpe_extra"] is None
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=3)
    # ... which is the same as passing zeros
    zeros = dict(inputs, rpe_extra=torch.zeros(2, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(attend(zeros, backend, grid=grid, num_extra=3),
                               attend(inputs, backend, grid=grid, num_extra=3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("grid", [(1,), (1, 6), (5, 1), (1, 1, 4), (3, 1, 2)], ids=str)
def test_grids_with_unit_axes(grid, backend):
    E = 2  # (1,) alone would be a single token, whose normalized gradients are pure round-off
    inputs = make_inputs(grid, E=E, M=2, seed=18)
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=E, boundary="zero")
    inputs = make_inputs(grid, E=E, M=2, seed=19, boundary="circular")
    assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=E, boundary="circular")


DEGENERATE = [
    # B, H, grid, E, M, Dk, Dv
    (1, 1, (1,), 2, 1, 2, 2), (1, 1, (1,), 1, 1, 2, 1), (1, 1, (1, 1), 1, 1, 3, 3), (1, 1, (1, 1, 1), 3, 1, 1, 2),
    (1, 1, (3,), 0, 1, 2, 1), (1, 1, (2, 2), 1, 1, 1, 1), (2, 2, (1,), 1, 1, 2, 2), (1, 1, (1,), 2, 2, 2, 2),
    (1, 1, (4,), 0, 1, 1, 3), (2, 1, (3,), 1, 3, 1, 3), (1, 2, (2, 1), 0, 1, 2, 1),
]


@pytest.mark.parametrize("case", DEGENERATE, ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_degenerate_shapes(case, backend):
    """Sizes of 1 everywhere they are allowed: one batch, one head, one group, one channel, one grid token.
    (These once crashed: the custom ops returned num and den as views of one buffer, which torch.library
    forbids.)"""
    B, H, grid, E, M, Dk, Dv = case
    inputs = make_inputs(grid, E=E, M=M, Dk=Dk, Dv=Dv, B=B, H=H, seed=37, rpe_extra=E > 0)
    # with Dk = 1 phi(q_i) cancels in num / (den + eps): dq is of the size of eps, so errors are taken
    # relative to at least 1e-3 (as in test_hypothesis.py)
    assert_close_to_reference(inputs, backend, 1e-9, floor=1e-3 if Dk == 1 else 0.0, grid=grid, num_extra=E)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
def test_grid_spellings(backend):
    """grid may be an int (1D), a list or a torch.Size; all mean the same grid."""
    inputs = make_inputs((8,), E=1, requires_grad=False, seed=20)
    base = attend(inputs, backend, grid=(8,), num_extra=1)
    for spelling in (8, [8], torch.Size([8])):
        torch.testing.assert_close(attend(inputs, backend, grid=spelling, num_extra=1), base, rtol=0, atol=0)


# --------------------------------------------------------------------------- layouts, batches, requires_grad

def _qkv_views(B, H, N, D, seed):
    """q, k, v as timm makes them: (B, N, 3, H, D) -> permute -> unbind: non-contiguous views of one leaf."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, q, k, v


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("grid, boundary, causal", [((4, 5), "zero", False), ((3, 2, 3), "circular", False),
                                                    ((12,), "zero", True)], ids=str)
def test_non_contiguous_inputs(grid, boundary, causal, backend):
    B, H, E, M, D = 2, 3, 1, 2, 4
    N = E + math.prod(grid)
    qkv, q, k, v = _qkv_views(B, H, N, D, seed=21)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    gen = torch.Generator().manual_seed(22)
    tab = table_shape(grid, boundary)
    # rpe: a transposed view (last two table axes, or H and M); rpe_extra: a transposed view too
    base = (0.5 * torch.randn(M, H, *tab, generator=gen, dtype=torch.float64)).requires_grad_()
    rpe = base.transpose(0, 1)
    base_x = (0.5 * torch.randn(H, 3, M, generator=gen, dtype=torch.float64)).requires_grad_()
    rpe_extra = base_x.transpose(1, 2)
    assert not rpe.is_contiguous() and not rpe_extra.is_contiguous()
    opts = dict(grid=grid, num_extra=E, boundary=boundary, causal=causal)
    g = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)

    def run(be):
        out = lisa_kernels.lisa_attention(q, k, v, rpe, rpe_extra=rpe_extra, backend=be, **opts)
        return out.detach(), dict(zip(("qkv", "rpe", "rpe_extra"),
                                      torch.autograd.grad(out, (qkv, base, base_x), g)))

    errs = errors(run(backend), run("reference"))
    assert max(errs.values()) <= 1e-9, errs
    # and the same numbers as contiguous copies
    cont = lisa_kernels.lisa_attention(q.contiguous(), k.contiguous(), v.contiguous(), rpe.contiguous(),
                                       rpe_extra=rpe_extra.contiguous(), backend=backend, **opts)
    assert rel_err(run(backend)[0], cont) <= 1e-12


@pytest.mark.parametrize("backend", FAST)
def test_rpe_shared_across_heads_by_expand(backend):
    """An expanded (stride-0) rpe: the gradient of its base sums over the heads."""
    grid, H = (3, 4), 3
    inputs = make_inputs(grid, E=1, M=2, H=H, seed=23)
    base = (0.5 * torch.randn(1, 2, *table_shape(grid, "zero"), dtype=torch.float64)).requires_grad_()
    inputs["rpe"] = base.expand(H, -1, -1, -1)
    g = torch.randn(inputs["v"].shape, dtype=torch.float64)
    out = attend(inputs, backend, grid=grid, num_extra=1)
    ref = attend(inputs, "reference", grid=grid, num_extra=1)
    assert rel_err(out, ref) <= 1e-9
    (gb,) = torch.autograd.grad(out, base, g)
    (gr,) = torch.autograd.grad(ref, base, g)
    assert rel_err(gb, gr) <= 1e-9


@pytest.mark.parametrize("backend", FAST)
def test_batch_and_heads_are_independent(backend):
    """Each (batch, head) slice computed alone equals its slice of the batched call."""
    grid, B, H, E = (4, 4), 3, 2, 1
    inputs = make_inputs(grid, E=E, M=2, B=B, H=H, seed=24, requires_grad=False)
    full = attend(inputs, backend, grid=grid, num_extra=E)
    for b in range(B):
        for h in range(H):
            one = {"q": inputs["q"][b:b + 1, h:h + 1], "k": inputs["k"][b:b + 1, h:h + 1],
                   "v": inputs["v"][b:b + 1, h:h + 1], "rpe": inputs["rpe"][h:h + 1],
                   "rpe_extra": inputs["rpe_extra"][h:h + 1]}
            part = attend(one, backend, grid=grid, num_extra=E)
            assert rel_err(full[b:b + 1, h:h + 1], part) <= 1e-12


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("which", [("v",), ("rpe",), ("q", "rpe_extra"), ("k",)], ids=str)
def test_some_inputs_require_grad(which, backend):
    grid = (3, 3)
    inputs = make_inputs(grid, E=2, M=2, seed=25, requires_grad=False)
    for n in which:
        inputs[n].requires_grad_()
    errs = assert_close_to_reference(inputs, backend, 1e-9, grid=grid, num_extra=2)
    assert set(errs) == {"out"} | set(which)


@pytest.mark.parametrize("backend", FAST)
def test_no_grad_and_inference_mode(backend):
    grid = (5, 2)
    inputs = make_inputs(grid, E=1, M=2, seed=26)
    ref = attend(inputs, "reference", grid=grid, num_extra=1).detach()
    with torch.no_grad():
        out = attend(inputs, backend, grid=grid, num_extra=1)
    assert not out.requires_grad and rel_err(out, ref) <= 1e-9
    with torch.inference_mode():
        out = attend(cast_inputs(inputs, torch.float64, requires_grad=False), backend, grid=grid, num_extra=1)
    assert rel_err(out, ref) <= 1e-9


# --------------------------------------------------------------------------- small workspaces: many chunks

@pytest.fixture
def small_budgets():
    """Tiny block / workspace budgets, so that the blocking and chunking loops run many iterations."""
    old = lisa_kernels.set_config(direct_block_bytes=256, fft_workspace_bytes=4096)
    yield
    lisa_kernels.set_config(direct_block_bytes=old.direct_block_bytes, fft_workspace_bytes=old.fft_workspace_bytes)


def _count_calls(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("grid, E, M, boundary, causal", [
    ((17,), 2, 2, "zero", True), ((16,), 0, 1, "circular", False), ((6, 5), 1, 2, "zero", False),
    ((5, 4), 3, 4, "circular", False), ((3, 4, 3), 1, 2, "zero", False), ((2, 3, 4), 0, 1, "circular", False),
], ids=str)
def test_small_block_budget_direct(small_budgets, monkeypatch, grid, E, M, boundary, causal):
    # the blocked loop (the fused kernel: test_direct_cpu.py)
    monkeypatch.setattr(lisa_kernels.direct, "_C_DIRECT", None)
    matmuls = _count_calls(monkeypatch, torch, "matmul")
    inputs = make_inputs(grid, E=E, M=M, Dk=3, Dv=8, B=2, H=2, boundary=boundary, seed=27)
    assert_close_to_reference(inputs, "direct", 1e-9, grid=grid, num_extra=E, boundary=boundary, causal=causal)
    # with a 256-byte weight tile each block holds a single query row of the grid: about Ng blocks per pass
    assert len(matmuls) >= math.prod(grid), (
        f"the direct path made only {len(matmuls)} torch.matmul calls for {math.prod(grid)} grid queries: "
        "direct_block_bytes seems to be ignored")


@pytest.mark.parametrize("grid, E, M, boundary, causal", [
    ((17,), 2, 2, "zero", True), ((16,), 0, 1, "circular", False), ((6, 5), 1, 2, "zero", False),
    ((5, 4), 3, 2, "circular", False), ((3, 4, 3), 1, 2, "zero", False), ((2, 3, 4), 0, 1, "circular", False),
], ids=str)
def test_small_workspace_fft(small_budgets, monkeypatch, grid, E, M, boundary, causal):
    monkeypatch.setattr(lisa_kernels.fft, "_C_FFT_CPU", None)   # the chunked torch passes (tests/test_fft_cpu.py)
    ffts = _count_calls(monkeypatch, torch.fft, "rfft")      # the first (pruned) stage of every chunk's transform
    B, H, Dk, Dv = 1, 2, 2, 4
    inputs = make_inputs(grid, E=E, M=M, Dk=Dk, Dv=Dv, B=B, H=H, boundary=boundary, seed=28)
    assert_close_to_reference(inputs, "fft", 1e-9, grid=grid, num_extra=E, boundary=boundary, causal=causal)
    # the whole field has B*H*Dk*(Dv+M) channels; a 4 KiB workspace holds at most a few of them at a time
    assert len(ffts) >= B * H * Dk, (
        f"the fft path made only {len(ffts)} torch.fft.rfft calls for a field of {B * H * Dk * (Dv + M)} "
        "channels: fft_workspace_bytes seems to be ignored")


@pytest.mark.parametrize("backend", CPU_FLOAT64)
def test_budget_does_not_change_the_result(backend):
    """Different chunkings of the same problem give the same numbers (to round-off)."""
    grid = (7, 6)
    inputs = make_inputs(grid, E=2, M=2, B=2, H=2, seed=29)
    results = []
    for budget in (2**30, 1 << 14, 512):
        lisa_kernels.set_config(direct_block_bytes=budget, fft_workspace_bytes=budget)
        results.append(forward_backward(inputs, backend, grid=grid, num_extra=2))
    for other in results[1:]:
        errs = errors(other, results[0])
        assert max(errs.values()) <= 1e-12, errs


# --------------------------------------------------------------------------- a long sequence in float32

@pytest.mark.parametrize("backend", CPU_FLOAT64)
@pytest.mark.parametrize("causal", [False, True], ids=["causal=False", "causal=True"])
def test_float32_long_sequence(causal, backend):
    """N = 4096 tokens in float32 within 1e-4 of float64 (computed by backend="direct", which the rest of this
    file checks against the dense reference; the dense reference would need 1/2 GiB here)."""
    N = 4096
    grid = (N,)
    x = make_inputs(grid, B=1, H=1, Dk=16, Dv=16, dtype=torch.float32, seed=38)
    g = torch.randn(1, 1, N, 16, generator=torch.Generator().manual_seed(39))
    expected = forward_backward(cast_inputs(x, torch.float64), "direct", g.double(), grid=grid, causal=causal)
    errs = errors(forward_backward(x, backend, g, grid=grid, causal=causal), expected)
    assert max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize("backend", CPU_FLOAT64)
@pytest.mark.parametrize("causal", [False, True], ids=["causal=False", "causal=True"])
def test_float32_causal_first_token_attends_to_itself(causal, backend):
    """With causal=True (and no extra tokens) token 0 sees only itself: out_0 = v_0 A_00 r(0) / (A_00 r(0) + eps),
    at any sequence length. (causal=False: the same row computed by the float64 direct path.)"""
    N = 4096
    x = make_inputs((N,), B=1, H=1, Dk=16, Dv=16, dtype=torch.float32, seed=1, requires_grad=False)
    out = attend(x, backend, grid=(N,), causal=causal)
    if causal:
        w = (F.elu(x["q"][0, 0, 0]) + 1) @ (F.elu(x["k"][0, 0, 0]) + 1) * torch.exp(x["rpe"][0, 0, N - 1])
        expected = x["v"][0, 0, 0] * w / (w + 1e-6)
    else:
        expected = attend(cast_inputs(x, torch.float64, requires_grad=False), "direct", grid=(N,))[0, 0, 0]
    assert rel_err(out[0, 0, 0], expected) <= 1e-5, (out[0, 0, 0], expected)


# --------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_output_and_gradient_dtypes(dtype, backend):
    grid = (3, 3)
    inputs = make_inputs(grid, E=1, M=2, dtype=dtype, seed=30)
    out, grads = forward_backward(inputs, backend, grid=grid, num_extra=1)
    assert out.dtype == dtype and out.shape == inputs["v"].shape
    for name, g in grads.items():
        assert g.dtype == dtype and g.shape == inputs[name].shape, name
        assert torch.isfinite(g).all(), name


LOW_PRECISION_CASES = [
    # grid, E, M, boundary, causal, normalize, feature_map
    ((5, 3), 1, 2, "zero", False, True, "elu1"),
    ((13,), 0, 1, "circular", True, True, "elu1"),
    ((2, 3, 3), 2, 2, "circular", False, True, "relu"),
    ((4, 4), 1, 1, "zero", False, False, "elu1"),
]


@pytest.mark.parametrize("backend", CPU_FLOAT64)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_flash_attention_criterion(dtype, case, backend):
    """err(backend in fp16/bf16) <= 2 err(reference computed by PyTorch in fp16/bf16) + ulp/2, for the
    output and every gradient; errors against the float64 reference on the same (rounded) inputs."""
    grid, E, M, boundary, causal, normalize, feature_map = case
    inputs = make_inputs(grid, E=E, M=M, Dk=8, Dv=8, boundary=boundary, dtype=dtype, seed=31)
    exact = cast_inputs(inputs, torch.float64)
    g = torch.randn(inputs["v"].shape, generator=torch.Generator().manual_seed(32)).to(dtype)
    opts = dict(grid=grid, num_extra=E, boundary=boundary, causal=causal, normalize=normalize,
                feature_map=feature_map)
    expected = forward_backward(exact, "reference", g.double(), **opts)
    # PyTorch's own low-precision run is the yardstick; where it overflows (e.g. fp16 (den + eps)^2 underflowing
    # to 0 in the normalizer's gradient) it sets no bound
    torch_low = errors(forward_backward(inputs, "reference", g, **opts), expected, nonfinite_ok=True)
    assert math.isfinite(torch_low["out"])
    result = forward_backward(inputs, backend, g, **opts)
    assert result[0].dtype == dtype and all(t.dtype == dtype for t in result[1].values())
    ours = errors(result, expected)
    slack = torch.finfo(dtype).eps / 2
    bad = {n: (ours[n], torch_low[n]) for n in ours if not ours[n] <= 2 * torch_low[n] + slack}
    assert not bad, f"(ours, pytorch-{dtype}) relative errors: {bad}"


# --------------------------------------------------------------------------- independent formulas

def _phi(x, name):
    return F.elu(x) + 1 if name == "elu1" else F.relu(x)


def _linear_attention(q, k, v, feature_map, eps, causal=False):
    """phi(q) (phi(k)^T v) / (phi(q) phi(k)^T 1 + eps), per (batch, head); causal by prefix sums."""
    fq, fk = _phi(q, feature_map), _phi(k, feature_map)
    if causal:
        kv = torch.cumsum(fk[..., :, None] * v[..., None, :], dim=2)           # (B, H, N, Dk, Dv)
        num = torch.einsum("bhnd,bhnde->bhne", fq, kv)
        den = torch.einsum("bhnd,bhnd->bhn", fq, torch.cumsum(fk, dim=2))
    else:
        num = fq @ (fk.transpose(-1, -2) @ v)
        den = fq @ fk.sum(2)[..., None]
        den = den[..., 0]
    return num / (den[..., None] + eps)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("grid, E, boundary, causal, feature_map", [
    ((9,), 0, "zero", False, "elu1"), ((9,), 2, "circular", True, "elu1"), ((4, 5), 1, "zero", False, "relu"),
    ((3, 5), 3, "circular", False, "elu1"), ((2, 3, 4), 1, "zero", False, "elu1"), ((12,), 1, "zero", True, "relu"),
], ids=str)
def test_zero_rpe_is_linear_attention(grid, E, boundary, causal, feature_map, backend):
    inputs = make_inputs(grid, E=E, M=2, Dk=4, Dv=6, boundary=boundary, seed=33, rpe_extra=False)
    inputs["rpe"] = torch.zeros_like(inputs["rpe"])
    eps = 1e-6
    out = attend(inputs, backend, grid=grid, num_extra=E, boundary=boundary, causal=causal,
                 feature_map=feature_map, eps=eps)
    expected = _linear_attention(inputs["q"], inputs["k"], inputs["v"], feature_map, eps, causal)
    assert rel_err(out, expected) <= 1e-10


def _spec_loops(q, k, v, rpe, rpe_extra, grid, E, boundary, causal, normalize, eps, feature_map):
    """docs/operator.md written with Python loops over (b, h, i, j) and Python floats; no code of the package."""
    def phi(x):
        if feature_map == "elu1":
            return x + 1.0 if x > 0 else math.exp(x)
        return max(x, 0.0)

    B, H, N, Dk = q.shape
    Dv, M = v.shape[3], rpe.shape[1]
    G = Dv // M
    positions = list(itertools.product(*[range(s) for s in grid]))        # row-major
    Q, K, V, R = q.tolist(), k.tolist(), v.tolist(), rpe.tolist()
    RX = None if rpe_extra is None else rpe_extra.tolist()

    def log_weight(h, m, i, j):
        if i < E or j < E:
            kind = 0 if i < E <= j else (1 if j < E <= i else 2)
            return 0.0 if RX is None else RX[h][m][kind]
        pi, pj = positions[i - E], positions[j - E]
        entry = R[h][m]
        for a, s in enumerate(grid):
            delta = pi[a] - pj[a]
            entry = entry[delta % s if boundary == "circular" else delta + s - 1]
        return entry

    out = [[[[0.0] * Dv for _ in range(N)] for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            for i in range(N):
                fqi = [phi(x * 1.0) for x in Q[b][h][i]]
                num = [0.0] * Dv
                den = [0.0] * M
                for j in range(N):
                    if causal and j > i:
                        continue
                    a_ij = sum(x * phi(y) for x, y in zip(fqi, K[b][h][j]))
                    for m in range(M):
                        w = a_ij * math.exp(log_weight(h, m, i, j))
                        den[m] += w
                        for c in range(m * G, (m + 1) * G):
                            num[c] += w * V[b][h][j][c]
                for c in range(Dv):
                    out[b][h][i][c] = num[c] / (den[c // G] + eps) if normalize else num[c]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("backend", ("reference",) + FAST)
@pytest.mark.parametrize("grid, E, boundary, causal, normalize, feature_map", [
    ((3, 2), 2, "zero", False, True, "elu1"),
    ((3, 2), 2, "circular", False, True, "elu1"),
    ((2, 3), 2, "zero", False, False, "relu"),
    ((7,), 2, "zero", True, True, "elu1"),
    ((6,), 1, "circular", True, True, "relu"),
    ((2, 2, 2), 1, "circular", False, True, "elu1"),
], ids=str)
def test_matches_spec_loops(grid, E, boundary, causal, normalize, feature_map, backend):
    inputs = make_inputs(grid, E=E, M=2, Dk=3, Dv=4, B=1, H=2, boundary=boundary, seed=34, requires_grad=False)
    inputs["rpe_extra"] = 0.5 * torch.randn(2, 2, 3, dtype=torch.float64)
    opts = dict(grid=grid, num_extra=E, boundary=boundary, causal=causal, normalize=normalize,
                feature_map=feature_map, eps=1e-6)
    expected = _spec_loops(*(inputs[n] for n in ("q", "k", "v", "rpe", "rpe_extra")), grid, E, boundary, causal,
                           normalize, 1e-6, feature_map)
    assert rel_err(attend(inputs, backend, **opts), expected) <= 1e-12


def _unrolled(circular_table, grid):
    """The zero-boundary (2S-1 per axis) table that reads entry ``delta mod S`` of a circular table."""
    t = circular_table
    for a, s in enumerate(grid):
        t = t.index_select(2 + a, torch.remainder(torch.arange(-(s - 1), s), s))
    return t


@pytest.mark.parametrize("backend", ("spec-loops", "reference") + FAST)
def test_circular_is_zero_boundary_with_a_wrapped_table(backend):
    """boundary="circular" with table C equals boundary="zero" with the table Z[delta] = C[delta mod S]."""
    grid, E = (3, 2), 2
    x = make_inputs(grid, E=E, M=2, B=1, H=2, boundary="circular", requires_grad=False, seed=35)
    z = dict(x, rpe=_unrolled(x["rpe"], grid))

    def run(d, boundary, causal=False, g=grid):
        if backend == "spec-loops":
            return _spec_loops(*(d[n] for n in ("q", "k", "v", "rpe", "rpe_extra")), g, E, boundary, causal,
                               True, 1e-6, "elu1")
        return attend(d, backend, grid=g, num_extra=E, boundary=boundary, causal=causal)

    assert rel_err(run(x, "circular"), run(z, "zero")) <= 1e-12
    # and the table's layout matters: a flipped table gives another answer
    assert rel_err(run(dict(z, rpe=z["rpe"].flip(-2)), "zero"), run(z, "zero")) > 1e-3
    # rpe_extra matters
    assert rel_err(run(dict(x, rpe_extra=None), "circular"), run(x, "circular")) > 1e-3
    # 1D causal: the same identity
    x1 = make_inputs((5,), E=1, M=1, B=1, H=1, boundary="circular", requires_grad=False, seed=36)
    z1 = dict(x1, rpe=_unrolled(x1["rpe"], (5,)))
    if backend == "spec-loops":
        a = _spec_loops(*(x1[n] for n in ("q", "k", "v", "rpe", "rpe_extra")), (5,), 1, "circular", True, True,
                        1e-6, "elu1")
        b = _spec_loops(*(z1[n] for n in ("q", "k", "v", "rpe", "rpe_extra")), (5,), 1, "zero", True, True,
                        1e-6, "elu1")
    else:
        a = attend(x1, backend, grid=(5,), num_extra=1, boundary="circular", causal=True)
        b = attend(z1, backend, grid=(5,), num_extra=1, boundary="zero", causal=True)
    assert rel_err(a, b) <= 1e-12


# --------------------------------------------------------------------------- the test harness itself

def test_poison_reaches_the_backends(monkeypatch):
    """tests/conftest.py NaN-fills fresh allocations; check that the package's allocations are poisoned."""
    assert torch.isnan(torch.empty(5)).all()
    assert torch.isnan(torch.empty_like(torch.ones(3))).all()
    assert torch.isnan(torch.ones(2).new_empty(4)).all()
    assert torch.isnan(torch.empty_strided((2, 2), (2, 1))).all()
    assert (torch.empty(3, dtype=torch.int64).shape == (3,))  # integer dtypes are left alone

    seen = []
    for name in ("empty", "empty_like", "empty_strided"):
        fn = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _fn=fn, _n=name, **kw: _record(seen, _n, _fn(*a, **kw)))
    for name in ("new_empty", "new_empty_strided"):
        fn = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _fn=fn, _n=name, **kw: _record(seen, _n, _fn(self, *a, **kw)))
    grid = (4, 3)
    inputs = make_inputs(grid, E=1, M=2, seed=36)
    # the blocked direct loop (it allocates its tiles; the dense one-block form builds everything from ops, and the
    # extension's fused kernel allocates in C++)
    monkeypatch.setattr(lisa_kernels.direct, "_C_DIRECT", None)
    lisa_kernels.set_config(direct_block_bytes=4096)
    for backend in ("direct", "fft"):
        forward_backward(inputs, backend, grid=grid, num_extra=1)
    floating = [(n, nan) for n, nan in seen if nan is not None]
    assert floating, "the direct and fft paths made no torch.empty*/new_empty* allocation: nothing to poison"
    assert all(nan for _, nan in floating), f"allocations that were not NaN-filled: {floating}"


def _record(seen, name, t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() \
            and t.device.type != "meta":
        seen.append((name, bool(torch.isnan(t).all())))
    else:
        seen.append((name, None))
    return t
