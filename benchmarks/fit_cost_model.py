"""Fit the cost model behind backend="auto" (lisa_kernels/cost_model.json) to a benchmark results file.

    python benchmarks/fit_cost_model.py RESULTS.json [--device-class CLASS] [--dry-run] [--force]

The device class is --device-class, else the file's meta["device_class"], else "cpu" if meta["device"] is
"cpu". For each backend b of that class's entry with measurements (records of method "lisa-<b>", or "flex-lisa"
for b = "flex", status "ok"; the problems are those of benchmarks/benchmark.py: M = 1, zero boundary, not causal,
no extra tokens), with the formulas of lisa_kernels.dispatch.backend_seconds:

1. forward constants from the float32 "fwd" records (direct kind: flops_per_s, overhead_s; fft kind:
   s_per_plogp, s_per_point, overhead_s), minimising the relative error

       sum_i w_i log(model_i / measured_i)^2

   over the logs of the constants (so they stay positive), by Nelder-Mead. w_i = 1, plus
   WEIGHT_NEAR_CROSSOVER where another backend measured at the same point is within CROSSOVER_RATIO of it:
   there the choice is close, so errors there cost most (unweighted, the CPU fit of 2026-11-25 put the
   128x128 D=32 fwd+bwd point exactly on the crossover). An overhead_s that ends below UNSEEN_SHARE of the
   model at every point is one the data cannot see (the smallest problems measured take far longer): it keeps
   its old value and the other constants are refitted (otherwise it drifts to ~0, and auto would send tiny
   problems, which the sweep never measures, to the fft path);
2. backward_factor from the float32 "fwd+bwd" records, t_fb = t_f (1 + backward_factor) with t_f the fitted
   forward model: the same weighted least squares in log space,
   log(1 + bf) = sum w_i log(t_fb,i / t_f,i) / sum w_i;
3. dtype_factor[dtype] for every other dtype measured: the median of measured / model over its records.

Constants are rounded to 3 significant digits. Prints, per point, the measured time and the model's before
and after, and per backend the median |log error|; then, for every point (grid, D, mode, B, H, dtype) where at
least two fast backends were measured, whether lisa_kernels.dispatch.choose_among picks one within 1.2x of the
fastest measured (the check of tests/test_cost_model.py). Exit code 1 if any fails; the class's entry is then
not written (unless --force). Otherwise the entry is written into lisa_kernels/cost_model.json (other classes
untouched), with measured = true and its source, unless --dry-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:      # fit the checkout this script lives in
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from lisa_kernels import dispatch  # noqa: E402
from lisa_kernels._validate import Problem  # noqa: E402
from lisa_kernels.backends import REGISTRY  # noqa: E402

FAST = tuple(b.name for b in REGISTRY if b.cost is not None)     # the backends with constants (each under its name)
PEERS = {"flex-lisa": "flex"}     # backends the sweep times under a peer's name (benchmarks/methods.py)


def method_backend(method: str) -> Optional[str]:
    """The backend a record's method times: "lisa-fft" -> "fft", "flex-lisa" -> "flex"; None for the others."""
    return PEERS.get(method) or (method[len("lisa-"):] if method.startswith("lisa-") else None)
PARAMS = {"direct": ("flops_per_s", "overhead_s"), "fft": ("s_per_plogp", "s_per_point", "overhead_s")}
BASE_DTYPE = "float32"
MODES = {"fwd": False, "fwd+bwd": True}                        # mode -> backward
WITHIN = 1.2                     # the check: the chosen backend is at most this much slower than the fastest
CROSSOVER_RATIO = 3.0            # measured times of two backends within this ratio: a close choice ...
WEIGHT_NEAR_CROSSOVER = 4.0      # ... whose points get this extra weight in the fit
UNSEEN_SHARE = 0.05              # an overhead below this share of every fitted time is not seen by the data


def problem(r: Dict) -> Problem:
    """The Problem of a benchmark record (benchmark.py's inputs: M = 1, zero boundary, not causal)."""
    return Problem(B=r["B"], H=r["H"], N=r["N"], Dk=r["D"], Dv=r["D"], M=1, grid=tuple(r["grid"]), num_extra=0,
                   feature_map="elu1", normalize=True, eps=1e-6, boundary="zero", causal=False, scale=1.0,
                   dtype=getattr(torch, r["dtype"]), device=torch.device("cpu"))


def point_key(r: Dict) -> Tuple:
    return tuple(r["grid"]), r["D"], r["mode"], r["B"], r["H"], r["dtype"]


def measured_points(records: Sequence[Dict], backends: Sequence[str]) -> Dict[Tuple, Dict[str, float]]:
    """{point: {backend: median ms}} over the ok "fwd" / "fwd+bwd" records of the given backends."""
    points: Dict[Tuple, Dict[str, float]] = {}
    for r in records:
        name = method_backend(r["method"])
        if r.get("status") == "ok" and name in backends and r["mode"] in MODES:
            points.setdefault(point_key(r), {})[name] = r["median_ms"]
    return points


def sig3(x: float) -> float:
    return float(f"{x:.3g}")


def nelder_mead(f: Callable[[List[float]], float], x0: Sequence[float], step: float = 1.0,
                iters: int = 2000) -> List[float]:
    """Minimise f from x0 (a plain Nelder-Mead: reflect, expand, contract, shrink)."""
    n = len(x0)
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < 1e-14 and max(abs(a - b) for p in pts[1:] for a, b in zip(p, pts[0])) < 1e-9:
            break
        centroid = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]

        def toward(t):     # centroid + t (worst - centroid)
            return [c + t * (w - c) for c, w in zip(centroid, pts[-1])]
        xr = toward(-1.0)
        fr = f(xr)
        if fr < vals[0]:
            xe = toward(-2.0)
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = toward(0.5)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [[b + 0.5 * (x - b) for b, x in zip(pts[0], p)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(n + 1), key=vals.__getitem__)]


def crossover_weight(times: Dict[str, float], name: str) -> float:
    """1, or 1 + WEIGHT_NEAR_CROSSOVER if another backend's time at this point is within CROSSOVER_RATIO."""
    t = times[name]
    close = any(o != name and max(t, u) <= CROSSOVER_RATIO * min(t, u) for o, u in times.items())
    return 1.0 + WEIGHT_NEAR_CROSSOVER * close


def fit_forward(c: Dict, names: Sequence[str], fwd: Sequence[Tuple[Problem, float, float]]) -> Dict[str, float]:
    """The constants ``names`` of entry ``c`` minimising sum w log(model / measured)^2 over the forward points
    (Nelder-Mead over their logs, so they stay positive), rounded to 3 significant digits."""
    def loss(logs):
        trial = {**c, **{n: math.exp(v) for n, v in zip(names, logs)}}
        return sum(w * math.log(dispatch.backend_seconds(trial, p, False) / t) ** 2 for p, t, w in fwd)
    x = [math.log(c[n]) for n in names]
    for _ in range(3):            # restarts: Nelder-Mead can stall on a degenerate simplex
        x = nelder_mead(loss, x)
    return {n: sig3(math.exp(v)) for n, v in zip(names, x)}


def fit_backend(name: str, old: Dict, records: Sequence[Dict], points: Dict[Tuple, Dict[str, float]]) -> Dict:
    """New constants of one backend (see the module docstring); those without records keep their old values."""
    kind = old.get("kind", name)
    c = {k: v for k, v in old.items() if k != "dtype_factor"}
    c["kind"] = kind
    base = [r for r in records if r["dtype"] == BASE_DTYPE]

    def data(mode):     # [(problem, measured seconds, weight)]
        return [(problem(r), r["median_ms"] / 1e3, crossover_weight(points[point_key(r)], name))
                for r in base if r["mode"] == mode]
    fwd, fb = data("fwd"), data("fwd+bwd")

    if fwd:
        free = list(PARAMS[kind])
        c.update(fit_forward(c, free, fwd))
        share = max(c["overhead_s"] / dispatch.backend_seconds(c, p, False) for p, _, _ in fwd)
        if share < UNSEEN_SHARE:     # the data cannot see the overhead: keep the old one, refit the rest
            print(f"{name}: fitted overhead_s {c['overhead_s']:.3g} is < {UNSEEN_SHARE:.0%} of every measured "
                  f"time, so the data do not determine it; keeping {old['overhead_s']:.3g}")
            c["overhead_s"] = old["overhead_s"]
            free.remove("overhead_s")
            c.update(fit_forward(c, free, fwd))
    if fb:
        log_ratio = sum(w * math.log(t / dispatch.backend_seconds(c, p, False)) for p, t, w in fb) / sum(
            w for _, _, w in fb)
        c["backward_factor"] = sig3(max(math.exp(log_ratio) - 1.0, 1e-3))
    factors = {}
    for dtype in sorted({r["dtype"] for r in records} - {BASE_DTYPE}):
        ratios = [r["median_ms"] / 1e3 / dispatch.backend_seconds(c, problem(r), MODES[r["mode"]])
                  for r in records if r["dtype"] == dtype]
        factors[dtype] = sig3(statistics.median(ratios))
    if factors:
        c["dtype_factor"] = factors
    if "kind" not in old:
        del c["kind"]
    return c


def seconds(entry: Dict, name: str, r: Dict) -> Optional[float]:
    """The model's time of backend ``name`` of a class entry for record ``r`` (None if it has no model)."""
    if name not in entry:
        return None
    return dispatch.backend_seconds({"kind": name, **entry[name]}, problem(r), MODES[r["mode"]])


def fmt_ms(s: Optional[float]) -> str:
    return f"{'-':>10}" if s is None else f"{s * 1e3:10.3f}"


def report_fit(records_by: Dict[str, List[Dict]], old: Dict, new: Dict) -> None:
    print(f"{'grid':>10} {'D':>4} {'mode':>8} {'dtype':>9} {'backend':>10} {'measured':>10} {'before':>10} "
          f"{'after':>10}   (ms)")
    errors = {}
    for name, recs in records_by.items():
        for r in sorted(recs, key=lambda r: (r["mode"], r["dtype"], r["N"], r["D"])):
            before, after = seconds(old, name, r), seconds(new, name, r)
            print(f"{'x'.join(map(str, r['grid'])):>10} {r['D']:>4} {r['mode']:>8} {r['dtype']:>9} {name:>10} "
                  f"{r['median_ms']:10.3f} {fmt_ms(before)} {fmt_ms(after)}")
            errors.setdefault(name, ([], []))
            t = r["median_ms"] / 1e3
            if before is not None:
                errors[name][0].append(abs(math.log(before / t)))
            errors[name][1].append(abs(math.log(after / t)))
    print("\nmedian |log(model / measured)| per backend (0.1 ~ 10 % off):")
    for name, (b, a) in errors.items():
        before = f"{statistics.median(b):.3f}" if b else "  -  "
        print(f"  {name:<10} before {before}   after {statistics.median(a):.3f}   ({len(a)} points)")


def check_choices(points: Dict[Tuple, Dict[str, float]], cls: str, old_entry: Dict, new_entry: Dict) -> bool:
    """choose_among the measured backends at each point with >= 2 of them: within WITHIN x of the fastest?"""
    def choose(entry, names, p, backward):
        dispatch.COST_MODEL[cls] = entry          # choose_among reads the in-memory model
        return dispatch.choose_among(names, p, backward, cls)

    print(f"\nauto's choice among the measured backends (must be within {WITHIN}x of the fastest):")
    ok_all = True
    for key, times in sorted(points.items()):
        if len(times) < 2:
            continue
        grid, D, mode, B, H, dtype = key
        p = problem({"grid": grid, "N": math.prod(grid), "D": D, "B": B, "H": H, "dtype": dtype})
        names = [n for n in FAST if n in times]
        before = choose(old_entry, names, p, MODES[mode])
        after = choose(new_entry, names, p, MODES[mode])
        best = min(times, key=times.get)
        ok = times[after] <= WITHIN * times[best]
        ok_all &= ok
        measured = ", ".join(f"{n} {times[n]:.1f}" for n in names)
        print(f"  {'ok  ' if ok else 'FAIL'} {'x'.join(map(str, grid)):>9} D{D:<3} {mode:<8} {dtype:<8} "
              f"picks {after:<10} (before: {before:<10}) measured ms: {measured}"
              + ("" if ok else f"  -> {times[after] / times[best]:.2f}x the fastest"))
    return ok_all


def format_number(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return json.dumps(x)
    if x == int(x) and abs(x) < 1e4:
        return str(int(x))
    if abs(x) >= 1e4 or abs(x) < 1e-4:
        mantissa, exponent = f"{x:.15e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return repr(float(x))


def format_compact(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {format_compact(x)}" for k, x in v.items()) + "}"
    return format_number(v)


def format_model(model: Dict) -> str:
    """cost_model.json as the repository keeps it: one line per key of a class, each backend on one line."""
    blocks = []
    for key, val in model.items():
        if isinstance(val, dict):
            inner = ",\n".join(f"    {json.dumps(k)}: {format_compact(v)}" for k, v in val.items())
            blocks.append(f"  {json.dumps(key)}: {{\n{inner}\n  }}")
        else:
            blocks.append(f"  {json.dumps(key)}: {json.dumps(val)}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a benchmarks/results/*.json file")
    ap.add_argument("--device-class", help=f"one of {list(dispatch.DEVICE_CLASSES)} (default: from the meta)")
    ap.add_argument("--dry-run", action="store_true", help="fit, print and check; do not write cost_model.json")
    ap.add_argument("--force", action="store_true", help="write the fitted entry even if the choice check fails")
    args = ap.parse_args(argv)

    with open(args.results) as f:
        data = json.load(f)
    meta, records = data.get("meta", {}), data["records"]
    cls = args.device_class or meta.get("device_class") or ("cpu" if meta.get("device") == "cpu" else None)
    if cls is None:
        ap.error("the results file does not say its device class (meta['device_class']); pass --device-class")
    with open(dispatch._MODEL_PATH) as f:
        model = json.load(f)
    if cls not in model:
        ap.error(f"device class {cls!r} is not in {dispatch._MODEL_PATH} (classes: "
                 f"{[k for k, v in model.items() if isinstance(v, dict)]})")
    old_entry = model[cls]
    backends = [n for n in FAST if isinstance(old_entry.get(n), dict)]
    points = measured_points(records, backends)
    records_by = {n: [r for r in records if r.get("status") == "ok" and method_backend(r["method"]) == n
                      and r["mode"] in MODES] for n in backends}
    records_by = {n: recs for n, recs in records_by.items() if recs}
    if not records_by:
        print(f"no ok records of {[{v: k for k, v in PEERS.items()}.get(n, 'lisa-' + n) for n in backends]} in "
              f"{args.results}", file=sys.stderr)
        return 1

    print(f"device class {cls}: fitting {', '.join(records_by)} to {args.results}\n")
    fitted = {n: fit_backend(n, old_entry[n], recs, points) for n, recs in records_by.items()}
    kept = [n for n in backends if n not in fitted]
    source = (f"fitted by benchmarks/fit_cost_model.py to {os.path.basename(args.results)} "
              f"({str(meta.get('date', '?'))[:10]}, {meta.get('device_name', meta.get('device', '?'))})")
    if kept:
        source += f"; not measured there, kept from before: {', '.join(kept)}"
    new_entry = {"measured": True, "source": source}
    new_entry.update({n: fitted.get(n, old_entry[n]) for n in backends})

    report_fit(records_by, old_entry, new_entry)
    print("\nconstants (old -> new):")
    for n in backends:
        print(f"  {n:<10} {format_compact(old_entry[n])}\n  {'':<10} {format_compact(new_entry[n])}")

    ok = check_choices(points, cls, old_entry, new_entry)
    print(f"\ncheck: {'all choices within ' + str(WITHIN) + 'x' if ok else 'FAILED at the points above'}")

    if args.dry_run:
        print("--dry-run: cost_model.json not written")
    elif not ok and not args.force:
        print("cost_model.json not written, since the check failed (--force writes it anyway)")
    else:
        model[cls] = new_entry
        with open(dispatch._MODEL_PATH, "w") as f:
            f.write(format_model(model))
        print(f"wrote class {cls!r} into {os.path.relpath(dispatch._MODEL_PATH)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
