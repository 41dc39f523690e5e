"""backend="flex" (lisa_kernels/flex.py: the operator through PyTorch's FlexAttention) against the reference.

* Seeded random configurations (1D/2D/3D grids from one token, extra tokens with and without ``rpe_extra``, both
  boundaries, causal, M in {1, 2, 4}, head dims from 1 with Dk != Dv, both feature maps, normalize on and off, eps
  from 0, the q scale), forward and every gradient, through FlexAttention's eager implementation (PyTorch's math
  path of the same score_mod, block mask and virtual key). Its CPU guard against gradients is lifted for this:
  on a GPU the compiled kernels differentiate the same function.
* The compiled CPU kernel (forward only) on random configurations, the log-sum-exp-free ``normalize=False`` route
  it takes included; float16 and bfloat16 judged like FlashAttention judges them.
* On the CPU a gradient raises NotImplementedError, ``auto`` never picks flex for training, and the compiled
  function is cached per shape. On a CUDA GPU: forward and gradients of the compiled kernels.

Normalized LiSA does not change when a query's features (Dk = 1) are scaled, so some q gradients are O(eps) by
construction: a gradient passes if its relative error is within TOL, or within twice that of the reference
evaluated in float32 (as tests/test_triton_random.py judges the Triton kernels).
"""

from __future__ import annotations

import math
import os
import random
import warnings

import pytest
import torch

import lisa_kernels
from lisa_kernels import flex
from lisa_test_utils import cast_inputs, config_id, errors, forward_backward, make_inputs, rel_err

SEED = int(os.environ.get("LISA_RANDOM_SEED", "23"))
COUNT = int(os.environ.get("LISA_RANDOM_CONFIGS", "24"))
TOL = 1e-4


def _draw(rng: random.Random) -> dict:
    dims = rng.choice([1, 1, 2, 2, 3])
    grid = {1: lambda: (rng.randint(1, 40),), 2: lambda: (rng.randint(1, 6), rng.randint(1, 7)),
            3: lambda: (rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 4))}[dims]()
    E, M = rng.choice([0, 0, 1, 2]), rng.choice([1, 1, 2, 4])
    normalize = rng.random() < 0.75
    return dict(grid=grid, E=E, rpe_extra=E > 0 and rng.random() < 0.8, M=M, Dk=rng.choice([1, 2, 3, 8]),
                Dv=M * rng.choice([1, 2, 5]), boundary=rng.choice(["zero", "circular"]),
                causal=dims == 1 and rng.random() < 0.4, normalize=normalize,
                eps=rng.choice([0.0, 1e-6, 1e-6, 0.25]) if normalize else 1e-6,
                feature_map=rng.choice(["elu1", "relu"]), scale=rng.choice([1.0, 1.0, 0.5, 1.7]),
                B=rng.choice([1, 2]), H=rng.choice([1, 2]), seed=rng.randrange(1 << 30))


def _configs(count=COUNT, seed=SEED):
    rng = random.Random(seed)
    return [_draw(rng) for _ in range(count)]


_id = config_id


def _inputs(cfg, dtype=torch.float64, requires_grad=True):
    x = make_inputs(cfg["grid"], E=cfg["E"], M=cfg["M"], Dk=cfg["Dk"], Dv=cfg["Dv"], B=cfg["B"], H=cfg["H"],
                    boundary=cfg["boundary"], rpe_extra=cfg["rpe_extra"], seed=cfg["seed"])
    return cast_inputs(x, dtype, requires_grad)


def _options(cfg):
    return dict(grid=cfg["grid"], num_extra=cfg["E"], boundary=cfg["boundary"], causal=cfg["causal"],
                normalize=cfg["normalize"], eps=cfg["eps"], feature_map=cfg["feature_map"], scale=cfg["scale"])


def _judge(cfg, got, reference64, reference32):
    """Each error within TOL, or within twice the float32 reference's; NaN where the reference has NaN (relu rows
    of zero weight with eps = 0: 0 / 0, as the formula says)."""
    nan = {n: torch.isnan(t) for n, t in [("out", reference64[0])] + list(reference64[1].items())}
    nan_got = {n: torch.isnan(t) for n, t in [("out", got[0])] + list(got[1].items())}
    assert torch.equal(nan["out"], nan_got["out"]), "NaN rows differ from the reference's"
    if nan["out"].any():
        # the other rows' outputs must still match; the reference's gradients are NaN throughout (0 / 0 in the
        # division's backward reaches every input), so the gradients are not compared
        keep = ~nan["out"]
        err = rel_err(got[0][keep], reference64[0][keep])
        assert err <= TOL or err <= 2 * rel_err(reference32[0][keep], reference64[0][keep]), (_id(cfg), err)
        return
    errs, base = errors(got, reference64), errors(reference32, reference64)
    bad = {n: (e, base[n]) for n, e in errs.items() if not (e <= TOL or e <= 2 * base[n])}
    assert not bad, f"{_id(cfg)}: (error, float32 reference's) over the bound: {bad}"


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled (PyTorch's math implementation), with its CPU guard against gradients lifted."""
    import torch.nn.attention.flex_attention as flex_module
    monkeypatch.setattr(flex, "COMPILE", False)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "flex_attention called without torch.compile()"
        yield


@pytest.mark.parametrize("cfg", _configs(), ids=_id)
def test_random_config_forward_and_gradients(cfg, eager_flex):
    x = _inputs(cfg)
    opts = _options(cfg)
    upstream = torch.randn(x["v"].shape, generator=torch.Generator().manual_seed(cfg["seed"] + 1),
                           dtype=torch.float64)
    reference64 = forward_backward(x, "reference", upstream, **opts)
    x32 = cast_inputs(x, torch.float32)
    reference32 = forward_backward(x32, "reference", upstream, **opts)
    got = forward_backward(cast_inputs(x, torch.float32), "flex", upstream, **opts)
    _judge(cfg, got, reference64, reference32)


@pytest.mark.parametrize("cfg", _configs(count=6, seed=SEED + 1), ids=_id)
def test_compiled_cpu_forward(cfg):
    """The compiled CPU kernel (what users get on a CPU), normalize=False by its own route (no log-sum-exp)."""
    x = _inputs(cfg, requires_grad=False)
    opts = _options(cfg)
    reference64 = forward_backward(x, "reference", **opts)
    reference32 = forward_backward(cast_inputs(x, torch.float32, False), "reference", **opts)
    got = forward_backward(cast_inputs(x, torch.float32, False), "flex", **opts)
    _judge(cfg, got, reference64, reference32)


def test_compiled_cpu_unnormalized_causal_with_extra_tokens():
    cfg = dict(grid=(37,), E=2, rpe_extra=True, M=2, Dk=5, Dv=6, boundary="zero", causal=True, normalize=False,
               eps=1e-6, feature_map="elu1", scale=0.8, B=2, H=2, seed=5)
    x = _inputs(cfg, requires_grad=False)
    reference = forward_backward(x, "reference", **_options(cfg))
    got = forward_backward(cast_inputs(x, torch.float32, False), "flex", **_options(cfg))
    assert errors(got, reference)["out"] <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_a_multiple_of_pytorchs_error(dtype):
    """Like FlashAttention's tests: error against float64 at most 3x that of the reference computed in ``dtype``."""
    cfg = dict(grid=(6, 7), E=1, rpe_extra=True, M=2, Dk=16, Dv=16, boundary="zero", causal=False, normalize=True,
               eps=1e-6, feature_map="elu1", scale=0.25, B=2, H=2, seed=11)
    x = _inputs(cfg, requires_grad=False)
    opts = _options(cfg)
    want = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], rpe_extra=x["rpe_extra"],
                                       backend="reference", **opts)
    low = cast_inputs(x, dtype, False)
    got = lisa_kernels.lisa_attention(low["q"], low["k"], low["v"], low["rpe"], rpe_extra=low["rpe_extra"],
                                      backend="flex", **opts)
    torch_low = lisa_kernels.lisa_attention(low["q"], low["k"], low["v"], low["rpe"], rpe_extra=low["rpe_extra"],
                                            backend="reference", **opts)
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    base = (torch_low.double() - want).abs().max().item()
    assert err <= 3 * base + 1e-6, (err, base)


def test_gpu_head_dim_padding(eager_flex, monkeypatch):
    """The GPU kernels' least head dim (16): q, k and v zero-padded, the extra value channels dropped."""
    monkeypatch.setattr(flex, "_min_head_dim", lambda device: 16)
    cfg = dict(grid=(4, 3), E=1, rpe_extra=True, M=2, Dk=3, Dv=4, boundary="zero", causal=False, normalize=False,
               eps=1e-6, feature_map="relu", scale=1.0, B=2, H=1, seed=9)
    x = _inputs(cfg)
    reference64 = forward_backward(x, "reference", **_options(cfg))
    reference32 = forward_backward(cast_inputs(x, torch.float32), "reference", **_options(cfg))
    _judge(cfg, forward_backward(cast_inputs(x, torch.float32), "flex", **_options(cfg)), reference64, reference32)


def test_unnormalized_without_a_log_sum_exp_in_eager_mode(eager_flex, monkeypatch):
    """normalize=False by the compiled CPU kernel's route (a virtual key of known weight and a ones channel, no
    log-sum-exp), run eagerly, so that every line of it runs in Python (compiled, dynamo only traces it)."""
    monkeypatch.setattr(flex, "_route", lambda p: (False, "w", p.N + 1))
    for causal, grid in ((False, (3, 5)), (True, (11,))):
        cfg = dict(grid=grid, E=1, rpe_extra=True, M=2, Dk=3, Dv=4, boundary="zero", causal=causal,
                   normalize=False, eps=1e-6, feature_map="elu1", scale=1.0, B=2, H=2, seed=21)
        x = _inputs(cfg)
        reference64 = forward_backward(x, "reference", **_options(cfg))
        reference32 = forward_backward(cast_inputs(x, torch.float32), "reference", **_options(cfg))
        _judge(cfg, forward_backward(cast_inputs(x, torch.float32), "flex", **_options(cfg)), reference64,
               reference32)


@pytest.mark.parametrize("n", [1, 5, 127, 128, 129, 300])
def test_causal_block_mask_is_create_block_masks(n):
    """The causal block mask built from block indices (O((N/128)^2)) is the one create_block_mask evaluates pair by
    pair, with and without the virtual key (index n, visible to every query)."""
    for nk in (n, n + 1):
        got = flex._causal_block_mask(n, nk, torch.device("cpu"))

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx >= n)
        want = flex._flex().create_block_mask(mask_mod, None, None, n, nk, device="cpu")
        assert torch.equal(got.to_dense(), want.to_dense()), (n, nk)
        dense = torch.ones(n, nk, dtype=torch.bool).tril()
        dense[:, n:] = True
        assert torch.equal(got.mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(nk)[None, :]), dense)


# ---------------------------------------------------------------- the CPU: forward only; caching

def _small(requires_grad):
    x = make_inputs((3, 4), E=1, M=2, Dk=4, Dv=4, dtype=torch.float32, seed=3, requires_grad=requires_grad)
    return x, dict(grid=(3, 4), num_extra=1)


def test_a_gradient_on_the_cpu_raises_and_auto_does_not_train_with_flex():
    x, opts = _small(True)
    out = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], rpe_extra=x["rpe_extra"], backend="flex",
                                      **opts)
    with pytest.raises(NotImplementedError, match="FlexAttention has no backward on the CPU"):
        out.sum().backward()
    expl = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], rpe_extra=x["rpe_extra"], **opts)
    assert expl.backward and expl.chosen != "flex"
    assert "no backward on the CPU" in expl.estimates["flex"].reason
    fwd = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], rpe_extra=x["rpe_extra"], backward=False, **opts)
    assert fwd.estimates["flex"].reason is None


def test_no_training_through_flex_under_deterministic_algorithms():
    """On a GPU flex's backward sums the table's gradient with atomic adds: where the user asked for deterministic
    algorithms, flex has no backward (auto takes another backend; an explicit flex raises at the gradient)."""
    import dataclasses
    x = torch.zeros(1, 1, 4, 2)
    p = lisa_kernels.check_inputs(x, x, x, torch.zeros(1, 1, 7), grid=(4,))
    on_gpu = dataclasses.replace(p, device=torch.device("cuda"))      # (the check reads the device type only)
    assert flex.flex_grad_reason(on_gpu) is None
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert "atomic adds" in flex.flex_grad_reason(on_gpu)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_score_mod_reads_every_pairs_log_weight():
    """The score_mod, called directly on every (query, key) pair (FlexAttention only ever traces it): exp(score)
    is the reference's weight A_ij exp(L^m_ij), the virtual key's log(eps) included, on a 2D grid with extra tokens
    and circular tables."""
    from lisa_kernels.reference import _log_weights
    for boundary in ("zero", "circular"):
        grid, E, M, H, eps = (3, 4), 2, 2, 2, 0.25
        x = make_inputs(grid, E=E, M=M, Dk=3, Dv=4, H=H, B=1, boundary=boundary, dtype=torch.float64,
                        requires_grad=False)
        p = lisa_kernels.check_inputs(x["q"], x["k"], x["v"], x["rpe"], grid=grid, num_extra=E,
                                      rpe_extra=x["rpe_extra"], boundary=boundary, eps=eps)
        N = p.N
        table = flex._table(x["rpe"], x["rpe_extra"], p, torch.full((H * M,), math.log(eps), dtype=torch.float64))
        lin = flex._token_lin(grid, E, N + 1, torch.device("cpu"))
        T0 = math.prod(2 * s - 1 for s in grid)
        score_mod = flex._score_mod(table, lin, E, N, T0, "eps")
        A = torch.rand(H * M, N + 1, N + 1, dtype=torch.float64) + 0.1
        A[:, :, 0] = 0.0                                         # a zero kernel: weight 0
        h = torch.arange(H * M)[:, None, None]
        i, j = torch.arange(N)[None, :, None], torch.arange(N + 1)[None, None, :]
        got = torch.exp(score_mod(A[:, :N], 0, h, i, j))
        logw = _log_weights(x["rpe"], x["rpe_extra"], p).transpose(0, 1).reshape(M * H, N, N)   # rows m * H + h
        want = A[:, :N, :N] * torch.exp(logw)
        torch.testing.assert_close(got[..., :N], want, rtol=1e-12, atol=0)
        torch.testing.assert_close(got[..., N], torch.full((H * M, N), eps, dtype=torch.float64))
        plain = flex._score_mod(table, lin[:N], E, N, T0, "none")           # no virtual key (eps = 0)
        torch.testing.assert_close(torch.exp(plain(A[:, :N, :N], 0, h, i, j[..., :N])), want, rtol=1e-12, atol=0)


def test_devices_flex_cannot_run_on(monkeypatch):
    import dataclasses
    x = torch.zeros(1, 1, 4, 2)
    p = lisa_kernels.check_inputs(x, x, x, torch.zeros(1, 1, 7), grid=(4,))
    assert "not meta" in flex.flex_reason(dataclasses.replace(p, device=torch.device("meta")))
    monkeypatch.setattr(flex, "_CPU_AVX2", False)
    assert "AVX2" in flex.flex_reason(p)
    # GPUs (the check reads the device type and what gpu_of says of it)
    from lisa_kernels import _device
    from lisa_kernels._device import GPU
    on_gpu = dataclasses.replace(p, device=torch.device("cuda"))
    for gpu, dtype, wide, reason in ((GPU("cuda", 90, 32), torch.float32, False, None),
                                     (GPU("cuda", 75, 32), torch.bfloat16, False, "bfloat16 needs sm_80"),
                                     (GPU("cuda", 70, 32), torch.float16, False, "needs sm_75"),
                                     (GPU("hip", "gfx90a", 64), torch.bfloat16, False, None),
                                     (GPU("cuda", 90, 32), torch.float16, True, "head dim over")):
        monkeypatch.setattr(_device, "gpu_of", lambda device, gpu=gpu: gpu)
        case = dataclasses.replace(on_gpu, dtype=dtype, Dk=512 if wide else p.Dk)
        got = flex.flex_reason(case)
        assert (got is None) if reason is None else (reason in got), (gpu, dtype, got)
    import lisa_kernels.triton_direct as triton_direct
    monkeypatch.setattr(triton_direct, "HAS_TRITON", False)
    assert "triton is not installed" in flex.flex_reason(on_gpu)


def test_float64_is_refused_before_anything_runs():
    x = make_inputs((4,), dtype=torch.float64, requires_grad=False)
    with pytest.raises(ValueError, match="backend='flex' cannot run this input: .*float64"):
        lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=(4,), backend="flex")


def test_compiled_once_per_shape():
    from torch._dynamo.utils import counters
    x, opts = _small(False)
    run = lambda: lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"],  # noqa: E731
                                              rpe_extra=x["rpe_extra"], backend="flex", **opts)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    first = run()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before, "the first call compiled nothing"
    for _ in range(3):
        torch.testing.assert_close(run(), first, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == compiled


# ---------------------------------------------------------------- a CUDA GPU: the compiled kernels, with gradients

_GPU_LARGE = [   # several KV blocks of 128, the virtual key in a tail block, causal block skipping, the lse gradient
    dict(grid=(127,), E=1, rpe_extra=True, M=2, Dk=16, Dv=32, boundary="zero", causal=True, normalize=False,
         eps=1e-6, feature_map="elu1", scale=0.5, B=2, H=2, seed=31),
    dict(grid=(127,), E=1, rpe_extra=True, M=1, Dk=64, Dv=64, boundary="circular", causal=True, normalize=True,
         eps=1e-6, feature_map="relu", scale=0.25, B=1, H=2, seed=32),
    dict(grid=(14, 14), E=1, rpe_extra=True, M=2, Dk=64, Dv=64, boundary="zero", causal=False, normalize=False,
         eps=1e-6, feature_map="elu1", scale=0.125, B=2, H=2, seed=33),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: FlexAttention's GPU kernels need one")
@pytest.mark.parametrize("cfg", _configs(count=8, seed=SEED + 2) + _GPU_LARGE, ids=_id)
def test_gpu_compiled_forward_and_gradients(cfg):    # pragma: no cover (GPU only)
    x = _inputs(cfg)
    opts = _options(cfg)
    upstream = torch.randn(x["v"].shape, generator=torch.Generator().manual_seed(cfg["seed"] + 1),
                           dtype=torch.float64)
    reference64 = forward_backward(x, "reference", upstream, **opts)
    reference32 = forward_backward(cast_inputs(x, torch.float32), "reference", upstream, **opts)
    on_gpu = {n: None if t is None else t.detach().cuda().float().requires_grad_() for n, t in x.items()}
    out, grads = forward_backward(on_gpu, "flex", upstream.cuda(), **opts)
    _judge(cfg, (out.cpu(), {n: g.cpu() for n, g in grads.items()}), reference64, reference32)
    assert math.isfinite(out.float().abs().max().item()) or not cfg["normalize"] or cfg["eps"] == 0


def test_auto_takes_flex_where_triton_has_no_validated_configs(monkeypatch):
    """On a GPU the Triton kernels were never compile-checked for (CDNA 2 here, simulated), triton says why and
    auto takes flex for a ViT-sized forward; on a validated one (an H100) triton stays first."""
    from lisa_kernels import _device
    from lisa_kernels._device import GPU
    x = make_inputs((14, 14), E=1, Dk=64, Dv=64, B=8, H=4, dtype=torch.float32, requires_grad=False)
    args = (x["q"], x["k"], x["v"], x["rpe"])
    for gpu, chosen in ((GPU("hip", "gfx90a", 64), "flex"), (GPU("cuda", 90, 32), "triton")):
        monkeypatch.setattr(_device, "gpu_of", lambda device, gpu=gpu: gpu)
        lisa_kernels.clear_cache()
        expl = lisa_kernels.explain(*args, grid=(14, 14), num_extra=1, rpe_extra=x["rpe_extra"], backward=False)
        assert expl.chosen == chosen, str(expl)
        if chosen == "flex":
            assert "no validated configs for AMD CDNA 2 (gfx90a)" in expl.estimates["triton"].reason
            assert "no validated configs" in str(expl)


@pytest.mark.parametrize("causal,normalize,eps", [(False, True, 1e-6), (True, True, 0.0), (False, False, 1e-6)],
                         ids=["full", "causal-eps0", "unnormalized"])
def test_inside_a_users_torch_compile(causal, normalize, eps):
    """A model compiled whole with Inductor: flex's forward is traced into the user's graph (its token index a
    constant of the graph, the block mask built in it), with each route of the epilogue; relu with Dk = 1 has rows of
    zero weight (NaN with eps = 0, as in the reference)."""
    grid, E = (20,), 1
    x = make_inputs(grid, E=E, M=2, Dk=1, Dv=6, dtype=torch.float32, seed=12, requires_grad=False)
    opts = dict(grid=grid, num_extra=E, causal=causal, normalize=normalize, eps=eps, feature_map="relu")

    def attend(q, k, v, rpe, rpe_extra):
        return lisa_kernels.lisa_attention(q, k, v, rpe, rpe_extra=rpe_extra, backend="flex", **opts)
    torch._dynamo.reset()
    got = torch.compile(attend, fullgraph=True)(x["q"], x["k"], x["v"], x["rpe"], x["rpe_extra"])
    want = lisa_kernels.lisa_attention(*(x[n].double() for n in ("q", "k", "v", "rpe")),
                                       rpe_extra=x["rpe_extra"].double(), backend="reference", **opts)
    assert torch.equal(got.isnan(), want.isnan()) and (want.isnan().any() or eps > 0 or not normalize)
    diff = (got.double() - want).nan_to_num(0).abs().max().item()
    assert diff <= TOL * want.nan_to_num(0).abs().max().item()


def test_forward_only_inside_a_users_torch_compile():
    """CPU inputs that require grad inside a user's torch.compile: dynamo cannot trace a backward that raises, so
    the call breaks the graph (then runs the forward, and its gradient raises) or, under fullgraph, fails saying
    why."""
    x = make_inputs((10,), M=1, Dk=4, Dv=4, B=1, dtype=torch.float32, seed=2, requires_grad=True)

    def attend(q, k, v, rpe):
        return lisa_kernels.lisa_attention(q, k, v, rpe, grid=(10,), backend="flex")
    torch._dynamo.reset()
    out = torch.compile(attend)(x["q"], x["k"], x["v"], x["rpe"])
    want = lisa_kernels.lisa_attention(*(x[n].detach().double() for n in ("q", "k", "v", "rpe")), grid=(10,),
                                       backend="reference")
    assert (out.double() - want).abs().max().item() <= TOL * want.abs().max().item()
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        out.sum().backward()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="call it under torch.no_grad"):
        torch.compile(attend, fullgraph=True)(x["q"], x["k"], x["v"], x["rpe"])
