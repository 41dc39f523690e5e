"""Every bad input is refused before any computation, with a TypeError (wrong kind of object or dtype) or a
ValueError (wrong value or shape) whose message names the offending argument."""

import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import dispatch
from lisa_test_utils import CPU_FLOAT64

B, H, DK, DV, M = 2, 2, 3, 4, 2
GRID = (3, 4)
E = 1
N = E + math.prod(GRID)


def good(**changes):
    """A valid call's arguments (float32, zero boundary), with some replaced."""
    args = dict(q=torch.randn(B, H, N, DK), k=torch.randn(B, H, N, DK), v=torch.randn(B, H, N, DV),
                rpe=torch.randn(H, M, 5, 7), grid=GRID, num_extra=E, rpe_extra=torch.randn(H, M, 3))
    args.update(changes)
    return args


def call(fn, args):
    args = dict(args)
    q, k, v, rpe = (args.pop(n) for n in ("q", "k", "v", "rpe"))
    return fn(q, k, v, rpe, **args)


def test_good_arguments_are_accepted():
    for backend in ("auto", "reference") + CPU_FLOAT64:
        out = call(lisa_kernels.lisa_attention, good(backend=backend))
        assert out.shape == (B, H, N, DV)
    assert isinstance(call(lisa_kernels.explain, good()), lisa_kernels.Explanation)


q0 = torch.randn(B, H, N, DK)

BAD = [
    # (id, changes, exception, pattern that names the argument)
    ("q-not-tensor", dict(q=q0.tolist()), TypeError, r"\bq must be a torch\.Tensor"),
    ("q-numpy", dict(q=q0.numpy()), TypeError, r"\bq must be a torch\.Tensor"),
    ("k-not-tensor", dict(k=None), TypeError, r"\bk must be a torch\.Tensor"),
    ("v-not-tensor", dict(v=3.0), TypeError, r"\bv must be a torch\.Tensor"),
    ("rpe-not-tensor", dict(rpe="table"), TypeError, r"\brpe must be a torch\.Tensor"),
    ("rpe_extra-not-tensor", dict(rpe_extra=[0.0, 0.0, 0.0]), TypeError, r"rpe_extra must be a torch\.Tensor"),
    ("q-rank-3", dict(q=torch.randn(B * H, N, DK)), ValueError, r"\bq must have 4 dimensions"),
    ("k-rank-5", dict(k=torch.randn(1, B, H, N, DK)), ValueError, r"\bk must have 4 dimensions"),
    ("v-rank-2", dict(v=torch.randn(N, DV)), ValueError, r"\bv must have 4 dimensions"),
    ("k-shape", dict(k=torch.randn(B, H, N, DK + 1)), ValueError, r"\bk must have the shape of q"),
    ("k-tokens", dict(k=torch.randn(B, H, N + 1, DK)), ValueError, r"\bk must have the shape of q"),
    ("v-tokens", dict(v=torch.randn(B, H, N - 1, DV)), ValueError, r"\bv must have shape"),
    ("v-heads", dict(v=torch.randn(B, H + 1, N, DV)), ValueError, r"\bv must have shape"),
    ("v-batch", dict(v=torch.randn(B + 1, H, N, DV)), ValueError, r"\bv must have shape"),
    ("q-int", dict(q=torch.ones(B, H, N, DK, dtype=torch.int64)), TypeError, r"\bq must have a floating dtype"),
    ("v-bool", dict(v=torch.ones(B, H, N, DV, dtype=torch.bool)), TypeError, r"\bv must have a floating dtype"),
    ("rpe-int", dict(rpe=torch.ones(H, M, 5, 7, dtype=torch.int32)), TypeError, r"\brpe must have a floating dtype"),
    ("q-complex", dict(q=torch.randn(B, H, N, DK, dtype=torch.complex64)), TypeError, r"\bq must have a floating"),
    ("k-dtype", dict(k=torch.randn(B, H, N, DK, dtype=torch.float64)), TypeError, r"\bk must have the dtype of q"),
    ("v-dtype", dict(v=torch.randn(B, H, N, DV, dtype=torch.float16)), TypeError, r"\bv must have the dtype of q"),
    ("rpe-dtype", dict(rpe=torch.randn(H, M, 5, 7, dtype=torch.float64)), TypeError, r"\brpe must have the dtype"),
    ("rpe_extra-dtype", dict(rpe_extra=torch.randn(H, M, 3, dtype=torch.bfloat16)), TypeError,
     r"rpe_extra must have the dtype of q"),
    ("k-device", dict(k=torch.empty(B, H, N, DK, device="meta")), ValueError, r"\bk must be on the device of q"),
    ("v-device", dict(v=torch.empty(B, H, N, DV, device="meta")), ValueError, r"\bv must be on the device of q"),
    ("rpe-device", dict(rpe=torch.empty(H, M, 5, 7, device="meta")), ValueError, r"\brpe must be on the device"),
    ("rpe_extra-device", dict(rpe_extra=torch.empty(H, M, 3, device="meta")), ValueError,
     r"rpe_extra must be on the device of q"),
    ("B-zero", dict(q=torch.randn(0, H, N, DK), k=torch.randn(0, H, N, DK), v=torch.randn(0, H, N, DV)),
     ValueError, r"batch size B must be positive"),
    ("Dk-zero", dict(q=torch.randn(B, H, N, 0), k=torch.randn(B, H, N, 0)), ValueError, r"head dim Dk"),
    # grid
    ("grid-0-axes", dict(grid=()), ValueError, r"grid must have 1 to 3 axes"),
    ("grid-4-axes", dict(grid=(1, 1, 3, 4)), ValueError, r"grid must have 1 to 3 axes"),
    ("grid-str-element", dict(grid=(3, "4")), TypeError, r"grid must hold ints"),
    ("grid-float-element", dict(grid=(3.0, 4)), TypeError, r"grid must hold ints"),
    ("grid-bool-element", dict(grid=(3, True)), TypeError, r"grid must hold ints"),
    ("grid-tensor-element", dict(grid=(torch.tensor(3), 4)), TypeError, r"grid must hold ints"),
    ("grid-str", dict(grid="3x4"), TypeError, r"grid must be a tuple"),
    ("grid-float", dict(grid=12.0), TypeError, r"grid must be a tuple"),
    ("grid-none", dict(grid=None), TypeError, r"grid must be a tuple"),
    ("grid-zero", dict(grid=(0, 4)), ValueError, r"grid sizes must be positive"),
    ("grid-negative", dict(grid=(-3, -4)), ValueError, r"grid sizes must be positive"),
    ("grid-product", dict(grid=(4, 4)), ValueError, r"grid \(4, 4\) with num_extra=1 describes 17 tokens"),
    ("grid-forgets-extra", dict(grid=(3, 4), num_extra=0), ValueError, r"grid .* describes 12 tokens.*N=13"),
    # num_extra
    ("num_extra-negative", dict(num_extra=-1), ValueError, r"num_extra must be >= 0"),
    ("num_extra-float", dict(num_extra=1.0), TypeError, r"num_extra must be an int"),
    ("num_extra-bool", dict(num_extra=True), TypeError, r"num_extra must be an int"),
    ("num_extra-str", dict(num_extra="1"), TypeError, r"num_extra must be an int"),
    # rpe
    ("rpe-rank", dict(rpe=torch.randn(H, M, 35)), ValueError, r"\brpe must have 4 dimensions"),
    ("rpe-rank-high", dict(rpe=torch.randn(1, H, M, 5, 7)), ValueError, r"\brpe must have 4 dimensions"),
    ("rpe-heads", dict(rpe=torch.randn(H + 1, M, 5, 7)), ValueError, r"\brpe must have shape \(H, M"),
    ("rpe-no-groups", dict(rpe=torch.randn(H, 0, 5, 7)), ValueError, r"\brpe must have shape"),
    ("rpe-circular-table-for-zero", dict(rpe=torch.randn(H, M, 3, 4)), ValueError,
     r"\brpe must have shape \(H, M, 2\*S-1 per axis\) = \(2, M, 5, 7\)"),
    ("rpe-zero-table-for-circular", dict(rpe=torch.randn(H, M, 5, 7), boundary="circular"), ValueError,
     r"\brpe must have shape \(H, M, S per axis\) = \(2, M, 3, 4\)"),
    ("rpe-transposed-table", dict(rpe=torch.randn(H, M, 7, 5)), ValueError, r"\brpe must have shape"),
    ("Dv-not-divisible", dict(rpe=torch.randn(H, 3, 5, 7), rpe_extra=torch.randn(H, 3, 3)), ValueError,
     r"Dv=4 must be divisible by the number of RPE groups M=3"),
    ("rpe_extra-shape", dict(rpe_extra=torch.randn(H, M, 2)), ValueError, r"rpe_extra must have shape \(H, M, 3\)"),
    ("rpe_extra-groups", dict(rpe_extra=torch.randn(H, 1, 3)), ValueError, r"rpe_extra must have shape"),
    ("rpe_extra-heads", dict(rpe_extra=torch.randn(1, M, 3)), ValueError, r"rpe_extra must have shape"),
    # scalars and options
    ("eps-negative", dict(eps=-1e-6), ValueError, r"eps must be finite and >= 0"),
    ("eps-nan", dict(eps=float("nan")), ValueError, r"eps must be finite"),
    ("eps-inf", dict(eps=float("inf")), ValueError, r"eps must be finite"),
    ("eps-str", dict(eps="1e-6"), TypeError, r"eps must be a real number"),
    ("eps-bool", dict(eps=True), TypeError, r"eps must be a real number"),
    ("eps-tensor", dict(eps=torch.tensor(1e-6)), TypeError, r"eps must be a real number"),
    ("scale-zero", dict(scale=0.0), ValueError, r"scale must be finite and > 0"),
    ("scale-nan", dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("scale-str", dict(scale="2"), TypeError, r"scale must be a real number"),
    ("feature_map-unknown", dict(feature_map="softmax"), ValueError, r"feature_map must be one of"),
    ("feature_map-callable", dict(feature_map=torch.relu), TypeError, r"feature_map must be one of"),
    ("feature_map-none", dict(feature_map=None), TypeError, r"feature_map must be one of"),
    ("boundary-unknown", dict(boundary="reflect"), ValueError, r"boundary must be one of"),
    ("boundary-case", dict(boundary="Zero"), ValueError, r"boundary must be one of"),
    ("boundary-int", dict(boundary=0), TypeError, r"boundary must be one of"),
    ("backend-unknown", dict(backend="flash"), ValueError, r"backend must be one of"),
    ("backend-none", dict(backend=None), TypeError, r"backend must be one of"),
    ("normalize-int", dict(normalize=1), TypeError, r"normalize must be a bool"),
    ("normalize-str", dict(normalize="yes"), TypeError, r"normalize must be a bool"),
    ("causal-int", dict(causal=0), TypeError, r"causal must be a bool"),
    ("causal-none", dict(causal=None), TypeError, r"causal must be a bool"),
    ("causal-2d", dict(causal=True), ValueError, r"causal=True needs a 1D grid"),
    ("causal-3d", dict(causal=True, grid=(1, 3, 4), rpe=torch.randn(H, M, 1, 5, 7)), ValueError,
     r"causal=True needs a 1D grid"),
]


@pytest.mark.parametrize("changes, exc, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused(changes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(lisa_kernels.lisa_attention, good(**changes))


@pytest.mark.parametrize("backend", lisa_kernels.BACKENDS)       # "auto" and every record of the registry
@pytest.mark.parametrize("changes, exc, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_refused_before_any_computation(changes, exc, pattern, backend, monkeypatch):
    """No backend runs (they are replaced by failing stubs), and explain() raises the same error."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a backend ran on invalid input")
    for name in list(dispatch._RUNNERS):
        monkeypatch.setitem(dispatch._RUNNERS, name, forbidden)
    args = good(**changes)
    if "backend" not in changes:
        args["backend"] = backend
    with pytest.raises(exc, match=pattern) as from_call:
        call(lisa_kernels.lisa_attention, args)
    with pytest.raises(exc, match=pattern) as from_explain:
        call(lisa_kernels.explain, args)
    assert str(from_call.value) == str(from_explain.value)


def test_validation_runs_before_autograd():
    """An invalid call leaves no autograd graph behind and does not touch the inputs' .grad."""
    args = good(eps=-1.0)
    for n in ("q", "k", "v", "rpe", "rpe_extra"):
        args[n].requires_grad_()
    with pytest.raises(ValueError, match="eps"):
        call(lisa_kernels.lisa_attention, args)
    assert all(args[n].grad is None for n in ("q", "k", "v", "rpe", "rpe_extra"))


def test_accepted_spellings():
    """What validation must not refuse: int and torch.Size grids, numpy ints, eps=0, rpe_extra=None."""
    import numpy as np
    args = good()
    base = call(lisa_kernels.lisa_attention, args)
    for grid in ([3, 4], torch.Size([3, 4]), (np.int64(3), np.int32(4))):
        torch.testing.assert_close(call(lisa_kernels.lisa_attention, dict(args, grid=grid)), base, rtol=0, atol=0)
    x = torch.randn(1, 1, 6, 2)
    assert lisa_kernels.lisa_attention(x, x, x, torch.zeros(1, 1, 11), grid=6).shape == (1, 1, 6, 2)
    assert call(lisa_kernels.lisa_attention, good(eps=0, num_extra=np.int64(1))).shape == (B, H, N, DV)
    assert call(lisa_kernels.lisa_attention, good(rpe_extra=None)).shape == (B, H, N, DV)


def test_reference_memory_limit(monkeypatch):
    lisa_kernels.set_config(reference_max_bytes=1024)
    ran = []
    original = dispatch._RUNNERS["reference"]
    monkeypatch.setitem(dispatch._RUNNERS, "reference", lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=r"backend='reference' cannot run this input: .*reference_max_bytes"):
        call(lisa_kernels.lisa_attention, good(backend="reference"))
    assert not ran, "the reference ran although its input is over the memory limit"
    # the fast paths and auto are not limited by it
    assert call(lisa_kernels.lisa_attention, good(backend="auto")).shape == (B, H, N, DV)
    # and the limit is exact: just enough memory lets it run
    monkeypatch.setitem(dispatch._RUNNERS, "reference", original)
    need = B * H * M * N * N * 4
    lisa_kernels.set_config(reference_max_bytes=need)
    assert call(lisa_kernels.lisa_attention, good(backend="reference")).shape == (B, H, N, DV)
    lisa_kernels.set_config(reference_max_bytes=need - 1)
    with pytest.raises(ValueError, match="reference_max_bytes"):
        call(lisa_kernels.lisa_attention, good(backend="reference"))


def test_reference_memory_limit_suggests_the_fast_backends():
    lisa_kernels.set_config(reference_max_bytes=1024)
    with pytest.raises(ValueError, match=r"('direct'|'fft'|\bdirect\b|\bfft\b)"):
        call(lisa_kernels.lisa_attention, good(backend="reference"))


def test_cuda_backend_on_cpu_says_why():
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run this input: .*cpu"):
        call(lisa_kernels.lisa_attention, good(backend="cuda"))


@pytest.mark.parametrize("backend", ["triton", "triton-fft"])
def test_triton_backends_refuse_float64_on_cpu(backend):
    """Under TRITON_INTERPRET=1 (tests/conftest.py) Triton runs on the CPU, but never in float64: either way
    a float64 CPU call must be refused with a reason, not crash inside a kernel."""
    if backend not in lisa_kernels.BACKENDS:
        pytest.skip(f"this version of lisa_kernels has no backend {backend!r}")
    args = good(backend=backend)
    for n in ("q", "k", "v", "rpe", "rpe_extra"):
        args[n] = args[n].double()
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run this input: \S"):
        call(lisa_kernels.lisa_attention, args)


def test_config_from_the_environment(monkeypatch):
    """LISA_*_BYTES: a number of bytes (float notation allowed), positive; blank means the default."""
    from lisa_kernels._config import Config
    monkeypatch.setenv("LISA_REFERENCE_MAX_BYTES", "1.5e3")
    monkeypatch.setenv("LISA_FFT_WORKSPACE_BYTES", " ")
    c = Config()
    assert c.reference_max_bytes == 1500 and c.fft_workspace_bytes == 256 * 2**20
    for bad, match in (("lots", "must be a number of bytes, got 'lots'"), ("-1", "must be positive, got '-1'"),
                       ("0.2", "must be positive")):
        monkeypatch.setenv("LISA_FFT_WORKSPACE_BYTES", bad)
        with pytest.raises(ValueError, match=f"LISA_FFT_WORKSPACE_BYTES {match}"):
            Config()


def test_set_config_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown setting 'fft_budget'"):
        lisa_kernels.set_config(fft_budget=1)
    for bad in (0, -5, 1.5, True, "1024"):
        with pytest.raises(ValueError, match="direct_block_bytes must be a positive int"):
            lisa_kernels.set_config(direct_block_bytes=bad)
