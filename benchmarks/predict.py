"""Predicted against measured, per pass: the compiled-code report's bound (benchmarks/kernel_report.py) at the
GPU's clock, beside the time benchmark.py measured, so that the proxy's error is known (gpu_session.sh runs it
after its timing stages).

    python benchmarks/predict.py timing_*.json --env env.json --out predicted.txt --json predicted.json

For each bf16 timing record of ``backend="triton"`` (lisa-triton, or lisa-auto where it ran triton) and of
FlashAttention-2 (sdpa-flash, flash-attn):

    measured forward   = the median of mode fwd;   measured backward = the median of fwd+bwd - the forward's
    predicted          = bound x (B H N^2 / 1000) / (SMs x SM clock)

``bound`` is the pass's cycles per 1000 (query, key) pairs in a kernel report of the GPU's target (sm_90a on an
H100 / H200): the sum over the pass's per-pair kernels, each at its lowest-bound spill-free config, for the
record's head dim and M = 1 (the report's 32x32 grid); FlashAttention takes the report's textbook FA2 yardstick.
The report is ``--report``, else the newest ``benchmarks/results/kernel_report_*_triton<installed version>.json``
that holds the target. SMs and the clock come from gpu_check.py env's ``env.json`` (the device's multiprocessor
count and ``nvidia-smi``'s maximum SM clock); without a GPU an H100 SXM is assumed (132 SMs, 1830 MHz: the clock
of the report's rates), and the table says so.

The bound leaves out the O(N) kernels (features, tables, the table-gradient fold) and launch latency, and
assumes that a loop's issue, tensor and atomic work overlap perfectly on every SM: measured / predicted is at
least about 1, and how far above 1 is what the proxy misses. Small problems are dominated by what it leaves out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kernel_report as kr  # noqa: E402

ASSUMED = {"gpu": "H100 SXM (assumed: no GPU)", "multiprocessors": 132, "sm_clock_mhz": 1830.0, "arch": "sm_90a"}
LISA = ("lisa-triton", "lisa-auto")
FLASH = ("sdpa-flash", "flash-attn")


def device_of(env: Optional[Dict]) -> Dict:
    """{gpu, multiprocessors, sm_clock_mhz, arch} of env.json's GPU, or the assumed H100 where it names none."""
    if not env or not env.get("gpu") or not env.get("sm_clock_mhz"):
        return dict(ASSUMED)
    major, minor = env["capability"]
    arch = {(9, 0): "sm_90a", (10, 0): "sm_100a"}.get((major, minor), f"sm_{major}{minor}")
    return {"gpu": env["gpu"], "multiprocessors": env["multiprocessors"], "sm_clock_mhz": float(env["sm_clock_mhz"]),
            "arch": arch}


def find_report(arch: str, triton_version: Optional[str]) -> Optional[str]:
    """The newest committed kernel report of the installed Triton that holds ``arch``."""
    pattern = os.path.join(HERE, "results", f"kernel_report_*_triton{triton_version or ''}*.json")
    for path in sorted(glob.glob(pattern), reverse=True):
        with open(path) as f:
            records = json.load(f)
        if isinstance(records, list) and any(r.get("arch") == arch for r in records):
            return path
    return None


def pass_bounds(records: List[Dict], arch: str) -> Dict:
    """{(family, D, pass): bound cycles per 1k pairs}: family "lisa" (backend triton) or "flash" (the yardstick),
    pass "fwd" / "bwd", bf16, M = 1, the 32x32 grid."""
    out = {}
    for key, t in kr.pass_totals(records).items():
        k_arch, dtype, D, M, grid, E, causal, boundary, pas = key
        if (k_arch, dtype, M, grid, E, causal, boundary) == (arch, "bfloat16", 1, (32, 32), 0, False, "zero"):
            family = "flash" if pas.startswith("yardstick-") else "lisa"
            out[(family, D, pas.replace("yardstick-", ""))] = t["bound"]
    return out


def rows(records: List[Dict], bounds: Dict, device: Dict, dtype: str = "bfloat16", flash=FLASH) -> List[Dict]:
    """One row per (grid, D, batch, method, pass) of ``dtype`` with a measured time and a bound."""
    ok = {(tuple(r["grid"]), r["D"], r["B"], r["H"], r["method"], r["mode"]): r for r in records
          if r.get("status") == "ok" and r.get("dtype") == dtype}
    cycles_per_s = device["multiprocessors"] * device["sm_clock_mhz"] * 1e6
    out = []
    for (grid, D, B, H, method, mode), r in sorted(ok.items()):
        if mode != "fwd":
            continue
        if method in LISA and r.get("backend") == "triton":
            family = "lisa"
        elif method in flash:
            family = "flash"
        else:
            continue
        both = ok.get((grid, D, B, H, method, "fwd+bwd"))
        measured = {"fwd": r["median_ms"], "bwd": both["median_ms"] - r["median_ms"] if both else None}
        pairs = B * H * r["N"] ** 2
        for pas, ms in measured.items():
            bound = bounds.get((family, D, pas))
            if ms is None or bound is None:
                continue
            predicted = bound * pairs / 1000 / cycles_per_s * 1e3
            out.append(dict(grid="x".join(map(str, grid)), D=D, B=B, H=H, N=r["N"], method=method, pas=pas,
                            bound_cycles_per_1k_pairs=bound, measured_ms=ms, predicted_ms=predicted,
                            measured_over_predicted=ms / predicted))
    return out


def render(table: List[Dict], device: Dict, report: str, dtype: str = "bfloat16") -> str:
    lines = [f"Predicted (the report's bf16 bound at {device['sm_clock_mhz']:.0f} MHz on {device['multiprocessors']} "
             f"SMs, {device['gpu']}) against measured ({dtype}), per pass; report {os.path.basename(report)} "
             f"({device['arch']})",
             f"{'grid':<10} {'D':>4} {'B':>4} {'method':<12} {'pass':<4} {'bound/1k':>9} {'pred ms':>9} "
             f"{'meas ms':>9} {'meas/pred':>9}"]
    for t in table:
        lines.append(f"{t['grid']:<10} {t['D']:>4} {t['B']:>4} {t['method']:<12} {t['pas']:<4} "
                     f"{t['bound_cycles_per_1k_pairs']:>9.1f} {t['predicted_ms']:>9.4f} {t['measured_ms']:>9.4f} "
                     f"{t['measured_over_predicted']:>9.2f}")
    if not table:
        lines.append(f"(no {dtype} timing of triton or FlashAttention with a bound in the report)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", help="benchmark.py result files (JSON)")
    ap.add_argument("--env", help="gpu_check.py env's JSON (the GPU, its SMs and clock)")
    ap.add_argument("--report", help="a kernel_report.py JSON (default: the newest committed one of this Triton)")
    ap.add_argument("--dtype", default="bfloat16", help="the timings' dtype [bfloat16] (the bound is bf16's; the "
                                                        "dry run's CPU timings are float32)")
    ap.add_argument("--flash", nargs="+", default=list(FLASH), help=f"FlashAttention's methods {list(FLASH)}")
    ap.add_argument("--out", help="write the table here")
    ap.add_argument("--json", help="write the rows (and the device, the report) here")
    args = ap.parse_args(argv)
    env = None
    if args.env and os.path.exists(args.env):
        with open(args.env) as f:
            env = json.load(f)
    device = device_of(env)
    report = args.report or find_report(device["arch"], (env or {}).get("triton"))
    if report is None:
        print(f"no kernel report for {device['arch']} and triton {(env or {}).get('triton')}")
        return 1
    with open(report) as f:
        bounds = pass_bounds(json.load(f), device["arch"])
    records = []
    for path in args.results:
        with open(path) as f:
            records += json.load(f).get("records", [])
    table = rows(records, bounds, device, args.dtype, tuple(args.flash))
    text = render(table, device, report, args.dtype)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "report": os.path.basename(report), "rows": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
