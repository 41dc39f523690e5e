"""LiSA's ``backend="auto"`` against ``F.scaled_dot_product_attention`` and the FlexAttention peer ``flex-lisa`` on
the CPU, at ViT sizes, in one process.

    python benchmarks/cpu_direct.py                   # the target points (about 3 min on 2 cores), saves the results
    python benchmarks/cpu_direct.py --quick --no-save # a smoke run

The targets of issue 20 (float32, 2 threads, medians, same run as SDPA): ``auto`` at most 1.2x SDPA's time
forward (no grad) and 1.5x forward+backward, at 14x14, 24x24, 32x32 (B=8, H=4, D=64) and 64x64 (B=1, H=4,
D=64), with the package installed from a CPU-only torch. The peer's (same run): ``auto`` forward at most 0.6x
``flex-lisa``'s (``lisa_attention(..., backend="flex")``: the same operator through PyTorch's FlexAttention) at
14x14, 24x24 and 32x32 (B=8); forward+backward ``auto`` runs where ``flex-lisa`` cannot (FlexAttention has no
backward on the CPU: recorded as skipped, with that reason).

Method:
- inputs: q, k, v (B, H, N, D) with N = num_extra + prod(grid) (``--num-extra``, default 1: a ViT's CLS token;
  ``--num-extra 0`` is the sweep's convention), rpe (H, 1, 2S-1, 2S-1) = 0.1 randn, rpe_extra (H, 1, 3) where
  there are extra tokens, float32 (``--dtype``); seeded;
- modes: ``fwd`` (under torch.no_grad) and ``fwd+bwd`` (every input requires grad; ``out.backward(g)`` with a
  fixed random g; the inputs' .grad are reset to None outside the timed region);
- methods: ``sdpa`` (torch's own kernel choice) and ``--methods`` (default ``lisa-auto flex-lisa``; also any
  ``lisa-<backend>`` and ``flex-rpb``, softmax attention with a relative-position bias through FlexAttention,
  benchmarks/methods.py); a method that cannot run a (case, mode) is recorded as skipped with the reason;
- timing: after ``--warmup`` calls of each (FlexAttention's first call per shape compiles it: seconds), ``--repeats``
  rounds in which every method runs once, in a rotating order (so that a change in machine load hits all of them
  alike); the median per method, and the ratio of medians to SDPA's and to flex-lisa's (also the median of the
  per-round ratios, a check of the first);
- environment: torch threads (``--threads``, default 2), torch version, CPU model, load average, whether
  lisa_kernels._C is built and which backend ``auto`` chose (``lisa_kernels.explain``).

Output: ``benchmarks/results/direct_vs_sdpa_cpu_<date>.json`` and ``.md`` (``--out STEM`` to choose), and a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
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
from methods import flex_reason, flex_rpb_attention, is_lisa, lisa_backend, rpb_token_index  # noqa: E402
from reports import cpu_model  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
MODES = ("fwd", "fwd+bwd")
TARGETS = {"fwd": 1.2, "fwd+bwd": 1.5}                    # lisa-auto / sdpa, at most
PEER = "flex-lisa"
PEER_TARGETS = {"fwd": 0.6}                               # lisa-auto / flex-lisa, at most (B = 8 cases)
# (grid, B): H = 4 and D = 64 everywhere
CASES = (((14, 14), 8), ((24, 24), 8), ((32, 32), 8), ((64, 64), 1))
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(grid, B: int, H: int, D: int, E: int, dtype, requires_grad: bool, seed: int = 0) -> Dict:
    gen = torch.Generator().manual_seed(seed)
    N = E + grid[0] * grid[1]

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_(requires_grad)

    x = {"q": rnd(B, H, N, D), "k": rnd(B, H, N, D), "v": rnd(B, H, N, D),
         "rpe": rnd(H, 1, *[2 * s - 1 for s in grid], scale=0.1),
         "rpe_extra": rnd(H, 1, 3, scale=0.1) if E else None, "grid": tuple(grid), "E": E,
         "g": torch.randn(B, H, N, D, generator=gen).to(dtype)}
    # flex-rpb's learned bias table (H, prod(2S-1)) and token index (made after the others: same q, k, v, rpe)
    x["table"] = rnd(H, math.prod(2 * s - 1 for s in grid), scale=0.1)
    x["lin"] = rpb_token_index(grid, E, "cpu")
    return x


def cannot_run_reason(method: str, x: Dict, mode: str) -> Optional[str]:
    """Why ``method`` cannot run this (case, mode), or None: lisa_kernels' reason (explain), FlexAttention's."""
    if method == "flex-rpb":
        return flex_reason("cpu", str(x["q"].dtype).replace("torch.", ""), mode)
    if not is_lisa(method) or method == "lisa-auto":
        return None
    e = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=x["grid"], num_extra=x["E"],
                             rpe_extra=x["rpe_extra"], backward=mode == "fwd+bwd").estimates.get(lisa_backend(method))
    if e is None:
        return f"this lisa_kernels has no backend {lisa_backend(method)!r}"
    if e.reason is None and method == PEER:   # (an older dispatch does not say it of the backward)
        return flex_reason("cpu", str(x["q"].dtype).replace("torch.", ""), mode)
    return e.reason


def make_call(method: str, x: Dict, mode: str) -> Callable[[], None]:
    """One call of ``method``: the forward (under no_grad), or the forward and the backward."""
    q, k, v, rpe, rx = x["q"], x["k"], x["v"], x["rpe"], x["rpe_extra"]
    if method == "sdpa":
        def fwd():
            return F.scaled_dot_product_attention(q, k, v)
    elif method == "flex-rpb":
        def fwd():
            return flex_rpb_attention(q, k, v, x["table"], x["lin"], x["E"])
    elif is_lisa(method):
        backend = lisa_backend(method)

        def fwd():
            return lisa_kernels.lisa_attention(q, k, v, rpe, grid=x["grid"], num_extra=x["E"], rpe_extra=rx,
                                               backend=backend)
    else:
        raise ValueError(f"unknown method {method!r}")
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fwd()
        return call
    g = x["g"]

    def fwd_bwd():
        fwd().backward(g)
    return fwd_bwd


def _reset_grads(x: Dict) -> None:
    for name in ("q", "k", "v", "rpe", "rpe_extra", "table"):
        if x[name] is not None:
            x[name].grad = None


def time_rounds(calls: Dict[str, Callable[[], None]], x: Dict, repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each method over ``repeats`` rounds, one call of each per round, rotating the order."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
            _reset_grads(x)
    names = list(calls)
    out = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            _reset_grads(x)
            t0 = time.perf_counter()
            calls[n]()
            out[n].append(time.perf_counter() - t0)
    _reset_grads(x)
    return out


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", LIBRARY_ROOT, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def extension_info() -> Dict:
    from lisa_kernels.cuda_fft import extension_reason
    info = {"built": extension_reason() is None, "reason": extension_reason()}
    if info["built"]:
        from lisa_kernels import _C
        info["with_cuda"] = bool(getattr(_C, "with_cuda", False))
        info["direct_cpu_kernel"] = hasattr(_C, "direct_cpu_forward")
        info["gemm"] = _C.direct_cpu_gemm() if hasattr(_C, "direct_cpu_gemm") else None
    return info


def _ratios(ts: List[float], base: List[float], name: str) -> Dict:
    """ratio_<name>: median over the baseline's median; ratio_<name>_paired: the median of per-round ratios."""
    return {f"ratio_{name}": statistics.median(ts) / statistics.median(base),
            f"ratio_{name}_paired": statistics.median(t / b for t, b in zip(ts, base))}


def measure(args) -> Dict:
    records = []
    for grid, B in args.cases:
        for mode in MODES:
            x = make_inputs(grid, B, args.heads, args.dim, args.num_extra, DTYPES[args.dtype], mode == "fwd+bwd")
            reasons = {m: cannot_run_reason(m, x, mode) for m in args.methods}
            calls = {m: make_call(m, x, mode) for m in args.methods if reasons[m] is None}
            times = time_rounds(calls, x, args.repeats, args.warmup)
            chosen = lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=grid, num_extra=args.num_extra,
                                          rpe_extra=x["rpe_extra"], backward=mode == "fwd+bwd").chosen
            for m in args.methods:
                rec = {"grid": "x".join(map(str, grid)), "B": B, "H": args.heads, "N": x["q"].shape[2],
                       "D": args.dim, "dtype": args.dtype, "mode": mode, "method": m}
                if m == "lisa-auto":
                    rec["backend"] = chosen
                if m not in times:
                    rec.update(status="skipped", reason=reasons[m])
                    records.append(rec)
                    print(f"{rec['grid']:>6} B={B} {mode:<8} {m:<12} cannot run: {reasons[m]}", flush=True)
                    continue
                ts = times[m]
                rec.update(status="ok", median_ms=statistics.median(ts) * 1e3, min_ms=min(ts) * 1e3, repeats=len(ts),
                           **_ratios(ts, times["sdpa"], "sdpa"))
                if PEER in times:
                    rec.update(_ratios(ts, times[PEER], PEER.replace("-", "_")))
                records.append(rec)
                peer = f"  x{rec['ratio_flex_lisa']:.2f} {PEER}" if PEER in times else ""
                print(f"{rec['grid']:>6} B={B} {mode:<8} {m:<12} {rec['median_ms']:9.2f} ms  x{rec['ratio_sdpa']:.2f} "
                      f"sdpa{peer}" + (f"  ({chosen})" if m == "lisa-auto" else ""), flush=True)
    return {"records": records}


def targets(records) -> Dict:
    """auto against SDPA (issue 20's limits) and, where flex-lisa ran, against it (forward, B = 8 cases)."""
    t = {}
    for r in records:
        if r["method"] != "lisa-auto" or r["dtype"] != "float32" or r["status"] != "ok":
            continue
        limit = TARGETS[r["mode"]]
        t[f"{r['grid']}_B{r['B']}_{r['mode']}_at_most_{limit:g}x_sdpa"] = {
            "ratio": r["ratio_sdpa"], "limit": limit, "met": r["ratio_sdpa"] <= limit}
        limit = PEER_TARGETS.get(r["mode"])
        if limit is not None and "ratio_flex_lisa" in r and r["B"] == 8:
            t[f"{r['grid']}_B{r['B']}_{r['mode']}_at_most_{limit:g}x_{PEER}"] = {
                "ratio": r["ratio_flex_lisa"], "limit": limit, "met": r["ratio_flex_lisa"] <= limit}
    return t


def markdown(data: Dict) -> str:
    meta = data["meta"]
    ext = meta["extension"]
    built = (f"lisa_kernels._C built ({'CUDA' if ext.get('with_cuda') else 'CPU-only'} build, products: "
             f"{ext.get('gemm')})" if ext["built"] else f"lisa_kernels._C not built ({ext['reason']})")
    lines = [f"# LiSA auto vs SDPA{' and ' + PEER if PEER in meta.get('methods', []) else ''} on the CPU, "
             f"{meta['cpu_model']} ({meta['date']})", "",
             f"torch {meta['torch']}, {meta['torch_threads']} threads, {meta['dtype']}, H={meta['heads']}, "
             f"D={meta['dim']}, num_extra={meta['num_extra']}; {built}. {meta['repeats']} rounds after "
             f"{meta['warmup']} warm-up calls, methods interleaved; medians. Load average "
             f"{', '.join(f'{v:.2f}' for v in meta['load_average'])}. Commit {meta['git_commit']}. "
             f"Command: `{meta['command']}`", "",
             "| grid | B | N | mode | method | backend | median ms | min ms | x sdpa | x sdpa (paired) | x flex-lisa "
             "| x flex-lisa (paired) |",
             "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def num(r, key):
        return f"{r[key]:.2f}" if key in r else "-"
    for r in data["records"]:
        head = f"| {r['grid']} | {r['B']} | {r['N']} | {r['mode']} | {r['method']} | {r.get('backend', '')} |"
        if r.get("status", "ok") != "ok":
            lines.append(f"{head} cannot run: {r['reason']} |" + " |" * 5)
            continue
        lines.append(f"{head} {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['ratio_sdpa']:.2f} | "
                     f"{r['ratio_sdpa_paired']:.2f} | {num(r, 'ratio_flex_lisa')} | "
                     f"{num(r, 'ratio_flex_lisa_paired')} |")
    if data["targets"]:
        lines += ["", "| target | ratio | limit | met |", "| --- | ---: | ---: | --- |"]
        for name, t in data["targets"].items():
            lines.append(f"| {name} | {t['ratio']:.2f} | {t['limit']:g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def default_stem() -> str:
    # (not cpu_*: tests/test_cost_model.py reads the sweep files of that name)
    stem = os.path.join(RESULTS_DIR, f"direct_vs_sdpa_cpu_{datetime.date.today().isoformat()}")
    path, n = stem, 2
    while os.path.exists(path + ".json"):
        path, n = f"{stem}_{n}", n + 1
    return path


def _case(text: str):
    grid, _, batch = text.partition(":")
    return tuple(int(s) for s in grid.split("x")), int(batch or 1)


def parse_args(argv: Optional[Sequence[str]]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", type=_case, help="GRIDxGRID:B ... [14x14:8 24x24:8 32x32:8 64x64:1]")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--num-extra", type=int, default=1, help="extra (CLS) tokens [1]")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--methods", nargs="+", default=["lisa-auto", PEER],
                    help=f"methods besides sdpa: lisa-<backend>, {PEER}, flex-rpb [lisa-auto {PEER}]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds (at least 5) [9]")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each method first [2]")
    ap.add_argument("--quick", action="store_true", help="14x14 and 24x24 only, 5 rounds")
    ap.add_argument("--out", help="output stem (STEM.json, STEM.md) [benchmarks/results/direct_vs_sdpa_cpu_<date>]")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    args.cases = args.cases or list(CASES)
    if args.quick:
        args.cases, args.repeats = args.cases[:2], 5
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")
    args.methods = ["sdpa"] + [m for m in args.methods if m != "sdpa"]
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "lisa_kernels": lisa_kernels.__version__,
            "extension": extension_info(), "dtype": args.dtype, "heads": args.heads, "dim": args.dim,
            "num_extra": args.num_extra, "repeats": args.repeats, "warmup": args.warmup, "methods": args.methods,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "git_commit": git_commit(),
            "command": "python benchmarks/cpu_direct.py " + " ".join(argv)}
    result = measure(args)
    meta["load_average"] = os.getloadavg()
    data = {"meta": meta, **result, "targets": targets(result["records"])}
    text = markdown(data)
    if not args.no_save:
        stem = args.out or default_stem()
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
