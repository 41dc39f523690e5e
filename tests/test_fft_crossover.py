"""explain()'s fft crossover: the smallest grid of the input's shape where the cost model prefers the FFT form."""

import dataclasses
import math

import pytest
import torch

import lisa_kernels
from lisa_kernels import dispatch
from lisa_kernels._validate import check_inputs


def _problem(grid, D, dtype=torch.float32):
    N = math.prod(grid)
    x = torch.empty(1, 4, N, D, dtype=dtype, device="meta")
    return check_inputs(x, x, x, torch.empty(4, 1, *[2 * s - 1 for s in grid], dtype=dtype, device="meta"), grid=grid)


@pytest.mark.parametrize("grid,D,backward", [((32, 32), 32, False), ((32, 32), 64, True), ((8, 16, 16), 32, False),
                                             ((1024,), 64, False)])
def test_crossover_is_where_fft_starts_to_win(grid, D, backward):
    p = _problem(grid, D)
    names = ("direct", "fft")
    cross = dispatch.fft_crossover(p, backward, "cpu", names)
    assert cross is not None and len(cross) == len(grid)

    def est(g, name):
        q = dataclasses.replace(p, grid=g, N=math.prod(g))
        return dispatch.estimate_seconds(name, q, backward, "cpu")
    assert est(cross, "fft") <= est(cross, "direct")
    top = max(grid)
    # the search's previous size (sides in steps of 2^(1/8)); between two steps the fft estimate may dip below
    # (its padded FFT sizes jump), so only the searched sizes are checked
    sides = sorted({max(2, round(2 ** (e / 8))) for e in range(8, 8 * 24 + 1)})
    below = [s for s in sides if s < max(cross)]
    if below:
        smaller = tuple(max(1, round(g * below[-1] / top)) for g in grid)
        if math.prod(smaller) < math.prod(cross):
            assert est(smaller, "fft") > est(smaller, "direct")


def test_explanation_states_the_crossover_and_the_float64_rule():
    grid = (16, 16)
    x = torch.randn(1, 2, 256, 32)
    rpe = torch.zeros(2, 1, 31, 31)
    text = str(lisa_kernels.explain(x, x, x, rpe, grid=grid))
    line = [ln for ln in text.splitlines() if "fft crossover" in ln]
    assert len(line) == 1
    assert "D=32" in line[0] and "float32" in line[0] and "class cpu" in line[0]
    assert "float64" in line[0]
    cross = dispatch.fft_crossover(check_inputs(x, x, x, rpe, grid=grid), False, "cpu")   # the same problem
    assert "x".join(map(str, cross)) in line[0]
