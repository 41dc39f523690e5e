"""The benchmark harness: its baselines compute what they claim, a tiny sweep writes every output, and the
regression comparison flags a slowdown."""

import csv
import json
import math
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import benchmark  # noqa: E402
import compare  # noqa: E402
import harness  # noqa: E402
import methods  # noqa: E402

import lisa_kernels  # noqa: E402


def offsets_table_index(grid):
    """The flattened table index of each (i, j) pair, by explicit loops over positions."""
    coords = [tuple(c) for c in torch.cartesian_prod(*[torch.arange(s) for s in grid]).reshape(-1, len(grid)).tolist()]
    index = torch.empty(len(coords), len(coords), dtype=torch.long)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            flat = 0
            for a, s in enumerate(grid):
                flat = flat * (2 * s - 1) + (ci[a] - cj[a] + s - 1)
            index[i, j] = flat
    return index


@pytest.mark.parametrize("grid", [(5,), (3, 4), (2, 3, 2)])
def test_relative_index_matches_loops(grid):
    assert torch.equal(methods.relative_index(grid, "cpu"), offsets_table_index(grid))


def test_dense_bias_is_softmax_with_the_gathered_bias():
    gen = torch.Generator().manual_seed(0)
    grid, H, D = (3, 4), 2, 5
    N = math.prod(grid)
    q, k, v = (torch.randn(1, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    table = torch.randn(H, 5 * 7, generator=gen, dtype=torch.float64)
    index = offsets_table_index(grid)
    bias = torch.stack([table[h][index] for h in range(H)])
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, dim=-1) @ v
    got = methods.dense_bias_attention(q, k, v, table, methods.relative_index(grid, "cpu"))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_linear_attention_is_lisa_with_unit_rpe_weights():
    gen = torch.Generator().manual_seed(1)
    grid = (4, 5)
    q, k, v = (torch.randn(2, 3, 20, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    ones = torch.ones(3, 1, 7, 9, dtype=torch.float64)
    ref = lisa_kernels.lisa_attention(q, k, v, ones, grid=grid, backend="reference")
    torch.testing.assert_close(methods.linear_attention(q, k, v), ref, rtol=1e-7, atol=1e-7)


def test_flop_formulas():
    case = methods.Case(grid=(8, 8), D=32, dtype="float32", mode="fwd", method="sdpa", B=2, H=3, device="cpu",
                        repeats=1, warmup=0, min_time=0.0, rotate=1, seed=0)
    assert methods.model_flops(case, "sdpa") == 4 * 2 * 3 * 64 ** 2 * 32
    assert methods.model_flops(case, "linear") == 4 * 2 * 3 * 64 * 32 * 33
    bwd = methods.Case(**{**case.__dict__, "mode": "fwd+bwd"})
    assert methods.model_flops(bwd, "sdpa") == 3.5 * methods.model_flops(case, "sdpa")
    assert methods.flop_kind("fft") == methods.flop_kind("lisa-cuda") == "lisa-fft"
    assert methods.flop_kind("direct") == methods.flop_kind("lisa-triton") == "lisa-direct"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = ["--device", "cpu", "--grids", "3x3", "2x2x3", "--dims", "4", "--modes", "fwd", "bwd", "fwd+bwd",
            "--methods", "sdpa", "sdpa-math", "sdpa-efficient", "flash-attn", "dense-bias", "linear", "lisa-direct",
            "lisa-fft", "lisa-auto", "--repeats", "1", "--min-time", "0", "--rotate", "2", "--in-process",
            "--out", str(out)]
    assert benchmark.main(argv) == 0
    return out


def test_tiny_sweep_writes_every_output(tiny_sweep):
    data = json.load(open(tiny_sweep))
    records = data["records"]
    assert len(records) == 2 * 3 * 9
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], set()).add(r["status"])
    assert by_method["sdpa-efficient"] == {"skipped"}                  # CUDA-only kernel on the CPU
    assert by_method["flash-attn"] == {"skipped"}
    for m in ("sdpa", "sdpa-math", "dense-bias", "linear", "lisa-direct", "lisa-fft", "lisa-auto"):
        assert by_method[m] == {"ok"}, (m, [r.get("reason") for r in records if r["method"] == m])
    for r in records:
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["tflops"] > 0 and r["ratio_base"] is not None
        if r["method"] == "sdpa":
            assert r["ratio_base"] == 1.0
        if r["status"] == "skipped":
            assert r["reason"].startswith("cannot run:")
    meta = data["meta"]
    assert meta["device_class"] == "cpu" and meta["baseline"] == "sdpa"
    assert "/work" not in meta["command"]
    with open(tiny_sweep.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(records)
    md = tiny_sweep.with_suffix(".md").read_text()
    assert "Speedup of lisa-auto over sdpa (float32, fwd+bwd" in md
    pytest.importorskip("matplotlib")
    assert tiny_sweep.with_suffix(".png").stat().st_size > 0
    assert (tiny_sweep.parent / "tiny_speedup.png").stat().st_size > 0


def test_one_case_in_a_child_process(tmp_path):
    case = methods.Case(grid=(4, 4), D=8, dtype="float32", mode="fwd+bwd", method="lisa-fft", B=1, H=2,
                        device="cpu", repeats=2, warmup=1, min_time=0.0, rotate=2, seed=3)
    result = harness.measure_in_subprocess(case, timeout=300)
    assert result["status"] == "ok", result
    assert result["calls"] == 2 and result["peak_mib"] >= 0


def test_compare_flags_a_slowdown(tiny_sweep, tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    shutil.copy(tiny_sweep, old)
    assert compare.main([str(old), str(tiny_sweep)]) == 0                # a run against itself: all "same"
    data = json.load(open(tiny_sweep))
    slowed = next(r for r in data["records"] if r["method"] == "lisa-fft" and r["status"] == "ok")
    slowed["median_ms"] *= 2
    slowed["min_ms"] *= 2
    json.dump(data, open(new, "w"))
    assert compare.main([str(old), str(new), "--out-dir", str(tmp_path)]) == 1
    rows = json.load(open(tmp_path / "comparison.json"))["rows"]
    assert [r["verdict"] for r in rows].count("regression") == 1
    assert compare.main([str(old), str(new), "--no-fail"]) == 0


def test_report_rewrites_the_outputs_of_a_saved_run(tiny_sweep, tmp_path):
    saved = tmp_path / "saved.json"
    shutil.copy(tiny_sweep, saved)
    assert benchmark.main(["--report", str(saved), "--no-plot"]) == 0
    assert json.load(open(saved))["records"] == json.load(open(tiny_sweep))["records"]
    assert saved.with_suffix(".md").read_text() == tiny_sweep.with_suffix(".md").read_text()
    assert saved.with_suffix(".csv").exists()
