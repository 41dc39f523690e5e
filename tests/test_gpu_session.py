"""benchmarks/gpu_session.sh --dry-run: the GPU session's stages on the CPU (Triton's interpreter, tiny sizes,
caps scaled down), so that the script a GPU session runs in one command cannot break unseen."""

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "check", "build", "check-cuda", "memcheck", "overhead", "timing-d64-a", "timing-d64-b", "fit")


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
    for name in ("env.json", "check.jsonl", "overhead_cpu.json", "timing_d64_a.json", "fit.log", "memcheck.log"):
        assert name in names, sorted(names)
    tail = proc.stdout.strip().splitlines()[-6:]
    assert any(line.startswith("Targets") for line in tail), tail
    assert any(line.startswith("3x3") for line in tail), tail
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
    # the dry run simulates an H100 (lisa_kernels.testing.fake_gpu): the triton checks autotuned over its candidates
    tuned = [r for r in records if r["backend"] == "triton" and r["status"] == "ok"]
    assert tuned and all(r["autotunings"] >= 4 and r["compiles"] >= r["autotunings"] for r in tuned), tuned
    assert {r["status"] for r in records if r["backend"] == "cuda"} <= {"skip", "ok"}
