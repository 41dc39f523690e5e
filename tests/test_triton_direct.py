"""backend="triton" (the fused direct kernel) against the float64 reference.

On a machine without a CUDA GPU the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before triton is imported), on small shapes; on a GPU the same tests run on the
device and a GPU-only test adds bf16 and larger sizes.
"""

import math

import pytest
import torch

import lisa_kernels as L
from lisa_kernels.triton_direct import HAS_TRITON
from lisa_test_utils import triton_test_device

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = triton_test_device()
ON_GPU = DEVICE == "cuda"

# relative error bound per dtype, against the float64 reference (issue: fp32 <= 1e-4, fp16 <= 1e-2)
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _inputs(grid, E, M, boundary, dtype, B=2, H=2, Dk=8, G=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = E + math.prod(grid)
    table = [s if boundary == "circular" else 2 * s - 1 for s in grid]
    q = torch.randn(B, H, N, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, N, G * M, generator=g, dtype=torch.float64)
    rpe = 0.5 * torch.randn(H, M, *table, generator=g, dtype=torch.float64)
    rx = 0.5 * torch.randn(H, M, 3, generator=g, dtype=torch.float64) if E else None
    ref = [t.requires_grad_() for t in (q, k, v, rpe) + ((rx,) if E else ())]
    low = [t.detach().to(DEVICE, dtype).requires_grad_() for t in ref]
    return ref, low


CASES = [
    # grid, E, M, boundary, causal, normalize, feature_map
    ((7,), 0, 1, "zero", False, True, "elu1"),
    ((21,), 2, 1, "zero", True, True, "elu1"),
    ((19,), 1, 2, "circular", True, False, "relu"),
    ((5, 3), 1, 2, "zero", False, True, "elu1"),
    ((6, 7), 4, 1, "circular", False, True, "relu"),
    ((4, 9), 0, 4, "zero", False, False, "elu1"),
    ((3, 4, 5), 2, 2, "circular", False, True, "elu1"),
    ((2, 3, 3), 1, 1, "zero", False, True, "relu"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("grid,E,M,boundary,causal,normalize,fm", CASES)
def test_triton_matches_reference(grid, E, M, boundary, causal, normalize, fm, dtype):
    ref, low = _inputs(grid, E, M, boundary, dtype)
    opts = dict(grid=grid, num_extra=E, boundary=boundary, causal=causal, normalize=normalize, feature_map=fm)
    out_ref = L.lisa_attention(*ref[:4], rpe_extra=ref[4] if E else None, backend="reference", **opts)
    out = L.lisa_attention(*low[:4], rpe_extra=low[4] if E else None, backend="triton", **opts)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert torch.isfinite(out).all()
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ref = torch.autograd.grad(out_ref, ref, upstream)
    g_low = torch.autograd.grad(out, low, upstream.to(DEVICE, dtype))
    names = ["out", "dq", "dk", "dv", "drpe", "drpe_extra"]
    errors = [_rel(out.cpu(), out_ref)] + [_rel(a.cpu(), b) for a, b in zip(g_low, g_ref)]
    bad = {n: e for n, e in zip(names, errors) if not e <= TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad}"


def test_triton_low_precision_like_flash_attention():
    """fp16 error of the kernel <= 2x the error of the same computation done by PyTorch in fp16 (+ slack)."""
    grid, E, M = (6, 5), 1, 2
    ref, low = _inputs(grid, E, M, "zero", torch.float16, seed=3)
    opts = dict(grid=grid, num_extra=E)
    exact = L.lisa_attention(*ref[:4], rpe_extra=ref[4], backend="reference", **opts)
    kernel = L.lisa_attention(*low[:4], rpe_extra=low[4], backend="triton", **opts)
    cpu16 = [t.detach().cpu() for t in low]
    torch_same = L.lisa_attention(*cpu16[:4], rpe_extra=cpu16[4], backend="reference", **opts)
    err_kernel = (kernel.cpu().double() - exact).abs().max().item()
    err_torch = (torch_same.double() - exact).abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-3, (err_kernel, err_torch)


def test_triton_writes_every_output_element(monkeypatch):
    """Outputs allocated NaN-filled: every element the kernels own must be overwritten."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    ref, low = _inputs((5, 7), 2, 2, "zero", torch.float32, seed=5)
    out = L.lisa_attention(*low[:4], rpe_extra=low[4], grid=(5, 7), num_extra=2, backend="triton")
    grads = torch.autograd.grad(out, low, torch.ones_like(out))
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()


def test_triton_reason_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 1, 4, 8)
    reason = L.available_backends("cpu")["triton"]
    assert reason is not None and "CUDA" in reason
    with pytest.raises(ValueError, match="triton"):
        L.lisa_attention(x, x, x, torch.zeros(1, 1, 7), grid=(4,), backend="triton")


def test_triton_refuses_float64_with_reason():
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        L.lisa_attention(x, x, x, torch.zeros(1, 1, 7, dtype=torch.float64, device=DEVICE), grid=(4,),
                         backend="triton")


def test_triton_reasons_name_the_limit(monkeypatch):
    """What the triton backend cannot run, said before any kernel: a head dim over MAX_HEAD_DIM, a table-gradient
    workspace over WALK_MAX_WORKSPACE, no triton at all. (Meta tensors: the sizes alone.)"""
    from lisa_kernels import triton_direct as TD
    from lisa_kernels._validate import check_inputs

    def reason(grid, Dk, Dv, M=1):
        n = math.prod(grid)
        q, k = (torch.empty(1, 1, n, Dk, device="meta") for _ in range(2))
        rpe = torch.empty(1, M, *(2 * s - 1 for s in grid), device="meta")
        return TD.triton_direct_reason(check_inputs(q, k, torch.empty(1, 1, n, Dv, device="meta"), rpe, grid=grid))

    monkeypatch.setattr(TD, "triton_device_reason", lambda p: None)      # meta tensors: the limits only
    assert reason((4, 4), 256, 256) is None
    assert reason((4, 4), 257, 8) == "head dim 257 is over the kernel's limit of 256"
    assert reason((4, 4), 8, 2 * 300, M=2) == "head dim 300 is over the kernel's limit of 256"
    work = reason((64, 512, 512), 8, 8)
    assert work.startswith("the table gradient's workspace would be") and "use 'fft'" in work
    monkeypatch.undo()
    monkeypatch.setattr(TD, "HAS_TRITON", False)
    x = torch.randn(1, 1, 4, 8)
    assert L.available_backends("cpu")["triton"] == "triton is not installed"
    with pytest.raises(ValueError, match="triton is not installed"):
        L.lisa_attention(x, x, x, torch.zeros(1, 1, 7), grid=(4,), backend="triton")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: bf16 tl.dot and large sizes are GPU-only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("grid,E", [((14, 14), 1), ((32, 32), 0), ((4, 16, 16), 0), ((1000,), 1)])
def test_triton_gpu_large(grid, E, dtype):
    M = 2
    ref, low = _inputs(grid, E, M, "zero", dtype, B=2, H=3, Dk=64, G=32)
    opts = dict(grid=grid, num_extra=E)
    ref_dev = [t.detach().to(DEVICE).requires_grad_() for t in ref]
    out_ref = L.lisa_attention(*ref_dev[:4], rpe_extra=ref_dev[4] if E else None, backend="direct", **opts)
    out = L.lisa_attention(*low[:4], rpe_extra=low[4] if E else None, backend="triton", **opts)
    upstream = torch.randn_like(out_ref)
    g_ref = torch.autograd.grad(out_ref, ref_dev, upstream)
    g_low = torch.autograd.grad(out, low, upstream.to(dtype))
    errors = [_rel(out, out_ref)] + [_rel(a, b) for a, b in zip(g_low, g_ref)]
    assert max(errors) <= TOL[dtype], errors


@pytest.mark.parametrize("grid,E,causal", [((5, 4), 2, False), ((13,), 1, True)])
def test_triton_deterministic_mode(grid, E, causal):
    """Under torch.use_deterministic_algorithms(True) (the backward has no atomics, so it runs as always): equal
    to the reference, and bitwise equal from run to run."""
    ref, low = _inputs(grid, E, 2, "zero", torch.float32, seed=11)
    opts = dict(grid=grid, num_extra=E, causal=causal)
    out_ref = L.lisa_attention(*ref[:4], rpe_extra=ref[4], backend="reference", **opts)
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g_ref = torch.autograd.grad(out_ref, ref, upstream)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = L.lisa_attention(*low[:4], rpe_extra=low[4], backend="triton", **opts)
            runs.append(torch.autograd.grad(out, low, upstream.to(DEVICE, torch.float32)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    errors = [_rel(a.cpu(), b) for a, b in zip(runs[0], g_ref)]
    assert max(errors) <= TOL[torch.float32], errors


def test_triton_launch_count(monkeypatch):
    """Two Triton launches per forward (prep, fwd) and five per backward (prep, dkv, dq, the table gradient's
    walkers and its fold), six with extra tokens and rpe_extra, one more (the circular fold) for circular tables;
    the table is built by the prep kernel, not by PyTorch ops (benchmarks/overhead.py counts all launches on a
    GPU: at most 8 for a forward and backward)."""
    import lisa_kernels.triton_direct as TD
    launched = []
    real = TD._run
    monkeypatch.setattr(TD, "_run", lambda launch, *rest: (launched.append(launch.name), real(launch, *rest))[1])
    ref, low = _inputs((4, 5), 1, 2, "zero", torch.float16, seed=4)
    out = L.lisa_attention(*low[:4], rpe_extra=low[4], grid=(4, 5), num_extra=1, backend="triton")
    assert launched == ["prep", "fwd"]
    torch.autograd.grad(out, low, torch.ones_like(out))
    assert launched == ["prep", "fwd", "bwd_prep", "bwd_dkv", "bwd_dq", "bwd_walk", "bwd_extra", "table_fold"]


# The table gradient: walkers along token diagonals of 64-token tiles, their fold by table entry.
# Grids past 64 tokens, so that a diagonal holds several tiles, tiles straddle grid rows (and planes), the last
# tile is padded, 2D/3D rows give 2/4 entries per token difference, and phases (rows of 12: 3 phases) or a
# padded walker layout (rows of 13 or 9: P = 16 or 10) come in. conftest.py fills every torch.empty with NaN,
# so the table-gradient buffer starts poisoned: an entry the fold does not write turns rpe's gradient NaN.
WALK_CASES = [
    # grid, E, M, boundary, causal
    ((150,), 0, 1, "zero", False),
    ((133,), 2, 2, "zero", True),
    ((9, 13), 1, 1, "zero", False),
    ((10, 12), 0, 4, "circular", False),
    ((7, 20), 3, 2, "zero", False),
    ((3, 5, 9), 1, 1, "circular", False),
    ((2, 4, 16), 0, 2, "zero", False),
]


@pytest.mark.parametrize("grid,E,M,boundary,causal", WALK_CASES)
def test_triton_table_gradient_walkers(grid, E, M, boundary, causal):
    assert torch.isnan(torch.empty(3)).all()          # (the poisoning of tests/conftest.py is active)
    ref, low = _inputs(grid, E, M, boundary, torch.float32, B=1, H=2, Dk=4, G=3, seed=21)
    opts = dict(grid=grid, num_extra=E, boundary=boundary, causal=causal)
    rex = ref[4] if E else None
    out_ref = L.lisa_attention(*ref[:4], rpe_extra=rex, backend="reference", **opts)
    out = L.lisa_attention(*low[:4], rpe_extra=low[4] if E else None, backend="triton", **opts)
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g_ref = torch.autograd.grad(out_ref, ref, upstream)
    g_low = torch.autograd.grad(out, low, upstream.to(DEVICE, torch.float32))
    names = ["out", "dq", "dk", "dv", "drpe", "drpe_extra"]
    errors = [_rel(out.cpu(), out_ref)] + [_rel(a.cpu(), b) for a, b in zip(g_low, g_ref)]
    bad = {n: e for n, e in zip(names, errors) if not e <= TOL[torch.float32]}
    assert not bad, f"relative errors over {TOL[torch.float32]}: {bad}"


@pytest.mark.parametrize("grid,E,causal", [((9, 13), 2, False), ((70,), 1, True)])
def test_triton_backward_is_bitwise_reproducible(grid, E, causal):
    """No atomics in the backward: two runs give bitwise-equal gradients, the table's included (without
    torch.use_deterministic_algorithms)."""
    assert not torch.are_deterministic_algorithms_enabled()
    _, low = _inputs(grid, E, 2, "zero", torch.float32, B=2, H=1, Dk=4, G=3, seed=8)
    opts = dict(grid=grid, num_extra=E, causal=causal)
    upstream = torch.randn(2, 1, E + math.prod(grid), 6, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    runs = []
    for _ in range(2):
        out = L.lisa_attention(*low[:4], rpe_extra=low[4], backend="triton", **opts)
        runs.append(torch.autograd.grad(out, low, upstream))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(ON_GPU, reason="the bf16 shapes run natively on a GPU (test_triton_gpu_large)")
@pytest.mark.parametrize("grid,E,M", [((9, 13), 1, 2), ((10, 12), 2, 4), ((3, 17), 0, 4)])
def test_triton_bf16_code_shapes_in_the_interpreter(monkeypatch, grid, E, M):
    """The interpreter runs bf16 with fp32 dots (its bf16 dot is broken), so the shapes that the bf16 mode takes on
    a GPU (gd added through the ones-row dot in dQ, dK/dV, the walkers and the extra-token sums; walkers with 2
    groups, on their row-computing and WIX paths) are run here with fp32 data."""
    import lisa_kernels.triton_direct as TD
    monkeypatch.setattr(TD, "BF16_SHAPES", True)
    ref, low = _inputs(grid, E, M, "zero", torch.float32, B=1, H=1, Dk=4, G=3, seed=13)
    opts = dict(grid=grid, num_extra=E)
    out_ref = L.lisa_attention(*ref[:4], rpe_extra=ref[4] if E else None, backend="reference", **opts)
    out = L.lisa_attention(*low[:4], rpe_extra=low[4] if E else None, backend="triton", **opts)
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    g_ref = torch.autograd.grad(out_ref, ref, upstream)
    g_low = torch.autograd.grad(out, low, upstream.float())
    errors = [_rel(out, out_ref)] + [_rel(a, b) for a, b in zip(g_low, g_ref)]
    assert max(errors) <= TOL[torch.float32], errors


@pytest.mark.parametrize("grid,E", [((1000,), 1), ((14, 14), 1), ((5, 33), 2), ((8, 16, 16), 0), ((8, 24, 24), 0),
                                    ((8, 32, 32), 3), ((4, 20, 20), 0), ((2, 9, 33), 1)])
def test_triton_walker_layout(grid, E):
    """The walkers' layout: rows padded to P3 >= S3 (and planes to P2 >= S2) so that the column pattern repeats
    every LW tiles of 64 (few phases where a small padding allows, the plane's own rows otherwise); every grid
    token has one place in it, and the rows it reads (up to E + 64 TW, and a zero row for padding) exist."""
    import lisa_kernels._triton_layout as TL
    lay = TL._layout_of(tuple(grid), E, False, False)
    S = lay.S
    if lay.NDIM > 1:
        assert lay.P3 >= S[2] and (lay.NDIM == 2 or lay.P2 >= S[1])
    period = {1: 1, 2: lay.P3, 3: lay.P2 * lay.P3}[lay.NDIM]
    assert (64 * lay.LW) % period == 0 and lay.LW == period // math.gcd(period, 64)
    wix = TL._token_index_cpu(lay)[2]
    counts = torch.bincount(wix, minlength=lay.NPAD)
    assert (counts[E:lay.N] == 1).all() and counts[:E].sum() == 0
    assert lay.NPAD >= E + 64 * lay.TW
    padded = len(wix) > lay.N - E
    assert not padded or (lay.NPAD > lay.N and counts[lay.NPAD - 1] == len(wix) - (lay.N - E))
