"""Per-call host overhead of lisa_attention against F.scaled_dot_product_attention, on tiny inputs.

On tiny inputs the kernels do almost nothing, so the time per call is the work around them: validation,
dispatch, table building, the aten ops issued and their autograd bookkeeping. That is what decides the race
with FlashAttention at ViT sizes on a GPU (a FlashAttention-2 call takes tens of microseconds there).

    python benchmarks/overhead.py                      # CPU (or the GPU if torch sees one), saves the results
    python benchmarks/overhead.py --quick --no-save    # a few seconds

Method:
- inputs: q, k, v (1, 1, 5, 8), rpe (1, 1, 3, 3), grid (2, 2), one extra token (N = 5), float32; on a GPU
  the same on the GPU, plus the launch-bound point (below);
- modes: ``fwd`` (inputs do not require grad) and ``fwd+bwd`` (all inputs require grad; ``out.backward(g)``
  with a fixed random ``g``);
- methods: ``sdpa`` (the baseline, torch's own kernel choice), ``lisa-direct``, ``lisa-auto``, and on a GPU
  ``lisa-triton``, ``lisa-cuda`` where they can run;
- timing: ``--batches`` batches of ``--calls`` calls per (method, mode), the methods interleaved batch by batch
  (so that a change in machine load hits all of them alike); per-call time = batch wall time / calls (on a GPU
  the batch ends with a synchronize); the median and the minimum over batches, and the median's ratio to
  SDPA's in the same run;
- counts: aten ops per call (every ``aten::`` event that torch.profiler records in one call, nested ones
  included) and, on a GPU, kernel launches per call (CUDA kernel events);
- on a GPU, the launch-bound point: 14x14 + 1 token, B = 1, H = 1, D = 64, bfloat16, ``lisa-auto`` against
  ``sdpa-flash`` (SDPA held to FlashAttention-2), device time per call from CUDA events around each batch.

Output: ``benchmarks/results/overhead_<cpu|cuda>_<date>.json`` and ``.md`` (``--out STEM`` to choose), and a
table printed last. The targets (issue 11): on the CPU, ``lisa-auto`` and ``lisa-direct`` at most 8x SDPA's
time forward and 6x forward+backward; on a GPU at most 3 kernel launches per ``lisa-triton`` forward and 8 per
forward+backward, and ``lisa-auto`` at most 2x ``sdpa-flash`` at the launch-bound point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _library import use_library  # noqa: E402

LIBRARY_ROOT = use_library()      # the installed lisa_kernels if there is one, else this checkout's (_library.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lisa_kernels  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
MODES = ("fwd", "fwd+bwd")
TARGETS_CPU = {"fwd": 8.0, "fwd+bwd": 6.0}          # lisa-auto / lisa-direct time over SDPA's, at most
TARGET_LAUNCHES = {"fwd": 3, "fwd+bwd": 8}           # lisa-triton kernel launches per call, at most
TARGET_LAUNCH_BOUND = 2.0                             # lisa-auto / sdpa-flash at 14x14+1, bf16, at most


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tiny_inputs(device: str, dtype=torch.float32, requires_grad=False, grid=(2, 2), E=1, D=8, B=1, H=1,
                seed=0) -> Dict:
    gen = torch.Generator().manual_seed(seed)
    N = E + grid[0] * grid[1]

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return {"q": rnd(B, H, N, D), "k": rnd(B, H, N, D), "v": rnd(B, H, N, D),
            "rpe": rnd(H, 1, *[2 * s - 1 for s in grid], scale=0.1), "grid": tuple(grid), "E": E,
            "g": torch.randn(B, H, N, D, generator=gen).to(device=device, dtype=dtype)}


def make_call(method: str, x: Dict, mode: str) -> Callable[[], None]:
    """One call of ``method`` on inputs ``x``: the forward, or the forward and the backward."""
    q, k, v, rpe, g = x["q"], x["k"], x["v"], x["rpe"], x["g"]
    if method in ("sdpa", "sdpa-flash"):
        if method == "sdpa-flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def fwd():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)
        else:
            def fwd():
                return F.scaled_dot_product_attention(q, k, v)
    elif method.startswith("lisa-"):
        backend, grid, E = method[len("lisa-"):], x["grid"], x["E"]

        def fwd():
            return lisa_kernels.lisa_attention(q, k, v, rpe, grid=grid, num_extra=E, backend=backend)
    else:
        raise ValueError(f"unknown method {method!r}")
    if mode == "fwd":
        return fwd

    def fwd_bwd():
        fwd().backward(g)
    return fwd_bwd


def can_run(method: str, x: Dict) -> Optional[str]:
    """None if the method runs on these inputs, else why not (one line)."""
    if method.startswith("lisa-") and method != "lisa-auto":
        p = lisa_kernels.check_inputs(x["q"], x["k"], x["v"], x["rpe"], grid=x["grid"], num_extra=x["E"])
        reason = lisa_kernels.backend_reason(method[len("lisa-"):], p)
        if reason is not None:
            return reason
    try:
        make_call(method, x, "fwd")()
    except Exception as exc:  # noqa: BLE001  (the reason is recorded)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def count_events(call: Callable[[], None], device: str, calls: int = 5) -> Dict[str, Optional[float]]:
    """aten ops (all levels) and CUDA kernel launches per call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    call()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::"))
    kernels = None
    if device.startswith("cuda"):
        kernels = sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                      and not e.name.startswith(("Memcpy", "Memset", "cudaDeviceSynchronize")))
        kernels /= calls
    return {"aten_ops": aten / calls, "kernels": kernels}


def time_batches(calls_by_method: Dict[str, Callable[[], None]], device: str, batches: int, calls: int,
                 warmup: int, events: bool = False) -> Dict[str, List[float]]:
    """Per-call seconds of each batch, the methods interleaved batch by batch (rotating their order)."""
    for fn in calls_by_method.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(calls_by_method)
    out = {n: [] for n in names}
    for b in range(batches):
        order = names[b % len(names):] + names[:b % len(names)]
        for n in order:
            fn = calls_by_method[n]
            if events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                end.synchronize()
                out[n].append(start.elapsed_time(end) / 1e3 / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(device)
                out[n].append((time.perf_counter() - t0) / calls)
    return out


def default_methods(device: str) -> List[str]:
    extra = ["lisa-triton", "lisa-cuda"] if device.startswith("cuda") else []
    return ["sdpa", "lisa-direct", "lisa-auto"] + extra


def measure(args) -> Dict:
    device = args.device
    records, skipped = [], {}
    for mode in MODES:
        x = tiny_inputs(device, requires_grad=(mode == "fwd+bwd"))
        runnable = {}
        for m in args.methods:
            reason = can_run(m, x)
            if reason is None:
                runnable[m] = make_call(m, x, mode)
            else:
                skipped[m] = reason
        times = time_batches(runnable, device, args.batches, args.calls, args.warmup)
        base = statistics.median(times["sdpa"]) if "sdpa" in times else None
        for m, ts in times.items():
            med = statistics.median(ts)
            rec = {"method": m, "mode": mode, "point": "tiny", "median_us": med * 1e6, "min_us": min(ts) * 1e6,
                   "batches": len(ts), "calls_per_batch": args.calls,
                   "ratio_sdpa": None if base is None else med / base}
            if m.startswith("lisa-auto"):
                rec["backend"] = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=x["grid"],
                                                      num_extra=x["E"]).chosen
            if args.count:
                rec.update(count_events(runnable[m], device))
            records.append(rec)
    if device.startswith("cuda") and args.launch_bound:
        records += launch_bound(args, skipped)
    return {"records": records, "skipped": skipped}


def launch_bound(args, skipped) -> List[Dict]:
    """14x14 + 1 token, B = H = 1, D = 64, bf16: device time per call of lisa-auto and sdpa-flash."""
    out = []
    for mode in MODES:
        x = tiny_inputs(args.device, dtype=torch.bfloat16, requires_grad=(mode == "fwd+bwd"), grid=(14, 14), E=1,
                        D=64)
        runnable = {}
        for m in ("sdpa-flash", "lisa-auto", "lisa-triton"):
            reason = can_run(m, x)
            if reason is None:
                runnable[m] = make_call(m, x, mode)
            else:
                skipped[f"{m} (14x14+1 bf16)"] = reason
        times = time_batches(runnable, args.device, args.batches, args.calls, args.warmup, events=True)
        base = statistics.median(times["sdpa-flash"]) if "sdpa-flash" in times else None
        for m, ts in times.items():
            med = statistics.median(ts)
            rec = {"method": m, "mode": mode, "point": "14x14+1 bf16 D64", "median_us": med * 1e6,
                   "min_us": min(ts) * 1e6, "batches": len(ts), "calls_per_batch": args.calls,
                   "ratio_sdpa": None if base is None else med / base, "baseline": "sdpa-flash"}
            if args.count:
                rec.update(count_events(runnable[m], args.device))
            out.append(rec)
    return out


def targets(records: List[Dict], device: str) -> Dict:
    t = {}
    for r in records:
        if r["point"] == "tiny" and r["method"] in ("lisa-auto", "lisa-direct") and not device.startswith("cuda"):
            limit = TARGETS_CPU[r["mode"]]
            t[f"{r['method']}_{r['mode']}_at_most_{limit:g}x_sdpa"] = {
                "ratio": r["ratio_sdpa"], "limit": limit, "met": r["ratio_sdpa"] is not None
                and r["ratio_sdpa"] <= limit}
        if r["method"] == "lisa-triton" and r.get("kernels") is not None and r["point"] == "tiny":
            limit = TARGET_LAUNCHES[r["mode"]]
            t[f"lisa-triton_{r['mode']}_at_most_{limit}_launches"] = {
                "launches": r["kernels"], "limit": limit, "met": r["kernels"] <= limit}
        if r["method"] == "lisa-auto" and r["point"].startswith("14x14"):
            t[f"lisa-auto_{r['mode']}_14x14+1_bf16_at_most_{TARGET_LAUNCH_BOUND:g}x_sdpa-flash"] = {
                "ratio": r["ratio_sdpa"], "limit": TARGET_LAUNCH_BOUND,
                "met": r["ratio_sdpa"] is not None and r["ratio_sdpa"] <= TARGET_LAUNCH_BOUND}
    return t


def machine(device: str) -> Dict:
    sys.path.insert(0, HERE)
    from reports import cpu_model, git_commit, version_of
    commit, dirty = git_commit(LIBRARY_ROOT)
    return {"device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda")
            else cpu_model(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": version_of("triton"), "cuda": torch.version.cuda, "lisa_kernels": lisa_kernels.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "git_commit": commit,
            "git_dirty": dirty, "load_average": os.getloadavg()}


def markdown(data: Dict) -> str:
    meta = data["meta"]
    lines = [f"# Per-call overhead, {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['torch']}, {meta['torch_threads']} thread(s), {meta['batches']} batches x "
             f"{meta['calls']} calls, methods interleaved; median per-call time over batches. "
             f"Load average {', '.join(f'{x:.2f}' for x in meta['load_average'])}. Command: `{meta['command']}`", "",
             "| point | mode | method | backend | median us | min us | x baseline | aten ops | kernels |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(x, spec):
        return "" if x is None else format(x, spec)
    for r in data["records"]:
        lines.append(f"| {r['point']} | {r['mode']} | {r['method']} | {r.get('backend', '')} | {r['median_us']:.1f} | "
                     f"{r['min_us']:.1f} | {fmt(r['ratio_sdpa'], '.1f')} | {fmt(r.get('aten_ops'), '.0f')} | "
                     f"{fmt(r.get('kernels'), '.1f')} |")
    if data["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{m}: {why}" for m, why in data["skipped"].items())]
    if data["targets"]:
        lines += ["", "| target | value | limit | met |", "| --- | ---: | ---: | --- |"]
        for name, t in data["targets"].items():
            value = t.get("ratio", t.get("launches"))
            lines.append(f"| {name} | {fmt(value, '.2f')} | {t['limit']:g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def default_stem(device: str) -> str:
    stem = os.path.join(RESULTS_DIR, f"overhead_{device.split(':')[0]}_{datetime.date.today().isoformat()}")
    path, n = stem, 2
    while os.path.exists(path + ".json"):
        path, n = f"{stem}_{n}", n + 1
    return path


def parse_args(argv: Optional[Sequence[str]]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="+", help="default: sdpa lisa-direct lisa-auto (+ lisa-triton lisa-cuda on a GPU)")
    ap.add_argument("--batches", type=int, default=15, help="timed batches per (method, mode) [15]")
    ap.add_argument("--calls", type=int, default=200, help="calls per batch [200]")
    ap.add_argument("--warmup", type=int, default=50, help="untimed calls per (method, mode) first [50]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    ap.add_argument("--no-count", dest="count", action="store_false", help="skip the profiler's op/kernel counts")
    ap.add_argument("--no-launch-bound", dest="launch_bound", action="store_false",
                    help="GPU: skip the 14x14+1 bf16 point against sdpa-flash")
    ap.add_argument("--quick", action="store_true", help="5 batches of 50 calls")
    ap.add_argument("--out", help="output stem (STEM.json, STEM.md) [benchmarks/results/overhead_<dev>_<date>]")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.calls, args.warmup = 5, 50, 10
    args.methods = args.methods or default_methods(args.device)
    if "sdpa" not in args.methods:
        args.methods = ["sdpa"] + args.methods
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args)
    meta = machine(args.device)
    meta.update(batches=args.batches, calls=args.calls, warmup=args.warmup,
                command="python benchmarks/overhead.py " + " ".join(argv),
                inputs="q, k, v (1, 1, 5, 8), rpe (1, 1, 3, 3), grid (2, 2), num_extra 1, float32",
                timing="per-call time = wall time of a batch of calls / calls (GPU: ends with a synchronize); "
                       "median over batches, methods interleaved batch by batch",
                counts="aten ops: torch.profiler aten:: events per call, nested included; kernels: CUDA kernel "
                       "events per call")
    data = {"meta": meta, **result, "targets": targets(result["records"], args.device)}
    text = markdown(data)
    if not args.no_save:
        stem = args.out or default_stem(args.device)
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        with open(stem + ".md", "w") as f:
            f.write(text)
        print(f"saved {stem}.json and {stem}.md")
    print(text)
    return data


if __name__ == "__main__":
    main()
