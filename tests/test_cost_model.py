"""backend="auto" against the committed CPU benchmark: at every stored point where both exact fast paths were
measured, the backend the cost model picks must be within 1.2x of the faster one measured."""

import glob
import json
import os

import pytest
import torch

from lisa_kernels._validate import Problem
from lisa_kernels.dispatch import explain_problem

RESULTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "cpu_*.json")))


def _points():
    if not RESULTS:
        return []
    records = json.load(open(RESULTS[-1]))["records"]
    measured = {}
    for r in records:
        if r.get("status") == "ok" and r["method"] in ("lisa-direct", "lisa-fft"):
            key = (tuple(r["grid"]), r["D"], r["mode"], r["B"], r["H"])
            measured.setdefault(key, {})[r["method"][5:]] = r["median_ms"]
    return [(key, times) for key, times in sorted(measured.items()) if len(times) == 2]


POINTS = _points()


@pytest.mark.skipif(not POINTS, reason="no committed CPU benchmark results (benchmarks/results/cpu_*.json)")
@pytest.mark.parametrize("key,times", POINTS, ids=[f"{'x'.join(map(str, k[0]))}-D{k[1]}-{k[2]}" for k, _ in POINTS])
def test_auto_is_within_1_2x_of_the_best_measured(key, times):
    grid, D, mode, B, H = key
    N = 1
    for s in grid:
        N *= s
    p = Problem(B=B, H=H, N=N, Dk=D, Dv=D, M=1, grid=grid, num_extra=0, feature_map="elu1", normalize=True,
                eps=1e-6, boundary="zero", causal=False, scale=1.0, dtype=torch.float32,
                device=torch.device("cpu"))
    chosen = explain_problem(p, backward=mode != "fwd").chosen
    assert chosen in times, (chosen, times)
    assert times[chosen] <= 1.2 * min(times.values()), f"auto picked {chosen}: {times} ms"
