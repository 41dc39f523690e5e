"""The benchmark harness: its baselines compute what they claim, a tiny sweep writes every output, the
default set is the documented one, the progress lines show the time left, the time budget skips what would
run over, and the regression comparison flags a slowdown."""

import csv
import json
import math
import os
import re
import shutil
import sys
import time

import pytest
import torch
import torch.nn.functional as F

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import benchmark  # noqa: E402
import compare  # noqa: E402
import harness  # noqa: E402
import methods  # noqa: E402
import reports  # noqa: E402
import run  # noqa: E402

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
    # flex-lisa: A once per RPE group, 2 B H N^2 (M Dk + Dv) with M = 1; flex-rpb: softmax attention
    assert methods.flop_kind("flex-lisa") == methods.flop_kind("flex") == "flex-lisa"     # (auto may pick flex)
    assert methods.model_flops(case, "flex-lisa") == 2 * 2 * 3 * 64 ** 2 * (32 + 32)
    assert methods.model_flops(bwd, "flex-lisa") == 3.5 * methods.model_flops(case, "flex-lisa")
    assert methods.flop_kind("flex-rpb") == "softmax"
    assert methods.model_flops(bwd, "flex-rpb") == methods.model_flops(bwd, "sdpa")
    assert "flex-lisa" in methods.FLOP_FORMULAS


# ------------------------------------------------------------------------- the FlexAttention peers

def _flex_case(method, mode="fwd", dtype="float32", grid=(3, 4), D=8):
    return methods.Case(grid=grid, D=D, dtype=dtype, mode=mode, method=method, B=2, H=2, device="cpu", repeats=1,
                        warmup=0, min_time=0.0, rotate=1, seed=5)


def test_method_list_names_the_flex_peers_once():
    """backend "flex" is timed as the peer flex-lisa, not also as lisa-flex; every method has its help line."""
    assert "flex-lisa" in methods.METHODS and "flex-rpb" in methods.METHODS
    assert "lisa-flex" not in methods.METHODS and "lisa-flex" not in methods.METHOD_HELP
    assert set(methods.METHOD_HELP) == set(methods.METHODS)
    assert methods.lisa_backend("flex-lisa") == "flex" and methods.lisa_backend("lisa-fft") == "fft"
    assert methods.is_lisa("flex-lisa") and not methods.is_lisa("flex-rpb")
    assert methods.position_params(_flex_case("flex-lisa")) == ["rpe"]
    assert methods.position_params(_flex_case("flex-rpb")) == ["table"]


@pytest.mark.parametrize("grid", [(5,), (3, 4), (2, 3, 2)])
def test_rpb_token_index_gives_the_relative_index(grid):
    """flex-rpb's per-token index: lin[i] - lin[j] + center is the dense relative index of every grid pair, and the
    extra tokens (first) have lin 0."""
    lin = methods.rpb_token_index(grid, 2, "cpu")
    assert lin.dtype == torch.int32 and lin.shape == (2 + math.prod(grid),) and lin[:2].tolist() == [0, 0]
    center = math.prod(2 * s - 1 for s in grid) // 2
    g = lin[2:].long()
    assert torch.equal(g[:, None] - g[None, :] + center, offsets_table_index(grid))


def test_flex_rpb_is_softmax_with_the_gathered_bias_extra_tokens_unbiased():
    """flex-rpb's forward (compiled FlexAttention on the CPU) against SDPA with the dense bias of the same table
    (dense-bias's gather), extended by zero rows and columns for one extra token."""
    gen = torch.Generator().manual_seed(2)
    grid, E, H, D = (3, 4), 1, 2, 8
    N = E + math.prod(grid)
    q, k, v = (torch.randn(2, H, N, D, generator=gen) for _ in range(3))
    table = 0.5 * torch.randn(H, 5 * 7, generator=gen)
    got = methods.flex_rpb_attention(q, k, v, table, methods.rpb_token_index(grid, E, "cpu"), num_extra=E)
    bias = torch.zeros(H, N, N)
    bias[:, E:, E:] = table[:, methods.relative_index(grid, "cpu")]
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    without_extra = methods.dense_bias_attention(q[:, :, E:], k[:, :, E:], v[:, :, E:], table,
                                                 methods.relative_index(grid, "cpu"))
    assert not torch.allclose(got[:, :, E:], without_extra, atol=1e-3)     # the extra token is attended to


def test_flex_methods_forward_is_their_operator():
    """The timed forward of each peer on its inputs: flex-lisa is lisa_attention's reference operator (rpe the
    method's input), flex-rpb is dense-bias with the same table."""
    for method in ("flex-lisa", "flex-rpb"):
        case = _flex_case(method)
        x = methods.make_inputs(case)
        got = methods.forward(case, x)
        if method == "flex-lisa":
            want = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=case.grid, backend="reference")
        else:
            assert x["table"].shape == (case.H, 5 * 7) and x["lin"].dtype == torch.int32
            want = methods.dense_bias_attention(x["q"], x["k"], x["v"], x["table"], methods.relative_index(case.grid,
                                                                                                           "cpu"))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_flex_methods_cannot_train_on_the_cpu_and_say_why(tmp_path):
    for method in ("flex-lisa", "flex-rpb"):
        assert methods.cannot_run_reason(_flex_case(method)) is None
        for mode in ("bwd", "fwd+bwd"):
            reason = methods.cannot_run_reason(_flex_case(method, mode))
            assert reason and "no backward on the CPU" in reason, (method, mode, reason)
        assert "float64" in methods.cannot_run_reason(_flex_case(method, dtype="float64"))
    # the sweep records it as skipped, nothing run
    args = benchmark.parse_args(["--device", "cpu", "--cases", "3x4:8:fwd+bwd", "--methods", "flex-lisa", "flex-rpb",
                                 "--in-process", "--out", str(tmp_path / "x.json")])
    for case in methods.build_cases(args)[1:]:
        rec = harness.run_case(case, [], args)
        assert rec["status"] == "skipped" and "no backward on the CPU" in rec["reason"], rec


def test_flex_lisa_on_a_library_without_backend_flex(monkeypatch):
    """compare.py times git refs whose lisa_kernels predates backend "flex": flex-lisa is still a method, with a
    reason, and no lisa-flex appears."""
    monkeypatch.setattr(methods, "LISA_FORMS", {n: f for n, f in methods.LISA_FORMS.items() if n != "flex"})
    for mode in ("fwd", "fwd+bwd"):
        assert methods.cannot_run_reason(_flex_case("flex-lisa", mode)) == \
            "this lisa_kernels has no backend 'flex' (FlexAttention)"


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
        assert r["wall_s"] >= 0
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


def test_gpu_peak_memory_leaves_out_the_autotuning(monkeypatch):
    """measure_cuda on a mocked torch.cuda allocator: the first call autotunes and allocates Triton's 256 MiB
    benchmarking scratch; the peak reported is that of a later call alone (it counted the scratch before)."""
    alloc = {"now": 0, "peak": 0}
    calls = []

    def call(i):
        extra = 256 * harness.MIB if not calls else 0            # the first call: autotuning's scratch
        calls.append(i)
        alloc["peak"] = max(alloc["peak"], alloc["now"] + extra + 3 * harness.MIB)

    def reset():
        alloc["peak"] = alloc["now"]

    monkeypatch.setattr(harness, "make_inputs", lambda case, i: None)
    monkeypatch.setattr(harness, "make_call", lambda case, sets: call)
    monkeypatch.setattr(harness, "time_calls_cuda", lambda c, case: [c(i) or 1e-3 for i in range(3)])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: alloc["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: alloc["peak"])
    case = methods.Case(grid=(4, 4), D=8, dtype="bfloat16", mode="fwd", method="lisa-triton", B=1, H=2,
                        device="cuda", repeats=3, warmup=1, min_time=0.0, rotate=1, seed=3)
    result = harness.measure_cuda(case)
    assert len(calls) == 4 and result["times_s"] == [1e-3] * 3
    assert result["peak_mib"] == 3


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


# ------------------------------------------------------------------------- the default set and --full

def _points(cases):
    return {(c.grid_label, c.D, c.mode) for c in cases}


def _methods_at(cases, grid_label, mode):
    return {c.method for c in cases if (c.grid_label, c.mode) == (grid_label, mode)}


def test_default_set_is_vit_sizes_and_a_large_fft_grid_in_a_budget():
    args = benchmark.parse_args(["--device", "cpu"])
    assert (args.sweep, args.budget_seconds, args.dtypes) == ("default", benchmark.DEFAULT_BUDGET_SECONDS, ["float32"])
    assert args.budget_seconds <= 280                     # with the check, imports and reports: under 5 minutes
    cases = methods.build_cases(args)
    assert _points(cases) == {(g, D, m) for g, D in (("14x14", 64), ("32x32", 64), ("64x64", 32), ("128x128", 32))
                              for m in ("fwd", "fwd+bwd")}
    every = set(benchmark.CPU_DEFAULT_METHODS)
    for grid in ("14x14", "32x32"):
        assert _methods_at(cases, grid, "fwd") == _methods_at(cases, grid, "fwd+bwd") == every
    assert _methods_at(cases, "128x128", "fwd") == every - {"dense-bias"}
    assert _methods_at(cases, "128x128", "fwd+bwd") == every - {"dense-bias", "lisa-direct"}
    assert cases[0].method == "sdpa" and cases[-1].grid_label == "128x128"      # baseline first, largest last
    assert len(cases) == 43
    # --modes picks the default set's points of those modes
    only_fwd = methods.build_cases(benchmark.parse_args(["--device", "cpu", "--modes", "fwd"]))
    assert _points(only_fwd) == {p for p in _points(cases) if p[2] == "fwd"}


def test_default_set_is_the_one_documented():
    """benchmarks/README.md lists the default set's points and budget as benchmark.py has them."""
    with open(os.path.join(BENCH_DIR, "README.md")) as f:
        readme = f.read()
    for point in benchmark.DEFAULT_CASES:
        assert f"`{point}`" in readme, point
    assert f"{benchmark.DEFAULT_BUDGET_SECONDS:g} s" in readme
    for grid in benchmark.FULL_GRIDS:
        assert grid in readme


def test_full_is_the_whole_sweep_and_explicit_grids_have_no_budget():
    args = benchmark.parse_args(["--device", "cpu", "--full"])
    cases = methods.build_cases(args)
    assert (args.sweep, args.budget_seconds) == ("full", 0.0)
    assert _points(cases) == {(g, D, m) for g in benchmark.FULL_GRIDS for D in benchmark.FULL_DIMS
                              for m in ("fwd", "fwd+bwd")}
    assert len(cases) == len(benchmark.FULL_GRIDS) * len(benchmark.FULL_DIMS) * 2 * len(benchmark.CPU_DEFAULT_METHODS)
    custom = benchmark.parse_args(["--device", "cpu", "--grids", "8x8"])
    assert (custom.sweep, custom.budget_seconds, custom.dims) == ("custom", 0.0, list(benchmark.FULL_DIMS))
    quick = benchmark.parse_args(["--device", "cpu", "--quick"])
    assert quick.sweep == "quick" and _points(methods.build_cases(quick)) == {
        (g, 32, m) for g in benchmark.QUICK_GRIDS for m in ("fwd", "fwd+bwd")}
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--device", "cpu", "--full", "--quick"])


def test_default_file_names(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "RESULTS_DIR", str(tmp_path))
    today = time.strftime("%Y-%m-%d")
    assert benchmark.default_out("cpu", "default") == str(tmp_path / f"cpu_{today}.json")
    assert benchmark.default_out("cuda:0", "full") == str(tmp_path / f"cuda_{today}_full.json")
    assert benchmark.default_out("cpu", "quick") == str(tmp_path / f"cpu_{today}_quick.json")
    (tmp_path / f"cpu_{today}.json").write_text("{}")
    assert benchmark.default_out("cpu", "default") == str(tmp_path / f"cpu_{today}_2.json")


def test_run_checks_then_passes_its_arguments_and_start_on(monkeypatch):
    calls = []
    monkeypatch.setattr(run, "correctness_check", lambda: calls.append("check") or True)
    monkeypatch.setattr(benchmark, "main", lambda argv, started=None: calls.append((argv, started)) or 0)
    assert run.main(["--full", "--no-plot"]) == 0
    assert calls == ["check", (["--full", "--no-plot"], run.STARTED)]
    calls.clear()
    assert run.main(["--check-only"]) == 0 and calls == ["check"]
    monkeypatch.setattr(run, "correctness_check", lambda: False)
    assert run.main([]) == 1


# ------------------------------------------------------------------- estimates, time left and budget

def _case(**kw):
    base = dict(grid=(8, 8), D=8, dtype="float32", mode="fwd", method="sdpa", B=1, H=2, device="cpu", repeats=3,
                warmup=1, min_time=0.5, rotate=2, seed=0)
    return methods.Case(**{**base, **kw})


def _record(case, ms, status="ok", estimate_s=None, source=None, wall_s=1.0):
    return {"method": case.method, "dtype": case.dtype, "D": case.D, "mode": case.mode, "grid": list(case.grid),
            "grid_label": case.grid_label, "N": case.N, "status": status, "median_ms": ms, "estimate_s": estimate_s,
            "estimate_source": source, "wall_s": wall_s}


def test_baseline_estimates_extrapolate_over_grids_then_scale_by_flops():
    small = _case()
    seen = [_record(small, 10.0)]
    est, source = harness.estimate(_case(grid=(16, 16)), seen)
    assert est == pytest.approx(0.010 * 16) and source == "N^2 extrapolation from 8x8"
    est, source = harness.estimate(_case(mode="fwd+bwd"), seen)           # same grid, other mode: FLOP model
    assert est == pytest.approx(0.010 * 3.5) and source.startswith("FLOP-model scaling from 8x8 D=8 fwd")
    assert harness.estimate(_case(method="linear"), seen) == (None, "first grid: not estimated")


def test_clock_predicts_a_case_from_its_estimate_and_the_cases_so_far():
    clock = harness.Clock(time.perf_counter())
    case = _case(method="lisa-direct")
    assert clock.calls_seconds(case, 0.001) == pytest.approx(0.001 * 2 + 0.5)      # warm-up + memory call; min-time
    assert clock.calls_seconds(case, 1.0) == pytest.approx(1.0 * 2 + 3.0)          # warm-up + memory call; 3 repeats
    assert clock.case_seconds(case, 1.0, harness.MODEL_SOURCE) == pytest.approx(0.5 + 5.0)   # overhead 0.5 s first
    # measured 2x slower than the model, with 1 s of overhead: both are taken in
    clock.learn(case, _record(case, 2000.0, estimate_s=1.0, source=harness.MODEL_SOURCE, wall_s=11.0))
    assert clock.model_factor("direct") == pytest.approx(2.0)
    assert clock.model_factor("fft") == pytest.approx(2.0)                          # no fft case yet: all backends
    assert clock.case_seconds(case, 1.0, harness.MODEL_SOURCE) == pytest.approx(1.0 + 10.0)
    assert clock.case_seconds(_case(), 1.0, "N^2 extrapolation from 4x4") == pytest.approx(1.0 + 5.0)


def test_time_left_follows_the_estimates_and_leaves_out_skips():
    clock = harness.Clock(time.perf_counter())
    seen = [_record(_case(), 10.0)]
    left = [_case(grid=(16, 16)), _case(grid=(64, 64))]
    expected = clock.case_seconds(left[0], 0.16, "") + clock.case_seconds(left[1], 0.16 * 256, "")
    assert clock.time_left(left, seen, max_seconds=100.0) == pytest.approx(expected)
    # the 64x64 case (est. 41 s per call) is over --max-seconds 10, so it will be skipped and counts nothing
    assert clock.time_left(left, seen, max_seconds=10.0) == pytest.approx(clock.case_seconds(left[0], 0.16, ""))
    budgeted = harness.Clock(time.perf_counter() - 95.0, budget=100.0)
    assert budgeted.time_left(left, seen, max_seconds=100.0) <= 5.0                # capped by the budget left


def test_a_case_that_would_end_past_the_budget_is_skipped():
    args = benchmark.parse_args(["--device", "cpu", "--cases", "4x4:4:fwd", "--in-process"])
    case = methods.build_cases(args)[0]
    late = harness.Clock(time.perf_counter() - 100.0, budget=100.5)     # 0.5 s left; the case needs about 1 s
    rec = harness.run_case(case, [], args, late)
    assert rec["status"] == "skipped" and rec["reason"].startswith("over the time budget: predicted")
    assert "over the time budget" in harness.progress_line(1, 1, case, rec, "sdpa")
    assert "| over the time budget |" in reports.markdown_table([rec], {
        "baseline": "sdpa", "device_name": "cpu", "device": "cpu", "cores": 2, "torch": "", "triton": "",
        "cuda": "", "B": 1, "H": 1, "repeats": 1, "warmup": 0, "date": "2026-01-01", "git_commit": None,
        "dtypes": ["float32"], "modes": ["fwd"]})
    on_time = harness.Clock(time.perf_counter(), budget=100.0)
    assert harness.run_case(case, [], args, on_time)["status"] == "ok"


def test_a_case_still_running_at_the_budget_is_stopped(monkeypatch):
    """A case predicted to fit but running on (here 30 s of --min-time) is stopped when the budget runs out."""
    args = benchmark.parse_args(["--device", "cpu", "--cases", "64x64:16:fwd", "--methods", "sdpa", "--min-time", "30"])
    case = methods.build_cases(args)[0]
    monkeypatch.setattr(harness.Clock, "case_seconds", lambda self, case, est, source: 0.0)
    clock = harness.Clock(time.perf_counter() - 98.0, budget=100.0)             # 2 s left
    rec = harness.run_case(case, [], args, clock)
    assert rec["status"] == "skipped" and rec["reason"].startswith("over the time budget: stopped after"), rec
    assert rec["wall_s"] < 15


def test_sweep_prints_the_time_left_and_honours_the_budget(tmp_path, capsys):
    argv = ["--device", "cpu", "--cases", "3x3:4:fwd", "4x4:4:fwd", "--methods", "sdpa", "linear", "--repeats", "1",
            "--min-time", "0", "--in-process", "--no-plot", "--out", str(tmp_path / "a.json")]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^about \d+ s by the estimates$", out, re.M)
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    for line in lines[:-1]:
        assert re.search(r"\| [0-9.]+ s, ~\d+ s left$", line), line
    assert re.search(r"\| [0-9.]+ s$", lines[-1]) and "[4/4]" in lines[-1]
    # started long ago with a budget nearly spent: every case is recorded as over the budget, none runs
    argv[-1] = str(tmp_path / "b.json")
    assert benchmark.main(argv + ["--budget-seconds", "1000"], started=time.perf_counter() - 999.9) == 0
    data = json.load(open(tmp_path / "b.json"))
    assert data["meta"]["budget_seconds"] == 1000 and data["meta"]["sweep"] == "custom"
    assert {r["status"] for r in data["records"]} == {"skipped"}
    assert all(r["reason"].startswith("over the time budget") for r in data["records"])


def test_duration_text():
    assert [reports.duration_text(s) for s in (0.4, 45, 60, 185, 3725)] == ["0 s", "45 s", "1 min 00 s",
                                                                             "3 min 05 s", "1 h 02 min"]

