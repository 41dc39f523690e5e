"""Accuracy of the float32 FFT path against the float64 reference, per row, over hard RPE tables.

The error of row i is max_c |out_i[c] - ref_i[c]| / max_c |ref_i[c]|: relative to that row's own magnitude,
so that rows far smaller than the largest output are checked too. Tables: log-weights uniform in [-12, 12],
a sharp peak at offset 0 (12 there, -12 or 0 elsewhere), and tables that spread the rows' weight masses
(a peak at a corner offset, a ramp across an axis), which a float32 FFT cannot resolve: those must be
detected (fft_needs_float64) and computed in float64.
"""

import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import fft as F

GRIDS = [(64,), (16, 16), (4, 6, 6)]
ROW_TOL = 1e-4          # the stated float32 accuracy: per row, relative to the row's own magnitude


def _table(kind, grid, H, g):
    T = [2 * s - 1 for s in grid]
    center = (slice(None), 0) + tuple(s - 1 for s in grid)
    if kind == "uniform12":
        return torch.rand(H, 1, *T, generator=g, dtype=torch.float64) * 24 - 12
    if kind == "peak":                        # 12 at offset 0, weights near 0 (log -12) elsewhere
        t = torch.full((H, 1, *T), -12.0, dtype=torch.float64)
        t[center] = 12.0
        return t
    if kind == "peak_on_flat":                # 12 at offset 0, log-weight 0 elsewhere
        t = torch.zeros((H, 1, *T), dtype=torch.float64)
        t[center] = 12.0
        return t
    if kind == "corner":                      # the one big weight at offset -(S-1): only one row sees it
        t = torch.full((H, 1, *T), -12.0, dtype=torch.float64)
        t[(slice(None), 0) + (0,) * len(grid)] = 12.0
        return t
    if kind.startswith("ramp"):               # log-weight linear in the first axis offset, spanning +-span
        span = float(kind[4:])
        ax = torch.linspace(-span, span, T[0], dtype=torch.float64)
        return ax.view(1, 1, -1, *[1] * (len(grid) - 1)).expand(H, 1, *T).contiguous()
    raise ValueError(kind)


def _inputs(grid, kind, seed=0, H=2, D=8):
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    q, k, v = [torch.randn(1, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]
    return q, k, v, _table(kind, grid, H, g)


def row_errors(out, ref):
    """Per-row error relative to each row's own magnitude: (B, H, N)."""
    return (out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-300)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind", ["uniform12", "peak", "peak_on_flat", "corner", "ramp12", "ramp4"])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_float32_fft_per_row_error(grid, kind, normalize):
    q, k, v, t = _inputs(grid, kind)
    ref = lisa_kernels.lisa_attention(q, k, v, t, grid=grid, normalize=normalize, backend="reference")
    out = lisa_kernels.lisa_attention(q.float(), k.float(), v.float(), t.float(), grid=grid, normalize=normalize,
                                      backend="fft")
    assert out.dtype == torch.float32
    err = row_errors(out.double(), ref)
    assert err.max().item() <= ROW_TOL, (
        f"worst row error {err.max().item():.2e} (row spread {F.table_row_range(t, grid, False).item():.1f} nats)")


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_detection_routes_only_the_hard_tables_to_float64(grid):
    for kind, hard in [("uniform12", False), ("peak", False), ("peak_on_flat", False), ("ramp4", False),
                       ("corner", True), ("ramp12", True)]:
        t = _table(kind, grid, 2, torch.Generator().manual_seed(1)).float()
        assert F.fft_needs_float64(t, grid, False, torch.float32) is hard, kind
        assert not F.fft_needs_float64(t.double(), grid, False, torch.float64)
    # a circular table gives every row the same weight mass
    assert not F.fft_needs_float64(torch.randn(2, 1, *grid) * 12, grid, True, torch.float32)


def test_float32_without_the_switch_loses_the_small_rows(monkeypatch):
    """The check above is needed: with the float64 switch off, the ramp table's small rows are lost."""
    grid = (16, 16)
    q, k, v, t = _inputs(grid, "ramp12")
    ref = lisa_kernels.lisa_attention(q, k, v, t, grid=grid, backend="reference")
    monkeypatch.setattr(F, "FLOAT32_MAX_ROW_RANGE", float("inf"))
    out = lisa_kernels.lisa_attention(q.float(), k.float(), v.float(), t.float(), grid=grid, backend="fft")
    assert row_errors(out.double(), ref).max().item() > 1e-2


def test_row_log_mass_matches_a_dense_sum():
    g = torch.Generator().manual_seed(3)
    for grid in [(5,), (3, 4), (2, 3, 4), (7,)]:
        t = torch.randn(2, 2, *[2 * s - 1 for s in grid], generator=g, dtype=torch.float64) * 5
        pos = torch.cartesian_prod(*[torch.arange(s) for s in grid]).view(-1, len(grid))
        idx = pos[:, None, :] - pos[None, :, :] + torch.tensor([s - 1 for s in grid])      # (Ng, Ng, d)
        w = torch.exp(t[(slice(None), slice(None)) + tuple(idx[..., a] for a in range(len(grid)))])
        dense = torch.log(w.sum(-1)).view(2, 2, *grid)
        torch.testing.assert_close(F.row_log_mass(t, grid), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["uniform12", "ramp12"])
def test_float32_fft_gradients(kind):
    """Backward of the float32 fft path (float64 inside for the hard table) against the float64 reference."""
    grid = (8, 8)
    q, k, v, t = _inputs(grid, kind, seed=4)
    w = torch.randn(1, 2, 64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = {}
    for name, dt in (("reference", torch.float64), ("fft", torch.float32)):
        xs = [x.detach().to(dt).clone().requires_grad_() for x in (q, k, v, t)]
        out = lisa_kernels.lisa_attention(*xs, grid=grid, backend=name)
        (out * w.to(dt)).sum().backward()
        grads[name] = [x.grad.double() for x in xs]
    for gf, gr in zip(grads["fft"], grads["reference"]):
        assert ((gf - gr).abs().max() / gr.abs().max()).item() <= 1e-4


def test_large_log_weights_do_not_overflow_the_spectrum():
    """Log-weights near float32's exp limit: the kernel is exp(table - max) <= 1 inside the FFT."""
    grid = (8, 8)
    q, k, v, t = _inputs(grid, "uniform12", seed=6)
    t = t * 0.1 + 80.0                                   # exp(80) * (D * N) would overflow a float32 spectrum sum
    ref = lisa_kernels.lisa_attention(q, k, v, t, grid=grid, backend="reference")
    out = lisa_kernels.lisa_attention(q.float(), k.float(), v.float(), t.float(), grid=grid, backend="fft")
    assert torch.isfinite(out).all()
    assert row_errors(out.double(), ref).max().item() <= ROW_TOL


# ------------------------------------------------------------------------------- the pruned, buffered transforms

@pytest.mark.parametrize("grid", [(5,), (4, 6), (3, 4, 5)], ids=str)
def test_pruned_transforms_equal_the_padded_rfftn(grid):
    """rfftn_pruned and rfftn_pruned_buffered against rfftn of the explicitly zero-padded field; the buffers are
    reused for a second field and for a chunk of another shape, so a padding that was written would show; the
    cropped inverse returns the field."""
    from lisa_kernels.fft import PaddedBuffers, fft_sizes, irfftn_cropped, rfftn_pruned, rfftn_pruned_buffered

    sizes = fft_sizes(grid, circular=False)
    d = len(grid)
    bufs = PaddedBuffers()
    g = torch.Generator().manual_seed(sum(grid))
    for lead in [(2, 3), (2, 3), (1, 2)]:
        x = torch.randn(*lead, *grid, generator=g, dtype=torch.float64)
        padded = torch.zeros(*lead, *sizes, dtype=torch.float64)
        padded[(Ellipsis,) + tuple(slice(0, s) for s in grid)] = x
        want = torch.fft.rfftn(padded, dim=tuple(range(-d, 0)))
        got_plain = rfftn_pruned(x, sizes)
        got = rfftn_pruned_buffered(lambda out: out.copy_(x), lead, grid, sizes, x.dtype, x.device, bufs)
        torch.testing.assert_close(got_plain, want, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(irfftn_cropped(got.clone(), sizes, grid), x, rtol=1e-12, atol=1e-12)
        got.fill_(float("nan"))                      # the result is not a view of a buffer
        again = rfftn_pruned_buffered(lambda out: out.copy_(x), lead, grid, sizes, x.dtype, x.device, bufs)
        torch.testing.assert_close(again, want, rtol=1e-12, atol=1e-10)


def test_explain_says_when_this_rpe_needs_float64():
    """explain() reads the input's table: the float64 switch is named where fft_needs_float64 holds, not elsewhere."""
    grid = (8, 8)
    q = torch.randn(1, 2, 64, 4)
    flat = torch.zeros(2, 1, 15, 15)
    peaked = flat.clone()
    peaked[..., 0, 0] = 12.0
    assert not F.fft_needs_float64(flat, grid, False, torch.float32)
    assert F.fft_needs_float64(peaked, grid, False, torch.float32)
    assert "runs it in float64" not in lisa_kernels.explain(q, q, q, flat, grid=grid).precision
    text = str(lisa_kernels.explain(q, q, q, peaked, grid=grid))
    assert "runs it in float64" in text, text
    assert lisa_kernels.explain(q.double(), q.double(), q.double(), peaked.double(), grid=grid).precision == ""
    s = q[:, :, :8]
    assert "causal" in lisa_kernels.explain(s, s, s, torch.zeros(2, 1, 15), grid=(8,), causal=True).precision
