"""What the benchmark writes: the issues' targets, tables, CSV, plots, run metadata and the JSON file.

- ``compute_targets`` / ``targets_text``: the CPU and GPU targets of the issues, read from the records;
- ``markdown_table`` (per (dtype, mode) a speedup table of lisa-auto over the baseline, then every record),
  ``write_csv``, ``plot_times`` (time vs tokens N) and ``plot_speedup`` (baseline / lisa-auto heatmaps);
- ``metadata``: the machine, the versions, the git commit, the options and how time and memory were measured;
- ``finish``: writes ``<stem>.json``, ``.csv``, ``.md``, ``.png`` and ``_speedup.png`` and prints the tables.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from methods import BASELINES, FLOP_FORMULAS, LIBRARY_ROOT, METHOD_HELP, METHODS, MODES, REPO_ROOT, parse_grid

import lisa_kernels  # noqa: E402  (after methods, which puts the lisa_kernels to benchmark on sys.path)


# ------------------------------------------------------------------------------------------- targets

def find(records, method: str, grid_label: str, D: int, mode: str, dtype: Optional[str] = None) -> Optional[Dict]:
    for r in records:
        if (r["method"], r["grid_label"], r["D"], r["mode"], r["status"]) == (method, grid_label, D, mode, "ok") \
                and (dtype is None or r["dtype"] == dtype):
            return r
    return None


def fft_scaling(records, small: str, large: str, dtype: str, limit: float = 5.0) -> Dict:
    """Time ratio of lisa-fft (D=32, fwd) between two grids."""
    a, b = find(records, "lisa-fft", small, 32, "fwd", dtype), find(records, "lisa-fft", large, 32, "fwd", dtype)
    ratio = None if a is None or b is None else b["median_ms"] / a["median_ms"]
    return {"grids": f"{large} / {small}", "tokens_ratio": None if a is None or b is None else b["N"] / a["N"],
            "ratio": ratio, "limit": limit, "met": None if ratio is None else ratio <= limit}


def auto_vs_base(records, grid_label: str, D: int, mode: str, dtype: str, limit: float, what: str = "time",
                 at_most: bool = True) -> Dict:
    """lisa-auto's time (or peak memory) over the baseline's at one point, against a limit."""
    out = {"grid": grid_label, "ratio": None, "limit": limit, "met": None, "backend": None}
    r = find(records, "lisa-auto", grid_label, D, mode, dtype)
    key = "ratio_base" if what == "time" else "memory_ratio_base"
    if r is not None and r.get(key) is not None:
        ratio = r[key] if at_most else 1.0 / r[key]
        out.update(ratio=ratio, met=ratio <= limit if at_most else ratio >= limit, backend=r["backend"])
    return out


def method_vs(records, method: str, other: str, grid_label: str, D: int, mode: str, dtype: str,
              limit: float) -> Dict:
    """One method's median time over another's at one point of the same run, against a limit."""
    a, b = find(records, method, grid_label, D, mode, dtype), find(records, other, grid_label, D, mode, dtype)
    ratio = None if a is None or b is None else a["median_ms"] / b["median_ms"]
    return {"grid": grid_label, "D": D, "mode": mode, "versus": other, "ratio": ratio, "limit": limit,
            "met": None if ratio is None else ratio <= limit}


def compute_targets(records: Sequence[Dict], meta: Dict) -> Dict:
    """Issue 2's CPU targets (float32) and issue 6's GPU targets (bf16, D=64, fwd+bwd), on this run's data."""
    fa_grids = ("14x14", "28x28", "32x32", "56x56", "64x64", "128x128", "256x256")
    return {
        "baseline": meta["baseline"], "device": meta["device_name"],
        "fft_scaling_d32_fwd_float32": [fft_scaling(records, "32x32", "64x64", "float32"),
                                        fft_scaling(records, "64x64", "128x128", "float32"),
                                        fft_scaling(records, "128x128", "256x256", "float32")],
        "fft_speed_float32": [method_vs(records, "lisa-fft", "sdpa", "256x256", 32, "fwd", "float32", 0.4),
                              method_vs(records, "lisa-fft", "lisa-direct", "128x128", 64, "fwd+bwd", "float32", 1.0),
                              method_vs(records, "lisa-fft", "sdpa", "16x64x64", 32, "fwd", "float32", 0.6)],
        "auto_within_3x_base_d64_fwd_float32": [auto_vs_base(records, g, 64, "fwd", "float32", 3.0)
                                                for g in ("32x32", "64x64", "128x128")],
        "auto_within_1x_base_d64_fwdbwd_bf16": [auto_vs_base(records, g, 64, "fwd+bwd", "bfloat16", 1.0)
                                                for g in fa_grids],
        "auto_speedup_2x_d64_fwdbwd_bf16": [auto_vs_base(records, g, 64, "fwd+bwd", "bfloat16", 2.0, at_most=False)
                                            for g in ("256x256", "16x64x64")],
        "auto_memory_within_1.1x_d64_fwdbwd_bf16": [auto_vs_base(records, g, 64, "fwd+bwd", "bfloat16", 1.1,
                                                                 what="memory") for g in fa_grids + ("16x64x64",)],
    }


def targets_text(targets: Dict) -> str:
    def verdict(t):
        return "not measured" if t["ratio"] is None else f"{t['ratio']:.2f} (limit {t['limit']:g}: " \
            f"{'met' if t['met'] else 'NOT met'})"
    base = targets["baseline"]
    lines = [f"Targets (baseline: {base}):"]
    for t in targets["fft_scaling_d32_fwd_float32"]:
        lines.append(f"  lisa-fft time ratio {t['grids']} (D=32, fwd, float32): {verdict(t)}")
    for t in targets.get("fft_speed_float32", []):
        lines.append(f"  lisa-fft / {t['versus']} time at {t['grid']} (D={t['D']}, {t['mode']}, float32): {verdict(t)}")
    titles = {"auto_within_3x_base_d64_fwd_float32": f"lisa-auto / {base} time (D=64, fwd, float32)",
              "auto_within_1x_base_d64_fwdbwd_bf16": f"lisa-auto / {base} time (D=64, fwd+bwd, bf16)",
              "auto_speedup_2x_d64_fwdbwd_bf16": f"{base} / lisa-auto time, at least (D=64, fwd+bwd, bf16)",
              "auto_memory_within_1.1x_d64_fwdbwd_bf16": f"lisa-auto / {base} peak memory (D=64, fwd+bwd, bf16)"}
    for key, title in titles.items():
        if all(t["ratio"] is None for t in targets[key]):
            lines.append(f"  {title}: not measured")
            continue
        for t in targets[key]:
            via = f" via {t['backend']}" if t["backend"] else ""
            lines.append(f"  {title} at {t['grid']}{via}: {verdict(t)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reports

def seconds_text(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"


def duration_text(s: float) -> str:
    """A wall time for people: '45 s', '3 min 05 s', '1 h 02 min'."""
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def library_text() -> str:
    """Which lisa_kernels runs (installed or a checkout) and its compiled extension, in a few words."""
    from lisa_kernels import cuda_fft
    where = "installed" if "site-packages" in lisa_kernels.__file__ else "checkout"
    if not cuda_fft.HAS_EXTENSION:
        ext = "no _C"
    else:
        ext = "_C with CUDA kernels" if cuda_fft.HAS_CUDA_KERNELS else "_C CPU-only"
    return f"lisa_kernels {where}, {ext}"


def title_line(meta: Dict) -> str:
    cores = f", {meta['cores']} cores" if meta["device"] == "cpu" else ""
    lib = f"; {meta['library']}" if meta.get("library") else ""
    return (f"{meta['device_name']}{cores}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}{lib}; "
            f"B={meta['B']}, H={meta['H']}, median of >= {meta['repeats']} calls after {meta['warmup']} warm-up; "
            f"{meta['date'][:10]}, commit {(meta['git_commit'] or '?')[:10]}")


def speedup_grid(records: Sequence[Dict], dtype: str, mode: str) -> Tuple[List[str], List[int], Dict]:
    """Grids (by N), Ds, and {(grid, D): baseline time / lisa-auto time} for one dtype and mode."""
    cells = {}
    for r in records:
        if (r["method"], r["dtype"], r["mode"], r["status"]) == ("lisa-auto", dtype, mode, "ok") \
                and r.get("ratio_base"):
            cells[(r["grid_label"], r["D"])] = 1.0 / r["ratio_base"]
    grids = [g for _, g in sorted({(r["N"], r["grid_label"]) for r in records})]
    dims = sorted({r["D"] for r in records})
    return grids, dims, cells


def summary_tables(records: Sequence[Dict], meta: Dict) -> str:
    """Per (dtype, mode): baseline time / lisa-auto time on each grid and D (> 1: LiSA is faster)."""
    out = []
    for dtype in meta["dtypes"]:
        for mode in meta["modes"]:
            grids, dims, cells = speedup_grid(records, dtype, mode)
            if not cells:
                continue
            out += [f"Speedup of lisa-auto over {meta['baseline']} ({dtype}, {mode}; > 1 means LiSA is faster)", "",
                    "| grid | N | " + " | ".join(f"D={d}" for d in dims) + " |",
                    "| --- | ---: |" + " ---: |" * len(dims)]
            for g in grids:
                n = math.prod(parse_grid(g))
                out.append(f"| {g} | {n} | " + " | ".join(fmt(cells.get((g, d)), ".2f") for d in dims) + " |")
            out.append("")
    return "\n".join(out)


def markdown_table(records: Sequence[Dict], meta: Dict) -> str:
    base = meta["baseline"]
    lines = [f"LiSA vs {base} on {title_line(meta)}", "", summary_tables(records, meta),
             f"| grid | N | D | dtype | mode | method | median ms | x {base} | TFLOP/s | peak MiB |",
             "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        method = f"{r['method']} ({r['backend']})" if r["method"] == "lisa-auto" else r["method"]
        if r["status"] == "ok":
            cells = (fmt(r["median_ms"], ".3f"), fmt(r.get("ratio_base"), ".2f"), fmt(r["tflops"], ".3f"),
                     fmt(r["peak_mib"], ".1f"))
        elif r["status"] == "skipped" and r["reason"].startswith("over the time budget"):
            cells = ("over the time budget", "-", "-", "-")
        elif r["status"] == "skipped" and r["estimate_s"] is not None:
            cells = (f"skipped (est. {seconds_text(r['estimate_s'])})", "-", "-", "-")
        elif r["status"] == "skipped":
            cells = ("cannot run", "-", "-", "-")
        else:
            cells = ("failed", "-", "-", "-")
        lines.append(f"| {r['grid_label']} | {r['N']} | {r['D']} | {r['dtype']} | {r['mode']} | {method} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("grid_label", "N", "D", "dtype", "mode", "method", "backend", "B", "H", "status", "reason",
               "median_ms", "min_ms", "ratio_base", "tflops", "flops", "flop_kind", "peak_mib", "memory_ratio_base",
               "estimate_s", "calls", "repeats", "warmup", "rotate", "seed")


def write_csv(path: str, records: Sequence[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in CSV_COLUMNS})


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None


COLORS = {"sdpa": "black", "sdpa-flash": "black", "sdpa-efficient": "dimgray", "sdpa-cudnn": "gray",
          "sdpa-math": "silver", "flash-attn": "tab:brown", "dense-bias": "tab:red", "linear": "tab:purple",
          "lisa-direct": "tab:blue", "lisa-fft": "tab:orange", "lisa-auto": "tab:green", "lisa-triton": "tab:cyan",
          "lisa-triton-fft": "tab:olive", "lisa-cuda": "tab:pink", "lisa-reference": "lightgray",
          "flex-lisa": "tab:gray", "flex-rpb": "darkred"}


def plot_times(records: Sequence[Dict], meta: Dict, path: str) -> bool:
    """Median time vs tokens N, log-log, one line per method; a panel per (dtype, D) row and mode column."""
    plt = _pyplot()
    if plt is None:
        return False
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    rows = [(t, d) for t in meta["dtypes"] for d in sorted({r["D"] for r in records})]
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(6 * len(modes), 4.2 * len(rows)), squeeze=False)
    for (dtype, D), ax_row in zip(rows, axes):
        for ax, mode in zip(ax_row, modes):
            for method in METHODS:
                pts = sorted((r["N"], r["median_ms"]) for r in records if (r["method"], r["D"], r["dtype"], r["mode"],
                             r["status"]) == (method, D, dtype, mode, "ok"))
                if pts:   # "auto" as a wide translucent band under the backend it picked
                    style = dict(linewidth=6, alpha=0.3, zorder=1) if method == "lisa-auto" else dict(zorder=2)
                    dashed = "--" if method in BASELINES or method == "flex-rpb" else "-"
                    ax.plot(*zip(*pts), dashed, marker="o", markersize=3, color=COLORS.get(method), label=method,
                            **style)
            ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="median ms per call",
                   title=f"{mode}, D={D}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"LiSA vs baselines\n{title_line(meta)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_speedup(records: Sequence[Dict], meta: Dict, path: str) -> bool:
    """Heatmaps of baseline time / lisa-auto time over grid x D, a panel per (dtype, mode)."""
    plt = _pyplot()
    if plt is None:
        return False
    import numpy as np
    from matplotlib.colors import LogNorm
    panels = [(t, m) for t in meta["dtypes"] for m in meta["modes"] if speedup_grid(records, t, m)[2]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 6.5), squeeze=False,
                             gridspec_kw={"wspace": 0.5})
    for ax, (dtype, mode) in zip(axes[0], panels):
        grids, dims, cells = speedup_grid(records, dtype, mode)
        data = np.array([[cells.get((g, d), np.nan) for d in dims] for g in grids])
        image = ax.imshow(data, cmap="RdYlGn", norm=LogNorm(vmin=1 / 16, vmax=16), aspect="auto")
        for i, g in enumerate(grids):
            for j, d in enumerate(dims):
                ax.text(j, i, "-" if math.isnan(data[i, j]) else f"{data[i, j]:.2g}", ha="center", va="center",
                        fontsize=8)
        ax.set(xticks=range(len(dims)), xticklabels=[f"D={d}" for d in dims], yticks=range(len(grids)),
               yticklabels=grids, title=f"{dtype}, {mode}")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{meta['baseline']} time / lisa-auto time (>1: LiSA faster)")
    fig.suptitle(f"Speedup of lisa-auto over {meta['baseline']}\n{title_line(meta)}", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ metadata

TIMING_METHOD = {
    "cpu": "time.perf_counter around each call; warm-up calls, then the median (and min) of the timed calls; "
           "calls cycle through the rotated input sets",
    "cuda": "a torch.cuda.Event pair around each call, read after one synchronize; warm-up calls, then the "
            "median (and min); calls cycle through the rotated input sets",
}
MEMORY_METHOD = {
    "cpu": ("each case in a fresh child process (forked from a server that has only imported the libraries); "
            "after the timed calls, glibc is set to map every block of 1 MiB or more on its own (mallopt "
            "M_MMAP_THRESHOLD, then malloc_trim) so that RSS follows the live allocations, and one more call is "
            "made while a background thread samples RSS from /proc/self/statm every ~1 ms; peak_mib = peak RSS "
            "- RSS just before that call. "
            "peak_mib_hwm is the kernel's VmHWM after resetting it (/proc/self/clear_refs) minus the same "
            "baseline, as a cross-check"),
    "cuda": ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
             "torch.cuda.memory_allocated() once the inputs exist (the caching allocator's live tensors)"),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str) -> Tuple[Optional[str], Optional[bool]]:
    def git(*a):
        return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        return head.stdout.strip(), bool(git("status", "--porcelain").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def version_of(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (absent or broken: just not reported)
        return None


def device_class(device: str) -> str:
    """The cost model's device class (lisa_kernels.dispatch), e.g. "cpu", "sm_90"."""
    from lisa_kernels import dispatch
    return dispatch._device_class(torch.device(device))


def _script_name() -> str:
    """The script as run, relative to the repository; benchmarks/benchmark.py when the sweep runs inside another
    program (pytest, a notebook) or from outside the checkout, so that no machine path is recorded."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.startswith(REPO_ROOT + os.sep) and os.path.basename(script) in ("benchmark.py", "run.py"):
        return os.path.relpath(script, REPO_ROOT)
    return "benchmarks/benchmark.py"


def metadata(args, argv: Sequence[str]) -> Dict:
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    commit, dirty = git_commit(LIBRARY_ROOT)
    return {
        "device": args.device, "device_class": device_class(args.device),
        "device_name": torch.cuda.get_device_name(args.device) if dev == "cuda" else cpu_model(),
        "compute_capability": list(torch.cuda.get_device_capability(args.device)) if dev == "cuda" else None,
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": version_of("triton"),
        "cuda": torch.version.cuda, "lisa_kernels": lisa_kernels.__version__, "flash_attn": version_of("flash_attn"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty, "library": library_text(),
        "command": shlex.join(["python", _script_name()] + list(argv)),
        "benchmark_argv": list(argv), "baseline": args.baseline, "methods": list(args.methods),
        "dtypes": list(args.dtypes), "modes": [m for m in MODES if m in args.modes], "B": args.batch,
        "H": args.heads, "repeats": args.repeats, "warmup": args.warmup, "min_time_s": args.min_time,
        "rotate": args.rotate, "sweep": args.sweep, "budget_seconds": args.budget_seconds or None,
        "max_seconds": args.max_seconds, "in_process": bool(args.in_process),
        "timing_method": TIMING_METHOD[dev],
        "memory_method": MEMORY_METHOD[dev] if not (dev == "cpu" and args.in_process) else
        ("all cases in one process (--in-process): RSS growth during one extra call after the timed calls, under "
         "glibc's default allocator, which can reuse freed blocks unseen (an under-count)"),
        "flop_formulas": FLOP_FORMULAS, "method_help": {m: METHOD_HELP[m] for m in args.methods},
        "load_average_start": os.getloadavg(),
    }


# -------------------------------------------------------------------------------------------- output

def write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")



def finish(records: List[Dict], meta: Dict, json_path: str, no_plot: bool, remeasure: bool = True) -> Dict:
    """Write the JSON, CSV, markdown and plots next to each other and print the tables and the targets."""
    if remeasure:
        meta["load_average_end"] = os.getloadavg()
    targets = compute_targets(records, meta)
    table = markdown_table(records, meta)
    stem = os.path.splitext(json_path)[0]
    write_json(json_path, {"meta": meta, "targets": targets, "records": records})
    write_csv(stem + ".csv", records)
    with open(stem + ".md", "w") as f:
        f.write(table)
    written = [json_path, stem + ".csv", stem + ".md"]
    if not no_plot:
        written += [p for p, ok in ((stem + ".png", plot_times(records, meta, stem + ".png")),
                                    (stem + "_speedup.png", plot_speedup(records, meta, stem + "_speedup.png"))) if ok]
    print("\n" + table)
    print(targets_text(targets))
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in written))
    return targets
