"""Time LiSA's backends against FlashAttention-style softmax attention and the other usual baselines.

    python benchmarks/benchmark.py                       # the default set (~2-4 min on 2 CPU cores), cuda if present
    python benchmarks/benchmark.py --full                # the full sweep: every grid, D and method (30-50 min)
    python benchmarks/benchmark.py --quick               # a tiny sweep (smoke test, ~1 minute on a CPU)
    python benchmarks/benchmark.py --grids 64x64 16x64x64 --dims 64 --modes fwd+bwd --methods sdpa lisa-auto

The default set (``DEFAULT_CASES``) is a few points: ViT sizes (14x14 and 32x32 tokens at D = 64, every
method), 64x64 and 128x128 at D = 32 (where the fft path overtakes SDPA on the CPU), forward and
forward+backward, within a time budget (``--budget-seconds``). ``--full`` is the product of ``FULL_GRIDS``,
``FULL_DIMS`` and both modes; ``--grids``/``--dims`` give a product of your own, ``--cases`` exact points.
This file is the command line; the work is done by ``methods.py`` (what runs), ``harness.py`` (how it is
measured) and ``reports.py`` (what is written).

Each case is one (grid, head dim D, dtype, mode, method): fresh random inputs q, k, v (B, H, N, D) and
rpe = 0.1 * randn (H, 1, 2*S1-1, ...), ``--rotate`` independent input sets used in turn (so that no method
finds its inputs in cache), warm-up calls, then ``--repeats`` timed calls; the median and the minimum are
reported, with the ratio to the baseline (FlashAttention-2 through SDPA on a GPU, SDPA on the CPU) on the
same (grid, D, dtype, mode), the peak memory and the throughput (TFLOP/s, formulas in ``FLOP_FORMULAS``).

- modes: "fwd" (the forward alone), "bwd" (the backward alone: ``torch.autograd.grad`` of an output made
  beforehand, graph retained), "fwd+bwd" (both). The backward takes the gradients of q, k, v and of the
  method's position parameters (LiSA's rpe, dense-bias's table) for a fixed random upstream gradient.
- methods: see ``METHOD_HELP``.
- timing: ``time.perf_counter`` on the CPU; CUDA events around each call on a GPU.
- memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation once the inputs exist; on the
  CPU each case runs in a fresh child process (forked from a server that has only imported the libraries)
  that samples its resident set size every ~1 ms during the calls: peak RSS minus RSS before the first call.
- cases whose estimated time per call exceeds ``--max-seconds`` are recorded as skipped ("estimated too
  slow"): LiSA's estimate is its cost model (``lisa_kernels.explain``), a baseline's is an extrapolation
  from its own time on the previous, smaller grid (N^2 for softmax attention, N for linear attention).
- progress: a line per case with the time it took and the time left, predicted from those estimates and
  the cases so far; a case predicted to end past ``--budget-seconds`` (counted from the command's start) is
  recorded as skipped ("over the time budget") instead of running over, and one still running when the
  budget runs out is stopped (its child process killed) and recorded the same way.

Writes ``<out>.json`` (metadata, one record per case, the issue's targets), ``<out>.csv`` (the records),
``<out>.md`` (tables), ``<out>.png`` (time vs tokens) and ``<out>_speedup.png`` (baseline / lisa-auto, grid
x D), by default under benchmarks/results/. ``benchmarks/compare.py`` compares two runs or two git refs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from harness import run_sweep
from methods import DTYPES, METHOD_HELP, METHODS, MODES, build_cases, parse_grid, parse_point
from reports import finish, metadata

import lisa_kernels  # noqa: E402  (after methods, which puts the lisa_kernels to benchmark on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_DEFAULT_METHODS = ("sdpa", "dense-bias", "linear", "lisa-direct", "lisa-fft", "lisa-auto")
# (the FlexAttention peers flex-lisa and flex-rpb only on a GPU: on the CPU they have no backward, and each case
# compiles them anew in its own process, seconds a case; benchmarks/cpu_direct.py times flex-lisa on the CPU)
GPU_DEFAULT_METHODS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn", "dense-bias", "linear",
                       "lisa-direct", "lisa-fft", "lisa-auto", "lisa-triton", "lisa-triton-fft", "lisa-cuda",
                       "flex-lisa", "flex-rpb")
DEFAULT_MODES = ("fwd", "fwd+bwd")
# The default set: exact GRID:D:MODE[:METHODS] points (as --cases), chosen to end in a few minutes on 2 CPU
# cores. ViT sizes (14x14 = ViT-B/16 at 224 pixels, 32x32 at 512) at ViT's head dim 64 with every method; 64x64
# and 128x128 at D = 32, where the fft path catches up with and then beats SDPA on the CPU, without the
# methods that take minutes there (dense-bias's (H, N, N) bias; lisa-direct's backward at 128x128).
# On a GPU every method runs at every point.
DEFAULT_CASES = ("14x14:64:fwd", "14x14:64:fwd+bwd", "32x32:64:fwd", "32x32:64:fwd+bwd",
                 "64x64:32:fwd:sdpa,linear,lisa-direct,lisa-fft,lisa-auto",
                 "64x64:32:fwd+bwd:sdpa,linear,lisa-direct,lisa-fft,lisa-auto",
                 "128x128:32:fwd:sdpa,linear,lisa-direct,lisa-fft,lisa-auto",
                 "128x128:32:fwd+bwd:sdpa,linear,lisa-fft,lisa-auto")
DEFAULT_BUDGET_SECONDS = 270.0     # the default set's cap, from the command's start (python benchmarks/run.py)
# --full: every grid, D and mode
FULL_GRIDS = ("7x7", "14x14", "28x28", "32x32", "56x56", "64x64", "128x128", "256x256", "8x32x32", "16x64x64")
FULL_DIMS = (32, 64, 128)
QUICK_GRIDS = ("14x14", "32x32")
QUICK_DIMS = (32,)
DEFAULT_MAX_SECONDS = 25.0
RESULTS_DIR = os.path.join(HERE, "results")


def default_out(device: str, sweep: str) -> str:
    """benchmarks/results/<cpu|cuda>_<date>[_full|_quick][_2].json, never overwriting an earlier result."""
    stem = os.path.join(RESULTS_DIR, f"{device.split(':')[0]}_{datetime.date.today().isoformat()}"
                        + (f"_{sweep}" if sweep in ("full", "quick") else ""))
    path, n = stem + ".json", 2
    while os.path.exists(path):
        path, n = f"{stem}_{n}.json", n + 1
    return path


# ------------------------------------------------------------------------------------------------ CLI

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="methods:\n" + "\n".join(f"  {m:<15} {h}" for m, h in METHOD_HELP.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help=f"the full sweep: grids {' '.join(FULL_GRIDS)} x D {' '.join(map(str, FULL_DIMS))} x "
                         "--modes, every method (30-50 min on 2 CPU cores) [default: the default set, below]")
    ap.add_argument("--grids", nargs="+", type=parse_grid, metavar="SxS",
                    help=f"token grids, e.g. 64x64 (2D), 1024 (1D), 8x32x32 (3D), times --dims and --modes "
                         f"[default with --full or --dims: {' '.join(FULL_GRIDS)}]")
    ap.add_argument("--cases", nargs="+", type=parse_point, metavar="GRID:D:MODE[:METHOD,...]",
                    help="measure exactly these points instead of --grids x --dims x --modes, e.g. "
                         "256x256:32:fwd 128x128:64:fwd+bwd:sdpa,lisa-fft (a point that names methods runs those "
                         f"of --methods, and the baseline) [default: {' '.join(DEFAULT_CASES)}]")
    ap.add_argument("--dims", nargs="+", type=int, metavar="D",
                    help=f"head dims D (Dk = Dv) [default with --full or --grids: {' '.join(map(str, FULL_DIMS))}]")
    ap.add_argument("--modes", nargs="+", choices=MODES,
                    help=f"[default: {' '.join(DEFAULT_MODES)}; with the default set, its points of these modes]")
    ap.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                    help=f"any of the methods below [default on the CPU: {' '.join(CPU_DEFAULT_METHODS)}; on a GPU: "
                         f"{' '.join(GPU_DEFAULT_METHODS)}]")
    ap.add_argument("--baseline", help="the method ratios are taken against [default: sdpa-flash on a GPU, sdpa on "
                                       "the CPU]; it is added to --methods")
    ap.add_argument("--dtypes", "--dtype", nargs="+", choices=DTYPES, metavar="DTYPE",
                    help="any of float32 bfloat16 float16 float64 [default: float32 on the CPU, bfloat16 on a GPU]")
    ap.add_argument("--batch", "-B", type=int, default=1, help="batch size B [default: 1]")
    ap.add_argument("--heads", type=int, default=4, help="number of heads H [default: 4]")
    ap.add_argument("--repeats", type=int, help="timed calls per case [default: 3 on the CPU, 30 on a GPU]")
    ap.add_argument("--warmup", type=int, help="untimed calls first [default: 1 on the CPU, 5 on a GPU]")
    ap.add_argument("--min-time", type=float,
                    help="keep timing a case (beyond --repeats, up to 1000 calls) until this many seconds are "
                         "spent, so that fast cases get many samples [default: 0.5 on the CPU, 0.2 on a GPU]")
    ap.add_argument("--rotate", type=int, default=3,
                    help="independent input sets, used in turn, so that caches do not flatter anyone [default: 3]")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda if available, else cpu; the default), cpu, cuda, cuda:1 ...")
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                    help=f"skip a case whose estimated time per call exceeds this [default: {DEFAULT_MAX_SECONDS:g}]")
    ap.add_argument("--budget-seconds", type=float,
                    help="skip a case predicted to end more than this many seconds after the command started "
                         f"(0: no limit) [default: {DEFAULT_BUDGET_SECONDS:g} for the default set, else none]")
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny sweep for smoke tests: grids {' '.join(QUICK_GRIDS)}, D=32, 2 repeats "
                         "(explicit --grids/--dims/--repeats still win)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; case i uses seed + i [default: 0]")
    ap.add_argument("--in-process", action="store_true",
                    help="on the CPU, measure in this process instead of a fresh child process per case "
                         "(memory numbers less clean)")
    ap.add_argument("--out", help="output JSON path; .csv, .md and .png files are written next to it "
                                  "[default: benchmarks/results/<device>_<date>[_full|_quick].json]")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
    ap.add_argument("--fake-gpu", metavar="NAME",
                    help="simulate this GPU (a key of lisa_kernels.testing.DEVICES, e.g. h100; needs --device cpu, "
                         "--in-process and TRITON_INTERPRET=1 set before the start): the GPU's host code runs, its "
                         "Triton autotuning included, the kernels in Triton's interpreter; the times mean nothing. "
                         "The meta records what the simulated GPU counted (gpu_session.sh --dry-run)")
    ap.add_argument("--report", metavar="RESULTS.json",
                    help="measure nothing: rewrite the CSV, markdown and plots (and the targets) of a saved run")
    args = ap.parse_args(argv)
    return resolve_defaults(ap, args)


def resolve_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.report:
        return args
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device")
    on_cuda = args.device.startswith("cuda")
    if args.full and (args.quick or args.cases):
        ap.error("--full is the full sweep: not with --quick or --cases")
    args.sweep = ("full" if args.full else "quick" if args.quick else "custom" if args.cases or args.grids or args.dims
                  else "default")
    if args.sweep == "default":
        points = [parse_point(p) for p in DEFAULT_CASES]
        args.cases = [(g, D, m, None if on_cuda else only) for g, D, m, only in points
                      if args.modes is None or m in args.modes]
        if not args.cases:
            ap.error(f"the default set has no point of --modes {' '.join(args.modes)}")
    args.modes = args.modes or list(DEFAULT_MODES)
    if args.cases:
        args.grids = sorted({c[0] for c in args.cases}, key=lambda g: (math.prod(g), g))
        args.dims = sorted({c[1] for c in args.cases})
        args.modes = [m for m in MODES if any(c[2] == m for c in args.cases)]
    args.grids = args.grids or [parse_grid(g) for g in (QUICK_GRIDS if args.quick else FULL_GRIDS)]
    args.dims = args.dims or list(QUICK_DIMS if args.quick else FULL_DIMS)
    if args.budget_seconds is None:
        args.budget_seconds = DEFAULT_BUDGET_SECONDS if args.sweep == "default" else 0.0
    args.repeats = args.repeats or (2 if args.quick else 30 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if on_cuda else 0.5)
    args.dtypes = args.dtypes or (["bfloat16"] if on_cuda else ["float32"])
    args.baseline = args.baseline or ("sdpa-flash" if on_cuda else "sdpa")
    args.methods = list(dict.fromkeys([args.baseline] + list(args.methods or default_methods(args.device))))
    if args.baseline not in METHODS:
        ap.error(f"--baseline must be one of the methods, got {args.baseline!r}")
    if args.fake_gpu and (on_cuda or not args.in_process or os.environ.get("TRITON_INTERPRET") != "1"):
        ap.error("--fake-gpu needs --device cpu, --in-process and TRITON_INTERPRET=1 in the environment")
    if min(args.batch, args.heads, args.repeats, args.rotate, *args.dims) < 1 or args.warmup < 0:
        ap.error("--batch, --heads, --repeats, --rotate and --dims must be positive, --warmup at least 0")
    return args


SIMULATED_COUNTS = ("compiles", "autotunings", "candidates_run")     # lisa_kernels.testing.Simulation.stats


def simulated(name: Optional[str]):
    """``lisa_kernels.testing.fake_gpu(name)`` (--fake-gpu), else no simulation; yields the Simulation or None."""
    if not name:
        return contextlib.nullcontext(None)
    from lisa_kernels.testing import fake_gpu
    return fake_gpu(name)


def default_methods(device: str) -> List[str]:
    """The CPU's default methods; on a GPU also every compiled LiSA backend that can run there."""
    if not device.startswith("cuda"):
        return list(CPU_DEFAULT_METHODS)
    return list(GPU_DEFAULT_METHODS)


def main(argv: Optional[Sequence[str]] = None, started: Optional[float] = None) -> int:
    """Run the sweep that ``argv`` describes (or redo a saved run's reports); ``started``, a
    ``time.perf_counter()`` reading, is when the command began (``--budget-seconds`` counts from it)."""
    started = time.perf_counter() if started is None else started
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        finish(saved["records"], saved["meta"], os.path.abspath(args.report), args.no_plot, remeasure=False)
        return 0
    json_path = os.path.abspath(args.out or default_out(args.device, args.sweep))
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    meta = metadata(args, argv)
    cases = build_cases(args)
    budget = f", --budget-seconds {args.budget_seconds:g}" if args.budget_seconds else ""
    print(f"{len(cases)} cases ({args.sweep} set) on {meta['device_name']} ({args.device}, {' '.join(args.dtypes)}, "
          f"B={args.batch}, H={args.heads}, {args.repeats} repeats, --max-seconds {args.max_seconds:g}{budget}; "
          f"{meta['library']})", flush=True)
    t0 = time.perf_counter()
    with simulated(args.fake_gpu) as sim:
        records = run_sweep(cases, args, meta, json_path + ".tmp", started)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if sim is not None:
        totals = sim.totals()
        meta["simulated_gpu"] = {"device": sim.device.name, **{k: totals[k] for k in SIMULATED_COUNTS},
                                 "by_kernel": {k: dict(v) for k, v in sim.stats.items()}}
        print(f"simulated {sim.device.name}: " + ", ".join(f"{totals[k]} {k}" for k in SIMULATED_COUNTS))
    finish(records, meta, json_path, args.no_plot)
    os.remove(json_path + ".tmp")
    print(f"sweep took {meta['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
