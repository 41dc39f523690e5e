"""The per-call fast paths: the plan cache in lisa_attention never skips a check whose outcome could differ,
sees every setting and replacement that changes a choice, and stays bounded; the direct path's dense form
(custom op and eager autograd.Function) matches the reference and the blocked form; benchmarks/overhead.py
writes what it says, and the tiny direct call issues a bounded number of aten ops."""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import weakref

import pytest
import torch

import lisa_kernels
from lisa_kernels import backends, direct, dispatch, ops
from lisa_test_utils import errors, forward_backward, make_inputs

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
OPS = torch.ops.lisa_kernels


def _tiny(requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 5, 8, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))
    rpe = (0.3 * torch.randn(1, 1, 3, 3, generator=g, dtype=dtype)).requires_grad_(requires_grad)
    return q, k, v, rpe


def _call(q, k, v, rpe, **kw):
    kw.setdefault("grid", (2, 2))
    kw.setdefault("num_extra", 1)
    return lisa_kernels.lisa_attention(q, k, v, rpe, **kw)


# ------------------------------------------------------------------------------------------ plan cache

@pytest.mark.parametrize("change, error, match", [
    (dict(grid=(2.0, 2)), TypeError, "grid must hold ints"),
    (dict(grid=[2, 2.0]), TypeError, "grid must hold ints"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(causal=0), TypeError, "causal must be a bool"),
    (dict(num_extra=True), TypeError, "num_extra must be an int"),
    (dict(eps=True), TypeError, "eps must be a real number"),
    (dict(scale=True), TypeError, "scale must be a real number"),
    (dict(backend="Direct"), ValueError, "backend must be one of"),
    (dict(eps=float("nan")), ValueError, "eps must be finite"),
])
def test_a_cached_signature_does_not_skip_option_checks(change, error, match):
    q, k, v, rpe = _tiny()
    for _ in range(2):                                     # cached now
        _call(q, k, v, rpe)
    with pytest.raises(error, match=match):
        _call(q, k, v, rpe, **change)


def test_a_cached_signature_does_not_skip_tensor_checks():
    q, k, v, rpe = _tiny()
    _call(q, k, v, rpe)
    _call(q, k, v, rpe)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        _call(q, k.double(), v, rpe)
    with pytest.raises(ValueError, match="rpe must be on the device of q"):
        _call(q, k, v, rpe.to("meta"))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        _call(q, k, v.numpy(), rpe)
    with pytest.raises(ValueError, match="grid .* describes 6 tokens"):
        _call(q, k, v, rpe, grid=(2, 3), num_extra=0)


def test_same_shape_other_strides_dtype_and_grad_give_the_right_answer():
    q, k, v, rpe = _tiny(dtype=torch.float64)
    ref = _call(q, k, v, rpe, backend="reference")
    assert torch.allclose(_call(q, k, v, rpe), ref, rtol=1e-10, atol=1e-12)
    # the same values in other strides (a transposed copy read back through a transposed view)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride() != q.stride()
    assert torch.allclose(_call(qt, k, v, rpe), ref, rtol=1e-10, atol=1e-12)
    # float32 after float64
    out32 = _call(q.float(), k.float(), v.float(), rpe.float())
    assert out32.dtype == torch.float32 and torch.allclose(out32.double(), ref, rtol=1e-4, atol=1e-5)
    # requiring grad after a no-grad call: gradients flow
    qg = q.clone().requires_grad_()
    _call(qg, k, v, rpe).sum().backward()
    qr = q.clone().requires_grad_()
    _call(qr, k, v, rpe, backend="reference").sum().backward()
    assert torch.allclose(qg.grad, qr.grad, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        assert not _call(qg, k, v, rpe).requires_grad


def test_the_signature_holds_what_the_choice_reads():
    q, k, v, rpe = _tiny()
    options = (1, "elu1", True, 1e-6, "zero", False, "auto", 1.0)
    sig = lisa_kernels._signature
    base = sig(q, k, v, rpe, None, (2, 2), options)
    assert base == sig(q, k, v, rpe, None, (2, 2), options)
    assert base != sig(q.requires_grad_(), k, v, rpe, None, (2, 2), options)
    q.requires_grad_(False)
    with torch.no_grad():
        assert base != sig(q, k, v, rpe, None, (2, 2), options)
    assert base != sig(q, k, v, rpe, None, [2, 2], options)
    assert base != sig(q, k, v, rpe, None, (2, 2), (1, "elu1", True, 1e-6, "zero", False, "auto", 1))
    old = lisa_kernels.set_config(direct_block_bytes=4096)
    assert base != sig(q, k, v, rpe, None, (2, 2), options)
    lisa_kernels.set_config(direct_block_bytes=old.direct_block_bytes)
    torch.use_deterministic_algorithms(True)
    try:
        assert base != sig(q, k, v, rpe, None, (2, 2), options)
    finally:
        torch.use_deterministic_algorithms(False)
    assert sig(q, k, v, rpe, None, iter((2, 2)), options) is None          # not cacheable: checked in full


def test_settings_changed_after_caching_are_seen(monkeypatch):
    q, k, v, rpe = _tiny()
    _call(q, k, v, rpe, backend="reference")
    lisa_kernels.set_config(reference_max_bytes=64)
    with pytest.raises(ValueError, match="reference_max_bytes"):
        _call(q, k, v, rpe, backend="reference")
    # a smaller block budget switches the direct path from its dense form to the blocked loop
    _call(q, k, v, rpe, backend="direct")
    calls = []
    real = ops.direct_dense_attention
    monkeypatch.setattr(backends, "direct_dense_attention", lambda *a: calls.append(1) or real(*a))
    _call(q, k, v, rpe, backend="direct")
    assert calls == [1]
    lisa_kernels.set_config(direct_block_bytes=256)
    _call(q, k, v, rpe, backend="direct")
    assert calls == [1]


def test_a_replaced_can_run_check_is_seen(monkeypatch):
    q, k, v, rpe = _tiny()
    assert lisa_kernels.explain(q, k, v, rpe, grid=(2, 2), num_extra=1).chosen == "direct"
    _call(q, k, v, rpe)
    real = dispatch.backend_reason
    monkeypatch.setattr(dispatch, "backend_reason",
                        lambda name, p: "off in this test" if name == "direct" else real(name, p))
    ran = []
    for name, fn in list(dispatch._RUNNERS.items()):
        monkeypatch.setitem(dispatch._RUNNERS, name, lambda *a, _fn=fn, _n=name: ran.append(_n) or _fn(*a))
    _call(q, k, v, rpe)
    assert ran and ran[0] != "direct"
    with pytest.raises(ValueError, match="off in this test"):
        _call(q, k, v, rpe, backend="direct")


def test_the_cache_is_bounded():
    lisa_kernels.clear_cache()
    x = torch.randn(1, 1, 1, 4)
    for n in range(lisa_kernels._PLAN_CACHE_SIZE + 40):
        q = torch.randn(1, 1, n + 1, 4)
        lisa_kernels.lisa_attention(q, q, q, torch.zeros(1, 1, 2 * n + 1), grid=(n + 1,), backend="direct")
    assert len(lisa_kernels._PLANS) == lisa_kernels._PLAN_CACHE_SIZE
    lisa_kernels.clear_cache()
    assert len(lisa_kernels._PLANS) == 0
    lisa_kernels.lisa_attention(x, x, x, torch.zeros(1, 1, 1), grid=(1,))


def test_the_cache_under_threads_stays_bounded_and_right():
    """Four threads call with more signatures than the cache holds, each reusing its own: eviction and reuse race,
    and every result is bitwise the one the same call gives alone."""
    import threading
    lisa_kernels.clear_cache()
    size = lisa_kernels._PLAN_CACHE_SIZE
    g = torch.Generator().manual_seed(11)
    inputs = [(torch.randn(1, 1, n, 2, generator=g), torch.randn(1, 1, 2 * n - 1, generator=g))
              for n in range(1, size // 3 + 2)]

    def calls(offset):
        for i in range(len(inputs)):
            for x, rpe in (inputs[(i + offset) % len(inputs)], inputs[0]):
                for backend in ("direct", "reference"):
                    yield (offset, i, x.shape[2], backend), lambda x=x, rpe=rpe, backend=backend: \
                        lisa_kernels.lisa_attention(x, x, x, rpe, grid=(x.shape[2],), backend=backend,
                                                    scale=1.0 + offset)

    alone = {key: call() for t in range(4) for key, call in calls(t)}
    lisa_kernels.clear_cache()
    failures = []

    def work(offset):
        for key, call in calls(offset):
            if not torch.equal(call(), alone[key]):
                failures.append(key)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert len(lisa_kernels._PLANS) == size            # 4 threads x (size//3 + 1) x 2 backends signatures > size
    lisa_kernels.clear_cache()


def test_the_traced_path_matches_the_cached_one(monkeypatch):
    """Under torch.compile lisa_attention checks and dispatches without the plan cache (dynamo traces it); the same
    path run eagerly gives the cached path's results, and "auto" picks the same backend."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g) for _ in range(3))
    rpe = 0.3 * torch.randn(2, 1, 3, 5, generator=g)
    for backend in ("auto", "direct", "fft", "reference"):
        want = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(2, 3), num_extra=1, backend=backend)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            got = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(2, 3), num_extra=1, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        with pytest.raises(ValueError, match="backend='triton' cannot run this input"):
            lisa_kernels.lisa_attention(q.double(), k.double(), v.double(), rpe.double(), grid=(2, 3), num_extra=1,
                                        backend="triton")


# ------------------------------------------------------------------------------------------ the dense form

DENSE_CASES = [((5,), 0, 1, dict(causal=True)), ((7,), 2, 2, dict(causal=True, feature_map="relu")),
               ((3, 4), 1, 2, dict(boundary="circular")), ((2, 3, 2), 1, 1, dict(normalize=False, scale=0.5)),
               ((4, 3), 3, 4, dict(eps=0.3)), ((6,), 1, 1, dict(boundary="circular", causal=True))]


@pytest.mark.parametrize("grid, E, M, opts", DENSE_CASES, ids=str)
def test_dense_form_matches_reference_and_blocked_form(grid, E, M, opts):
    inputs = make_inputs(grid, E=E, M=M, Dk=3, Dv=4 * M, B=2, H=2, boundary=opts.get("boundary", "zero"),
                         seed=len(grid) * 10 + E)
    kw = dict(grid=grid, num_extra=E, **opts)
    ref = forward_backward(inputs, "reference", **kw)
    dense = forward_backward(inputs, "direct", **kw)
    lisa_kernels.set_config(direct_block_bytes=256)                # the blocked loop, many blocks
    blocked = forward_backward(inputs, "direct", **kw)
    assert max(errors(dense, ref).values()) <= 1e-9
    assert max(errors(blocked, dense).values()) <= 1e-9


@pytest.mark.parametrize("fused", [False, True], ids=["dense-function", "fused-kernel"])
@pytest.mark.parametrize("grid, E, M, opts", DENSE_CASES[:4], ids=str)
def test_custom_op_and_eager_function_agree(grid, E, M, opts, fused, monkeypatch):
    """The eager autograd.Function of a recorded tiny call (the dense form's, or the extension's fused kernel's
    where it is built) against the direct_dense custom op."""
    if fused and direct._C_DIRECT is None:
        pytest.skip("the extension's fused direct CPU kernel is not built")
    if not fused:
        monkeypatch.setattr(direct, "_C_DIRECT", None)
    inputs = make_inputs(grid, E=E, M=M, Dk=3, Dv=4 * M, B=2, H=2, boundary=opts.get("boundary", "zero"), seed=5)
    names = [n for n in ("q", "k", "v", "rpe", "rpe_extra") if inputs[n] is not None]
    p = lisa_kernels.check_inputs(inputs["q"], inputs["k"], inputs["v"], inputs["rpe"], grid=grid, num_extra=E,
                                  rpe_extra=inputs["rpe_extra"], **opts)
    g = torch.randn(p.B, p.H, p.N, p.Dv, dtype=torch.float64)
    eager = ops.direct_dense_attention(*[inputs[n] for n in ("q", "k", "v", "rpe", "rpe_extra")], p)
    wanted_fn = "DirectCPUFunction" if fused else "DenseFunction"
    assert eager.grad_fn is not None and wanted_fn in type(eager.grad_fn).__name__
    via_op = OPS.direct_dense(inputs["q"], inputs["k"], inputs["v"], inputs["rpe"],
                              inputs["rpe_extra"] if E else None, list(grid), E, p.feature_map, p.normalize, p.eps,
                              p.boundary, p.causal, p.scale)
    assert torch.allclose(eager, via_op, rtol=1e-12, atol=1e-14)
    wanted = [inputs[n] for n in names if n != "rpe_extra" or E]
    for a, b in zip(torch.autograd.grad(eager, wanted, g), torch.autograd.grad(via_op, wanted, g)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_direct_dense(with_extra, causal, monkeypatch):
    monkeypatch.undo()                                 # conftest's NaN poisoning would leak into opcheck's buffers
    grid, E = (6,), 1
    x = make_inputs(grid, E=E, M=2, Dk=3, Dv=4, B=2, H=2, seed=9, rpe_extra=True)
    rx = x["rpe_extra"] if with_extra else None
    args = (x["q"], x["k"], x["v"], x["rpe"], rx, list(grid), E, "elu1", True, 1e-6, "zero", causal, 0.7)
    torch.library.opcheck(OPS.direct_dense, args)
    plain = [None if t is None else t.detach() for t in args[:5]]
    torch.library.opcheck(OPS.direct_dense_backward, (*plain, torch.randn(2, 2, 7, 4, dtype=torch.float64),
                                                      *args[5:]))


def test_under_a_dispatch_mode_the_custom_op_runs(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def eager_path(*args):
        raise AssertionError("the eager path ran under a dispatch mode")
    monkeypatch.setattr(ops, "dense_forward", eager_path)
    monkeypatch.setattr(ops, "dense_forward_saving", eager_path)
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 3, 13, 8) for _ in range(3))
        out = lisa_kernels.lisa_attention(q, k, v, torch.empty(3, 1, 5, 7), grid=(3, 4), num_extra=1,
                                          backend="direct")
    assert out.shape == (2, 3, 13, 8)


def test_eager_function_leaves_no_reference_cycle():
    q, k, v, rpe = _tiny(requires_grad=True)
    gc.disable()
    try:
        out = _call(q, k, v, rpe, backend="direct")
        ref = weakref.ref(out)
        out.sum().backward()
        del out
        assert ref() is None, "the output is kept alive by a reference cycle"
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------ overhead.py

@pytest.fixture(scope="module")
def overhead_run(tmp_path_factory):
    sys.path.insert(0, BENCH_DIR)
    import overhead
    stem = str(tmp_path_factory.mktemp("overhead") / "run")
    data = overhead.main(["--batches", "3", "--calls", "5", "--warmup", "2", "--out", stem])
    return stem, data


def test_overhead_writes_every_record(overhead_run):
    stem, data = overhead_run
    with open(stem + ".json") as f:
        saved = json.load(f)
    assert saved["records"] == json.loads(json.dumps(data["records"]))
    got = {(r["method"], r["mode"]) for r in saved["records"]}
    assert got == {(m, mode) for m in ("sdpa", "lisa-direct", "lisa-auto") for mode in ("fwd", "fwd+bwd")}
    for r in saved["records"]:
        assert r["median_us"] > 0 and r["ratio_sdpa"] > 0 and r["aten_ops"] > 0 and r["batches"] == 3
    assert saved["meta"]["torch_threads"] == 1 and saved["meta"]["device_name"]
    assert set(saved["targets"]) == {f"{m}_{mode}_at_most_{lim}x_sdpa" for m in ("lisa-direct", "lisa-auto")
                                     for mode, lim in (("fwd", 8), ("fwd+bwd", 6))}
    with open(stem + ".md") as f:
        text = f.read()
    assert "| tiny | fwd | lisa-auto | direct |" in text


def test_tiny_direct_call_issues_few_aten_ops(overhead_run):
    """Before the plan cache and the dense form this call issued 258 aten ops forward, 639 forward+backward
    (torch.profiler, nested ops included); the limits leave room for small changes, not for a regression."""
    _, data = overhead_run
    ops_per_call = {(r["method"], r["mode"]): r["aten_ops"] for r in data["records"]}
    assert ops_per_call[("lisa-direct", "fwd")] <= 60
    assert ops_per_call[("lisa-direct", "fwd+bwd")] <= 160
    assert ops_per_call[("lisa-auto", "fwd")] == ops_per_call[("lisa-direct", "fwd")]
    assert math.isfinite(ops_per_call[("sdpa", "fwd")])


def test_eager_function_backward_twice_with_retain_graph():
    q, k, v, rpe = _tiny(requires_grad=True, dtype=torch.float64)
    out = _call(q, k, v, rpe, backend="direct")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v, rpe), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v, rpe), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, (q,), g)
