"""The compiled dense forward (csrc/dense.cpp, ``lisa_kernels._C.dense_forward``) against the float64 reference:
both of its forms (the CPU loop nest below ``dense_loop_max_work`` multiply-adds, the ATen sequence above it),
every option, strided inputs, low precision; and that ``lisa_attention`` takes it for forwards that autograd
does not record, and nowhere else."""

from __future__ import annotations

import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import direct
from lisa_kernels.cuda_fft import extension_reason
from lisa_kernels.direct import dense_forward, dense_index
from lisa_kernels.reference import reference_lisa_attention
from lisa_test_utils import make_inputs

pytestmark = pytest.mark.skipif(extension_reason() is not None or direct._C_DENSE_FORWARD is None,
                                reason=f"the compiled extension is not built: {extension_reason()}")

if extension_reason() is None:
    from lisa_kernels import _C
    LOOP_MAX = _C.dense_loop_max_work
else:
    LOOP_MAX = 0


def _work(B, H, N, Dk, Dv):
    return B * H * N * N * (Dk + Dv)


def _compiled(x, grid, E, feature_map="elu1", normalize=True, eps=1e-6, boundary="zero", causal=False,
              scale=1.0):
    q, k, v, rpe, rx = (None if x[n] is None else x[n].detach() for n in ("q", "k", "v", "rpe", "rpe_extra"))
    index = dense_index(tuple(grid), E, boundary, causal, q.device)
    return _C.dense_forward(q, k, v, rpe, rx if E else None, index, E, feature_map == "elu1", normalize, eps,
                            causal, scale)


def _reference(x, grid, E, **opts):
    q, k, v, rpe, rx = (None if x[n] is None else x[n].detach().double() for n in ("q", "k", "v", "rpe",
                                                                                     "rpe_extra"))
    p = lisa_kernels.check_inputs(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx, **opts)
    return reference_lisa_attention(q, k, v, rpe, rx, p)


# (grid, E, M, options): 1D/2D/3D, extra tokens with and without rpe_extra, groups, causal, circular, relu,
# no normalisation, scale, a large eps
CASES = [((6,), 0, 1, dict(causal=True)), ((7,), 2, 2, dict(causal=True, feature_map="relu")),
         ((3, 4), 1, 2, dict(boundary="circular")), ((2, 3, 2), 1, 1, dict(normalize=False, scale=0.5)),
         ((4, 3), 3, 4, dict(eps=0.3)), ((6,), 1, 1, dict(boundary="circular", causal=True)),
         ((3, 3), 1, 1, dict())]


@pytest.mark.parametrize("grid, E, M, opts", CASES, ids=str)
@pytest.mark.parametrize("form", ["loop", "aten"])
@pytest.mark.parametrize("with_extra", [True, False])
def test_both_forms_match_the_reference(grid, E, M, opts, form, with_extra):
    B, H, Dk = 2, 2, 3
    N = E + math.prod(grid)
    Dv = 4 * M
    if form == "aten":                           # enough heads that the work passes the loop's limit
        H = LOOP_MAX // _work(B, 1, N, Dk, Dv) + 1
    assert (_work(B, H, N, Dk, Dv) <= LOOP_MAX) == (form == "loop")
    x = make_inputs(grid, E=E, M=M, Dk=Dk, Dv=Dv, B=B, H=H, boundary=opts.get("boundary", "zero"),
                    seed=len(grid) * 7 + E + M, rpe_extra=with_extra and E > 0, requires_grad=False)
    out = _compiled(x, grid, E, **opts)
    ref = _reference(x, grid, E, **opts)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["loop", "aten"])
def test_low_precision_error_is_that_of_the_python_dense_form(dtype, form):
    """Both compute in float32 from the rounded inputs; the error against float64 must be of the same size."""
    grid, E, M = (4, 4), 1, 2
    B, H = (1, 2) if form == "loop" else (4, 8)
    x = make_inputs(grid, E=E, M=M, Dk=8, Dv=8, B=B, H=H, seed=11, requires_grad=False)
    assert (_work(B, H, E + 16, 8, 8) <= LOOP_MAX) == (form == "loop")
    low = {n: None if t is None else t.to(dtype) for n, t in x.items()}
    ref = _reference(low, grid, E)                               # float64 from the rounded inputs
    out = _compiled(low, grid, E)
    python = dense_forward(low["q"], low["k"], low["v"], low["rpe"], low["rpe_extra"], grid, E, "elu1", True,
                           1e-6, "zero", False, 1.0)
    assert out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    err_python = (python.double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * err_python + ulp, (err, err_python)


@pytest.mark.parametrize("form", ["loop", "aten"])
def test_strided_inputs(form):
    """q, k, v as views of one (B, N, 3, H, D) tensor (timm's qkv layout) and a non-contiguous rpe."""
    grid, E = (3, 4), 1
    B, H, D = (1, 2, 8) if form == "loop" else (4, 8, 16)
    N = E + 12
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    rpe = torch.randn(H, 1, 7, 5, generator=g, dtype=torch.float64).transpose(2, 3)                # (H, 1, 5, 7)
    assert not rpe.is_contiguous() and rpe.shape == (H, 1, 5, 7)
    x = {"q": q, "k": k, "v": v, "rpe": rpe, "rpe_extra": None}
    assert (_work(B, H, N, D, D) <= LOOP_MAX) == (form == "loop")
    torch.testing.assert_close(_compiled(x, grid, E), _reference(x, grid, E), rtol=1e-10, atol=1e-12)


def test_lisa_attention_takes_it_only_for_unrecorded_forwards(monkeypatch):
    calls = []
    real = direct._C_DENSE_FORWARD
    monkeypatch.setattr(direct, "_C_DENSE_FORWARD", lambda *a: calls.append(1) or real(*a))
    x = make_inputs((3, 3), E=1, Dk=4, Dv=4, B=1, H=2, seed=2)
    args = (x["q"], x["k"], x["v"], x["rpe"])
    kw = dict(grid=(3, 3), num_extra=1, rpe_extra=x["rpe_extra"], backend="direct")
    with torch.no_grad():
        fast = lisa_kernels.lisa_attention(*args, **kw)
    assert len(calls) == 1 and fast.grad_fn is None
    recorded = lisa_kernels.lisa_attention(*args, **kw)           # inputs require grad: the autograd.Function
    assert len(calls) == 1 and recorded.grad_fn is not None
    torch.testing.assert_close(fast, recorded.detach(), rtol=1e-12, atol=1e-14)
    auto = lisa_kernels.lisa_attention(*[t.detach() for t in args], **{**kw, "backend": "auto",
                                                                         "rpe_extra": x["rpe_extra"].detach()})
    assert len(calls) == 2
    torch.testing.assert_close(auto, fast, rtol=1e-12, atol=1e-14)


def test_a_wrong_index_is_refused_not_read():
    x = make_inputs((3,), E=0, Dk=2, Dv=2, B=1, H=1, seed=1, requires_grad=False)
    index = dense_index((3,), 0, "zero", False, torch.device("cpu")).clone()
    index[4] = 5                                                  # the table has 5 entries: 0..4
    with pytest.raises(RuntimeError, match="outside the table"):
        _C.dense_forward(x["q"], x["k"], x["v"], x["rpe"], None, index, 0, True, True, 1e-6, False, 1.0)
    with pytest.raises(RuntimeError, match="index must be"):
        _C.dense_forward(x["q"], x["k"], x["v"], x["rpe"], None, index[:-1], 0, True, True, 1e-6, False, 1.0)
