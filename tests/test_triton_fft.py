"""The Triton FFT core (lisa_kernels/triton_fft.py) against the PyTorch FFT core and the dense reference.

Without a CUDA GPU the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set below
before anything imports triton): shapes stay tiny because the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton FFT core cannot run")

import lisa_kernels  # noqa: E402
from lisa_kernels import triton_fft  # noqa: E402
from lisa_kernels._compose import compose, linear_log_table  # noqa: E402
from lisa_kernels._validate import check_inputs  # noqa: E402
from lisa_kernels.fft import _field, _unit_bytes, fft_chunk_plan, fft_sizes  # noqa: E402
from lisa_kernels.ops import fft_core, triton_fft_core  # noqa: E402
from lisa_kernels.triton_fft import triton_fft_reason  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
TOL = 1e-4
B, H, DK, DV = 2, 2, 3, 4


def test_mode_is_picked():
    """On the CPU the kernels must be the interpreter's: fail loudly (never skip) if they are not."""
    if DEVICE == "cpu":
        assert INTERPRET, "no CUDA GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here"
        kind = type(triton_fft.lisa_fft_form_kernel).__name__
        assert kind == "InterpretedFunction", (
            f"lisa_kernels.triton_fft was imported before TRITON_INTERPRET=1 was set (kernel is a {kind}); "
            "export TRITON_INTERPRET=1 before running the tests")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make(grid, E, M, boundary, causal, normalize, feature_map="elu1", dtype=torch.float32, strided=False,
         seed=0, B=B):
    g = torch.Generator().manual_seed(seed)
    N = E + math.prod(grid)
    if strided:   # q, k, v as views of one (B, N, 3, H, D) tensor, as a qkv projection gives them
        qkv = torch.randn(B, N, 3, H, DK, generator=g).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        v = torch.randn(B, N, H, DV, generator=g).transpose(1, 2)
    else:
        q, k = torch.randn(B, H, N, DK, generator=g), torch.randn(B, H, N, DK, generator=g)
        v = torch.randn(B, H, N, DV, generator=g)
    table = tuple(grid) if boundary == "circular" else tuple(2 * s - 1 for s in grid)
    rpe = 0.5 * torch.randn(H, M, *table, generator=g)
    rpe_extra = 0.5 * torch.randn(H, M, 3, generator=g) if E > 0 else None
    tensors = [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (q, k, v, rpe, rpe_extra)]
    opts = dict(grid=grid, num_extra=E, boundary=boundary, causal=causal, normalize=normalize,
                feature_map=feature_map)
    return tensors, opts


def run(core, tensors, opts, cotangent=None):
    q, k, v, rpe, rx = tensors
    p = check_inputs(q, k, v, rpe, rpe_extra=rx, **opts)
    if core == "reference":
        out = lisa_kernels.lisa_attention(q, k, v, rpe, rpe_extra=rx, backend="reference", **opts)
    else:
        out = compose(core, q, k, v, rpe, rx, p, circular_core=p.boundary == "circular" and not p.causal)
    if cotangent is None:
        g = torch.Generator().manual_seed(123)
        cotangent = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    inputs = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(out, inputs, cotangent)
    return [out.detach()] + list(grads)


def check_against_fft_and_reference(tensors, opts, tol=TOL):
    got = run(triton_fft_core, tensors, opts)
    names = ["out", "dq", "dk", "dv", "drpe", "drpe_extra"]
    for label, core in (("fft", fft_core), ("reference", "reference")):
        want = run(core, tensors, opts)
        assert len(got) == len(want)
        for name, a, b in zip(names, got, want):
            assert torch.isfinite(a).all(), f"{name}: non-finite values"
            err = rel(a, b)
            assert err <= tol, f"{name} vs {label}: relative error {err:.2e} > {tol:.0e} ({opts})"
    return got


# grid, E, M, boundary, causal, normalize, feature_map
CASES = [
    ((7,), 0, 1, "zero", False, True, "elu1"),
    ((7,), 2, 2, "zero", False, False, "elu1"),
    ((7,), 0, 2, "circular", False, True, "relu"),
    ((7,), 2, 1, "zero", True, True, "elu1"),
    ((7,), 0, 2, "zero", True, False, "elu1"),
    ((7,), 2, 2, "circular", True, True, "elu1"),
    ((7,), 0, 1, "zero", True, True, "relu"),      # relu + causal: dens that are exactly 0
    ((5, 3), 0, 1, "zero", False, True, "elu1"),
    ((5, 3), 2, 2, "circular", False, True, "elu1"),
    ((5, 3), 2, 2, "zero", False, False, "relu"),
    ((3, 4, 5), 0, 2, "zero", False, True, "elu1"),
    ((3, 4, 5), 2, 1, "circular", False, False, "elu1"),
    ((1, 6), 2, 2, "zero", False, True, "elu1"),
    ((1, 6), 0, 1, "circular", False, True, "elu1"),
]


@pytest.mark.parametrize("grid,E,M,boundary,causal,normalize,fmap", CASES,
                         ids=lambda x: str(x).replace(" ", ""))
def test_matches_fft_and_reference(grid, E, M, boundary, causal, normalize, fmap):
    tensors, opts = make(grid, E, M, boundary, causal, normalize, fmap)
    check_against_fft_and_reference(tensors, opts)


def _budget(mode, p, circular):
    """Budgets that cut the field in (b, h) across heads (3 of 4 rows), in d (2 + 1), in channels of one group
    (2 + 1), or down to one channel per chunk."""
    unit = _unit_bytes(p, fft_sizes(p.grid, circular), backward=True)
    C = p.M * (p.Dv // p.M + 1)
    return {"bh3": unit * C * p.Dk * 3, "d2": unit * C * 2, "c2": unit * 2, "one": 1}[mode]


WORKSPACE_CASES = [   # grid, E, M, boundary, causal, how the field is cut
    ((5, 3), 2, 2, "zero", False, "bh3"),
    ((5, 3), 2, 2, "zero", False, "d2"),
    ((3, 4, 5), 0, 2, "circular", False, "bh3"),
    ((3, 4, 5), 0, 2, "circular", False, "d2"),
    ((1, 6), 0, 2, "zero", False, "c2"),
    ((7,), 2, 1, "zero", True, "d2"),
    ((7,), 2, 1, "zero", True, "one"),
]


@pytest.mark.parametrize("grid,E,M,boundary,causal,mode", WORKSPACE_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_small_workspace_many_chunks(grid, E, M, boundary, causal, mode):
    # one channel per chunk runs B H Dk (Dv + M) chunks: B = 1 there, for the interpreter's sake
    tensors, opts = make(grid, E, M, boundary, causal, True, seed=1, B=1 if mode in ("c2", "one") else B)
    q, k, v, rpe, rx = tensors
    p = check_inputs(q, k, v, rpe, rpe_extra=rx, **opts)
    circular = boundary == "circular" and not causal
    old = lisa_kernels.set_config(fft_workspace_bytes=_budget(mode, p, circular))
    try:
        plan = fft_chunk_plan(p, circular, backward=True)
        G1 = p.Dv // p.M + 1
        assert plan.bh * plan.d * plan.groups * plan.channels < p.B * p.H * p.Dk * p.M * G1  # really chunked
        check_against_fft_and_reference(tensors, opts)
    finally:
        lisa_kernels.set_config(fft_workspace_bytes=old.fft_workspace_bytes)


@pytest.mark.parametrize("grid,boundary", [((5, 3), "zero"), ((3, 4, 5), "circular")])
def test_unpruned_transforms(monkeypatch, grid, boundary):
    """PRUNED = False: the plain torch.fft transforms of the padded field (the pruned ones' baseline) give the same
    results, forward and every gradient."""
    monkeypatch.setattr(triton_fft, "PRUNED", False)
    tensors, opts = make(grid, 2, 2, boundary, False, True, seed=4)
    check_against_fft_and_reference(tensors, opts)


def test_int64_spectral_indices(monkeypatch):
    """The spectral kernel's int64 form (chunks of 2^30 complex values and more), forced on a small problem."""
    monkeypatch.setattr(triton_fft, "_INT32_LIMIT", 1)
    tensors, opts = make((5, 3), 2, 2, "zero", False, True, seed=6)
    check_against_fft_and_reference(tensors, opts)


def _nan_empty(*shape, device, dtype):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


@pytest.mark.parametrize("grid,mode", [((5, 3), None), ((5, 3), "d2"), ((7,), "c2")])
def test_poisoned_buffers(monkeypatch, grid, mode):
    """Outputs and workspaces start as NaN: every element (padding included) must be written by a kernel."""
    monkeypatch.setattr(triton_fft, "_empty", _nan_empty)
    tensors, opts = make(grid, 2, 2, "zero", False, True, seed=2, B=1 if mode == "c2" else B)
    q, k, v, rpe, rx = tensors
    p = check_inputs(q, k, v, rpe, rpe_extra=rx, **opts)
    old = lisa_kernels.set_config(fft_workspace_bytes=_budget(mode, p, False) if mode else 2**28)
    try:
        check_against_fft_and_reference(tensors, opts)
    finally:
        lisa_kernels.set_config(fft_workspace_bytes=old.fft_workspace_bytes)


@pytest.mark.parametrize("grid,circular", [((5,), False), ((3, 4), False), ((2, 3, 3), False), ((3, 4), True)])
def test_form_kernel_writes_zero_padding(grid, circular):
    """Kernel 1 into a NaN buffer equals torch's zero-padded field, in both the grid and the padding."""
    M, G = 2, 2
    Dv = M * G
    ng = math.prod(grid)
    g = torch.Generator().manual_seed(3)
    fk = torch.rand(B * H, ng, DK, generator=g).to(DEVICE)
    v = torch.randn(B * H, ng, Dv, generator=g).to(DEVICE)
    last = torch.randn(B * H, ng, M, generator=g).to(DEVICE)
    x = torch.zeros(1, 1, ng, DK, device=DEVICE)
    rpe = torch.zeros(1, M, *(grid if circular else tuple(2 * s - 1 for s in grid)), device=DEVICE)
    p = check_inputs(x.expand(B, H, ng, DK), x.expand(B, H, ng, DK), x.new_zeros(B, H, ng, Dv),
                     rpe.expand(H, *rpe.shape[1:]), grid=grid, boundary="circular" if circular else "zero")
    sizes = fft_sizes(grid, circular)
    sl = (slice(1, 3), slice(1, 3), slice(0, 2), slice(1, 3))        # b 1..2, d 1..2, m 0..1, c 1..2
    ch = triton_fft._Chunk(sl, sizes)
    for lt in (None, last):                                          # [v, 1] and [v, last]
        U = torch.full(ch.field_shape, float("nan"), device=DEVICE)
        triton_fft._form(U, fk, v, lt, ch, p, sizes)
        col = (lt if lt is not None else torch.ones(B * H, ng, M, device=DEVICE))[..., None]
        ext = torch.cat([v.view(B * H, ng, M, G), col], -1)
        want = _field(fk[sl[0], :, sl[1]], ext[sl[0], :, sl[2], sl[3]], grid)
        padded = torch.zeros(ch.field_shape, device=DEVICE)
        padded[(slice(None),) * 4 + tuple(slice(0, s) for s in grid)] = want
        assert torch.equal(U, padded)


def test_workspace_is_bounded(monkeypatch):
    """With a small budget no buffer holds the whole Dk x (Dv + M) x L field: only one chunk's."""
    sizes_seen = []

    def recording_empty(*shape, device, dtype):
        sizes_seen.append(math.prod(shape))
        return torch.empty(*shape, device=device, dtype=dtype)

    monkeypatch.setattr(triton_fft, "_empty", recording_empty)
    tensors, opts = make((3, 4, 5), 0, 2, "zero", False, True, seed=4)
    q, k, v, rpe, rx = tensors
    p = check_inputs(q, k, v, rpe, rpe_extra=rx, **opts)
    sizes = fft_sizes(p.grid, False)
    whole = p.B * p.H * p.Dk * (p.Dv + p.M) * math.prod(sizes)
    old = lisa_kernels.set_config(fft_workspace_bytes=_budget("d2", p, False))
    try:
        chunk = 0
        for backward in (False, True):   # the forward plan has larger chunks (its unit is smaller)
            plan = fft_chunk_plan(p, False, backward=backward)
            chunk = max(chunk, plan.bh * plan.d * plan.groups * plan.channels * math.prod(sizes))
        run(triton_fft_core, tensors, opts)
    finally:
        lisa_kernels.set_config(fft_workspace_bytes=old.fft_workspace_bytes)
    io = p.B * p.H * p.num_grid * max(p.Dk, p.Dv)
    assert sizes_seen and max(sizes_seen) <= max(chunk, io) < whole


def test_strided_inputs():
    """q, k, v as non-contiguous views (a qkv split): the kernels take strides."""
    tensors, opts = make((5, 3), 2, 2, "zero", False, True, strided=True, seed=5)
    assert not tensors[0].is_contiguous() and not tensors[2].is_contiguous()
    check_against_fft_and_reference(tensors, opts)


def test_half_inputs_upcast():
    """float16 inputs: compose upcasts to float32 for both cores, so they agree to float16 rounding."""
    tensors, opts = make((5, 3), 0, 1, "zero", False, True, dtype=torch.float16, seed=6)
    got, want = run(triton_fft_core, tensors, opts), run(fft_core, tensors, opts)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16 and rel(a, b) <= 2e-3


def test_backward_is_deterministic():
    tensors, opts = make((3, 4), 2, 2, "zero", False, True, seed=7)
    first, second = run(triton_fft_core, tensors, opts), run(triton_fft_core, tensors, opts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_core_outputs_and_unused_den():
    """The core alone: (num, den) shapes and dtypes like fft_core, and backward with den unused."""
    tensors, opts = make((7,), 0, 2, "zero", False, False, seed=8)
    q, k, v, rpe, _ = tensors
    p = check_inputs(q, k, v, rpe, **opts)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    table = linear_log_table(rpe, p)
    num, den = triton_fft_core(fq, fk, v, table, p)
    num_ref, den_ref = fft_core(fq, fk, v, table, p)
    assert num.shape == num_ref.shape and den.shape == den_ref.shape and num.dtype == torch.float32
    assert rel(num, num_ref) <= TOL and rel(den, den_ref) <= TOL
    g1 = torch.autograd.grad(num.sum(), (q, k, v, rpe), retain_graph=True)
    g2 = torch.autograd.grad(num_ref.sum(), (q, k, v, rpe))
    for a, b in zip(g1, g2):
        assert rel(a, b) <= TOL


@pytest.mark.parametrize("grid", [(3, 4)])
def test_cores_with_num_unused(grid):
    """Backward through den alone (the custom ops get num's gradient as zeros): the direct, fft and triton-fft cores
    agree."""
    from lisa_kernels.ops import direct_core
    tensors, opts = make(grid, 0, 2, "zero", False, True, seed=9)
    q, k, v, rpe, _ = tensors
    p = check_inputs(q, k, v, rpe, **opts)
    grads = []
    for core in (direct_core, fft_core, triton_fft_core):
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        num, den = core(fq, fk, v, linear_log_table(rpe, p), p)
        grads.append(torch.autograd.grad((den * den).sum(), (q, k, rpe), allow_unused=True))
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            assert rel(a, b) <= TOL


def test_reason():
    x = torch.zeros(1, 1, 4, 4, device=DEVICE)
    p = check_inputs(x, x, x, torch.zeros(1, 1, 7, device=DEVICE), grid=(4,))
    assert triton_fft_reason(p) is None
    x64 = x.double()
    p64 = check_inputs(x64, x64, x64, torch.zeros(1, 1, 7, device=DEVICE, dtype=torch.float64), grid=(4,))
    reason = triton_fft_reason(p64)
    assert reason and "float64" in reason and "'fft'" in reason and "\n" not in reason
    with pytest.raises(ValueError, match="float64"):
        triton_fft_core(x64, x64, x64, torch.zeros(1, 1, 7, dtype=torch.float64, device=DEVICE), p64)


def test_reason_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 1, 4, 4)
    p = check_inputs(x, x, x, torch.zeros(1, 1, 7), grid=(4,))
    reason = triton_fft_reason(p)
    assert reason and "cpu" in reason and "TRITON_INTERPRET" in reason
