"""The compiled CPU loop of the fft path (csrc/fft_cpu.cpp, ``lisa_kernels._C.fft_cpu_forward/backward``).

Against the float64 reference (forward and every gradient) over 1D/2D/3D grids, both boundaries, M > 1, extra
tokens and causal; against the batched torch.fft chunks (``fft._C_FFT_CPU = None``) on grids too big for the
reference, with channel blocks that do not divide Dk; float32 error within a small multiple of the torch
chunks' error; that the loop is taken where it should be and not where its workspace exceeds the budget; and
that the compiled functions refuse malformed arguments."""

from __future__ import annotations

import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import fft as F
from lisa_kernels.cuda_fft import extension_reason
from lisa_test_utils import assert_close_to_reference, errors, forward_backward, make_inputs

pytestmark = pytest.mark.skipif(extension_reason() is not None or F._C_FFT_CPU is None,
                                reason=f"the compiled extension is not built: {extension_reason()}")


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts the calls of the compiled forward and backward loops: {"forward": n, "backward": n}."""
    calls = {"forward": 0, "backward": 0}

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def fft_cpu_forward(*args):
            calls["forward"] += 1
            return real.fft_cpu_forward(*args)

        @staticmethod
        def fft_cpu_backward(*args):
            calls["backward"] += 1
            return real.fft_cpu_backward(*args)

    real = F._C_FFT_CPU
    monkeypatch.setattr(F, "_C_FFT_CPU", Spy())
    return calls


@pytest.mark.parametrize("grid, E, M, boundary, causal", [
    ((37,), 0, 1, "zero", False), ((33,), 2, 2, "zero", True), ((32,), 1, 2, "circular", False),
    ((9, 7), 0, 1, "zero", False), ((8, 6), 2, 2, "zero", False), ((6, 8), 1, 4, "circular", False),
    ((3, 5, 4), 1, 2, "zero", False), ((4, 3, 5), 0, 1, "circular", False), ((1, 6, 5), 0, 1, "zero", False),
], ids=str)
def test_loop_matches_reference_float64(loop_calls, grid, E, M, boundary, causal):
    inputs = make_inputs(grid, E=E, M=M, Dk=5, Dv=2 * M, B=2, H=3, boundary=boundary, seed=71)
    assert_close_to_reference(inputs, "fft", 1e-9, grid=grid, num_extra=E, boundary=boundary, causal=causal)
    assert loop_calls == {"forward": 1, "backward": 1}, loop_calls


def _assert_loop_matches_chunks(monkeypatch, loop_calls, inputs, chunk_inputs, grid, tol):
    """The loop on ``inputs`` (both loops called once) against the torch chunks on ``chunk_inputs``."""
    result = forward_backward(inputs, "fft", grid=grid)
    assert loop_calls == {"forward": 1, "backward": 1}, loop_calls
    monkeypatch.setattr(F, "_C_FFT_CPU", None)
    errs = errors(result, forward_backward(chunk_inputs, "fft", grid=grid))
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("grid, Dk", [((16384,), 11), ((40, 36), 37), ((6, 10, 12), 13), ((128, 128), 3)],
                         ids=str)
def test_loop_matches_torch_chunks_with_partial_blocks(monkeypatch, loop_calls, grid, Dk):
    """Channel blocks that do not divide Dk (in float64, 2 channels per call at L = 32768, 11 at 80x72 and at
    12x20x24), and column blocks (128x128 in float64: one channel per call, its 528 KiB spectrum in 3 blocks of
    columns); the loop and the chunked torch passes compute the same sums."""
    inputs = make_inputs(grid, M=1, Dk=Dk, Dv=3, B=1, H=2, seed=72)
    _assert_loop_matches_chunks(monkeypatch, loop_calls, inputs, inputs, grid, 1e-11)


def test_loop_one_channel_per_call_on_big_grids(monkeypatch, loop_calls):
    """128x256 (L = 256x512, a 1 MiB spectrum per channel): one channel per call, 3 column blocks; float32
    against float64."""
    grid = (128, 256)
    x64 = make_inputs(grid, M=1, Dk=2, Dv=2, B=1, H=1, seed=73, rpe_scale=0.1)
    x32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in x64.items()}
    _assert_loop_matches_chunks(monkeypatch, loop_calls, x32, x64, grid, 2e-5)


@pytest.mark.parametrize("grid", [(64,), (12, 10), (4, 5, 6)], ids=str)
def test_float32_error_like_torch_chunks(monkeypatch, grid):
    """The loop's float32 error against float64 stays within 2x (+ 1e-6) of the chunked torch passes' error."""
    x64 = make_inputs(grid, M=2, Dk=6, Dv=4, B=2, H=2, seed=74)
    expected = forward_backward(x64, "reference", grid=grid)
    x32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in x64.items()}
    loop = errors(forward_backward(x32, "fft", grid=grid), expected)
    monkeypatch.setattr(F, "_C_FFT_CPU", None)
    chunks = errors(forward_backward(x32, "fft", grid=grid), expected)
    bad = {n: (loop[n], chunks[n]) for n in loop if not loop[n] <= 2 * chunks[n] + 1e-6}
    assert not bad, f"float32 errors (loop, torch chunks): {bad}"


def test_budget_below_the_loop_workspace_takes_the_chunks(loop_calls):
    grid = (12, 10)
    inputs = make_inputs(grid, M=1, Dk=3, Dv=2, B=1, H=2, seed=75)
    sizes = list(F.fft_sizes(grid, False))
    need = F._C_FFT_CPU.fft_cpu_workspace_bytes(list(grid), sizes, 2, 1, 3, 8, False)   # the forward's: the smaller
    old = lisa_kernels.set_config(fft_workspace_bytes=need - 1)
    try:
        assert_close_to_reference(inputs, "fft", 1e-9, grid=grid)
    finally:
        lisa_kernels.set_config(fft_workspace_bytes=old.fft_workspace_bytes)
    assert loop_calls == {"forward": 0, "backward": 0}, loop_calls
    assert_close_to_reference(inputs, "fft", 1e-9, grid=grid)
    assert loop_calls == {"forward": 1, "backward": 1}, loop_calls


def test_taken_for_half_inputs_and_the_float64_switch(loop_calls):
    """float16 inputs (the core computes in float32) and float32 calls switched to float64 both take the loop."""
    grid = (8, 8)
    x = make_inputs(grid, Dk=4, Dv=4, B=1, H=1, seed=76, requires_grad=False)
    with torch.no_grad():
        lisa_kernels.lisa_attention(x["q"].half(), x["k"].half(), x["v"].half(), x["rpe"].half(), grid=grid,
                                    backend="fft")
        assert loop_calls["forward"] == 1, loop_calls
        spread = torch.zeros_like(x["rpe"]).float()
        spread[..., 0, 0] = 12.0          # one corner offset far heavier: the rows' masses spread over 5.5 nats
        assert F.fft_needs_float64(spread, grid, False, torch.float32)
        lisa_kernels.lisa_attention(x["q"].float(), x["k"].float(), x["v"].float(), spread, grid=grid, backend="fft")
    assert loop_calls["forward"] == 2, loop_calls


def test_cost_model_knows_whether_the_loop_runs(monkeypatch):
    """The CPU fft estimate is for the compiled loop; without it the torch chunks' factor applies."""
    from lisa_kernels import dispatch
    x = make_inputs((64, 64), Dk=32, Dv=32, B=1, H=4, dtype=torch.float32, requires_grad=False)
    expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=(64, 64))
    with_loop = expl.estimates["fft"].seconds
    monkeypatch.setattr(F, "_C_FFT_CPU", None)
    expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=(64, 64))
    without = expl.estimates["fft"].seconds
    assert without == pytest.approx(with_loop * dispatch.FFT_TORCH_CHUNKS_FACTOR)


def _loop_args(grid=(6, 5), BH=2, Dk=3, M=1, G1=3, H=2, dtype=torch.float32):
    sizes = F.fft_sizes(grid, False)
    ng = math.prod(grid)
    khat_shape = (H, M) + tuple(sizes[:-1]) + (sizes[-1] // 2 + 1,)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return dict(fk=torch.rand(BH, Dk, ng, dtype=dtype), ve=torch.rand(BH, M, G1, ng, dtype=dtype),
                fq=torch.rand(BH, Dk, ng, dtype=dtype), khat=torch.randn(khat_shape, dtype=cdtype),
                grid=list(grid), sizes=list(sizes))


@pytest.mark.parametrize("change, message", [
    (dict(fk=torch.rand(2, 3, 29)), "fk and fq must be"),
    (dict(fq=torch.rand(2, 4, 30)), "fk and fq must be"),
    (dict(ve=torch.rand(2, 1, 3, 31)), "ve must be"),
    (dict(khat=torch.randn(2, 1, 11, 6, dtype=torch.complex64)), "khat must be"),
    (dict(khat=torch.randn(2, 1, 11, 6, dtype=torch.complex128)), "khat must be"),
    (dict(fk=torch.rand(2, 30, 3).transpose(1, 2)), "contiguous"),
    (dict(fk=torch.rand(2, 3, 30, dtype=torch.float64)), "one dtype"),
    (dict(sizes=[4, 9]), "must be >= the grid"),
    (dict(grid=[6, 5, 1, 1], sizes=[11, 9, 1, 1]), "1 to 3 axes"),
], ids=lambda x: str({k: f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else v for k, v in x.items()}
                     if isinstance(x, dict) else x)[:60])          # (shapes, not values: the same ids in every worker)
def test_malformed_arguments_are_refused(change, message):
    args = _loop_args()
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        F._C_FFT_CPU.fft_cpu_forward(**args)
    ge = torch.rand_like(args["ve"]) if args["ve"].dim() == 4 else args["ve"]
    with pytest.raises(RuntimeError, match=message):
        F._C_FFT_CPU.fft_cpu_backward(args["fk"], args["ve"], args["fq"], ge, args["khat"], args["grid"],
                                      args["sizes"])


def test_backward_refuses_a_mismatched_gradient():
    args = _loop_args()
    with pytest.raises(RuntimeError, match="ge must be"):
        F._C_FFT_CPU.fft_cpu_backward(args["fk"], args["ve"], args["fq"], torch.rand(2, 1, 2, 30), args["khat"],
                                      args["grid"], args["sizes"])


def test_an_empty_batch_gives_empty_results():
    """No (batch, head) rows: the loops run no task and return empty outputs, and a zero gradient of the table."""
    args = _loop_args(BH=0)
    out = F._C_FFT_CPU.fft_cpu_forward(**args)
    assert out.shape == (0, 1, 3, 30)
    grads = F._C_FFT_CPU.fft_cpu_backward(args["fk"], args["ve"], args["fq"], torch.rand_like(args["ve"]),
                                          args["khat"], args["grid"], args["sizes"])
    assert [tuple(g.shape) for g in grads[:3]] == [(0, 3, 30), (0, 3, 30), (0, 1, 3, 30)]
    assert grads[3].shape == args["khat"].shape and not grads[3].abs().any()
