"""benchmark.py --cases (exact points) and issue 12's fft targets; plot_fft_scaling.py on a tiny results file."""

import json
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCH_DIR)

import benchmark  # noqa: E402
import methods  # noqa: E402
import plot_fft_scaling  # noqa: E402
import reports  # noqa: E402


def test_cases_are_exactly_the_points_given():
    args = benchmark.parse_args(["--device", "cpu", "--cases", "256x256:32:fwd", "16x64x64:32:fwd",
                                 "128x128:64:fwd+bwd", "--methods", "sdpa", "lisa-fft"])
    got = [(c.grid, c.D, c.mode, c.method) for c in methods.build_cases(args)]
    assert got == [((128, 128), 64, "fwd+bwd", "sdpa"), ((128, 128), 64, "fwd+bwd", "lisa-fft"),
                   ((16, 64, 64), 32, "fwd", "sdpa"), ((16, 64, 64), 32, "fwd", "lisa-fft"),
                   ((256, 256), 32, "fwd", "sdpa"), ((256, 256), 32, "fwd", "lisa-fft")]


def test_a_case_may_name_its_methods():
    assert methods.parse_point("64x64:32:fwd") == ((64, 64), 32, "fwd", None)
    assert methods.parse_point("64x64:32:fwd:lisa-fft,linear") == ((64, 64), 32, "fwd", ("lisa-fft", "linear"))
    args = benchmark.parse_args(["--device", "cpu", "--cases", "64x64:32:fwd:lisa-fft,linear", "32x32:32:fwd",
                                 "--methods", "sdpa", "lisa-fft", "lisa-direct"])
    got = [(c.grid, c.method) for c in methods.build_cases(args)]
    assert got == [((32, 32), "sdpa"), ((32, 32), "lisa-direct"), ((32, 32), "lisa-fft"),
                   ((64, 64), "sdpa"), ((64, 64), "lisa-fft")]       # named and in --methods, plus the baseline


@pytest.mark.parametrize("bad", ["256x256:32", "256x256:x:fwd", "256x256:32:back", "256x256:32:fwd:nope",
                                 "256x256:32:fwd:sdpa:x"])
def test_bad_case_is_an_argparse_error(bad):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--device", "cpu", "--cases", bad])


def _rec(method, grid, D, mode, ms):
    N = 1
    for s in grid:
        N *= s
    return {"method": method, "grid": list(grid), "grid_label": "x".join(map(str, grid)), "N": N, "D": D,
            "mode": mode, "dtype": "float32", "status": "ok", "median_ms": ms}


def test_fft_targets_and_scaling_plot(tmp_path):
    recs = [_rec("sdpa", (256, 256), 32, "fwd", 1000.0), _rec("lisa-fft", (256, 256), 32, "fwd", 300.0),
            _rec("lisa-direct", (128, 128), 64, "fwd+bwd", 100.0), _rec("lisa-fft", (128, 128), 64, "fwd+bwd", 120.0),
            _rec("lisa-fft", (64, 64), 32, "fwd", 20.0), _rec("lisa-fft", (128, 128), 32, "fwd", 70.0)]
    t = reports.compute_targets(recs, {"baseline": "sdpa", "device_name": "cpu"})
    speed = {(x["grid"], x["versus"]): x for x in t["fft_speed_float32"]}
    assert speed[("256x256", "sdpa")]["ratio"] == pytest.approx(0.3) and speed[("256x256", "sdpa")]["met"]
    assert speed[("128x128", "lisa-direct")]["ratio"] == pytest.approx(1.2)
    assert speed[("128x128", "lisa-direct")]["met"] is False
    assert speed[("16x64x64", "sdpa")]["ratio"] is None
    assert "NOT met" in reports.targets_text(t)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": {"baseline": "sdpa", "B": 1, "H": 4}, "records": recs}))
    out = tmp_path / "p.png"
    assert plot_fft_scaling.main([str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
