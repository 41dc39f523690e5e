"""The fused direct CPU kernel (csrc/direct_cpu.cpp, ``lisa_kernels._C.direct_cpu_forward/backward``).

Against the float64 reference, forward and every gradient: 1D/2D/3D grids and every option (extra tokens with
and without rpe_extra, M groups, zero and circular boundaries, causal, elu1/relu, normalize, scale, eps); block
edges (N not a multiple of the block, one token, grids smaller than a block) through explicit tile sizes;
strided inputs and a non-contiguous rpe; seeded random configurations of awkward sizes; float32 and
float16/bfloat16 errors against the Python path's own; bitwise determinism (on any number of threads); the
ATen fallback of the products; clear errors for bad arguments; that ``backend="direct"`` and ``"auto"`` take the
kernel on the CPU (and ``explain`` says so); the custom ops under opcheck and torch.compile."""

from __future__ import annotations

import math
import random

import pytest
import torch

import lisa_kernels
from lisa_kernels import direct, ops
from lisa_kernels.cuda_fft import extension_reason
from lisa_test_utils import cast_inputs, errors, forward_backward, make_inputs

pytestmark = pytest.mark.skipif(direct._C_DIRECT is None,
                                reason=f"the compiled extension is not built: {extension_reason()}")
C = direct._C_DIRECT
OPS = torch.ops.lisa_kernels
NAMES = ("q", "k", "v", "rpe", "rpe_extra")


def _options(opts):
    return dict(feature_map=opts.get("feature_map", "elu1"), normalize=opts.get("normalize", True),
                eps=opts.get("eps", 1e-6), boundary=opts.get("boundary", "zero"), causal=opts.get("causal", False),
                scale=opts.get("scale", 1.0))


def compiled(x, grid, E, grad_out=None, block_q=0, block_k=0, **opts):
    """(out, {name: grad}) from the extension's two calls; gradients only where grad_out is given."""
    o = _options(opts)
    q, k, v, rpe, rx = (None if x[n] is None else x[n].detach() for n in NAMES)
    rx = rx if E else None
    args = (list(grid), E, o["feature_map"] == "elu1", o["normalize"], o["eps"], o["boundary"] == "circular",
            o["causal"], o["scale"])
    out, out_c, inv = C.direct_cpu_forward(q, k, v, rpe, rx, *args, True, block_q, block_k)
    if grad_out is None:
        return out, {}
    grads = C.direct_cpu_backward(q, k, v, rpe, rx, out_c if out_c.numel() else out, inv, grad_out, *args,
                                  block_q, block_k)
    names = [n for n in NAMES if x[n] is not None and (n != "rpe_extra" or E)]
    return out, dict(zip(names, grads))


def _upstream(x, seed=1234):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x["v"].shape, generator=g, dtype=torch.float64).to(x["v"].dtype)


def _check(x, grid, E, tol=1e-10, block_q=0, block_k=0, floor=0.0, **opts):
    g = _upstream(x)
    ref = forward_backward(x, "reference", g, grid=grid, num_extra=E, **opts)
    if not E:
        ref[1].pop("rpe_extra", None)
    got = compiled(x, grid, E, g, block_q, block_k, **opts)
    assert got[0].dtype == x["q"].dtype and got[0].shape == ref[0].shape
    errs = errors(got, ref, floor)
    assert max(errs.values()) <= tol, errs
    return errs


# (grid, E, M, options): every option, on 1D, 2D and 3D grids
CASES = [
    ((9,), 0, 1, {}),
    ((11,), 2, 2, dict(causal=True)),
    ((10,), 1, 1, dict(causal=True, feature_map="relu", rpe_extra=False)),
    ((8,), 1, 2, dict(boundary="circular")),
    ((7,), 2, 1, dict(boundary="circular", causal=True)),
    ((5, 4), 1, 2, {}),
    ((4, 6), 0, 1, dict(boundary="circular", feature_map="relu")),
    ((3, 5), 3, 4, dict(eps=0.3, rpe_extra=False)),
    ((4, 3), 1, 1, dict(normalize=False, scale=0.5)),
    ((3, 4, 5), 2, 2, {}),
    ((2, 3, 4), 0, 1, dict(boundary="circular", scale=1.7)),
    ((2, 2, 3), 1, 2, dict(normalize=False, feature_map="relu")),
]


@pytest.mark.parametrize("grid, E, M, opts", CASES, ids=str)
@pytest.mark.parametrize("blocks", [(0, 0), (4, 3), (5, 7)], ids=["default", "bq4-bk3", "bq5-bk7"])
def test_matches_the_reference(grid, E, M, opts, blocks):
    opts = dict(opts)
    with_extra = opts.pop("rpe_extra", True) and E > 0
    x = make_inputs(grid, E=E, M=M, Dk=3, Dv=2 * M, B=2, H=2, boundary=opts.get("boundary", "zero"),
                    seed=len(grid) * 17 + E + M, rpe_extra=with_extra)
    _check(x, grid, E, block_q=blocks[0], block_k=blocks[1], **opts)


@pytest.mark.parametrize("grid, E", [((1,), 0), ((1,), 1), ((1, 1), 2), ((1, 1, 1), 0)], ids=str)
def test_one_grid_token(grid, E):
    x = make_inputs(grid, E=E, M=1, Dk=2, Dv=3, B=2, H=2, seed=3)
    # one token: out = v W / (W + eps), whose q and k gradients are of the order of eps (a cancellation): an
    # absolute error is the meaningful one there (floor = 1)
    _check(x, grid, E, floor=1.0)
    _check(x, grid, E, floor=1.0, causal=len(grid) == 1)


def test_grids_smaller_than_a_block_and_ragged_blocks():
    """Default tiles (128 queries, 512 keys) over a 3x3 grid; and N = 47 with blocks that do not divide it."""
    x = make_inputs((3, 3), E=1, M=1, Dk=4, Dv=4, B=1, H=1, seed=5)
    _check(x, (3, 3), 1)
    x = make_inputs((46,), E=1, M=2, Dk=4, Dv=4, B=1, H=2, seed=6)
    for bq, bk in [(10, 9), (46, 1), (1, 46), (47, 47), (100, 100)]:
        _check(x, (46,), 1, block_q=bq, block_k=bk, causal=True)


def _random_config(rng: random.Random):
    d = rng.choice([1, 2, 3])
    grid = tuple(rng.randint(1, 6 if d < 3 else 3) for _ in range(d))
    E = rng.choice([0, 0, 1, 2, 3])
    M = rng.choice([1, 1, 2, 3])
    opts = dict(feature_map=rng.choice(["elu1", "relu"]), normalize=rng.random() < 0.8,
                eps=rng.choice([1e-6, 0.0, 0.2]), boundary=rng.choice(["zero", "circular"]),
                causal=d == 1 and rng.random() < 0.5, scale=rng.choice([1.0, 0.3, 2.0]))
    if opts["eps"] == 0.0 and opts["feature_map"] == "relu":
        opts["eps"] = 1e-3          # relu features can make a whole row's weights zero: 0 / 0
    sizes = dict(Dk=rng.choice([1, 2, 5, 8]), G=rng.choice([1, 2, 3]), B=rng.randint(1, 2), H=rng.randint(1, 3))
    N = E + math.prod(grid)
    blocks = (rng.randint(1, N + 2), rng.randint(1, N + 2)) if rng.random() < 0.7 else (0, 0)
    return grid, E, M, opts, sizes, blocks


@pytest.mark.parametrize("seed", range(24))
def test_random_awkward_configurations(seed):
    """Head dim 1, Dk != Dv, one token, odd grids, random tile sizes: forward and every gradient."""
    grid, E, M, opts, sz, blocks = _random_config(random.Random(seed))
    x = make_inputs(grid, E=E, M=M, Dk=sz["Dk"], Dv=sz["G"] * M, B=sz["B"], H=sz["H"], boundary=opts["boundary"],
                    seed=seed, rpe_extra=E > 0 and seed % 3 != 0)
    # floor: with Dk = 1 and eps = 0 phi(q_i) cancels from out_i, so dq is zero up to round-off (its relative
    # error is meaningless); gradients of O(1) inputs are compared with an absolute floor of 1e-3
    _check(x, grid, E, tol=1e-9, block_q=blocks[0], block_k=blocks[1], floor=1e-3, **opts)


def test_strided_inputs_and_a_non_contiguous_rpe():
    """q, k, v as views of one (B, N, 3, H, D) tensor (timm's qkv), rpe and rpe_extra transposed views."""
    grid, E, B, H, D = (4, 5), 1, 2, 3, 6
    N = E + 20
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4)
    q, k, v = (t.requires_grad_() for t in qkv.detach().unbind(0))
    assert not q.is_contiguous() and q.stride(-1) == 1
    rpe = (0.5 * torch.randn(H, 1, 9, 7, generator=g, dtype=torch.float64)).transpose(2, 3).requires_grad_()
    rx = (0.5 * torch.randn(3, 1, H, generator=g, dtype=torch.float64)).permute(2, 1, 0).requires_grad_()
    assert not rpe.is_contiguous() and not rx.is_contiguous() and rpe.shape == (H, 1, 7, 9)
    x = dict(q=q, k=k, v=v, rpe=rpe, rpe_extra=rx)
    _check(x, grid, E)
    # and a v whose last dim is strided (copied to rows of unit stride), and a strided incoming gradient
    x["v"] = torch.randn(B, H, N, 2 * D, generator=g, dtype=torch.float64)[..., ::2].requires_grad_()
    gr = torch.randn(B, H, N, 2 * D, generator=g, dtype=torch.float64)[..., ::2]
    ref = forward_backward(x, "reference", gr, grid=grid, num_extra=E)
    got = compiled(x, grid, E, gr)
    assert max(errors(got, ref).values()) <= 1e-10


def _python_direct(x, grid, E, grad_out, monkeypatch, **opts):
    """The direct path without the fused kernel (the dense form or the blocked loop), same dtype."""
    with monkeypatch.context() as m:
        m.setattr(direct, "_C_DIRECT", None)
        lisa_kernels.clear_cache()
        res = forward_backward(x, "direct", grad_out, grid=grid, num_extra=E, **opts)
    lisa_kernels.clear_cache()
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grid, E, M, opts", [((6, 7), 1, 2, {}), ((23,), 2, 1, dict(causal=True)),
                                              ((3, 4, 4), 0, 1, dict(boundary="circular"))], ids=str)
def test_low_precision_error_is_that_of_the_python_path(dtype, grid, E, M, opts, monkeypatch):
    """float16/bfloat16 compute in float32 from the rounded inputs, like the Python path: the error against the
    float64 reference of those rounded inputs is at most 2x the Python path's own, plus one ulp of the result.
    Errors are root-mean-square over each tensor: the largest of a few hundred rounding errors is a noisy
    statistic (on these inputs the two paths' largest errors differ by up to 3x either way from seed to seed,
    their RMS errors by 0.8x to 1.3x)."""
    x64 = make_inputs(grid, E=E, M=M, Dk=16, Dv=8 * M, B=2, H=2, boundary=opts.get("boundary", "zero"), seed=13)
    low = cast_inputs(x64, dtype)
    exact = cast_inputs(low, torch.float64)                      # the rounded inputs, in float64
    g = _upstream(low)
    ref = forward_backward(exact, "reference", g.double(), grid=grid, num_extra=E, **opts)
    got = compiled(low, grid, E, g, **opts)
    py = _python_direct(low, grid, E, g, monkeypatch, **opts)
    ulp = torch.finfo(dtype).eps
    assert got[0].dtype == dtype and all(t.dtype == dtype for t in got[1].values())

    def rms(t):
        return t.double().pow(2).mean().sqrt().item()
    for name in ["out"] + list(ref[1]):
        a = got[0] if name == "out" else got[1][name]
        b = py[0] if name == "out" else py[1][name]
        r = ref[0] if name == "out" else ref[1][name]
        err, err_py = rms(a.double() - r), rms(b.double() - r)
        assert err <= 2 * err_py + ulp * rms(r), (name, err, err_py)


def _same_on_any_number_of_threads(call, counts=(1, 2, 3)):
    """call() on each thread count in turn: every output and gradient bitwise equal to the first run's."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            runs.append(call())
    finally:
        torch.set_num_threads(threads)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for name, t in grads.items():
            assert torch.equal(t, runs[0][1][name]), name


def test_deterministic_on_any_number_of_threads():
    """The table gradient is summed per task, then in task order: bitwise the same run to run, and on 1, 2 or 3
    threads (the tasks do not depend on the thread count)."""
    grid, E = (9, 10), 1
    x = make_inputs(grid, E=E, M=2, Dk=8, Dv=8, B=1, H=2, seed=21, dtype=torch.float32)
    g = _upstream(x)
    _same_on_any_number_of_threads(lambda: compiled(x, grid, E, g, block_q=16, block_k=24), counts=(1, 2, 2, 3))


@pytest.mark.parametrize("seed", range(20))
def test_deterministic_on_any_number_of_threads_random(seed):
    """The same on random configurations (1D/2D/3D grids, extra tokens, M = 1 or 2, D up to 64, float32 and
    float64, the default blocks). On an AMD EPYC the products' order depended on the thread count until each task
    ran MKL on one thread with its scratch at one alignment (csrc/direct_cpu.cpp, run_tasks and aligned_elems):
    with the first alone, configuration 14 still differed."""
    rng = random.Random(seed)
    dims = rng.choice([1, 2, 3])
    grid = {1: (rng.randint(8, 80),), 2: (rng.randint(3, 12), rng.randint(3, 12)),
            3: (rng.randint(2, 4), rng.randint(2, 5), rng.randint(2, 6))}[dims]
    E, M = rng.choice([0, 1, 2]), rng.choice([1, 2])
    D = rng.choice([8, 16, 32, 64])
    dtype = rng.choice([torch.float32, torch.float64])
    x = make_inputs(grid, E=E, M=M, Dk=D, Dv=D, B=rng.choice([1, 2]), H=rng.choice([1, 2, 3]), seed=seed,
                    dtype=dtype)
    g = _upstream(x)
    _same_on_any_number_of_threads(lambda: compiled(x, grid, E, g, causal=dims == 1 and seed % 2 == 0))


def test_aten_products_match_blas():
    """Where torch exports no BLAS symbol the kernel's products run as ATen addmm: the same results."""
    grid, E = (5, 6), 1
    x = make_inputs(grid, E=E, M=2, Dk=5, Dv=6, B=2, H=2, seed=4)
    assert C.direct_cpu_gemm() in ("blas", "aten")
    g = _upstream(x)
    blas = compiled(x, grid, E, g, block_q=8, block_k=7)
    C._direct_cpu_force_aten_gemm(True)
    try:
        assert C.direct_cpu_gemm() == "aten"
        aten = compiled(x, grid, E, g, block_q=8, block_k=7)
    finally:
        C._direct_cpu_force_aten_gemm(False)
    assert max(errors(aten, blas).values()) <= 1e-12


def test_weights_are_shifted_by_the_table_max():
    """log-weights around +-200 overflow exp in float32 (and float64 sums); shifted by their max they do not."""
    grid, E = (6,), 1
    x = make_inputs(grid, E=E, M=1, Dk=4, Dv=4, B=1, H=2, seed=2, dtype=torch.float32)
    with torch.no_grad():
        x["rpe"].add_(200.0)
        x["rpe_extra"].add_(200.0)
    out, grads = compiled(x, grid, E, _upstream(x))
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads.values())
    shifted = {n: None if t is None else t.detach().clone() for n, t in x.items()}
    shifted["rpe"] -= 200.0
    shifted["rpe_extra"] -= 200.0
    ref, _ = compiled(shifted, grid, E)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ bad arguments

def _good():
    x = make_inputs((3, 4), E=1, M=2, Dk=4, Dv=4, B=1, H=2, seed=1, requires_grad=False)
    return [x["q"], x["k"], x["v"], x["rpe"], x["rpe_extra"], [3, 4], 1, True, True, 1e-6, False, False, 1.0, True]


BAD = [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "must be \\(B, H, N, Dk\\)"),
    (lambda a: a.__setitem__(1, a[1][:, :, :-1]), ValueError, "must be \\(B, H, N, Dk\\)"),
    (lambda a: a.__setitem__(2, a[2][:, :, :-1]), ValueError, "must be \\(B, H, N, Dk\\)"),
    (lambda a: a.__setitem__(5, [3, 5]), ValueError, "describe 16 tokens"),
    (lambda a: a.__setitem__(5, [3, 4, 1, 1]), ValueError, "1 to 3 axes"),
    (lambda a: a.__setitem__(5, [0, 4]), ValueError, "positive"),
    (lambda a: a.__setitem__(6, -1), ValueError, "num_extra"),
    (lambda a: a.__setitem__(3, a[3][:, :, :-1]), ValueError, "entries per axis"),
    (lambda a: a.__setitem__(3, a[3][:1]), ValueError, "rpe must be"),
    (lambda a: a.__setitem__(4, a[4][:, :1]), ValueError, "rpe_extra must be"),
    (lambda a: a.__setitem__(2, a[2][..., :3]), ValueError, "divisible by M"),
    (lambda a: a.__setitem__(1, a[1].float()), TypeError, "one dtype"),
    (lambda a: a.__setitem__(4, a[4].float()), TypeError, "rpe_extra must have"),
    (lambda a: [a.__setitem__(i, a[i].long()) for i in range(5)], TypeError, "float16, bfloat16"),
    (lambda a: a.__setitem__(0, a[0].to("meta")), ValueError, "CPU tensors"),
    (lambda a: a.__setitem__(9, -1.0), ValueError, "eps"),
    (lambda a: a.__setitem__(9, float("nan")), ValueError, "eps"),
    (lambda a: a.__setitem__(12, 0.0), ValueError, "scale"),
    (lambda a: a.__setitem__(11, True), ValueError, "causal needs a 1D grid"),
    (lambda a: a.__setitem__(10, True), ValueError, "entries per axis"),
    (lambda a: [a.__setitem__(i, a[i][:0]) for i in range(3)], ValueError, "empty inputs: q \\[0, 2, 13, 4\\]"),
    (lambda a: [a.__setitem__(i, a[i][:, :0]) for i in range(5)], ValueError, "empty inputs: q \\[1, 0, 13, 4\\]"),
]


@pytest.mark.parametrize("change, exc, match", BAD, ids=[b[2] for b in BAD])
def test_forward_refuses_bad_arguments(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        C.direct_cpu_forward(*args)


def test_block_sizes_and_backward_arguments_are_checked():
    args = _good()
    with pytest.raises(ValueError, match="block sizes"):
        C.direct_cpu_forward(*args, -1, 0)
    out, out_c, inv = C.direct_cpu_forward(*args)
    rest = args[5:13]
    g = torch.randn_like(out)
    C.direct_cpu_backward(*args[:5], out, inv, g, *rest)                      # fine
    with pytest.raises(ValueError, match="grad_out must be"):
        C.direct_cpu_backward(*args[:5], out, inv, g[..., :-1], *rest)
    with pytest.raises(ValueError, match="out must be"):
        C.direct_cpu_backward(*args[:5], out[:, :, :-1], inv, g, *rest)
    with pytest.raises(ValueError, match="inv must be"):
        C.direct_cpu_backward(*args[:5], out, inv[..., :1], g, *rest)
    with pytest.raises(ValueError, match="inv must be"):
        C.direct_cpu_backward(*args[:5], out, torch.empty(0, dtype=out.dtype), g, *rest)
    with pytest.raises(TypeError, match="grad_out must have"):
        C.direct_cpu_backward(*args[:5], out, inv, g.float(), *rest)
    with pytest.raises(TypeError):
        C.direct_cpu_forward(*args[:5], (3, "x"), *args[6:])


# ------------------------------------------------------------------------------------------ wiring

def _vit_like(requires_grad, B=2, H=2, grid=(8, 8), D=16, seed=0):
    x = make_inputs(grid, E=1, M=2, Dk=D, Dv=D, B=B, H=H, seed=seed, dtype=torch.float32,
                    requires_grad=requires_grad)
    return x, dict(grid=grid, num_extra=1, rpe_extra=x["rpe_extra"])


def test_direct_and_auto_take_the_fused_kernel(monkeypatch):
    calls = []
    real = C

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def direct_cpu_forward(self, *a):
            calls.append("forward")
            return real.direct_cpu_forward(*a)

        def direct_cpu_backward(self, *a):
            calls.append("backward")
            return real.direct_cpu_backward(*a)

    monkeypatch.setattr(direct, "_C_DIRECT", Spy())
    x, kw = _vit_like(True)
    for backend in ("direct", "auto"):
        calls.clear()
        out = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], backend=backend, **kw)
        out.sum().backward()
        assert calls == ["forward", "backward"], (backend, calls)
        with torch.no_grad():
            lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], backend=backend, **kw)
        assert calls == ["forward", "backward", "forward"]
    expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], **kw)
    assert expl.chosen == "direct" and "fused CPU kernel" in str(expl), str(expl)


def test_explain_says_why_not_without_the_kernel(monkeypatch):
    monkeypatch.setattr(direct, "_C_DIRECT", None)
    x, kw = _vit_like(False)
    text = str(lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], **kw))
    assert "direct" in text and "PyTorch ops" in text, text


def test_eager_function_and_custom_op_agree():
    x, kw = _vit_like(True, seed=3)
    p = lisa_kernels.check_inputs(x["q"], x["k"], x["v"], x["rpe"], **kw)
    eager = ops.direct_cpu_attention(x["q"], x["k"], x["v"], x["rpe"], x["rpe_extra"], p)
    assert "DirectCPUFunction" in type(eager.grad_fn).__name__
    via_op = OPS.direct_cpu(x["q"], x["k"], x["v"], x["rpe"], x["rpe_extra"], [8, 8], 1, "elu1", True, 1e-6, "zero",
                            False, 1.0)[0]
    assert torch.equal(eager, via_op)
    g = torch.randn_like(eager)
    inputs = [x[n] for n in NAMES]
    for a, b in zip(torch.autograd.grad(eager, inputs, g), torch.autograd.grad(via_op, inputs, g)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_extra, dtype", [(True, torch.float32), (False, torch.float64),
                                               (True, torch.bfloat16)])
def test_opcheck(with_extra, dtype, monkeypatch):
    monkeypatch.undo()                        # conftest's NaN poisoning would leak into opcheck's own buffers
    x = make_inputs((5,), E=1, M=2, Dk=3, Dv=4, B=2, H=2, seed=9, dtype=dtype)
    rx = x["rpe_extra"] if with_extra else None
    args = (x["q"], x["k"], x["v"], x["rpe"], rx, [5], 1, "elu1", True, 1e-6, "zero", False, 0.7)
    torch.library.opcheck(OPS.direct_cpu, args)
    plain = [None if t is None else t.detach() for t in args[:5]]
    out, out_c, inv = OPS.direct_cpu(*plain, *args[5:])
    torch.library.opcheck(OPS.direct_cpu_backward, (*plain, out, out_c, inv, torch.randn_like(out), *args[5:]))


def test_torch_compile_fullgraph_runs_the_fused_op(monkeypatch):
    monkeypatch.undo()
    torch._dynamo.reset()
    x, kw = _vit_like(True, seed=5)
    inputs = [x[n] for n in NAMES]

    def f(q, k, v, rpe, rx):
        return lisa_kernels.lisa_attention(q, k, v, rpe, grid=(8, 8), num_extra=1, rpe_extra=rx, backend="direct")

    compiled_f = torch.compile(f, fullgraph=True)
    out_c = compiled_f(*inputs)
    out_e = f(*inputs)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, inputs, g), torch.autograd.grad(out_e, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backend_cuda_says_when_the_build_has_no_cuda_kernels(monkeypatch):
    """A CPU-only build of the extension (no CUDA toolkit or a CPU-only torch at install) runs the CPU loops; for
    CUDA inputs backend="cuda" says that its kernels are missing instead of failing at the launch."""
    import dataclasses

    from lisa_kernels import _extension, cuda_fft, dispatch
    x, kw = _vit_like(False)
    p = dataclasses.replace(lisa_kernels.check_inputs(x["q"], x["k"], x["v"], x["rpe"], **kw),
                            device=torch.device("cuda", 0))
    assert cuda_fft.HAS_CUDA_KERNELS is bool(C.with_cuda)
    monkeypatch.setattr(_extension, "HAS_CUDA_KERNELS", False)
    assert "built without its CUDA kernels" in dispatch.backend_reason("cuda", p)
    monkeypatch.setattr(_extension, "HAS_CUDA_KERNELS", True)
    assert dispatch.backend_reason("cuda", p) is None
