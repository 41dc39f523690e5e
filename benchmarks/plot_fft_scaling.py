"""Plot the fft path's time per token against the number of tokens N, log-log, with an N log N reference.

    python benchmarks/plot_fft_scaling.py RESULTS.json [--out PLOT.png] [--D 32] [--mode fwd] [--dtype float32]

Reads a results file of benchmarks/benchmark.py and draws, for the chosen (D, mode, dtype), the median time
per token of lisa-fft (and of the baseline and lisa-direct where measured, dashed) on the 1D/2D grids and, as
separate markers, the 3D ones. The grey line is c * log2(N): what N log N time looks like per token, through
the smallest fft point; a flat line would be linear time, a slope of 1 quadratic time.
Prints the points and the time ratio per 4x tokens of lisa-fft between consecutive 2D grids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence


def series(records: Sequence[Dict], method: str, D: int, mode: str, dtype: str, rank3: bool) -> List[Dict]:
    rows = [r for r in records if r["method"] == method and r["D"] == D and r["mode"] == mode
            and r["dtype"] == dtype and r["status"] == "ok" and (len(r["grid"]) == 3) == rank3]
    return sorted(rows, key=lambda r: r["N"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--out", help="PNG path [default: <results stem>_fft_scaling.png]")
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--mode", default="fwd")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    records, meta = data["records"], data["meta"]
    base = meta.get("baseline", "sdpa")
    fft = series(records, "lisa-fft", args.D, args.mode, args.dtype, False)
    if not fft:
        print(f"no ok lisa-fft records at D={args.D}, {args.mode}, {args.dtype}", file=sys.stderr)
        return 1
    print(f"lisa-fft, D={args.D}, {args.mode}, {args.dtype}: time per token")
    for r in fft:
        print(f"  {r['grid_label']:>10} N={r['N']:>7}  {r['median_ms']:10.2f} ms  {1e3 * r['median_ms'] / r['N']:8.2f} us/token")
    for a, b in zip(fft, fft[1:]):
        ratio = b["median_ms"] / a["median_ms"]
        per4 = ratio ** (math.log(4) / math.log(b["N"] / a["N"]))
        print(f"  {a['grid_label']} -> {b['grid_label']}: time x{ratio:.2f} for x{b['N'] / a['N']:.0f} tokens "
              f"(x{per4:.2f} per 4x tokens)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, style, label in (("lisa-fft", "o-", "lisa-fft"), ("lisa-direct", "s--", "lisa-direct"),
                                 (base, "^--", base)):
        rows = series(records, method, args.D, args.mode, args.dtype, False)
        if rows:
            ax.plot([r["N"] for r in rows], [1e3 * r["median_ms"] / r["N"] for r in rows], style, label=label)
        rows3 = series(records, method, args.D, args.mode, args.dtype, True)
        if rows3:
            ax.plot([r["N"] for r in rows3], [1e3 * r["median_ms"] / r["N"] for r in rows3], style[0],
                    mfc="none", ms=9, label=f"{label}, 3D grid", color=ax.lines[-1].get_color() if rows else None)
    n0, t0 = fft[0]["N"], 1e3 * fft[0]["median_ms"] / fft[0]["N"]
    ns = [n0 * 2 ** (k / 4) for k in range(0, 4 * int(math.log2(max(r["N"] for r in records) / n0)) + 5)]
    ax.plot(ns, [t0 * math.log2(n) / math.log2(n0) for n in ns], color="0.6", lw=1, label="N log N (per token: log N)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("median time per token (us)")
    ax.set_title(f"fft path, D={args.D}, {args.mode}, {args.dtype}, B={meta.get('B')}, H={meta.get('H')}\n"
                 f"{meta.get('device_name', meta.get('device'))}, {meta.get('torch_threads', '?')} threads "
                 f"(shared machine)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = args.out or os.path.splitext(args.results)[0] + "_fft_scaling.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
