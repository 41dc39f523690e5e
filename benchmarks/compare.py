"""Compare two benchmark runs, or benchmark two git refs of lisa_kernels with the same harness: a regression check.

    python benchmarks/compare.py OLD.json NEW.json                  # two saved runs of benchmark.py
    python benchmarks/compare.py --refs main . -- --quick           # ref main against this checkout, as it is
    python benchmarks/compare.py --refs v0.1.0 HEAD --build -- --grids 64x64 --dims 64 --methods lisa-auto

For every case measured in both runs (same grid, D, dtype, mode and method) it prints the time ratio
new / old of the medians and of the minima. A case is a **regression** when both ratios exceed
``--threshold`` (default 1.15: a median alone moves with noise, a minimum alone with luck), an
**improvement** when both are below 1 / threshold. Exit code 1 if any case regressed (unless --no-fail).

With ``--refs OLD NEW``, each ref is checked out into a temporary ``git worktree`` (``.`` means this checkout
with its uncommitted changes) and timed by *this* checkout's ``benchmarks/benchmark.py``, told by the
environment variable ``LISA_BENCH_LIBRARY_ROOT`` to import that worktree's ``lisa_kernels``: the harness is the
same on both sides, only the library differs. Worktrees have no compiled extension unless ``--build`` runs
``python setup.py build_ext --inplace`` in them; without it, ``lisa-cuda`` is skipped there. Everything after
``--`` goes to benchmark.py (its ``--out`` is set here). The two runs are saved under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

Key = Tuple[str, int, str, str, str]


def load(path: str) -> Tuple[Dict, Dict[Key, Dict]]:
    """(meta, {(grid, D, dtype, mode, method): record}) of a benchmark.py JSON file, measured cases only."""
    with open(path) as f:
        data = json.load(f)
    records = {}
    for r in data["records"]:
        if r.get("status") == "ok":
            records[(r["grid_label"], r["D"], r.get("dtype", data["meta"].get("dtype")), r["mode"], r["method"])] = r
    return data["meta"], records


def compare(old: Dict[Key, Dict], new: Dict[Key, Dict], threshold: float) -> List[Dict]:
    """One row per case measured in both: the median and minimum ratios new / old and a verdict."""
    rows = []
    for key in sorted(set(old) & set(new), key=lambda k: (old[k]["N"], k)):
        a, b = old[key], new[key]
        median, minimum = b["median_ms"] / a["median_ms"], b["min_ms"] / a["min_ms"]
        verdict = "regression" if min(median, minimum) > threshold else \
            "improvement" if max(median, minimum) < 1 / threshold else "same"
        rows.append({"grid": key[0], "D": key[1], "dtype": key[2], "mode": key[3], "method": key[4],
                     "old_ms": a["median_ms"], "new_ms": b["median_ms"], "ratio_median": median,
                     "ratio_min": minimum, "verdict": verdict,
                     "backends": f"{a['backend']} -> {b['backend']}" if a["backend"] != b["backend"] else a["backend"]})
    return rows


def table(rows: Sequence[Dict], old_name: str, new_name: str, threshold: float) -> str:
    lines = [f"new = {new_name}, old = {old_name}; regression: median and min ratios both > {threshold:g}", "",
             "| grid | D | dtype | mode | method (backend) | old ms | new ms | new/old median | new/old min | verdict |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        mark = f"**{r['verdict']}**" if r["verdict"] == "regression" else r["verdict"]
        lines.append(f"| {r['grid']} | {r['D']} | {r['dtype']} | {r['mode']} | {r['method']} ({r['backends']}) | "
                     f"{r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['ratio_median']:.2f} | {r['ratio_min']:.2f} | "
                     f"{mark} |")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("regression", "improvement", "same")}
    lines += ["", f"{len(rows)} cases compared: " + ", ".join(f"{n} {v}" for v, n in counts.items())]
    return "\n".join(lines) + "\n"


def git(*args: str, cwd: str = REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def worktree_path(work: str, ref: str) -> str:
    return os.path.join(work, re.sub(r"[^A-Za-z0-9._-]", "_", ref))


def run_ref(ref: str, bench_args: Sequence[str], out_json: str, work: str, build: bool) -> None:
    """Time lisa_kernels as of ``ref`` ("." = this checkout) with this checkout's benchmark.py."""
    root = REPO_ROOT
    if ref != ".":
        root = worktree_path(work, ref)
        git("worktree", "add", "--detach", root, git("rev-parse", "--verify", f"{ref}^{{commit}}"))
        if build:
            subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root, check=True)
    env = dict(os.environ, LISA_BENCH_LIBRARY_ROOT=root)
    print(f"== {ref}: lisa_kernels at commit {git('rev-parse', '--short', 'HEAD', cwd=root)}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "benchmark.py"), *bench_args, "--out", out_json],
                   env=env, check=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", metavar="RUN.json", help="two benchmark.py JSON files: old, then new")
    ap.add_argument("--refs", nargs=2, metavar=("OLD", "NEW"), help="two git refs to benchmark ('.' = this checkout)")
    ap.add_argument("--build", action="store_true", help="build the C++/CUDA extension in each ref's worktree")
    ap.add_argument("--threshold", type=float, default=1.15, help="regression threshold on new/old [default: 1.15]")
    ap.add_argument("--out-dir", help="where the --refs runs and the comparison are saved [default: a temp dir]")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even if a case regressed")
    args = ap.parse_args(argv)
    if bool(args.refs) == bool(args.runs) or (args.runs and len(args.runs) != 2):
        ap.error("give either two JSON files or --refs OLD NEW")
    if args.threshold <= 1:
        ap.error(f"--threshold must be above 1, got {args.threshold}")

    if args.refs:
        out_dir = args.out_dir or tempfile.mkdtemp(prefix="lisa_compare_")
        os.makedirs(out_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="lisa_worktrees_")
        paths = [os.path.join(out_dir, f"{side}.json") for side in ("old", "new")]
        try:
            for ref, path in zip(args.refs, paths):
                run_ref(ref, bench_args, path, work, args.build)
        finally:
            for ref in args.refs:
                root = worktree_path(work, ref)
                if ref != "." and os.path.isdir(root):
                    git("worktree", "remove", "--force", root)
            shutil.rmtree(work, ignore_errors=True)
        names = [f"{ref} ({(load(p)[0].get('git_commit') or '?')[:10]})" for ref, p in zip(args.refs, paths)]
    else:
        paths, out_dir = args.runs, args.out_dir
        names = [os.path.basename(p) for p in paths]

    (_, old), (_, new) = load(paths[0]), load(paths[1])
    rows = compare(old, new, args.threshold)
    text = table(rows, names[0], names[1], args.threshold)
    print("\n" + text)
    if out_dir:
        with open(os.path.join(out_dir, "comparison.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, "comparison.json"), "w") as f:
            json.dump({"old": names[0], "new": names[1], "threshold": args.threshold, "rows": rows}, f, indent=1)
        print(f"wrote {os.path.join(out_dir, 'comparison.md')} and comparison.json")
    if not rows:
        print("no case was measured in both runs")
        return 1
    regressed = any(r["verdict"] == "regression" for r in rows)
    return 1 if regressed and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
