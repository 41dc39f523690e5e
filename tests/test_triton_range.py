"""fp16 / bf16 range of backend="triton": large q, k (scale up to 4), head dims up to 128, RPE log-weights in
[-10, 10], M > 1, extra tokens and causal masking.

Where the float64 reference is finite the kernels must be finite, and their error (forward and every gradient)
at most 2x that of the ``direct`` path given the same 16-bit inputs (which computes in fp32 and rounds at the
ends), plus a floor of a quarter of the dtype's epsilon for errors at round-off level. The reference takes the
16-bit inputs upcast, so input rounding is no one's error. Runs under the interpreter on a CPU.
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

CASES = [
    # grid, E, M, causal, D, q/k scale, rpe range, normalize, feature map
    ((6, 6), 1, 2, False, 64, 4.0, (-10.0, 10.0), True, "elu1"),
    ((40,), 2, 1, True, 64, 3.0, (-10.0, 10.0), True, "elu1"),
    ((5, 6), 0, 1, False, 128, 4.0, (4.0, 6.0), True, "elu1"),
    ((8, 8), 0, 1, False, 64, 3.0, (4.0, 6.0), True, "elu1"),       # the overflow case (fp16 NaN before)
    ((8, 8), 0, 1, False, 64, 1.0, (8.0, 10.0), True, "elu1"),      # ... and its unit-input variant
    ((3, 4, 4), 1, 4, False, 32, 4.0, (-10.0, 10.0), True, "relu"),
    ((30,), 1, 2, True, 64, 1.0, (-10.0, 0.0), False, "elu1"),     # unnormalized: outputs must fit fp16
]


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("grid,E,M,causal,D,qs,rng,normalize,fm", CASES)
def test_low_precision_range(grid, E, M, causal, D, qs, rng, normalize, fm, dtype):
    g = torch.Generator().manual_seed(7)
    B, H = 1, 2
    N = E + math.prod(grid)
    lo, hi = rng
    q = (qs * torch.randn(B, H, N, D, generator=g)).to(dtype)
    k = (qs * torch.randn(B, H, N, D, generator=g)).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    rpe = (lo + (hi - lo) * torch.rand(H, M, *[2 * s - 1 for s in grid], generator=g)).to(dtype)
    rx = (lo + (hi - lo) * torch.rand(H, M, 3, generator=g)).to(dtype) if E else None
    low = [q, k, v, rpe] + ([rx] if E else [])
    opts = dict(grid=grid, num_extra=E, causal=causal, normalize=normalize, feature_map=fm)
    ref_in = [t.double().requires_grad_() for t in low]
    ref = L.lisa_attention(*ref_in[:4], rpe_extra=ref_in[4] if E else None, backend="reference", **opts)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_in, upstream)
    big = torch.finfo(dtype).max / 4      # the case must be representable in the dtype (else no kernel can be)
    assert all((t.abs() < big).all() for t in [ref] + list(ref_grads))
    errors = {}
    for backend in ("direct", "triton"):
        x = [t.detach().to(DEVICE).requires_grad_() for t in low]
        out = L.lisa_attention(*x[:4], rpe_extra=x[4] if E else None, backend=backend, **opts)
        grads = torch.autograd.grad(out, x, upstream.to(DEVICE, dtype))
        results = [out] + list(grads)
        if backend == "triton":
            bad = [i for i, t in enumerate(results) if not torch.isfinite(t).all()]
            assert not bad, f"non-finite results (0 = out, then the gradients): {bad}"
        errors[backend] = [_rel(a.cpu(), b) for a, b in zip(results, [ref] + list(ref_grads))]
    floor = torch.finfo(dtype).eps / 4
    names = ["out", "dq", "dk", "dv", "drpe", "drpe_extra"]
    over = {n: (t, d) for n, t, d in zip(names, errors["triton"], errors["direct"]) if t > 2 * d + floor}
    assert not over, f"triton error over 2x direct's (triton, direct): {over}"


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton36_interpreter_patch(monkeypatch):
    """lisa_kernels._triton_compat on a simulated Triton 3.6 interpreter (CI's oldest stage runs the real one):
    the per-launch tensor patching is wrapped so that __index__ reads a one-element array the way 3.8 does, once;
    Triton 3.7+, a compiled run, or other interpreter internals are left alone."""
    import types

    import numpy as np
    import triton
    from triton.runtime import interpreter

    from lisa_kernels import _triton_compat as compat

    calls = []

    class Scope:
        def set_attr(self, obj, name, value):
            calls.append((obj, name, value))

    def original(tensor, scope, *args, **kwargs):
        calls.append(("original", tensor, args, kwargs))

    monkeypatch.setattr(compat, "_PATCHED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert not compat.patch_interpreter()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", None, raising=False)
    assert not compat.patch_interpreter()                      # internals not the ones described
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", original)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not compat.patch_interpreter()                      # compiled: nothing to patch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compat.patch_interpreter() and compat.patch_interpreter()
    patched = interpreter._patch_lang_tensor
    assert patched is not original
    patched("T", Scope(), 1, k=2)
    assert calls[0] == ("original", "T", (1,), {"k": 2}) and calls[1][:2] == ("T", "__index__")
    index = calls[1][2]
    assert index(types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([7], dtype=np.int32)))) == 7
