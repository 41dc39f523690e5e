"""backend="auto": what it picks, why (explain), and that it only picks what can run.

Large problems are described with tensors on the "meta" device: explain() only needs shapes, and no
memory is allocated.
"""

import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import dispatch
from lisa_test_utils import make_inputs

MODEL_FREE = ("reference",)   # auto never runs the dense reference; it has no cost model entry


def meta_inputs(grid, B=1, H=1, Dk=16, Dv=16, M=1, E=0, boundary="zero", requires_grad=False):
    N = E + math.prod(grid)
    table = [s if boundary == "circular" else 2 * s - 1 for s in grid]

    def t(*shape):
        return torch.empty(*shape, device="meta").requires_grad_(requires_grad)
    return t(B, H, N, Dk), t(B, H, N, Dk), t(B, H, N, Dv), t(H, M, *table)


def explain(grid, backward=False, **kw):
    opts = {k: kw.pop(k) for k in ("causal", "normalize", "num_extra", "feature_map") if k in kw}
    if "E" in kw:
        opts["num_extra"] = kw["E"]
    if "boundary" in kw:
        opts["boundary"] = kw["boundary"]
    q, k, v, rpe = meta_inputs(grid, **kw)
    return lisa_kernels.explain(q, k, v, rpe, grid=grid, backward=backward, **opts)


def cheapest_runnable(expl):
    cands = {n: e.seconds for n, e in expl.estimates.items()
             if e.reason is None and e.seconds is not None and n not in MODEL_FREE}
    return min(cands, key=cands.get), cands


PROBLEMS = [
    dict(grid=(16,)), dict(grid=(4096,), Dk=32, Dv=32), dict(grid=(2**16,)), dict(grid=(14, 14), E=1, H=3, Dk=64,
                                                                                     Dv=64),
    dict(grid=(64, 64), H=4, Dk=32, Dv=32), dict(grid=(8, 32, 32), B=2, Dk=32, Dv=32, M=2),
    dict(grid=(2000,), causal=True), dict(grid=(96, 96), boundary="circular", Dk=8, Dv=8),
]


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_explain_chooses_the_cheapest_runnable_backend(problem, backward):
    expl = explain(backward=backward, **problem)
    assert isinstance(expl, lisa_kernels.Explanation)
    assert expl.backward is backward and expl.device_class == "cpu"
    assert set(expl.estimates) >= {"reference", "direct", "fft", "cuda"}
    assert all(isinstance(e, lisa_kernels.Estimate) and e.backend == n for n, e in expl.estimates.items())
    chosen = expl.estimates[expl.chosen]
    assert chosen.reason is None, f"auto chose {expl.chosen!r}, which cannot run: {chosen.reason}"
    best, cands = cheapest_runnable(expl)
    assert chosen.seconds == cands[best], (expl.chosen, cands)
    assert all(e.seconds is None or e.seconds > 0 for e in expl.estimates.values())


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_str_of_explanation_mentions_every_backend(problem):
    expl = explain(**problem)
    text = str(expl)
    assert f"auto -> {expl.chosen!r}" in text
    for name, e in expl.estimates.items():
        assert name in text
        if e.reason is not None:
            assert e.reason in text
            assert "\n" not in e.reason, f"the reason of {name!r} is not one line: {e.reason!r}"
    assert len(text.splitlines()) == 1 + len(expl.estimates) + bool(expl.crossover)   # + the fft crossover line
    marked = [line for line in text.splitlines()[1:] if line.lstrip().startswith("*")]
    assert len(marked) == 1 and expl.chosen in marked[0]


def test_explain_defaults_backward_to_whether_grads_are_needed():
    q, k, v, rpe = meta_inputs((64,), requires_grad=True)
    assert lisa_kernels.explain(q, k, v, rpe, grid=(64,)).backward is True
    with torch.no_grad():
        assert lisa_kernels.explain(q, k, v, rpe, grid=(64,)).backward is False
    q, k, v, rpe = meta_inputs((64,))
    assert lisa_kernels.explain(q, k, v, rpe, grid=(64,)).backward is False
    rpe.requires_grad_()   # a learnable table alone is enough
    assert lisa_kernels.explain(q, k, v, rpe, grid=(64,)).backward is True


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_backward_estimate_exceeds_forward(problem):
    fwd, both = explain(backward=False, **problem), explain(backward=True, **problem)
    for name in ("direct", "fft"):
        assert both.estimates[name].seconds > fwd.estimates[name].seconds, name


def test_fft_wins_for_large_grids_direct_for_small():
    choices = {}
    ratio = []
    for n in (16, 256, 4096, 2**14, 2**16, 2**18, 2**20):
        expl = explain((n,), Dk=16, Dv=16)
        choices[n] = expl.chosen
        ratio.append(expl.estimates["direct"].seconds / expl.estimates["fft"].seconds)
    assert choices[16] == "direct" and choices[256] == "direct"
    assert choices[2**20] == "fft"
    # O(N^2) against O(N log N): once the fixed overheads are negligible (N >= 4096), the direct/fft cost
    # ratio only grows with N
    assert all(a < b for a, b in zip(ratio[2:], ratio[3:])), ratio
    # and in 2D and 3D: a ViT-sized image goes direct, a large video goes fft
    assert explain((14, 14), E=1, Dk=64, Dv=64).chosen == "direct"
    assert explain((32, 64, 64), Dk=16, Dv=16).chosen == "fft"


def test_estimates_follow_the_problem():
    base = explain((512,))
    causal = explain((512,), causal=True)
    assert causal.estimates["direct"].seconds < base.estimates["direct"].seconds   # half the keys
    zero, circ = explain((96, 96)), explain((96, 96), boundary="circular")
    assert circ.estimates["fft"].seconds < zero.estimates["fft"].seconds            # no padding
    small, big = explain((64, 64), H=1), explain((64, 64), H=8)
    for name in ("direct", "fft"):
        assert big.estimates[name].seconds > small.estimates[name].seconds


def _spy_runners(monkeypatch):
    ran = []
    for name, fn in list(dispatch._RUNNERS.items()):
        def spy(*args, _fn=fn, _name=name):
            ran.append(_name)
            return _fn(*args)
        monkeypatch.setitem(dispatch._RUNNERS, name, spy)
    return ran


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("grid", [(12,), (3, 4), (2, 2, 3)], ids=str)
def test_auto_runs_what_explain_chooses(grid, requires_grad, monkeypatch):
    x = make_inputs(grid, E=1, M=2, dtype=torch.float32, requires_grad=requires_grad)
    expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=grid, num_extra=1, rpe_extra=x["rpe_extra"])
    assert expl.backward is requires_grad
    ran = _spy_runners(monkeypatch)
    lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=grid, num_extra=1,
                                rpe_extra=x["rpe_extra"])
    assert ran == [expl.chosen]


def test_auto_runs_fft_on_a_large_meta_problem(monkeypatch):
    """Shapes only (meta tensors): a 2**20-token sequence is dispatched to the fft path."""
    q, k, v, rpe = meta_inputs((2**20,))
    ran = _spy_runners(monkeypatch)
    out = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(2**20,))
    assert ran == ["fft"] and out.shape == v.shape and out.device.type == "meta"


@pytest.mark.parametrize("unavailable", ["direct", "fft"])
def test_auto_falls_back_to_a_backend_that_can_run(unavailable, monkeypatch):
    real = dispatch.backend_reason

    def reason(name, p):
        return f"{name} switched off by the test" if name == unavailable else real(name, p)
    monkeypatch.setattr(dispatch, "backend_reason", reason)
    for grid in [(16,), (2**20,)]:   # one where direct is cheaper, one where fft is
        q, k, v, rpe = meta_inputs(grid)
        expl = lisa_kernels.explain(q, k, v, rpe, grid=grid)
        assert expl.chosen != unavailable and expl.estimates[expl.chosen].reason is None
        assert expl.estimates[unavailable].reason == f"{unavailable} switched off by the test"
        assert "switched off by the test" in str(expl)
    ran = _spy_runners(monkeypatch)
    x = make_inputs((6,), requires_grad=False)
    out = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=(6,))
    ref = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=(6,), backend="reference")
    assert ran[0] not in (unavailable, "reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=f"backend='{unavailable}' cannot run this input: {unavailable} switched"):
        lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=(6,), backend=unavailable)


def test_auto_on_cpu_picks_a_modelled_cpu_path():
    """On the CPU auto picks direct or fft (the modelled paths), for every dtype."""
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        x = make_inputs((3, 3), dtype=dtype, requires_grad=False)
        expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=(3, 3))
        assert expl.chosen in ("direct", "fft"), (dtype, expl.chosen)


def test_available_backends():
    status = lisa_kernels.available_backends()
    assert set(status) == set(lisa_kernels.BACKENDS) - {"auto"}
    for name in ("reference", "direct", "fft"):
        assert status[name] is None, (name, status[name])
    assert isinstance(status["cuda"], str) and "cpu" in status["cuda"]
    for name in ("triton", "triton-fft"):
        if name in status and status[name] is not None:
            assert isinstance(status[name], str) and status[name].strip()
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason.strip() and "\n" not in reason), (name, reason)
    # a backend reported unavailable refuses with that same reason
    x = make_inputs((4,), dtype=torch.float32, B=1, H=1, requires_grad=False)
    for name, reason in status.items():
        if reason is not None:
            with pytest.raises(ValueError, match="cannot run this input") as info:
                lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=(4,), backend=name)
            assert reason in str(info.value)


def test_available_backends_for_the_meta_device():
    status = lisa_kernels.available_backends("meta")
    assert status["direct"] is None and status["fft"] is None
    assert status["cuda"] is not None and "meta" in status["cuda"]


@pytest.mark.parametrize("grid", [(64,), (8, 8)], ids=str)
def test_explain_on_real_tensors_matches_meta(grid):
    real = make_inputs(grid, B=2, H=3, Dk=8, Dv=8, dtype=torch.float32, requires_grad=False)
    meta = {n: t.to("meta") for n, t in real.items() if t is not None}
    a = lisa_kernels.explain(real["q"], real["k"], real["v"], real["rpe"], grid=grid)
    b = lisa_kernels.explain(meta["q"], meta["k"], meta["v"], meta["rpe"], grid=grid)
    assert a.chosen == b.chosen
    for n in ("direct", "fft"):
        assert a.estimates[n].seconds == b.estimates[n].seconds


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA GPU the Triton backends are not refused")
def test_triton_backends_on_cpu_without_the_interpreter(monkeypatch):
    """tests/conftest.py turns Triton's CPU interpreter on; without it, triton and triton-fft cannot run on the
    CPU: available_backends says why, and calling them raises ValueError with that reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = lisa_kernels.available_backends()
    names = [n for n in ("triton", "triton-fft") if n in lisa_kernels.BACKENDS]
    assert names, "no Triton backend in this version of lisa_kernels"
    x = make_inputs((4,), dtype=torch.float32, B=1, H=1, requires_grad=False)
    for name in names:
        assert isinstance(status[name], str) and status[name].strip() and "\n" not in status[name], status
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run this input") as info:
            lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=(4,), backend=name)
        assert status[name] in str(info.value)
        expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=(4,))
        assert expl.estimates[name].reason == status[name] and expl.chosen in ("direct", "fft")
