"""Time LiSA's backends against softmax attention (``F.scaled_dot_product_attention``).

    python benchmarks/benchmark.py                       # the default sweep on cuda if present, else cpu
    python benchmarks/benchmark.py --quick               # a tiny sweep (smoke test, ~1 minute on a CPU)
    python benchmarks/benchmark.py --grids 64x64 128x128 --dims 32 --modes fwd --methods sdpa lisa-fft

Each case is one (grid, head dim D, mode, method): fresh random inputs q, k, v (B, H, N, D) and
rpe = 0.1 * randn (H, 1, 2*S1-1, ...), one warm-up call, then ``--repeats`` timed calls; the median and
the minimum are reported, with the ratio to SDPA on the same (grid, D, mode) and the peak memory.

- mode "fwd": the forward alone; "fwd+bwd": forward, then ``torch.autograd.grad`` of the output with a
  fixed random upstream gradient, for all of q, k, v (and rpe for LiSA).
- methods: "sdpa" (softmax attention; FlashAttention-2 inside on a GPU), "lisa-direct", "lisa-fft",
  "lisa-auto" (``backend="auto"``: the record names the backend it chose).
- timing: ``time.perf_counter`` on the CPU; CUDA events around each call on a GPU.
- memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation after the inputs exist; on the
  CPU each case runs in a fresh subprocess (this script with the hidden ``--worker`` flag) that samples its
  resident set size (RSS, /proc/self/statm) every ~1 ms in a background thread during the warm-up and
  timed calls, and reports the peak RSS minus the RSS just before the first call.
- cases whose estimated time per call exceeds ``--max-seconds`` are recorded as skipped ("estimated too
  slow"): LiSA's estimate is ``lisa_kernels.dispatch.estimate_seconds`` (via ``lisa_kernels.explain``),
  SDPA's is a quadratic extrapolation from the same method on the previous (smaller) grid.

Writes ``<out>.json`` (metadata, one record per case, the issue's targets), ``<out>.png`` (time vs tokens)
and ``<out>.md`` (a markdown table), by default under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:      # benchmark the checkout this script lives in
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lisa_kernels  # noqa: E402

DEFAULT_METHODS = ("sdpa", "lisa-direct", "lisa-fft", "lisa-auto")
METHODS = DEFAULT_METHODS + tuple(f"lisa-{b}" for b in lisa_kernels.BACKENDS if f"lisa-{b}" not in DEFAULT_METHODS)
MODES = ("fwd", "fwd+bwd")
DEFAULT_GRIDS = ("14x14", "28x28", "32x32", "56x56", "64x64", "128x128", "256x256")
DEFAULT_DIMS = (32, 64)
QUICK_GRIDS = ("14x14", "32x32")
QUICK_DIMS = (32,)
DEFAULT_MAX_SECONDS = 25.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
RESULTS_DIR = os.path.join(HERE, "results")
MIB = 2.0 ** 20

TIMING_METHOD = {
    "cpu": "time.perf_counter around each call; 1 warm-up call, then the median (and min) of the timed calls",
    "cuda": "torch.cuda.Event pairs around each call (synchronized); 1 warm-up call, then the median (and min)",
}
MEMORY_METHOD = {
    "cpu": ("each case in a fresh subprocess; after a tiny warm-up of the same method (library initialisation) "
            "and the inputs, a background thread samples RSS from /proc/self/statm every ~1 ms during the "
            "warm-up and timed calls; peak_mib = peak RSS - RSS just before the first call. peak_mib_hwm is the "
            "kernel's VmHWM after resetting it (/proc/self/clear_refs) minus the same baseline, as a cross-check"),
    "cuda": ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
             "torch.cuda.memory_allocated() once the inputs exist (the caching allocator's live tensors)"),
}


# ----------------------------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: a method on one problem size, in one mode."""

    grid: Tuple[int, ...]
    D: int
    mode: str
    method: str
    B: int
    H: int
    dtype: str
    device: str
    repeats: int
    seed: int

    @property
    def N(self) -> int:
        return math.prod(self.grid)

    @property
    def grid_label(self) -> str:
        return "x".join(map(str, self.grid))

    @property
    def label(self) -> str:
        return f"{self.grid_label:>9} N={self.N:<6} D={self.D:<3} {self.mode:<7} {self.method:<11}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        d = json.loads(text)
        d["grid"] = tuple(d["grid"])
        return cls(**d)


def parse_grid(text: str) -> Tuple[int, ...]:
    """'128x128' -> (128, 128); '1024' -> (1024,); '8x32x32' -> (8, 32, 32)."""
    try:
        grid = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid is like 64x64, 1024 or 8x32x32, got {text!r}") from None
    if not 1 <= len(grid) <= 3 or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"a grid has 1 to 3 positive sizes, got {text!r}")
    return grid


def build_cases(args) -> List[Case]:
    """All cases, smallest grid first, SDPA first within a (grid, D, mode): what the estimates need."""
    grids = sorted(set(args.grids), key=lambda g: (math.prod(g), g))
    methods = [m for m in METHODS if m in args.methods]
    cases = []
    for grid in grids:
        for D in sorted(set(args.dims)):
            for mode in [m for m in MODES if m in args.modes]:
                for method in methods:
                    cases.append(Case(grid, D, mode, method, args.batch, args.heads, args.dtype, args.device,
                                      args.repeats, args.seed + len(cases)))
    return cases


# ------------------------------------------------------------------------------------ inputs and calls

def make_inputs(case: Case) -> Dict[str, torch.Tensor]:
    """Fresh random q, k, v (B, H, N, D), rpe = 0.1 * randn, and the upstream gradient for fwd+bwd."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=dev, dtype=dtype)

    shape = (case.B, case.H, case.N, case.D)
    x = {"q": randn(*shape), "k": randn(*shape), "v": randn(*shape),
         "rpe": randn(case.H, 1, *(2 * s - 1 for s in case.grid), scale=0.1)}
    if case.mode == "fwd+bwd":
        x["grad_out"] = randn(*shape)
        for name in ("q", "k", "v", "rpe"):
            x[name].requires_grad_(True)
    return x


def lisa_backend(method: str) -> str:
    return method[len("lisa-"):]


def forward(case: Case, x: Dict[str, torch.Tensor]) -> torch.Tensor:
    if case.method == "sdpa":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])
    return lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=case.grid,
                                       backend=lisa_backend(case.method))


def make_call(case: Case, x: Dict[str, torch.Tensor]) -> Callable[[], None]:
    """The timed unit: the forward, or the forward and the gradients of every input that takes one."""
    if case.mode == "fwd":
        def call():
            forward(case, x)
        return call
    wrt = [x["q"], x["k"], x["v"]] + ([] if case.method == "sdpa" else [x["rpe"]])

    def call():
        out = forward(case, x)
        torch.autograd.grad(out, wrt, x["grad_out"])
    return call


def problem_view(case: Case) -> Dict[str, torch.Tensor]:
    """Zero-memory stand-ins with the case's shapes (expanded scalars), enough for lisa_kernels.explain."""
    dev, dtype = torch.device(case.device), DTYPES[case.dtype]
    one = torch.zeros((), device=dev, dtype=dtype)
    qkv = one.expand(case.B, case.H, case.N, case.D)
    return {"q": qkv, "k": qkv, "v": qkv, "rpe": one.expand(case.H, 1, *(2 * s - 1 for s in case.grid))}


def explain_case(case: Case):
    x = problem_view(case)
    return lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=case.grid,
                                backward=case.mode == "fwd+bwd")


def cannot_run_reason(case: Case) -> Optional[str]:
    """lisa_kernels' one-line reason why the case's LiSA backend cannot run it; None if it can."""
    if case.method in ("sdpa", "lisa-auto"):
        return None
    e = explain_case(case).estimates.get(lisa_backend(case.method))
    return None if e is None else e.reason


def chosen_backend(case: Case) -> Optional[str]:
    """The backend that actually runs: "sdpa", the named LiSA backend, or what "auto" picks."""
    if case.method == "sdpa":
        return "sdpa"
    if case.method == "lisa-auto":
        return explain_case(case).chosen
    return lisa_backend(case.method)


# ------------------------------------------------------------------------------------------- timing

class RssSampler:
    """Samples this process's resident set size every ``interval`` seconds in a daemon thread."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        os.lseek(self._fd, 0, os.SEEK_SET)
        return int(os.read(self._fd, 256).split()[1]) * self.PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        os.close(self._fd)


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter VmHWM (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_hwm() -> Optional[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def time_calls_cpu(call: Callable[[], None], repeats: int) -> List[float]:
    call()                                        # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def time_calls_cuda(call: Callable[[], None], repeats: int) -> List[float]:
    call()                                        # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def measure_cpu(case: Case) -> Dict:
    """Time one case on the CPU and sample its RSS (run it in a fresh process for a clean baseline)."""
    tiny = dataclasses.replace(case, grid=tuple(min(s, 4) for s in case.grid))
    make_call(tiny, make_inputs(tiny))()          # load and initialise the libraries the method uses
    x = make_inputs(case)
    call = make_call(case, x)
    gc.collect()
    hwm_ok = reset_hwm()
    with RssSampler() as sampler:
        base = sampler.peak
        times = time_calls_cpu(call, case.repeats)
    hwm = read_hwm() if hwm_ok else None
    return {"times_s": times, "peak_mib": (sampler.peak - base) / MIB, "rss_samples": sampler.samples,
            "peak_mib_hwm": None if hwm is None else (hwm - base) / MIB}


def measure_cuda(case: Case) -> Dict:
    """Time one case on the GPU; peak memory from the caching allocator's statistics."""
    x = make_inputs(case)
    call = make_call(case, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = time_calls_cuda(call, case.repeats)
    return {"times_s": times, "peak_mib": (torch.cuda.max_memory_allocated() - base) / MIB}


def measure(case: Case) -> Dict:
    """Measure one case in this process: a record with status "ok", or "failed" and the reason."""
    on_cuda = case.device.startswith("cuda")
    try:
        m = measure_cuda(case) if on_cuda else measure_cpu(case)
    except Exception as exc:  # noqa: BLE001  (a failing case is a result, not the end of the sweep)
        m = {"status": "failed", "reason": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
    if on_cuda:
        torch.cuda.empty_cache()     # after an out-of-memory error, give the next case a clean device
    if "reason" in m:
        return m
    times = m.pop("times_s")
    return {"status": "ok", "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "times_ms": [1e3 * t for t in times], **m}


# ------------------------------------------------------------------------------------- the worker

WORKER_TAG = "LISA_BENCH_RESULT "


def run_worker(case_json: str) -> int:
    """Hidden ``--worker`` entry point: measure one case given as JSON, print the result as one JSON line."""
    result = measure(Case.from_json(case_json))
    print(WORKER_TAG + json.dumps(result), flush=True)
    return 0


def measure_in_subprocess(case: Case, timeout: float) -> Dict:
    """Run one case in a fresh Python process (this script with --worker) and parse its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case.to_json()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"worker timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "failed", "reason": f"worker exited with code {proc.returncode}: {tail[:300]}"}


# ---------------------------------------------------------------------------------------- estimates

def lisa_model_seconds(case: Case) -> Optional[float]:
    """lisa_kernels' cost-model estimate of one call of the backend the case runs."""
    e = explain_case(case)
    name = e.chosen if case.method == "lisa-auto" else lisa_backend(case.method)
    return e.estimates[name].seconds if name in e.estimates else None


def previous_grid_record(case: Case, records: Sequence[Dict]) -> Optional[Dict]:
    """The record of the same method, D, mode and grid rank on the largest smaller grid (timed or estimated)."""
    same = [r for r in records
            if (r["method"], r["D"], r["mode"], len(r["grid"])) == (case.method, case.D, case.mode, len(case.grid))
            and r["N"] < case.N and record_seconds(r) is not None]
    return max(same, key=lambda r: r["N"]) if same else None


def record_seconds(r: Dict) -> Optional[float]:
    """A record's time per call: measured median, or the estimate it was skipped on."""
    if r["status"] == "ok":
        return r["median_ms"] / 1e3
    if r["status"] == "skipped":
        return r["estimate_s"]
    return None


def estimate(case: Case, records: Sequence[Dict]) -> Tuple[Optional[float], str]:
    """(seconds per call, how it was estimated); None where there is nothing to estimate from."""
    if case.method != "sdpa":
        return lisa_model_seconds(case), "lisa_kernels cost model (dispatch.estimate_seconds)"
    prev = previous_grid_record(case, records)
    if prev is None:
        return None, "first grid: not estimated"
    return (record_seconds(prev) * (case.N / prev["N"]) ** 2,
            f"quadratic extrapolation from {prev['grid_label']}")


# -------------------------------------------------------------------------------------------- sweep

def base_record(case: Case) -> Dict:
    return {"grid": list(case.grid), "grid_label": case.grid_label, "N": case.N, "D": case.D, "mode": case.mode,
            "method": case.method, "backend": chosen_backend(case), "B": case.B, "H": case.H, "dtype": case.dtype,
            "repeats": case.repeats, "seed": case.seed}


def sdpa_median(records: Sequence[Dict], rec: Dict) -> Optional[float]:
    for r in records:
        if (r["method"], r["grid"], r["D"], r["mode"]) == ("sdpa", rec["grid"], rec["D"], rec["mode"]) \
                and r["status"] == "ok":
            return r["median_ms"]
    return None


def run_case(case: Case, records: Sequence[Dict], args) -> Dict:
    """Estimate, then skip or measure one case; returns its record."""
    rec = base_record(case)
    reason = cannot_run_reason(case)
    if reason is not None:
        rec.update(status="skipped", reason=f"cannot run: {reason}", estimate_s=None, estimate_source=None)
        return rec
    est, source = estimate(case, records)
    rec.update(estimate_s=est, estimate_source=source)
    if est is not None and est > args.max_seconds:
        rec.update(status="skipped", reason="estimated too slow")
        return rec
    if case.device == "cpu" and not args.in_process:
        timeout = 120 + 5 * (case.repeats + 1) * max(args.max_seconds, est or 0)
        rec.update(measure_in_subprocess(case, timeout))
    else:
        rec.update(measure(case))
    if rec["status"] == "ok":
        ref = rec["median_ms"] if case.method == "sdpa" else sdpa_median(records, rec)
        rec["ratio_sdpa"] = None if ref is None else rec["median_ms"] / ref
    return rec


def progress_line(i: int, n: int, case: Case, rec: Dict) -> str:
    head = f"[{i:>{len(str(n))}}/{n}] {case.label}"
    if rec["status"] == "skipped" and rec["estimate_s"] is None:
        return f"{head} skipped: {rec['reason']}"
    if rec["status"] == "skipped":
        return f"{head} skipped: estimated too slow ({seconds_text(rec['estimate_s'])} > --max-seconds)"
    if rec["status"] == "failed":
        return f"{head} FAILED: {rec['reason']}"
    backend = f" ({rec['backend']})" if case.method == "lisa-auto" else ""
    ratio = "   -   " if rec.get("ratio_sdpa") is None else f"x{rec['ratio_sdpa']:6.2f}"
    return (f"{head}{backend:<9} {rec['median_ms']:10.2f} ms  {ratio} SDPA  "
            f"peak {rec['peak_mib']:8.1f} MiB")


def run_sweep(cases: Sequence[Case], args, meta: Dict, tmp_path: str) -> List[Dict]:
    """Run every case in order, printing a line per case and saving partial results to ``tmp_path``."""
    records: List[Dict] = []
    for i, case in enumerate(cases, 1):
        rec = run_case(case, records, args)
        records.append(rec)
        print(progress_line(i, len(cases), case, rec), flush=True)
        write_json(tmp_path, {"meta": meta, "records": records})
    return records


# ------------------------------------------------------------------------------------------- targets

def find(records, method: str, grid_label: str, D: int, mode: str) -> Optional[Dict]:
    for r in records:
        if (r["method"], r["grid_label"], r["D"], r["mode"], r["status"]) == (method, grid_label, D, mode, "ok"):
            return r
    return None


def fft_scaling(records, small: str, large: str, limit: float = 5.0) -> Dict:
    """Time ratio of lisa-fft (D=32, fwd) between two grids."""
    a, b = find(records, "lisa-fft", small, 32, "fwd"), find(records, "lisa-fft", large, 32, "fwd")
    ratio = None if a is None or b is None else b["median_ms"] / a["median_ms"]
    return {"grids": f"{large} / {small}", "tokens_ratio": None if a is None or b is None else b["N"] / a["N"],
            "ratio": ratio, "limit": limit, "met": None if ratio is None else ratio <= limit}


def auto_vs_sdpa(records, N: int, limit: float = 3.0) -> Dict:
    """lisa-auto / sdpa at N tokens on a 2D grid (D=64, fwd)."""
    out = {"N": N, "ratio": None, "limit": limit, "met": None, "backend": None, "grid": None}
    for r in records:
        if (r["method"], r["N"], r["D"], r["mode"], len(r["grid"]), r["status"]) == \
                ("lisa-auto", N, 64, "fwd", 2, "ok") and r.get("ratio_sdpa") is not None:
            out.update(ratio=r["ratio_sdpa"], met=r["ratio_sdpa"] <= limit, backend=r["backend"],
                       grid=r["grid_label"])
    return out


def compute_targets(records: Sequence[Dict], meta: Dict) -> Dict:
    return {
        "conditions": {"dtype": meta["dtype"], "B": meta["B"], "H": meta["H"], "device": meta["device"],
                       "issue_conditions": "auto: D=64, float32, B=1, H=4, forward; fft: D=32, forward"},
        "fft_scaling_d32_fwd": [fft_scaling(records, "64x64", "128x128"),
                                fft_scaling(records, "128x128", "256x256")],
        "auto_within_3x_sdpa_d64_fwd": [auto_vs_sdpa(records, n) for n in (1024, 4096, 16384)],
    }


def targets_text(targets: Dict) -> str:
    def verdict(t):
        return "not measured" if t["ratio"] is None else f"{t['ratio']:.2f} (limit {t['limit']:g}: " \
            f"{'met' if t['met'] else 'NOT met'})"
    lines = ["Targets:"]
    for t in targets["fft_scaling_d32_fwd"]:
        lines.append(f"  lisa-fft time ratio {t['grids']} (D=32, fwd): {verdict(t)}")
    for t in targets["auto_within_3x_sdpa_d64_fwd"]:
        via = f" via {t['backend']} on {t['grid']}" if t["backend"] else ""
        lines.append(f"  lisa-auto / sdpa at N={t['N']} (D=64, fwd){via}: {verdict(t)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reports

def seconds_text(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(records: Sequence[Dict], meta: Dict) -> str:
    lines = [f"LiSA vs SDPA on {meta['device_name']} ({meta['dtype']}, B={meta['B']}, H={meta['H']}, "
             f"median of {meta['repeats']} after 1 warm-up; {meta['date'][:10]}, commit {meta['git_commit']})",
             "",
             "| grid | N | D | mode | method | median ms | x SDPA | peak MiB |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in records:
        method = f"{r['method']} ({r['backend']})" if r["method"] == "lisa-auto" else r["method"]
        if r["status"] == "ok":
            cells = (fmt(r["median_ms"], ".2f"), fmt(r.get("ratio_sdpa"), ".2f"), fmt(r["peak_mib"], ".1f"))
        elif r["status"] == "skipped" and r["estimate_s"] is not None:
            cells = (f"skipped (est. {seconds_text(r['estimate_s'])})", "-", "-")
        elif r["status"] == "skipped":
            cells = ("cannot run", "-", "-")
        else:
            cells = ("failed", "-", "-")
        lines.append(f"| {r['grid_label']} | {r['N']} | {r['D']} | {r['mode']} | {method} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def plot(records: Sequence[Dict], meta: Dict, path: str) -> bool:
    """Time vs tokens, log-log, one line per (method, D), a subplot per mode; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    dims = sorted({r["D"] for r in records})
    styles = ["--", "-", ":", "-."]
    colors = {"sdpa": "black", "lisa-direct": "tab:blue", "lisa-fft": "tab:orange", "lisa-auto": "tab:green"}
    markers = {"sdpa": "o", "lisa-direct": "s", "lisa-fft": "^", "lisa-auto": "x"}
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for method in METHODS:
            for j, D in enumerate(dims):
                pts = sorted((r["N"], r["median_ms"]) for r in records if (r["method"], r["D"], r["mode"],
                             r["status"]) == (method, D, mode, "ok"))
                if pts:   # "auto" as a wide translucent band under the backend it picked
                    band = dict(linewidth=5, alpha=0.35, zorder=1) if method == "lisa-auto" else dict(zorder=2)
                    ax.plot(*zip(*pts), styles[j % len(styles)], marker=markers.get(method, "d"), markersize=5,
                            color=colors.get(method), label=f"{method} D={D}", **band)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="median time per call (ms)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cores = f", {meta['cores']} cores" if meta["device"] == "cpu" else ""
    fig.suptitle(f"LiSA vs SDPA on {meta['device_name']}{cores} ({meta['dtype']}, B={meta['B']}, H={meta['H']}, "
                 f"median of {meta['repeats']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ metadata

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Tuple[Optional[str], Optional[bool]]:
    def git(*a):
        return subprocess.run(["git", "-C", REPO_ROOT, *a], capture_output=True, text=True, timeout=10)
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


def metadata(args, argv: Sequence[str]) -> Dict:
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    commit, dirty = git_commit()
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if dev == "cuda" else cpu_model(),
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": version_of("triton"),
        "cuda": torch.version.cuda, "lisa_kernels": lisa_kernels.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty,
        "command": shlex.join(["python"] + sys.argv), "benchmark_argv": list(argv),
        "dtype": args.dtype, "B": args.batch, "H": args.heads, "repeats": args.repeats, "warmup_calls": 1,
        "max_seconds": args.max_seconds, "in_process": bool(args.in_process),
        "timing_method": TIMING_METHOD[dev],
        "memory_method": MEMORY_METHOD[dev] if not (dev == "cpu" and args.in_process) else
        MEMORY_METHOD["cpu"].replace("each case in a fresh subprocess", "all cases in one process (--in-process)"),
        "load_average_start": os.getloadavg(),
    }


# -------------------------------------------------------------------------------------------- output

def write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def default_out(device: str, quick: bool) -> str:
    """benchmarks/results/<cpu|cuda>_<date>[_quick][_2].json, never overwriting an earlier result."""
    stem = os.path.join(RESULTS_DIR, f"{device.split(':')[0]}_{datetime.date.today().isoformat()}"
                        + ("_quick" if quick else ""))
    path, n = stem + ".json", 2
    while os.path.exists(path):
        path, n = f"{stem}_{n}.json", n + 1
    return path


# ------------------------------------------------------------------------------------------------ CLI

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", nargs="+", type=parse_grid, metavar="SxS",
                    help=f"token grids, e.g. 64x64 (2D), 1024 (1D), 8x32x32 (3D) [default: {' '.join(DEFAULT_GRIDS)}]")
    ap.add_argument("--dims", nargs="+", type=int, metavar="D", help="head dims D (Dk = Dv) [default: 32 64]")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="[default: fwd fwd+bwd]")
    ap.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                    help=f"any of {' '.join(METHODS)} [default: {' '.join(DEFAULT_METHODS)}, plus on a GPU "
                         "every other fast LiSA backend that can run there, e.g. lisa-triton]")
    ap.add_argument("--batch", "-B", type=int, default=1, help="batch size B [default: 1]")
    ap.add_argument("--heads", type=int, default=4, help="number of heads H [default: 4]")
    ap.add_argument("--repeats", type=int, help="timed calls per case, after 1 warm-up [default: 3 cpu, 20 cuda]")
    ap.add_argument("--dtype", choices=DTYPES, help="[default: float32 on cpu, bfloat16 on cuda]")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda if available, else cpu; the default), cpu, cuda, cuda:1 ...")
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                    help=f"skip a case whose estimated time per call exceeds this [default: {DEFAULT_MAX_SECONDS:g}]")
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny sweep for smoke tests: grids {' '.join(QUICK_GRIDS)}, D=32, 2 repeats "
                         "(explicit --grids/--dims/--repeats still win)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; case i uses seed + i [default: 0]")
    ap.add_argument("--in-process", action="store_true",
                    help="on the CPU, measure in this process instead of a fresh subprocess per case "
                         "(faster; memory numbers less clean)")
    ap.add_argument("--out", help="output JSON path; .png and .md are written next to it "
                                  "[default: benchmarks/results/<device>_<date>.json]")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    ap.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return resolve_defaults(ap, args)


def resolve_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.worker is not None:
        return args
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device")
    on_cuda = args.device.startswith("cuda")
    args.grids = args.grids or [parse_grid(g) for g in (QUICK_GRIDS if args.quick else DEFAULT_GRIDS)]
    args.dims = args.dims or list(QUICK_DIMS if args.quick else DEFAULT_DIMS)
    args.repeats = args.repeats or (2 if args.quick else 20 if on_cuda else 3)
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.methods = args.methods or default_methods(args.device)
    if min(args.batch, args.heads, args.repeats, *args.dims) < 1:
        ap.error("--batch, --heads, --repeats and --dims must be positive")
    return args


def default_methods(device: str) -> List[str]:
    """The four default methods, plus on a GPU the compiled LiSA backends (triton, cuda) that can run there."""
    methods = list(DEFAULT_METHODS)
    if device.startswith("cuda"):
        ready = lisa_kernels.available_backends(device)
        methods += [f"lisa-{b}" for b in ("triton", "cuda") if b in ready and ready[b] is None]
    return methods


def finish(records: List[Dict], meta: Dict, json_path: str, no_plot: bool) -> Dict:
    """Write the JSON, PNG and markdown next to each other and print the table and the targets."""
    meta["load_average_end"] = os.getloadavg()
    targets = compute_targets(records, meta)
    table = markdown_table(records, meta)
    stem = os.path.splitext(json_path)[0]
    write_json(json_path, {"meta": meta, "targets": targets, "records": records})
    with open(stem + ".md", "w") as f:
        f.write(table)
    plotted = not no_plot and plot(records, meta, stem + ".png")
    print("\n" + table)
    print(targets_text(targets))
    print(f"\nwrote {json_path}, {stem}.md" + (f", {stem}.png" if plotted else ""))
    return targets


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)
    json_path = os.path.abspath(args.out or default_out(args.device, args.quick))
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    meta = metadata(args, argv)
    cases = build_cases(args)
    print(f"{len(cases)} cases on {meta['device_name']} ({args.device}, {args.dtype}, B={args.batch}, "
          f"H={args.heads}, {args.repeats} repeats, --max-seconds {args.max_seconds:g})", flush=True)
    t0 = time.perf_counter()
    records = run_sweep(cases, args, meta, json_path + ".tmp")
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    finish(records, meta, json_path, args.no_plot)
    os.remove(json_path + ".tmp")
    print(f"sweep took {meta['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
