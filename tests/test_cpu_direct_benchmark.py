"""benchmarks/cpu_direct.py, the same-run comparison of lisa-auto with SDPA on the CPU: a tiny run writes its
JSON and Markdown, with a ratio for every (case, mode) and a target entry for each."""

import json
import os
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import cpu_direct  # noqa: E402


def test_tiny_run_writes_json_and_markdown(tmp_path):
    stem = str(tmp_path / "run")
    data = cpu_direct.main(["--cases", "3x4:2", "2x2:1", "--dim", "8", "--heads", "2", "--repeats", "5",
                            "--warmup", "1", "--threads", "1", "--methods", "lisa-auto", "lisa-direct",
                            "--out", stem])
    with open(stem + ".json") as f:
        saved = json.load(f)
    assert saved["records"] == json.loads(json.dumps(data["records"]))
    got = {(r["grid"], r["mode"], r["method"]) for r in saved["records"]}
    assert got == {(g, mode, m) for g in ("3x4", "2x2") for mode in ("fwd", "fwd+bwd")
                   for m in ("sdpa", "lisa-auto", "lisa-direct")}
    for r in saved["records"]:
        assert r["median_ms"] > 0 and r["ratio_sdpa"] > 0 and r["repeats"] == 5 and r["N"] == 1 + (12 if r["grid"] == "3x4" else 4)
    assert len(saved["targets"]) == 4 and all(t["limit"] in (1.2, 1.5) for t in saved["targets"].values())
    meta = saved["meta"]
    assert meta["torch_threads"] == 1 and meta["num_extra"] == 1 and "built" in meta["extension"]
    with open(stem + ".md") as f:
        text = f.read()
    assert "| 3x4 | 2 | 13 | fwd | lisa-auto | direct |" in text
    assert cpu_direct.default_stem().startswith(os.path.join(cpu_direct.RESULTS_DIR, "direct_vs_sdpa_cpu_"))


def test_flex_lisa_column_and_its_target(tmp_path):
    """With flex-lisa (the FlexAttention peer): its forward is timed in the same rounds, every timed record gets its
    ratio to it, auto's forward at B = 8 gets the 0.6x target, and its forward+backward is recorded as skipped (no
    CPU backward) rather than failing the run."""
    stem = str(tmp_path / "run")
    data = cpu_direct.main(["--cases", "3x4:8", "--dim", "8", "--heads", "2", "--repeats", "5", "--warmup", "1",
                            "--threads", "1", "--methods", "lisa-auto", "flex-lisa", "--out", stem])
    recs = {(r["mode"], r["method"]): r for r in data["records"]}
    for m in ("sdpa", "lisa-auto", "flex-lisa"):
        assert recs[("fwd", m)]["status"] == "ok" and recs[("fwd", m)]["ratio_flex_lisa"] > 0
    assert recs[("fwd", "flex-lisa")]["ratio_flex_lisa"] == 1.0
    skipped = recs[("fwd+bwd", "flex-lisa")]
    assert skipped["status"] == "skipped" and "no backward on the CPU" in skipped["reason"]
    assert recs[("fwd+bwd", "lisa-auto")]["status"] == "ok" and "ratio_flex_lisa" not in recs[("fwd+bwd", "lisa-auto")]
    target = data["targets"]["3x4_B8_fwd_at_most_0.6x_flex-lisa"]
    assert target["limit"] == 0.6 and target["ratio"] == recs[("fwd", "lisa-auto")]["ratio_flex_lisa"]
    with open(stem + ".md") as f:
        text = f.read()
    assert "| 3x4 | 8 | 13 | fwd+bwd | flex-lisa |  | cannot run: FlexAttention has no backward" in text
    assert all(line.count("|") == 13 for line in text.splitlines() if line.startswith("| 3x4 "))
