"""Models that leave PyTorch: ONNX export (plain, and through the decomposition table), ONNX Runtime against
eager, torch.export and AOTInductor on the CPU (docs/deploy.md)."""

import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import export as lx
from lisa_kernels._validate import check_inputs
from lisa_kernels.direct import direct_cpu_built
from lisa_kernels.nn import LiSAAttention

# (grid, num_extra, M, options): the awkward corners of the operator
CASES = [
    ((5,), 0, 1, dict()),
    ((7,), 2, 1, dict(causal=True)),
    ((6,), 1, 2, dict(causal=True, boundary="circular", feature_map="relu", eps=1e-3)),
    ((3, 4), 2, 2, dict(normalize=False, scale=0.7)),
    ((4, 3), 1, 1, dict(boundary="circular")),
    ((2, 3, 2), 1, 2, dict()),
    ((2, 2, 3), 0, 1, dict(boundary="circular", feature_map="relu")),
]


def _inputs(grid, E, M, options, B=2, H=2, Dk=3, Dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = E + math.prod(grid)
    q, k = torch.randn(B, H, N, Dk, generator=g), torch.randn(B, H, N, Dk, generator=g)
    v = torch.randn(B, H, N, Dv, generator=g)
    table = grid if options.get("boundary") == "circular" else tuple(2 * s - 1 for s in grid)
    rpe = torch.randn(H, M, *table, generator=g)
    rx = torch.randn(H, M, 3, generator=g) if E else None
    return q, k, v, rpe, rx


@pytest.mark.parametrize("block", [3, 256])
@pytest.mark.parametrize("grid,E,M,options", CASES)
def test_export_form_matches_reference(grid, E, M, options, block):
    q, k, v, rpe, rx = _inputs(grid, E, M, options, Dv=2 * M)
    ref = lisa_kernels.lisa_attention(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx, backend="reference",
                                      **options)
    p = check_inputs(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx, **options)
    out = lx.export_attention(q, k, v, rpe, rx, p, key_block=block)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_export_form_float64_and_half():
    q, k, v, rpe, rx = _inputs((3, 3), 1, 1, {})
    p = check_inputs(q.double(), k.double(), v.double(), rpe.double(), grid=(3, 3), num_extra=1, rpe_extra=rx.double())
    ref = lisa_kernels.lisa_attention(q.double(), k.double(), v.double(), rpe.double(), grid=(3, 3), num_extra=1,
                                      rpe_extra=rx.double(), backend="reference")
    out = lx.export_attention(q.double(), k.double(), v.double(), rpe.double(), rx.double(), p, key_block=4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    ph = check_inputs(q.half(), k.half(), v.half(), rpe.half(), grid=(3, 3), num_extra=1, rpe_extra=rx.half())
    assert lx.export_attention(q.half(), k.half(), v.half(), rpe.half(), rx.half(), ph).dtype == torch.float16
    with pytest.raises(ValueError, match="key_block"):
        lx.export_attention(q, k, v, rpe, rx, check_inputs(q, k, v, rpe, grid=(3, 3), num_extra=1), key_block=-1)


class _Net(torch.nn.Module):
    """Embedding, one LiSAAttention with random tables, a head: what a user's model looks like."""

    def __init__(self, grid, E, M, options, dim=16, heads=2):
        super().__init__()
        self.attn = LiSAAttention(dim, heads, grid=grid, num_extra=E, num_rpe=M,
                                  feature_map=options.get("feature_map", "elu1"),
                                  boundary=options.get("boundary", "zero"))
        self.causal = options.get("causal", False)
        self.head = torch.nn.Linear(dim, 5)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.attn.rpe.rpe.copy_(torch.randn(self.attn.rpe.rpe.shape, generator=g))
            if self.attn.rpe.rpe_extra is not None:
                self.attn.rpe.rpe_extra.copy_(torch.randn(self.attn.rpe.rpe_extra.shape, generator=g))

    def forward(self, x):
        return self.head(self.attn(x, is_causal=self.causal))


def _onnx_ops(model_proto):
    return {(n.domain, n.op_type) for n in model_proto.graph.node}


def _check_standard(model_proto):
    ops = _onnx_ops(model_proto)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    assert not any(op in ("DFT", "STFT") for _, op in ops), ops
    assert not any("lisa" in op.lower() for _, op in ops), ops


def _ort_check(onnx_program, model, N, dim, tmp_path, batches=(1, 3, 5)):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    onnx_program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in batches:
        x = torch.randn(b, *N) if isinstance(N, tuple) else torch.randn(b, N, dim)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), b


ONNX_CASES = [CASES[1], CASES[2], CASES[3], CASES[5], CASES[6]]


@pytest.mark.parametrize("grid,E,M,options", ONNX_CASES)
def test_onnx_export_plain(grid, E, M, options, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = _Net(grid, E, M, options).eval()
    N = E + math.prod(grid)
    prog = torch.onnx.export(model, (torch.randn(2, N, 16),), dynamo=True,
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    _check_standard(prog.model_proto)
    _ort_check(prog, model, N, 16, tmp_path)


def test_is_onnx_exporting_seen_inside_export():
    pytest.importorskip("onnxscript")
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(lx.is_onnx_exporting())
            return x + 1

    assert not lx.is_onnx_exporting()
    torch.onnx.export(Probe(), (torch.randn(2, 3),), dynamo=True, verbose=False)
    assert seen and all(seen)
    seen.clear()
    torch.export.export(Probe(), (torch.randn(2, 3),))
    assert seen == [False]


def _lisa_targets(ep):
    return sorted({str(n.target) for n in ep.graph.nodes if "lisa_kernels" in str(n.target)})


@pytest.mark.parametrize("grid,E,M,options,backend", [
    ((6, 6), 1, 2, {}, "auto"),
    ((5,), 2, 1, dict(boundary="circular", causal=True), "fft"),
    ((3, 4), 1, 2, {}, "direct"),
])
def test_decomposition_table(grid, E, M, options, backend, tmp_path):
    torch.manual_seed(0)
    model = _Net(grid, E, M, options).eval()
    model.attn.backend = backend
    N = E + math.prod(grid)
    ep = torch.export.export(model, (torch.randn(2, N, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert _lisa_targets(ep), "torch.export keeps the package's custom ops"
    dec = ep.run_decompositions(lx.decomposition_table())
    assert _lisa_targets(dec) == []
    x = torch.randn(3, N, 16)
    with torch.no_grad():
        torch.testing.assert_close(dec.module()(x), model(x), rtol=1e-5, atol=1e-5)
    if pytest.importorskip("onnxscript", reason="onnxscript not installed") is not None:
        pytest.importorskip("onnxruntime")
        prog = torch.onnx.export(dec, dynamo=True, verbose=False)
        _check_standard(prog.model_proto)
        _ort_check(prog, model, N, 16, tmp_path, batches=(4,))


def test_decomposition_table_ops_directly():
    """Each covered op against its own implementation, the backward-only outputs shaped as the fakes."""
    ops = torch.ops.lisa_kernels
    q, k, v, rpe, rx = _inputs((3, 4), 1, 2, {})
    args = ([3, 4], 1, "elu1", True, 1e-6, "zero", False, 1.0)
    table = lx.decomposition_table({})
    assert set(table) == {getattr(ops, name).default for name in lx.CUSTOM_OPS}
    want = ops.direct_dense(q, k, v, rpe, rx, *args)
    torch.testing.assert_close(table[ops.direct_dense.default](q, k, v, rpe, rx, *args), want)
    fq, fk = torch.nn.functional.elu(q[:, :, 1:]) + 1, torch.nn.functional.elu(k[:, :, 1:]) + 1
    num, den = ops.direct_core(fq, fk, v[:, :, 1:], rpe, [3, 4], False)
    dnum, dden = table[ops.direct_core.default](fq, fk, v[:, :, 1:], rpe, [3, 4], False)
    torch.testing.assert_close(dnum, num)
    torch.testing.assert_close(dden, den)
    got = table[ops.fft_core.default](fq, fk, v[:, :, 1:], rpe, [3, 4], False, False, "torch")
    ref = ops.fft_core(fq, fk, v[:, :, 1:], rpe, [3, 4], False, False, "torch")
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    targs = ([3, 4], 1, "elu1", True, 1e-6, False, "zero", 1.0)          # (triton_direct: causal before boundary)
    got = table[ops.triton_direct.default](q, k, v, rpe, rx, *targs)
    torch.testing.assert_close(got[0], want)
    p = lisa_kernels.check_inputs(q, k, v, rpe, grid=(3, 4), num_extra=1, rpe_extra=rx)
    if lisa_kernels.backend_reason("triton", p) is None:        # (the Triton interpreter: the op itself runs here)
        ref = ops.triton_direct(q, k, v, rpe, rx, *targs)
        assert [(a.shape, a.dtype) for a in got] == [(b.shape, b.dtype) for b in ref]
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)


class _OpCall(torch.nn.Module):
    """One forward custom op of the package called directly (what a torch.export program holds), its tables
    as parameters; q, k, v (or features) are the inputs, with a dynamic batch."""

    def __init__(self, name, rpe, rx, args):
        super().__init__()
        self.name, self.args = name, args
        self.rpe = torch.nn.Parameter(rpe)
        self.rx = None if rx is None else torch.nn.Parameter(rx)

    def forward(self, q, k, v):
        fn = getattr(torch.ops.lisa_kernels, self.name)
        if self.name in ("direct_core", "fft_core"):
            return fn(q, k, v, self.rpe, *self.args)[:2]                      # (num, den)
        outs = fn(q, k, v, self.rpe, self.rx, *self.args)                      # (the rest: the backward's state)
        return outs[0] if isinstance(outs, (tuple, list)) else outs


@pytest.mark.parametrize("name,grid,E,M,options", [
    ("direct_dense", (3, 4), 1, 2, dict(boundary="zero", causal=False)),
    ("direct_cpu", (6,), 2, 1, dict(boundary="circular", causal=True, feature_map="relu")),
    ("triton_direct", (2, 3, 2), 1, 2, dict(boundary="zero", causal=False)),
    ("direct_core", (6,), 0, 1, dict(boundary="zero", causal=True)),
    ("direct_core", (4, 3), 0, 2, dict(boundary="zero", causal=False)),
    ("fft_core", (5,), 0, 2, dict(boundary="circular", causal=False)),
    ("fft_core", (7,), 0, 1, dict(boundary="zero", causal=True)),
])
def test_onnx_translation_table(name, grid, E, M, options, tmp_path):
    """Each forward custom op, held by a torch.export program, exported with the translation table: standard
    ONNX ops only, and ONNX Runtime against eager at batch sizes other than the export's."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    q, k, v, rpe, rx = _inputs(grid, E, M, options, Dv=2 * M)
    fm, boundary, causal = options.get("feature_map", "elu1"), options["boundary"], options["causal"]
    if name in ("direct_core", "fft_core"):
        # the cores' contract (lisa_kernels._compose): a linear table, causal-masked (-inf at negative offsets),
        # or with circular=True (never causal) a circular one
        args = [list(grid), causal] + ([boundary == "circular", "torch"] if name == "fft_core" else [])
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        if causal:
            rpe[..., :grid[0] - 1] = float("-inf")
    elif name == "triton_direct":
        p = check_inputs(q, k, v, rpe, grid=grid, num_extra=E, rpe_extra=rx)
        if lisa_kernels.backend_reason("triton", p) is not None:
            pytest.skip(lisa_kernels.backend_reason("triton", p))
        args = [list(grid), E, fm, True, 1e-6, causal, boundary, 0.8]
    else:
        args = [list(grid), E, fm, True, 1e-6, boundary, causal, 0.8]
    if name == "direct_cpu" and not direct_cpu_built():
        pytest.skip("the CPU extension is not built")
    model = _OpCall(name, rpe, rx, args).eval()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (q, k, v), dynamic_shapes=tuple({0: batch} for _ in range(3)))
    assert _lisa_targets(ep) == [f"lisa_kernels.{name}.default"]
    prog = torch.onnx.export(ep, dynamo=True, custom_translation_table=lx.onnx_translation_table(), verbose=False)
    _check_standard(prog.model_proto)
    path = tmp_path / "op.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for b in (1, 3):
        x = [torch.randn(b, *t.shape[1:]) for t in (q, k, v)]
        if name in ("direct_core", "fft_core"):
            x[:2] = [torch.nn.functional.elu(t) + 1 for t in x[:2]]
        with torch.no_grad():
            want = model(*x)
        want = want if isinstance(want, tuple) else (want,)
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, x)})
        assert len(got) == len(want)
        for g_, w_ in zip(got, want):
            g_ = torch.from_numpy(g_)
            assert g_.shape == w_.shape and (g_ - w_).abs().max().item() <= 1e-4 * w_.abs().max().item(), (name, b)


@pytest.fixture(scope="module")
def timm_models():
    timm = pytest.importorskip("timm")
    import lisa_kernels.models  # noqa: F401
    from lisa_kernels.nn import convert_vit
    torch.manual_seed(0)
    registered = timm.create_model("lisa_vit_tiny_patch16_224", img_size=48, depth=2, num_rpe=2,
                                   num_classes=7, exportable=True)
    converted = convert_vit(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                                              reg_tokens=2, num_classes=4), boundary="circular")
    for model in (registered, converted):
        for m in model.modules():
            if isinstance(m, LiSAAttention):
                with torch.no_grad():
                    m.rpe.rpe.normal_()
                    if m.rpe.rpe_extra is not None:
                        m.rpe.rpe_extra.normal_()
    return {"registered": registered.eval(), "converted": converted.eval()}


@pytest.mark.parametrize("which,size", [("registered", 48), ("converted", 32)])
def test_onnx_export_timm(timm_models, which, size, tmp_path):
    pytest.importorskip("onnxscript")
    model = timm_models[which]
    prog = torch.onnx.export(model, (torch.randn(2, 3, size, size),), dynamo=True,
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    _check_standard(prog.model_proto)
    _ort_check(prog, model, (3, size, size), None, tmp_path, batches=(1, 3))


def test_aotinductor_cpu(tmp_path):
    aoti_compile = getattr(torch._inductor, "aoti_compile_and_package", None)
    if aoti_compile is None:
        pytest.skip("this torch has no torch._inductor.aoti_compile_and_package")
    torch.manual_seed(0)
    model = _Net((3, 3), 1, 2, {}).eval()
    ep = torch.export.export(model, (torch.randn(2, 10, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert _lisa_targets(ep), "AOTInductor keeps the package's custom ops"
    try:
        path = aoti_compile(ep, package_path=str(tmp_path / "model.pt2"))
    except Exception as e:      # no C++ compiler on this machine
        pytest.skip(f"AOTInductor could not compile here: {type(e).__name__}: {str(e)[:200]}")
    runner = torch._inductor.aoti_load_package(path)
    for b in (1, 4):
        x = torch.randn(b, 10, 16)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-5)


def test_direct_under_export_decides_its_form_without_a_guard_on_the_batch():
    """torch.export with a dynamic batch: the direct path chooses between its dense form and the fused CPU kernel
    from what is statically known of the symbolic batch (no guard): the dense form while it fits the block budget
    for every batch, else the fused kernel; both programs match eager at a batch the export did not use."""
    if not direct_cpu_built():
        pytest.skip("the CPU extension is not built (the fused kernel is the alternative to the dense form)")
    grid, E = (3, 4), 1
    N = E + math.prod(grid)
    model = _Net(grid, E, 1, {}).eval()
    model.attn.backend = "direct"
    batch = torch.export.Dim("batch", max=16)        # B H N^2 (Dk + Dv) within the dense loop nest at every batch
    x = torch.randn(3, N, 16)
    forms = {}
    for budget in (None, 1):                         # the default budget; one byte: nothing fits
        old = lisa_kernels.set_config(direct_block_bytes=budget) if budget else None
        try:
            ep = torch.export.export(model, (torch.randn(2, N, 16),), dynamic_shapes=({0: batch},))
        finally:
            if old is not None:
                lisa_kernels.set_config(direct_block_bytes=old.direct_block_bytes)
        forms[budget] = _lisa_targets(ep)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
    assert forms == {None: ["lisa_kernels.direct_dense.default"], 1: ["lisa_kernels.direct_cpu.default"]}, forms


def test_direct_cpu_reason_off_the_cpu():
    """The fused CPU kernel's check names the device it cannot run on; a circular Problem's table shape is S per
    axis."""
    import dataclasses
    from lisa_kernels.direct import direct_cpu_reason
    q, k, v, rpe, rx = _inputs((3, 4), 1, 1, dict(boundary="circular"))
    p = check_inputs(q, k, v, rpe, grid=(3, 4), num_extra=1, rpe_extra=rx, boundary="circular")
    assert p.rpe_table_shape == (3, 4)
    assert direct_cpu_reason(dataclasses.replace(p, device=torch.device("cuda", 0))) == \
        "inputs are on cuda:0, not the CPU"
