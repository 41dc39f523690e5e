"""benchmarks/gpu_session.sh --dry-run: the GPU session's stages on the CPU (Triton's interpreter, tiny sizes,
caps scaled down), so that the script a GPU session runs in one command cannot break unseen."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "plan", "check", "check-flex", "build", "check-cuda", "memcheck", "check-aoti", "overhead",
          "timing-d64-a", "timing-d64-b", "fit")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session_out")
    work = tmp_path_factory.mktemp("gpu_session_work")
    env = {**os.environ, "OUT": str(out), "LISA_SESSION_WORK": str(work), "PYTHON": sys.executable,
           "PYTHONPATH": ROOT,
           "LISA_SESSION_SECONDS": "400"}   # the script's own budget (170 s) is for a quiet machine; CI's is shared
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=420)
    return proc, out, work, time.perf_counter() - t0


def _stage_table(text):
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in STAGES and parts[2].endswith("s"):
            rows[parts[0]] = parts[1]
    return rows


def test_dry_run_runs_every_stage(dry_run):
    proc, out, work, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _stage_table(proc.stdout)
    assert set(rows) == set(STAGES), proc.stdout[-3000:]
    for name, verdict in rows.items():
        # the fit's own check (auto's choice within 1.2x of the fastest) may fail on two tiny CPU points
        assert verdict == "ok" or (name == "fit" and verdict == "rc=1"), (name, verdict, proc.stdout[-3000:])
    assert seconds < 300


def test_dry_run_brings_back_few_files_and_ends_with_the_targets(dry_run):
    proc, out, work, _ = dry_run
    assert sorted(os.listdir(out)) == ["gpu_session.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    for name in ("env.json", "plan.json", "check.jsonl", "overhead_cpu.json", "timing_d64_a.json", "fit.log",
                 "memcheck.log", "warm.log"):
        assert name in names, sorted(names)
    lines = proc.stdout.strip().splitlines()
    tail = lines[max(i for i, line in enumerate(lines) if line.startswith("=== stages")):]   # what it prints last
    targets = [i for i, line in enumerate(tail) if line.startswith("Targets")]
    assert targets and any(line.startswith("3x3") for line in tail[targets[0]:]), tail
    assert any(line.startswith("Predicted") for line in tail[targets[0]:]), tail
    with open(out / "summary.txt") as f:
        summary = f.read()
    assert "Targets" in summary and "check" in summary


def test_dry_run_correctness_stage_checked_the_triton_backends(dry_run):
    _, _, work, _ = dry_run
    with open(work / "check.jsonl") as f:
        records = [json.loads(line) for line in f]
    ran = {(r["backend"], r["dtype"]) for r in records if r["status"] == "ok"}
    for backend in ("triton", "triton-fft"):
        for dtype in ("float32", "float16", "bfloat16"):
            assert (backend, dtype) in ran, sorted(ran)
    assert not [r for r in records if r["status"] == "FAIL"]
    # check-aoti (the dry run: the exported model against eager, without Inductor)
    assert [r["case"] for r in records if r["backend"] == "aoti" and r["status"] == "ok"] == ["export"]
    # the dry run simulates an H100 (lisa_kernels.testing.fake_gpu): the triton checks autotuned over its candidates
    tuned = [r for r in records if r["backend"] == "triton" and r["status"] == "ok"]
    assert tuned and all(r["autotunings"] >= 4 and r["compiles"] >= r["autotunings"] for r in tuned), tuned
    assert {r["status"] for r in records if r["backend"] == "cuda"} <= {"skip", "ok"}
    # check-flex: flex against the reference and against triton on the same inputs (the dry run: the forward alone,
    # FlexAttention has no CPU backward)
    flex = [r for r in records if r["backend"] == "flex"]
    assert flex and all(r["status"] == "ok" and r["against"] == "triton" and "worst_vs" in r for r in flex), flex


def test_dry_run_timed_the_flexattention_peers(dry_run):
    """The second dry timing stage times flex-rpb's forward (compiled by check-flex beforehand) and records the
    forward+backward as skipped, FlexAttention having no CPU backward; flex-lisa too (or, where the library timed
    is an installed one without backend flex, says so)."""
    proc, _, work, _ = dry_run
    with open(work / "timing_d64_b.json") as f:
        records = {(r["method"], r["mode"]): r for r in json.load(f)["records"]}
    assert records[("flex-rpb", "fwd")]["status"] == "ok", records[("flex-rpb", "fwd")]
    for method in ("flex-rpb", "flex-lisa"):
        r = records[(method, "fwd+bwd")]
        assert r["status"] == "skipped" and ("no backward on the CPU" in r["reason"]
                                             or "no backend 'flex'" in r["reason"]), r
    lisa = records[("flex-lisa", "fwd")]
    assert lisa["status"] == "ok" or "no backend 'flex'" in lisa["reason"], lisa
    with open(work / "check-flex.log") as f:
        log = f.read()
    assert "warm: compiled" in log and "0 failed" in log, log[-2000:]
    assert "Targets: lisa-triton vs flex-lisa" in proc.stdout


def _plan(work):
    with open(work / "plan.json") as f:
        return json.load(f)


def test_plan_counts_the_gpu_runs_triton_work_and_fits_the_budget(dry_run):
    """gpu_check.py plan (the dry run's plan stage): the GPU run's stages, from gpu_session.sh's GPU_STAGES, with
    their Triton compiles and autotunings counted for the real cases (Triton 3.6's candidates), each stage's
    estimate within its cap and the whole run within the 530 s budget, the checks of every backend first."""
    _, _, work, _ = dry_run
    plan = _plan(work)
    rows = {r["stage"]: r for r in plan["stages"]}
    with open(os.path.join(ROOT, "benchmarks", "gpu_session.sh")) as f:
        script = f.read()
    listed = re.search(r"GPU_STAGES=\(([^)]*)\)", script).group(1).split()
    assert [r["stage"] for r in plan["stages"]] == ["env"] + [s.split(":")[0] for s in listed]
    assert {r["stage"]: r["cap_s"] for r in plan["stages"][1:]} == {s.split(":")[0]: int(s.split(":")[1])
                                                                     for s in listed}
    # the triton checks: the real cases' autotune keys and candidates (8 cases x 3 dtypes), and triton-fft's kernels
    check = rows["check"]
    assert check["autotune_keys"] >= 24 and check["candidates_run"] >= 2 * check["autotune_keys"], check
    assert check["compiles_by_kernel"].get("_fwd_kernel", 0) > 0, check
    assert any(k.startswith("lisa_fft_") for k in check["compiles_by_kernel"]), check
    timings = [r for r in plan["stages"] if r["stage"].startswith("timing")]
    assert len(timings) >= 3
    for r in timings:
        assert r["autotune_keys"] > 0 and r["compiles"] + r["cache_hits"] > 0, r
        assert r["auto"], r          # lisa-auto's backend per grid and mode
    # checks of every backend first: triton-fft and triton (check), cuda and direct (check-cuda), then the timings
    order = [r["stage"] for r in plan["stages"]]
    assert max(order.index("check"), order.index("check-cuda")) < min(order.index(r["stage"]) for r in timings)
    assert plan["triton"] == "3.6" and plan["budget_s"] == 530
    assert plan["fits_budget"] and plan["needed_s"] <= plan["budget_s"], plan["needed_s"]
    # every stage runs but D = 128, which runs only if more than 100 s are left (the flex timings took its place)
    skipped = {r["stage"]: r["skipped"] for r in plan["stages"] if r["skipped"]}
    assert set(skipped) <= {"timing-d128"} and set(skipped.values()) <= {"too little time left"}, plan["stages"]
    # check-flex: flex's checks (bf16 and fp32) and the FlexAttention cases of the timing stages that name the peers
    assert rows["check-flex"]["cases"] == 4 and rows["check-flex"]["warm_cases"] >= 8, rows["check-flex"]
    for name in ("timing-d64-a", "timing-d64-b"):
        assert rows[name]["flex_compiles"] >= 4, rows[name]
    assert plan["every_stage_fits_its_cap"], [(r["stage"], r["estimate_s"], r["cap_s"]) for r in plan["stages"]]
    # why the warm-up: the compiles in one process alone would take more than the budget
    assert plan["warm"]["jobs"] > 1 and plan["compile_seconds_one_process"] > plan["budget_s"]


def test_plan_counts_what_the_simulated_gpu_counted(dry_run):
    """The plan's static count (no kernel run) of the dry run's own check stage equals what its simulated H100
    recorded while running it (check.jsonl): autotune keys, candidates compiled, candidates timed."""
    _, _, work, _ = dry_run
    with open(work / "check.jsonl") as f:
        records = [json.loads(line) for line in f]
    simulated = {k: sum(r[k] for r in records if r["backend"] == "triton" and r["status"] == "ok")
                 for k in ("autotunings", "compiles", "candidates_run")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "plan", "--tiny",
                           "--backends", "triton", "--dtypes", "bfloat16", "float16", "float32"],
                          env={**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counted = json.loads(proc.stdout.strip().splitlines()[-1])
    assert simulated["autotunings"] > 0
    assert {k: counted[k] for k in simulated} == simulated


def test_dry_run_warm_up_compiled_for_the_gpu_and_timing_simulated_it(dry_run):
    """The warm-up's mechanics (a background job, one real sm_90a compile into the session's Triton cache), and the
    first timing stage under the simulated H100 (benchmark.py --fake-gpu): lisa-auto ran triton, autotuned."""
    _, _, work, _ = dry_run
    with open(work / "warm.rc") as f:
        assert f.read().strip() == "0"
    with open(work / "warm.log") as f:
        log = f.read()
    assert "warm-up done: 1 compiled, 0 failed" in log, log[-2000:]
    assert any(files for _, _, files in os.walk(work / "triton-cache"))
    with open(work / "timing_d64_a.json") as f:
        timing = json.load(f)
    sim = timing["meta"]["simulated_gpu"]
    assert sim["autotunings"] > 0 and sim["candidates_run"] > 0, sim
    auto = [r for r in timing["records"] if r["method"] == "lisa-auto"]
    assert auto and all(r["status"] == "ok" and r["backend"] == "triton" for r in auto), auto
    assert [r for r in timing["records"] if r["method"] == "lisa-triton-fft" and r["status"] == "ok"]


def test_dry_run_wrote_the_predicted_against_measured_table(dry_run):
    """benchmarks/predict.py ran after the timings: it found a committed kernel report of the installed Triton that
    holds sm_90a, and its table is in summary.txt (the dry run's timings are float32 at head dim 8, which the
    report does not cover: the arithmetic is tested below)."""
    proc, out, work, _ = dry_run
    with open(work / "predicted.json") as f:
        data = json.load(f)
    assert data["device"]["arch"] == "sm_90a" and data["report"].startswith("kernel_report_"), data
    with open(out / "summary.txt") as f:
        assert "Predicted (the report's bf16 bound" in f.read()


def _report_record(pas, name, bound, issue, D=64, stack=0, config="c0", index=0):
    return {"arch": "sm_90a", "dtype": "bfloat16", "D": D, "M": 1, "grid": [32, 32], "E": 0, "causal": False,
            "boundary": "zero", "pass": pas, "name": name, "config": config, "config_index": index,
            "issue_cycles_per_1k_pairs": issue, "tensor_cycles_per_1k_pairs": bound,
            "bound_cycles_per_1k_pairs": bound, "atomic_cycles_per_1k_pairs": 0.0, "stack_bytes": stack,
            "spills": stack > 0, "wgmma_serialized": ""}


def _timing(method, backend, mode, ms, dtype="bfloat16"):
    return {"grid": [32, 32], "N": 1024, "D": 64, "B": 4, "H": 8, "dtype": dtype, "mode": mode, "method": method,
            "backend": backend, "status": "ok", "median_ms": ms}


def test_predicted_is_the_bound_at_the_gpus_clock(tmp_path):
    """predict.py: per pass, predicted = the pass's bound (the sum of its kernels' lowest spill-free bounds; the
    yardstick's for FlashAttention) x B H N^2 / 1000 / (SMs x clock), measured backward = fwd+bwd - fwd; records of
    another dtype, or of lisa-auto where it did not run triton, are left out."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import predict
    report = [_report_record("fwd", "fwd", 70.0, 35.0),
              _report_record("bwd", "bwd_dkv", 120.0, 60.0), _report_record("bwd", "bwd_dkv", 100.0, 50.0, stack=8,
                                                                            config="c1", index=1),
              _report_record("bwd", "bwd_dq", 60.0, 40.0), _report_record("bwd", "bwd_walk", 64.0, 30.0),
              _report_record("yardstick-fwd", "fa2_fwd", 75.0, 75.0),
              _report_record("yardstick-bwd", "fa2_dkdv", 125.0, 70.0),
              _report_record("yardstick-bwd", "fa2_dq", 94.0, 56.0)]
    (tmp_path / "report.json").write_text(json.dumps(report))
    timings = [_timing("lisa-triton", "triton", "fwd", 1.0), _timing("lisa-triton", "triton", "fwd+bwd", 3.5),
               _timing("sdpa-flash", "sdpa", "fwd", 0.8), _timing("sdpa-flash", "sdpa", "fwd+bwd", 2.6),
               _timing("lisa-auto", "fft", "fwd", 9.0), _timing("lisa-triton", "triton", "fwd", 5.0, "float32")]
    (tmp_path / "timing.json").write_text(json.dumps({"meta": {}, "records": timings}))
    env = {"gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "multiprocessors": 132, "sm_clock_mhz": 1980.0,
           "triton": "3.6.0"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    assert predict.main([str(tmp_path / "timing.json"), "--env", str(tmp_path / "env.json"), "--report",
                         str(tmp_path / "report.json"), "--json", str(tmp_path / "p.json")]) == 0
    rows = {(r["method"], r["pas"]): r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert set(rows) == {("lisa-triton", "fwd"), ("lisa-triton", "bwd"), ("sdpa-flash", "fwd"), ("sdpa-flash", "bwd")}
    seconds_per_cycle_1k = 4 * 8 * 1024 ** 2 / 1000 / (132 * 1980e6) * 1e3     # ms per (cycle per 1k pairs)
    for key, bound, measured in ((("lisa-triton", "fwd"), 70.0, 1.0), (("lisa-triton", "bwd"), 244.0, 2.5),
                                 (("sdpa-flash", "fwd"), 75.0, 0.8), (("sdpa-flash", "bwd"), 219.0, 1.8)):
        r = rows[key]
        assert r["bound_cycles_per_1k_pairs"] == pytest.approx(bound)
        assert r["predicted_ms"] == pytest.approx(bound * seconds_per_cycle_1k)
        assert r["measured_ms"] == pytest.approx(measured)
        assert r["measured_over_predicted"] == pytest.approx(measured / (bound * seconds_per_cycle_1k))


def test_env_reads_the_max_sm_clock(monkeypatch):
    """gpu_check env's SM clock (what predict.py turns cycles into time at): nvidia-smi's first line, or None where
    nvidia-smi is missing or prints no number."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    def smi(out=None, exc=None):
        def run(*args, **kwargs):
            if exc is not None:
                raise exc
            return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")
        return run
    monkeypatch.setattr(gpu_check.subprocess, "run", smi("1980\n1980\n"))
    assert gpu_check._max_sm_clock_mhz() == 1980.0
    monkeypatch.setattr(gpu_check.subprocess, "run", smi("[N/A]\n"))
    assert gpu_check._max_sm_clock_mhz() is None
    monkeypatch.setattr(gpu_check.subprocess, "run", smi(exc=FileNotFoundError("nvidia-smi")))
    assert gpu_check._max_sm_clock_mhz() is None
