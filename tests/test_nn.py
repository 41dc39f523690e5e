"""lisa_kernels.nn: LiSAAttention (timm's Attention interface), LiSARPE and resample_rpe."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lisa_kernels
from lisa_kernels.nn import LiSAAttention, LiSARPE, resample_rpe
from lisa_test_utils import CPU_FLOAT64

DIM, HEADS = 32, 4


def make_attention(grid=(4, 5), num_extra=1, num_rpe=2, boundary="zero", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return LiSAAttention(DIM, num_heads=HEADS, grid=grid, num_extra=num_extra, num_rpe=num_rpe,
                         boundary=boundary, **kw).to(dtype)


def tokens(attn, B=2, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    N = attn.num_extra + math.prod(attn.grid)
    return torch.randn(B, N, DIM, generator=gen, dtype=torch.float64).to(dtype)


def randomize_rpe(attn, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.rpe.rpe.copy_(0.5 * torch.randn(attn.rpe.rpe.shape, generator=gen, dtype=torch.float64))
        if attn.rpe.rpe_extra is not None:
            attn.rpe.rpe_extra.copy_(0.5 * torch.randn(attn.rpe.rpe_extra.shape, generator=gen, dtype=torch.float64))


def linear_attention_block(attn, x, eps=1e-6):
    """The module at rpe = 0, written independently: qkv -> heads -> phi -> normalized linear attention -> proj."""
    B, N, C = x.shape
    hd = C // attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, attn.num_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))                      # (B, H, N, hd)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    num = fq @ (fk.transpose(-1, -2) @ v)
    den = fq @ fk.sum(2, keepdim=True).transpose(-1, -2)                              # (B, H, N, 1)
    out = (num / (den + eps)).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("grid, num_extra", [((4, 5), 1), ((3, 3), 0), ((2, 3, 2), 2), ((10,), 1)], ids=str)
def test_shape_and_zero_rpe_is_linear_attention(grid, num_extra):
    attn = make_attention(grid, num_extra)
    assert torch.count_nonzero(attn.rpe.rpe) == 0     # initialised at zero: plain linear attention
    x = tokens(attn)
    y = attn(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, linear_attention_block(attn, x), rtol=1e-10, atol=1e-12)


def test_rpe_changes_the_output():
    attn = make_attention()
    x = tokens(attn)
    y0 = attn(x)
    randomize_rpe(attn)
    assert (attn(x) - y0).abs().max() > 1e-3


@pytest.mark.parametrize("boundary", ["zero", "circular"])
def test_module_is_lisa_attention_of_its_projections(boundary):
    """forward = proj(lisa_attention(q, k, v, rpe)) with timm's qkv layout; every backend agrees."""
    attn = make_attention(boundary=boundary)
    randomize_rpe(attn)
    x = tokens(attn)
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    o = lisa_kernels.lisa_attention(qkv[0], qkv[1], qkv[2], attn.rpe.rpe, rpe_extra=attn.rpe.rpe_extra,
                                    grid=attn.grid, num_extra=1, boundary=boundary, backend="reference")
    expected = attn.proj(o.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-12)
    for backend in ("reference",) + CPU_FLOAT64:
        attn.backend = backend
        torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-12)


def test_backward_reaches_every_parameter():
    attn = make_attention(qkv_bias=True)
    x = tokens(attn).requires_grad_()
    attn(x).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name
    names = dict(attn.named_parameters())
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpe.rpe", "rpe.rpe_extra"} <= set(names)
    assert x.grad is not None and x.grad.abs().max() > 0


def test_rpe_gradient_matches_reference_backend():
    grads = {}
    for backend in ("reference",) + CPU_FLOAT64:
        attn = make_attention(backend=backend)
        randomize_rpe(attn)
        attn(tokens(attn)).square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in attn.named_parameters()}
    for backend in CPU_FLOAT64:
        for n, g in grads["reference"].items():
            torch.testing.assert_close(grads[backend][n], g, rtol=1e-9, atol=1e-12, msg=f"{backend} {n}")


def test_float32_module():
    attn = make_attention(dtype=torch.float32)
    randomize_rpe(attn)
    x = tokens(attn, dtype=torch.float32)
    y = attn(x)
    assert y.dtype == torch.float32
    ref = make_attention(dtype=torch.float64)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-5)


def test_attn_mask_is_refused():
    attn = make_attention()
    x = tokens(attn)
    N = x.shape[1]
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, attn_mask=torch.ones(N, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C\)"):
        attn(x[0])


def test_constructor_checks():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LiSAAttention(30, num_heads=4, grid=(3, 3))
    with pytest.raises(ValueError, match="num_rpe"):
        LiSAAttention(32, num_heads=4, grid=(3, 3), num_rpe=3)
    with pytest.raises(ValueError, match="feature_map"):
        LiSAAttention(32, num_heads=4, grid=(3, 3), feature_map="softmax")
    with pytest.raises(ValueError, match="boundary"):
        LiSAAttention(32, num_heads=4, grid=(3, 3), boundary="reflect")
    with pytest.raises(ValueError, match="grid"):
        LiSAAttention(32, num_heads=4, grid=(3, 3, 3, 3))
    with pytest.warns(UserWarning, match="attn_drop"):
        LiSAAttention(32, num_heads=4, grid=(3, 3), attn_drop=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LiSAAttention(32, num_heads=4, grid=(3, 3), attn_drop=0.0)


def test_wrong_token_count_is_refused():
    attn = make_attention(grid=(4, 5), num_extra=1)
    x = torch.randn(2, 4 * 5, DIM, dtype=torch.float64)     # forgot the CLS token
    with pytest.raises(ValueError, match="grid"):
        attn(x)


# --------------------------------------------------------------------------- set_grid / resample_rpe

@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("old, new", [((4, 5), (7, 3)), ((6,), (11,)), ((3, 4, 5), (2, 6, 5))], ids=str)
def test_set_grid_shapes_and_run(old, new, boundary):
    attn = make_attention(old, num_extra=1, boundary=boundary)
    randomize_rpe(attn)
    extra = attn.rpe.rpe_extra.detach().clone()
    attn.set_grid(new)
    assert attn.grid == tuple(new)
    table = tuple(new) if boundary == "circular" else tuple(2 * s - 1 for s in new)
    assert attn.rpe.rpe.shape == (HEADS, 2) + table
    assert torch.equal(attn.rpe.rpe_extra, extra)            # rpe_extra does not depend on the grid
    params = dict(attn.named_parameters())
    assert params["rpe.rpe"] is attn.rpe.rpe and attn.rpe.rpe.requires_grad
    x = tokens(attn)
    y = attn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert attn.rpe.rpe.grad is not None and attn.rpe.rpe.grad.shape == attn.rpe.rpe.shape


@pytest.mark.parametrize("boundary", ["zero", "circular"])
def test_set_grid_to_the_same_grid_is_identity(boundary):
    attn = make_attention((4, 5), boundary=boundary)
    randomize_rpe(attn)
    before = attn.rpe.rpe.detach().clone()
    x = tokens(attn)
    y = attn(x)
    attn.set_grid((4, 5))
    assert torch.equal(attn.rpe.rpe, before)
    torch.testing.assert_close(attn(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("boundary", ["zero", "circular"])
@pytest.mark.parametrize("new", [(7, 3), (2, 9), (1, 5)], ids=str)
def test_resampled_constant_table_stays_constant(new, boundary):
    rpe = LiSARPE(3, (4, 5), num_rpe=2, boundary=boundary).double()
    with torch.no_grad():
        rpe.rpe.fill_(0.37)
    rpe.set_grid(new)
    torch.testing.assert_close(rpe.rpe, torch.full_like(rpe.rpe, 0.37), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("old, new", [((4, 5), (7, 3)), ((5, 3), (9, 9)), ((6, 6), (3, 2)), ((3, 2), (3, 4))], ids=str)
def test_resampled_linear_table_stays_linear_zero_boundary(old, new):
    """Zero boundary: offsets scale with the grid, delta' reads old offset delta' (S-1)/(S'-1) (ends stay ends),
    so a table linear in the offset stays linear with slope a (S-1)/(S'-1)."""
    a, b = (0.3, -0.7), 0.25
    rpe = LiSARPE(1, old, num_rpe=1).double()
    with torch.no_grad():
        d1 = torch.arange(2 * old[0] - 1, dtype=torch.float64) - (old[0] - 1)
        d2 = torch.arange(2 * old[1] - 1, dtype=torch.float64) - (old[1] - 1)
        rpe.rpe[0, 0] = a[0] * d1[:, None] + a[1] * d2[None, :] + b
    rpe.set_grid(new)
    e1 = torch.arange(2 * new[0] - 1, dtype=torch.float64) - (new[0] - 1)
    e2 = torch.arange(2 * new[1] - 1, dtype=torch.float64) - (new[1] - 1)
    s1 = (old[0] - 1) / (new[0] - 1) if new[0] > 1 else 0.0
    s2 = (old[1] - 1) / (new[1] - 1) if new[1] > 1 else 0.0
    expected = a[0] * s1 * e1[:, None] + a[1] * s2 * e2[None, :] + b
    torch.testing.assert_close(rpe.rpe[0, 0], expected, rtol=1e-13, atol=1e-13)
    t = rpe.rpe[0, 0]
    c1, c2 = new[0] - 1, new[1] - 1                                         # the entry of offset 0
    assert t[c1, c2].item() == pytest.approx(b, abs=1e-13)                   # offset 0 stays offset 0
    assert t[0, 0].item() == pytest.approx(-a[0] * (old[0] - 1) - a[1] * (old[1] - 1) + b, abs=1e-13)  # ends
    assert t[-1, -1].item() == pytest.approx(a[0] * (old[0] - 1) + a[1] * (old[1] - 1) + b, abs=1e-13)


@pytest.mark.parametrize("old, new", [(6, 9), (8, 4), (5, 5), (4, 10)])
def test_resampled_linear_table_circular(old, new):
    """Circular: new entry e' reads old offset x = e' S / S'; where x <= S - 1 a linear table stays linear
    (value a x + b), above it the interpolation wraps between entry S-1 and entry 0."""
    a, b = 0.4, -0.1
    rpe = LiSARPE(2, (old,), num_rpe=1, boundary="circular").double()
    with torch.no_grad():
        rpe.rpe[:] = a * torch.arange(old, dtype=torch.float64) + b
    rpe.set_grid((new,))
    t = rpe.rpe[0, 0]
    assert t.shape == (new,)
    torch.testing.assert_close(rpe.rpe[1, 0], t, rtol=0, atol=0)
    for e in range(new):
        x = e * old / new
        if x <= old - 1:
            expected = a * x + b
        else:
            w = x - (old - 1)
            expected = (1 - w) * (a * (old - 1) + b) + w * b
        assert t[e].item() == pytest.approx(expected, abs=1e-13), (e, x)


def test_resample_rpe_function():
    table = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    assert torch.equal(resample_rpe(table, (4, 5), (4, 5)), table)
    up = resample_rpe(table, (4, 5), (8, 10))
    assert up.shape == (2, 3, 15, 19)
    # zero boundary: the ends and the centre (offset 0) are kept exactly
    torch.testing.assert_close(up[..., 0, 0], table[..., 0, 0], rtol=0, atol=1e-14)
    torch.testing.assert_close(up[..., -1, -1], table[..., -1, -1], rtol=0, atol=1e-14)
    torch.testing.assert_close(up[..., 7, 9], table[..., 3, 4], rtol=0, atol=1e-14)
    # a grid of one position along an axis: every new offset takes the value of offset 0
    single = torch.randn(1, 1, 1, 5, dtype=torch.float64)
    grown = resample_rpe(single, (1, 3), (4, 3))
    assert grown.shape == (1, 1, 7, 5)
    torch.testing.assert_close(grown, single.expand(1, 1, 7, 5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="new_grid must have 2 axes"):
        resample_rpe(table, (4, 5), (4, 5, 6))


def test_set_grid_refuses_a_bad_grid():
    attn = make_attention((4, 5))
    with pytest.raises(ValueError, match="new_grid must have 2 axes"):
        attn.set_grid((4, 5, 6))
    with pytest.raises(ValueError, match="grid sizes must be positive"):
        attn.set_grid((0, 5))
    assert attn.grid == (4, 5) and attn.rpe.rpe.shape[2:] == (7, 9)


# --------------------------------------------------------------------------- state dict

@pytest.mark.parametrize("boundary", ["zero", "circular"])
def test_state_dict_round_trip(boundary):
    attn = make_attention((4, 5), boundary=boundary, qkv_bias=True, seed=3)
    randomize_rpe(attn)
    x = tokens(attn)
    sd = attn.state_dict()
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpe.rpe", "rpe.rpe_extra"} <= set(sd)
    other = make_attention((4, 5), boundary=boundary, qkv_bias=True, seed=4)
    assert not torch.allclose(other(x), attn(x))
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), attn(x), rtol=0, atol=0)
    # after a resolution change, the state dict carries the new table: a module built at the new grid loads it
    attn.set_grid((6, 7))
    fresh = make_attention((6, 7), boundary=boundary, qkv_bias=True, seed=5)
    fresh.load_state_dict(attn.state_dict())
    x2 = tokens(attn)
    torch.testing.assert_close(fresh(x2), attn(x2), rtol=0, atol=0)
    # ... and a module at the old grid refuses it (shape mismatch)
    with pytest.raises(RuntimeError, match="rpe.rpe"):
        make_attention((4, 5), boundary=boundary, qkv_bias=True).load_state_dict(attn.state_dict())
