"""The GPU session's checks (benchmarks/gpu_session.sh): environment and ceilings, correctness of the compiled
backends against the reference, one small call per backend for compute-sanitizer, and the targets table.

    python benchmarks/gpu_check.py env --out env.json               # device, versions, bf16 matmul and copy rates
    python benchmarks/gpu_check.py check --out check.jsonl          # triton, triton-fft, cuda vs reference
    python benchmarks/gpu_check.py sanitize-one triton triton-fft   # one small fwd+bwd call each (run under
                                                                    # compute-sanitizer by gpu_session.sh)
    python benchmarks/gpu_check.py summary timing_*.json            # the targets table: auto / FA2 per grid

Correctness: for each backend, dtype (float32, float16, bfloat16) and case (1D, 2D and 3D grids, extra tokens
with rpe_extra, M > 1 RPE groups, causal, the circular boundary), fresh random inputs (never zeros), the
output and the gradients of q, k, v, rpe and rpe_extra for a random upstream gradient, against
``backend="reference"`` in float64 on the same device (for ``direct`` also the output of a forward under
``torch.no_grad``, which runs the compiled dense form of csrc/dense.cpp where the extension is built).
Uninitialised memory is poisoned (torch.empty and friends return NaN-filled tensors while the backend runs), so
an unwritten output element fails. The error of a
tensor is max|x - x_ref| / max|x_ref|; limits: float32 2e-3 (Triton's float32 dots may use tf32), float16
1e-2, bfloat16 3e-2. Each case's result is appended to the --out file (one JSON line) as soon as it is known.
``--tiny`` (the session's dry run on the CPU, Triton's interpreter) runs small shapes only; ``--fake-gpu h100`` (the dry
run) simulates that GPU (lisa_kernels.testing.fake_gpu), so that the GPU's host code runs, and records per case the
autotune candidates compiled, the tuning keys benchmarked and the candidate runs (what a GPU would spend).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported (through lisa_kernels)

import lisa_kernels  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
BACKENDS = ("triton", "triton-fft", "cuda", "direct")

# (name, grid, E, M, D, options)
CASES = [
    ("1d-causal", (37,), 0, 1, 16, {"causal": True}),
    ("1d-extra-M2", (29,), 2, 2, 16, {}),
    ("1d-causal-extra-relu", (23,), 1, 1, 16, {"causal": True, "feature_map": "relu"}),
    ("2d-extra", (6, 7), 1, 1, 16, {}),
    ("2d-circular-M2", (5, 6), 1, 2, 16, {"boundary": "circular"}),
    ("2d-unnormalized", (4, 5), 0, 1, 16, {"normalize": False}),
    ("3d", (3, 4, 5), 0, 1, 16, {}),
    ("vit-14x14+1-D64", (14, 14), 1, 1, 64, {}),
]
TINY_CASES = [
    ("1d-causal", (5,), 0, 1, 4, {"causal": True}),
    ("2d-extra-M2", (2, 3), 1, 2, 4, {}),
    ("3d-circular", (2, 2, 2), 0, 1, 4, {"boundary": "circular"}),
]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ env

def _time(fn, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def env(args) -> Dict:
    dev = device()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "lisa_kernels": lisa_kernels.__version__, "device": dev, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import flash_attn
        info["flash_attn"] = flash_attn.__version__
    except Exception:  # noqa: BLE001
        info["flash_attn"] = None
    if dev == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(gpu=prop.name, capability=list(torch.cuda.get_device_capability(0)),
                    multiprocessors=prop.multi_processor_count, memory_gib=prop.total_memory / 2**30,
                    l2_mib=getattr(prop, "L2_cache_size", 0) / 2**20)
        n, copy_bytes = 8192, 2 * 2**30
    else:
        info["gpu"] = None
        n, copy_bytes = 256, 32 * 2**20
    gen = torch.Generator(device=dev).manual_seed(0)
    mm_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=mm_dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=mm_dtype, generator=gen)
    t = _time(lambda: a @ b, 10 if dev == "cuda" else 3)
    info["matmul"] = {"n": n, "dtype": str(mm_dtype), "tflops": 2 * n ** 3 / t / 1e12, "random_data": True}
    x = torch.randn(copy_bytes // 4, device=dev, generator=gen)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), 10 if dev == "cuda" else 3)
    info["copy"] = {"bytes": copy_bytes, "tb_per_s_read_plus_write": 2 * copy_bytes / t / 1e12}
    del a, b, x, y
    print(json.dumps(info, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
    return info


# ------------------------------------------------------------------------------------------------ correctness

class poisoned:
    """Within the block, torch.empty / empty_like / empty_strided and Tensor.new_empty / new_empty_strided
    return NaN-filled floating tensors, so that a kernel that leaves an output element unwritten is caught."""

    FUNCTIONS = ("empty", "empty_like", "empty_strided")
    METHODS = ("new_empty", "new_empty_strided")

    @staticmethod
    def _fill(t):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() > 0:
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    def __enter__(self):
        self.saved = [(torch, n, getattr(torch, n)) for n in self.FUNCTIONS] + \
                     [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in self.METHODS]
        for owner, name, fn in self.saved:
            if owner is torch:
                setattr(owner, name, lambda *a, _fn=fn, **k: self._fill(_fn(*a, **k)))
            else:
                setattr(owner, name, lambda s, *a, _fn=fn, **k: self._fill(_fn(s, *a, **k)))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)


def make_inputs(grid, E, M, D, dtype, boundary="zero", B=2, H=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = E + math.prod(grid)
    table = tuple(s if boundary == "circular" else 2 * s - 1 for s in grid)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device())
    x = {"q": rnd(B, H, N, D), "k": rnd(B, H, N, D), "v": rnd(B, H, N, D), "rpe": rnd(H, M, *table, scale=0.5),
         "rpe_extra": rnd(H, M, 3, scale=0.5) if E else None}
    g = rnd(B, H, N, D)
    low = {n: None if t is None else t.to(dtype).requires_grad_() for n, t in x.items()}
    ref = {n: None if t is None else t.detach().to(dtype).to(torch.float64).requires_grad_() for n, t in x.items()}
    return low, ref, g


def run(x, g, backend, grid, E, options):
    out = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=grid, num_extra=E,
                                      rpe_extra=x["rpe_extra"], backend=backend, **options)
    names = [n for n in ("q", "k", "v", "rpe", "rpe_extra") if x[n] is not None]
    grads = torch.autograd.grad(out, [x[n] for n in names], g.to(out.dtype))
    res = {"out": out.detach(), **{f"d{n}": t for n, t in zip(names, grads)}}
    if backend == "direct":            # a forward autograd does not record: the compiled dense form (csrc/dense.cpp)
        with torch.no_grad():
            res["out_nograd"] = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=grid,
                                                            num_extra=E, rpe_extra=x["rpe_extra"], backend=backend,
                                                            **options)
    return res


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def check_case(backend, dtype, case, seed) -> Dict:
    name, grid, E, M, D, options = case
    rec = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "case": name, "grid": list(grid), "E": E,
           "M": M, "D": D, "options": options}
    low, ref, g = make_inputs(grid, E, M, D, dtype, options.get("boundary", "zero"), seed=seed)
    p = lisa_kernels.check_inputs(low["q"], low["k"], low["v"], low["rpe"], grid=grid, num_extra=E,
                                  rpe_extra=low["rpe_extra"], **options)
    reason = lisa_kernels.backend_reason(backend, p)
    if reason is not None:
        return {**rec, "status": "skip", "reason": reason}
    t0 = time.perf_counter()
    try:
        with poisoned():
            got = run(low, g, backend, grid, E, options)
        sync()
    except Exception as exc:  # noqa: BLE001  (recorded as a failure)
        return {**rec, "status": "FAIL", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    seconds = time.perf_counter() - t0
    want = run(ref, g, "reference", grid, E, options)
    errors = {n: rel_err(got[n], want[n if n in want else "out"]) for n in got}
    worst = max(errors.values())
    return {**rec, "status": "ok" if worst <= TOL[dtype] else "FAIL", "errors": errors, "worst": worst,
            "limit": TOL[dtype], "seconds": seconds}


def simulated(args):
    """``lisa_kernels.testing.fake_gpu(args.fake_gpu)`` where asked (the dry run: the GPU's host code, autotuning
    and its candidates included, on the CPU), else no simulation; yields the Simulation or None."""
    if not getattr(args, "fake_gpu", None):
        return contextlib.nullcontext(None)
    from lisa_kernels.testing import fake_gpu
    return fake_gpu(args.fake_gpu)


# what a simulated GPU counts per case: compiles of autotune candidates (on a GPU each is a compile), tuning keys
# benchmarked, candidate runs while tuning
COUNTS = ("compiles", "autotunings", "candidates_run")


def check(args) -> int:
    cases = TINY_CASES if args.tiny else CASES
    failed = 0
    out = open(args.out, "a") if args.out else None
    print(f"{'backend':<11} {'dtype':<9} {'case':<22} {'status':<6} worst error (limit)  [reason]")
    with simulated(args) as sim:
        failed = _check_all(args, cases, out, sim)
    if sim is not None:
        totals = sim.totals()
        print(f"simulated {sim.device.name}: " + ", ".join(f"{totals[k]} {k}" for k in COUNTS))
    print(f"{failed} failed")
    return 1 if failed else 0


def _check_all(args, cases, out, sim) -> int:
    failed = 0
    for backend in args.backends:
        for dname in args.dtypes:
            for i, case in enumerate(cases):
                before = sim.totals() if sim is not None else None
                rec = check_case(backend, DTYPES[dname], case, seed=100 + i)
                if sim is not None:
                    after = sim.totals()
                    rec.update({k: after[k] - before[k] for k in COUNTS})
                failed += rec["status"] == "FAIL"
                err = f"{rec['worst']:.2e} ({rec['limit']:.0e})" if "worst" in rec else ""
                print(f"{backend:<11} {rec['dtype']:<9} {rec['case']:<22} {rec['status']:<6} {err:<20} "
                      f"{rec.get('reason', '')[:150]}", flush=True)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
    return failed


def sanitize_one(args) -> int:
    """One small forward+backward call of each backend (gpu_session.sh runs this under compute-sanitizer)."""
    with simulated(args):
        return _sanitize_each(args)


def _sanitize_each(args) -> int:
    status = 0
    grid, D = ((2, 3), 4) if args.tiny else ((6, 7), 16)
    for backend in args.backends:
        low, _, g = make_inputs(grid, 1, 1, D, torch.float16, seed=7)
        p = lisa_kernels.check_inputs(low["q"], low["k"], low["v"], low["rpe"], grid=grid, num_extra=1)
        reason = lisa_kernels.backend_reason(backend, p)
        if reason is not None:
            print(f"{backend}: skipped ({reason})")
            continue
        try:
            got = run(low, g, backend, grid, 1, {})
            sync()
            finite = all(bool(torch.isfinite(t).all()) for t in got.values())
            print(f"{backend}: one call ran, outputs finite: {finite}")
            status |= 0 if finite else 1
        except Exception as exc:  # noqa: BLE001
            print(f"{backend}: FAILED: {type(exc).__name__}: {exc}")
            status = 1
    return status


# ------------------------------------------------------------------------------------------------ summary

def summary(args) -> int:
    """The targets table from benchmark.py results: lisa-auto against FlashAttention-2 (sdpa-flash) per grid."""
    records, device_name, baseline = [], None, None
    for path in args.results:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"(cannot read {path}: {exc})")
            continue
        device_name = device_name or data["meta"].get("device_name")
        baseline = baseline or data["meta"].get("baseline")
        records += data.get("records", [])
    baseline = baseline or "sdpa-flash"
    if args.merge:
        merged = {"meta": {**(data["meta"] if records else {}), "merged_from": list(args.results)},
                  "records": records}
        with open(args.merge, "w") as f:
            json.dump(merged, f, indent=1)
    def label(r):
        return r.get("grid_label") or "x".join(map(str, r["grid"]))
    ok = {(label(r), r["D"], r["dtype"], r["mode"], r["method"]): r for r in records if r.get("status") == "ok"}
    keys = sorted({(label(r), r["D"], r["dtype"], r["mode"]) for r in records},
                  key=lambda k: (k[1], k[2], k[3], math.prod(map(int, k[0].split("x")))))
    what = "FlashAttention-2 (sdpa-flash)" if baseline == "sdpa-flash" else baseline
    lines = [f"Targets ({device_name or 'no results'}): lisa-auto vs {what}; 'base' = {baseline}",
             f"{'grid':<10} {'D':>4} {'dtype':<9} {'mode':<8} {'auto ms':>9} {'via':<11} {'base ms':>9} "
             f"{'time x':>7} {'auto MiB':>9} {'base MiB':>9} {'mem x':>6}"]
    for grid, D, dtype, mode in keys:
        a, f2 = ok.get((grid, D, dtype, mode, "lisa-auto")), ok.get((grid, D, dtype, mode, baseline))

        def num(r, key, spec):
            return format(r[key], spec) if r and r.get(key) is not None else "-"
        ratio = f"{a['median_ms'] / f2['median_ms']:.2f}" if a and f2 else "-"
        mem = f"{a['peak_mib'] / f2['peak_mib']:.2f}" if a and f2 and f2.get("peak_mib") else "-"
        lines.append(f"{grid:<10} {D:>4} {dtype:<9} {mode:<8} {num(a, 'median_ms', '9.3f')} {(a or {}).get('backend') or '-':<11} "
                     f"{num(f2, 'median_ms', '9.3f')} {ratio:>7} {num(a, 'peak_mib', '9.1f')} "
                     f"{num(f2, 'peak_mib', '9.1f')} {mem:>6}")
    if not keys:
        lines.append("(no timing results)")
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="device, versions and the measured ceilings")
    e.add_argument("--out")
    c = sub.add_parser("check", help="correctness of the compiled backends against the reference")
    c.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    c.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    c.add_argument("--tiny", action="store_true", help="small shapes only (the dry run)")
    c.add_argument("--out", help="append one JSON line per case here")
    c.add_argument("--fake-gpu", help="simulate this GPU (a key of lisa_kernels.testing.DEVICES; the dry run)")
    s = sub.add_parser("sanitize-one", help="one small fwd+bwd call of each backend")
    s.add_argument("backends", nargs="+", choices=BACKENDS)
    s.add_argument("--tiny", action="store_true", help="a smaller call (the dry run)")
    s.add_argument("--fake-gpu", help="simulate this GPU (a key of lisa_kernels.testing.DEVICES; the dry run)")
    m = sub.add_parser("summary", help="the targets table from benchmark.py results")
    m.add_argument("results", nargs="*")
    m.add_argument("--out")
    m.add_argument("--merge", help="also write the records of all results into one file (for fit_cost_model.py)")
    args = ap.parse_args(argv)
    return {"env": lambda: (env(args), 0)[1], "check": lambda: check(args), "sanitize-one": lambda: sanitize_one(args),
            "summary": lambda: summary(args)}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
