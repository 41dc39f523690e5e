"""The compiled extension lisa_kernels._C: its build, its checks, and its passes' arithmetic.

The ops run the same element functions on the CPU as the CUDA kernels run on a GPU (csrc/fft_passes.h),
so on a machine without a GPU the FFT path with the extension's passes is compared with the reference on
CPU tensors. Set LISA_REQUIRE_EXTENSION=1 (CI does, where nvcc exists) to make a missing build a failure
rather than a skip.
"""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lisa_kernels as L
from lisa_kernels._compose import compose
from lisa_kernels._validate import check_inputs
from lisa_kernels.cuda_fft import HAS_EXTENSION, extension_reason
from lisa_kernels.ops import cuda_fft_core

REQUIRED = os.environ.get("LISA_REQUIRE_EXTENSION") == "1"


def test_extension_built_when_required():
    if REQUIRED:
        assert HAS_EXTENSION, extension_reason()
    elif not HAS_EXTENSION:
        assert "not built" in extension_reason()


def test_reasons_without_the_extension(monkeypatch):
    """What every backend that needs lisa_kernels._C says where it is not built (simulated: CI builds it)."""
    from lisa_kernels import _extension, cuda_fft
    monkeypatch.setattr(_extension, "HAS_EXTENSION", False)
    monkeypatch.setattr(_extension, "IMPORT_ERROR", ImportError("no module named lisa_kernels._C"))
    for reason in (cuda_fft.extension_reason(), cuda_fft.cuda_extension_reason()):
        assert reason.startswith("the compiled extension lisa_kernels._C is not built (no module named")
        assert "pip install --no-build-isolation ." in reason


needs_ext = pytest.mark.skipif(not HAS_EXTENSION and not REQUIRED,
                               reason=f"lisa_kernels._C is not built: {extension_reason()}")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in sys.path:
        path = os.path.join(base, "nvidia", "cu13", "bin", "cuobjdump")
        if os.path.isfile(path):
            return path
    return None


def _built_archs():
    """The SASS archs setup.py compiles for: LISA_CUDA_ARCHS, default "8.0;9.0a" (CI's oldest-torch environment
    builds 9.0a alone)."""
    archs = os.environ.get("LISA_CUDA_ARCHS", "8.0;9.0a")
    return ["sm_" + a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]


@needs_ext
def test_module_holds_the_archs_it_was_built_for():
    import lisa_kernels._C as C
    if not C.with_cuda:
        pytest.skip("a CPU-only build of the extension (no CUDA toolkit or a CPU-only torch at install)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    if not os.access(tool, os.X_OK):
        os.chmod(tool, 0o755)
    listing = subprocess.run([tool, "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    assert all(arch in listing for arch in _built_archs()), (_built_archs(), listing)


def _problem(grid, E, M, boundary, causal, dtype, seed, Dk=6, G=3, B=2, H=3):
    g = torch.Generator().manual_seed(seed)
    N = E + math.prod(grid)
    table = [s if boundary == "circular" else 2 * s - 1 for s in grid]
    q = torch.randn(B, H, N, Dk, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, H, N, Dk, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, H, N, G * M, generator=g, dtype=dtype).requires_grad_()
    rpe = (0.5 * torch.randn(H, M, *table, generator=g, dtype=dtype)).requires_grad_()
    rx = (0.5 * torch.randn(H, M, 3, generator=g, dtype=dtype)).requires_grad_() if E else None
    return q, k, v, rpe, rx


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grid,E,M,boundary,causal", [
    ((9,), 0, 1, "zero", False),
    ((11,), 2, 2, "zero", True),
    ((8,), 1, 1, "circular", False),
    ((5, 4), 1, 2, "zero", False),
    ((4, 6), 0, 1, "circular", False),
    ((3, 4, 5), 2, 2, "zero", False),
    ((2, 3, 4), 0, 1, "circular", False),
])
def test_extension_passes_match_reference(grid, E, M, boundary, causal, dtype, tol):
    q, k, v, rpe, rx = _problem(grid, E, M, boundary, causal, dtype, seed=len(grid) * 10 + E)
    p = check_inputs(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx, boundary=boundary, causal=causal)
    inputs = [q, k, v, rpe] + ([rx] if rx is not None else [])
    ref = L.lisa_attention(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx, boundary=boundary, causal=causal,
                           backend="reference")
    circular = boundary == "circular" and not causal
    old = L.set_config(fft_workspace_bytes=4096)        # many chunks: every (b, d, m, c) offset path runs
    try:
        out = compose(cuda_fft_core, q, k, v, rpe, rx, p, circular_core=circular)
        upstream = torch.randn_like(ref)
        g_ref = torch.autograd.grad(ref, inputs, upstream)
        g_ext = torch.autograd.grad(out, inputs, upstream)
    finally:
        L.set_config(fft_workspace_bytes=old.fft_workspace_bytes)
    errs = [((out - ref).abs().max() / ref.abs().max()).item()]
    errs += [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(g_ext, g_ref)]
    assert max(errs) <= tol, errs


@needs_ext
def test_ops_check_their_inputs():
    ops = torch.ops.lisa_kernels
    a = torch.randn(2, 6, 3)
    bt = torch.randn(2, 6, 1, 5)
    X = ops.fft_form(a, bt, [0, 2, 0, 3, 0, 1, 0, 5, 1], [6], [11])
    assert X.shape == (2, 3, 1, 5, 11)
    assert torch.equal(X[..., 6:], torch.zeros_like(X[..., 6:]))          # padding written as zeros
    expected = a.transpose(1, 2)[:, :, None, None, :] * bt.permute(0, 2, 3, 1)[:, None]
    assert torch.allclose(X[..., :6], expected)
    with pytest.raises(RuntimeError, match="chunk must be"):
        ops.fft_form(a, bt, [0, 2, 0, 3], [6], [11])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.fft_form(a, bt, [1, 2, 0, 3, 0, 1, 0, 5, 1], [6], [11])
    with pytest.raises(RuntimeError, match="dtype"):
        ops.fft_form(a, bt.double(), [0, 2, 0, 3, 0, 1, 0, 5, 1], [6], [11])
    with pytest.raises(RuntimeError, match="must be >= the grid"):
        ops.fft_form(a, bt, [0, 2, 0, 3, 0, 1, 0, 5, 1], [6], [5])
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.fft_contract_d(X.transpose(-1, -2).contiguous().transpose(-1, -2), a, [0, 2, 0, 3, 0, 1, 0, 5, 1], [6], [11])


@needs_ext
def test_cuda_backend_explains_itself_on_cpu():
    x = torch.randn(1, 1, 4, 8)
    assert "not a CUDA device" in L.available_backends("cpu")["cuda"]
    with pytest.raises(ValueError, match="cuda"):
        L.lisa_attention(x, x, x, torch.zeros(1, 1, 7), grid=(4,), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_EXTENSION, reason=f"lisa_kernels._C is not built: {extension_reason()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("grid,E", [((14, 14), 1), ((4, 8, 8), 0), ((300,), 2)])
def test_cuda_backend_on_gpu(grid, E, dtype, tol):
    q, k, v, rpe, rx = _problem(grid, E, 2, "zero", False, torch.float64, seed=7, Dk=32, G=16)
    inputs = [t for t in (q, k, v, rpe, rx) if t is not None]
    ref = L.lisa_attention(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx, backend="fft")
    dev = [t.detach().cuda().to(dtype).requires_grad_() for t in inputs]
    out = L.lisa_attention(*dev[:4], grid=grid, num_extra=E, rpe_extra=dev[4] if E else None, backend="cuda")
    upstream = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, inputs, upstream)
    g_dev = torch.autograd.grad(out, dev, upstream.cuda().to(dtype))
    errs = [((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()]
    errs += [((a.double().cpu() - b).abs().max() / b.abs().max()).item() for a, b in zip(g_dev, g_ref)]
    assert max(errs) <= tol, errs
