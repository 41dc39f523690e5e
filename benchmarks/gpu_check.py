"""The GPU session's checks (benchmarks/gpu_session.sh): environment and ceilings, correctness of the compiled
backends against the reference, one small call per backend for compute-sanitizer, and the targets table.

    python benchmarks/gpu_check.py env --out env.json               # device, versions, bf16 matmul and copy rates
    python benchmarks/gpu_check.py check --out check.jsonl          # every backend vs the reference
    python benchmarks/gpu_check.py flex --stages timing-... --methods ...  # flex vs the reference and triton, and
                                                                    # the timings' FlexAttention compiles, at once
    python benchmarks/gpu_check.py sanitize-one triton triton-fft   # one small fwd+bwd call each (run under
                                                                    # compute-sanitizer by gpu_session.sh)
    python benchmarks/gpu_check.py summary timing_*.json            # the targets tables: auto / FA2 per grid,
                                                                    # triton / flex-lisa
    python benchmarks/gpu_check.py plan --stages env:30 check:240 ... # the GPU run's Triton work and time per stage
    python benchmarks/gpu_check.py warm --stages ... --jobs 10      # compile that work beforehand, in parallel
    python benchmarks/gpu_check.py compile-time                     # seconds per Triton compile for sm_90a here

Correctness: for each backend, dtype (float32, float16, bfloat16) and case (1D, 2D and 3D grids, extra tokens
with rpe_extra, M > 1 RPE groups, causal, the circular boundary), fresh random inputs (never zeros), the
output and the gradients of q, k, v, rpe and rpe_extra for a random upstream gradient, against
``backend="reference"`` in float64 on the same device (for ``direct`` also the output of a forward under
``torch.no_grad``, which runs the compiled dense form of csrc/dense.cpp where the extension is built).
Uninitialised memory is poisoned (torch.empty and friends return NaN-filled tensors while the backend runs), so
an unwritten output element fails. The error of a
tensor is max|x - x_ref| / max|x_ref|; limits: float32 2e-3 (Triton's float32 dots may use tf32), float16
1e-2, bfloat16 3e-2. Each case's result is appended to the --out file (one JSON line) as soon as it is known.
``--against B`` also compares with backend B on the same inputs (limit twice the reference's); a backend without a
backward there (``flex`` on the CPU) is checked on its output alone. ``flex`` (:func:`flex`, the session's check-flex
stage) runs FLEX_CHECK (flex against the reference and triton, bf16 and fp32) beside one call of each timing case that
runs FlexAttention, in processes of their own at once, so that the timing stages find those compiles in Inductor's
disk caches.
``--tiny`` (the session's dry run on the CPU, Triton's interpreter) runs small shapes only; ``--fake-gpu h100`` (the dry
run) simulates that GPU (lisa_kernels.testing.fake_gpu), so that the GPU's host code runs, and records per case the
autotune candidates compiled, the tuning keys benchmarked and the candidate runs (what a GPU would spend).

Plan (:func:`plan`, the dry run's first stage; ``plan.json`` in the session's results): for each stage of the GPU
run as gpu_session.sh passes them (its real cases, not the dry run's), the Triton compiles it causes (one per new
specialization: Triton's own binder on placeholder tensors of the GPU's shapes; an estimate), the autotune keys it
tunes and the candidates it compiles and times, an estimated time from per-compile and per-benchmark costs
(measured with ``compile-time``; parameters), each against the stage's cap and the whole run against the budget.
Warm-up (:func:`warm`, started by the GPU run in the background): those compiles, made beforehand by several
processes into Triton's disk cache, where the stages find them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported (through lisa_kernels)

import lisa_kernels  # noqa: E402
from lisa_kernels._device import GPU  # noqa: E402
from lisa_kernels.backends import REGISTRY  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# every backend but the yardstick (the reference); those with GPU kernels of their own (compute-sanitizer's
# memcheck), and those with Triton kernels (the plan's compile work)
BACKENDS = tuple(b.name for b in REGISTRY if b.name != "reference")
GPU_KERNEL_BACKENDS = tuple(b.name for b in REGISTRY if b.gpu_kernels)
TRITON_BACKENDS = tuple(b.name for b in REGISTRY if b.gpu_kernels == "triton")

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
# backend "flex" (FlexAttention, compiled per shape and dtype: seconds a case, ~15 s with its backward; so a few
# cases, each in a process of its own, gpu_check.py flex): against the reference and, on the same inputs, against
# triton (two independent implementations of the operator); bf16 and fp32. The cases: extra tokens with rpe_extra,
# M = 2 and the circular boundary (the table gather), and ViT's 14x14 + 1 at D = 64. The dry run: one tiny case in
# float32, the forward alone (FlexAttention has no CPU backward)
FLEX_CHECK = {"backend": "flex", "dtypes": ("bfloat16", "float32"), "cases": ("2d-circular-M2", "vit-14x14+1-D64"),
              "against": "triton"}
FLEX_CHECK_TINY = {**FLEX_CHECK, "dtypes": ("float32",), "cases": ("2d-extra-M2",)}
AGAINST_FACTOR = 2     # two backends each within the limit of the reference: within twice it of each other


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


def _max_sm_clock_mhz() -> Optional[float]:
    """GPU 0's maximum SM clock (nvidia-smi), the clock benchmarks/predict.py turns cycles into time at."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return float(out.splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


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
                    l2_mib=getattr(prop, "L2_cache_size", 0) / 2**20, sm_clock_mhz=_max_sm_clock_mhz())
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


def run(x, g, backend, grid, E, options, grads=True):
    """The output and (``grads``) the gradients of every input for the upstream gradient ``g``."""
    with torch.set_grad_enabled(grads):
        out = lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=grid, num_extra=E,
                                          rpe_extra=x["rpe_extra"], backend=backend, **options)
    if not grads:
        return {"out": out.detach()}
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


def grad_reason(backend: str, p) -> Optional[str]:
    """Why ``backend`` has no gradients for ``p`` (its forward runs; flex on the CPU), or None."""
    record = next((b for b in REGISTRY if b.name == backend), None)
    fn = getattr(record, "grad_reason", None)
    return fn(p) if fn is not None else None


def check_case(backend, dtype, case, seed, against: Optional[str] = None) -> Dict:
    """One backend on one case against the float64 reference (the output and every gradient, or the output alone
    where the backend has no backward there); with ``against``, also against that backend on the same inputs
    (limit AGAINST_FACTOR x the reference's)."""
    name, grid, E, M, D, options = case
    rec = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "case": name, "grid": list(grid), "E": E,
           "M": M, "D": D, "options": options}
    low, ref, g = make_inputs(grid, E, M, D, dtype, options.get("boundary", "zero"), seed=seed)
    p = lisa_kernels.check_inputs(low["q"], low["k"], low["v"], low["rpe"], grid=grid, num_extra=E,
                                  rpe_extra=low["rpe_extra"], **options)
    reason = lisa_kernels.backend_reason(backend, p)
    if reason is not None:
        return {**rec, "status": "skip", "reason": reason}
    no_grads = grad_reason(backend, p)
    if no_grads is not None:
        rec["grads"] = f"not checked: {no_grads}"
    t0 = time.perf_counter()
    try:
        with poisoned():
            got = run(low, g, backend, grid, E, options, grads=no_grads is None)
        sync()
    except Exception as exc:  # noqa: BLE001  (recorded as a failure)
        return {**rec, "status": "FAIL", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    seconds = time.perf_counter() - t0
    want = run(ref, g, "reference", grid, E, options)
    errors = {n: rel_err(got[n], want[n if n in want else "out"]) for n in got}
    worst = max(errors.values())
    rec.update(errors=errors, worst=worst, limit=TOL[dtype], seconds=seconds)
    ok = worst <= TOL[dtype]
    if against is not None:
        other_reason = lisa_kernels.backend_reason(against, p)
        if other_reason is not None:
            rec.update(against=against, against_reason=other_reason)
        else:
            other = run(low, g, against, grid, E, options, grads=no_grads is None)
            errors_vs = {n: rel_err(got[n], other[n]) for n in got}
            rec.update(against=against, errors_vs=errors_vs, worst_vs=max(errors_vs.values()),
                       limit_vs=AGAINST_FACTOR * TOL[dtype])
            ok = ok and rec["worst_vs"] <= rec["limit_vs"]
    return {**rec, "status": "ok" if ok else "FAIL"}


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


def _seed(case) -> int:
    """A case's input seed: 100 + its place in its list (the same inputs whichever backends and cases are run)."""
    return 100 + next(i for cases in (CASES, TINY_CASES) for i, c in enumerate(cases) if c is case)


def check(args) -> int:
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases]
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
            for case in cases:
                before = sim.totals() if sim is not None else None
                rec = check_case(backend, DTYPES[dname], case, seed=_seed(case), against=getattr(args, "against", None))
                if sim is not None:
                    after = sim.totals()
                    rec.update({k: after[k] - before[k] for k in COUNTS})
                failed += rec["status"] == "FAIL"
                _print_check(rec)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
    return failed


def _print_check(rec: Dict) -> None:
    err = f"{rec['worst']:.2e} ({rec['limit']:.0e})" if "worst" in rec else ""
    if "worst_vs" in rec:
        err += f" vs {rec['against']} {rec['worst_vs']:.2e} ({rec['limit_vs']:.0e})"
    print(f"{rec['backend']:<11} {rec['dtype']:<9} {rec['case']:<22} {rec['status']:<6} {err:<20} "
          f"{rec.get('reason', rec.get('grads', ''))[:150]}", flush=True)


# ------------------------------------------------------------------------------------------------ flex

def flex_timing_cases(stages: Sequence[Dict], methods: Sequence[str], device: str, heads: int, dtype: str) -> List:
    """The timing stages' cases that run FlexAttention (flex-lisa, flex-rpb, lisa-auto where it picks flex), as
    benchmark.py builds them for those stages (the same shapes, dtype and mode: the same compiled graphs)."""
    # benchmark.py's library rule (_library.py) puts the library it times first on sys.path, which the processes
    # spawned here would inherit: they check (and compile) the lisa_kernels this script imported, as this one does
    saved = list(sys.path)
    try:
        import benchmark
        import methods as bm
    finally:
        sys.path[:] = saved
    cases = []
    for spec in stages:
        if "grids" not in spec:
            continue
        args = benchmark.parse_args(["--device", device, "--grids", *["x".join(map(str, g)) for g in spec["grids"]],
                                     "--dims", str(spec["D"]), "--batch", str(spec["B"]), "--heads", str(heads),
                                     "--dtypes", dtype, "--modes", "fwd", "fwd+bwd",
                                     "--methods", *methods, *spec.get("methods", [])])
        cases += [c for c in bm.build_cases(args) if (c.method in bm.FLEX_METHODS or bm.chosen_backend(c) == "flex")
                  and bm.cannot_run_reason(c) is None]
    return cases


def _flex_job(job) -> tuple:
    """In a process of its own: ("check", record) of one flex check, or ("warm", line) after one call of a timing
    case (its compile, into Inductor's disk caches)."""
    kind, payload = job
    if kind == "check":
        backend, dname, name, against, tiny = payload
        case = next(c for c in (TINY_CASES if tiny else CASES) if c[0] == name)
        return "check", check_case(backend, DTYPES[dname], case, seed=_seed(case), against=against)
    import methods as bm
    case = bm.Case.from_json(payload)
    t0 = time.perf_counter()
    try:
        bm.make_call(case, [bm.make_inputs(case)])(0)
        sync()
        return "warm", f"compiled {case.label.strip()} in {time.perf_counter() - t0:.1f} s"
    except Exception as exc:  # noqa: BLE001  (the timing stage compiles it itself, or records the failure)
        return "warm", f"FAILED {case.label.strip()}: {type(exc).__name__}: {str(exc)[:200]}"


def flex(args) -> int:
    """gpu_session.sh's check-flex stage: backend flex against the reference and triton (FLEX_CHECK: bf16 and fp32,
    the output and every gradient where FlexAttention has a backward), and one call of every timing case that runs
    FlexAttention, so that its compile lands in Inductor's disk caches (dynamo's trace remains: ~3 s a case instead
    of ~6-15 s); all in --jobs processes at once, since each FlexAttention compile takes one process seconds. Exit
    code 1 if a check fails (a warm-up call that fails is reported; its timing case compiles for itself)."""
    import concurrent.futures
    import multiprocessing
    preset = FLEX_CHECK_TINY if args.tiny else FLEX_CHECK
    jobs = [("check", (preset["backend"], dname, name, preset["against"], args.tiny))
            for dname in preset["dtypes"] for name in preset["cases"]]
    cases = flex_timing_cases([parse_stage(s) for s in args.stages], args.methods, args.device, args.heads, args.dtype)
    jobs += [("warm", c.to_json()) for c in cases]
    print(f"flex: {len(jobs) - len(cases)} checks and {len(cases)} timing cases in {min(args.jobs, len(jobs))} "
          f"processes", flush=True)
    t0, failed = time.perf_counter(), 0
    out = open(args.out, "a") if args.out else None
    # Inductor's own compile workers, one set per process, would be too many: each process compiles in itself
    with mock.patch.dict(os.environ, {"TORCHINDUCTOR_COMPILE_THREADS": "1"}):
        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(jobs)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(_flex_job, job) for job in jobs]):
                kind, result = fut.result()
                if kind == "check":
                    failed += result["status"] == "FAIL"
                    _print_check(result)
                    if out:
                        out.write(json.dumps(result) + "\n")
                        out.flush()
                else:
                    print(f"warm: {result}", flush=True)
    print(f"{failed} failed; {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def aoti(args) -> int:
    """gpu_session.sh's check-aoti stage: a model that leaves PyTorch on this device. Two LiSAAttention layers
    (14x14 grid + CLS, 4 heads of 32, 2 RPE groups; bf16 on a GPU, where auto takes the Triton kernels, whose ops
    are ``torch.library.triton_op``s) exported with a dynamic batch (torch.export, example batch 2), compiled and
    packaged by AOTInductor, loaded and run at batches 3 and 5 against eager; on a GPU also the Triton kernels'
    names in the package (AOTInductor compiled them in, not a call back into Python), and the model under
    torch.compile, forward and backward (Inductor's code holds the backward kernels), against eager.
    ``--no-compile`` (the dry run, on the CPU): the exported program run against eager, without Inductor (the CPU's
    AOTInductor is tests/test_export.py's). Each check appends one JSON line to --out as soon as it ends (a check
    that raises is recorded as failed, with the error); exit code 1 if one fails."""
    import tempfile

    from lisa_kernels.nn import LiSAAttention

    on_gpu = device() == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    grid, heads, dim = ((14, 14), 4, 128) if not args.tiny else ((3, 3), 2, 16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[LiSAAttention(dim, heads, grid=grid, num_extra=1, num_rpe=2) for _ in range(2)])
    for layer in model:          # random tables: the structure matters
        torch.nn.init.normal_(layer.rpe.rpe, std=0.5)
        torch.nn.init.normal_(layer.rpe.rpe_extra, std=0.5)
    model = model.to(device(), dtype).eval()
    x = {b: torch.randn(b, 1 + math.prod(grid), dim, device=device(), dtype=dtype) for b in (2, 3, 5)}
    with torch.no_grad():
        eager = {b: model(xb) for b, xb in x.items()}
    checks = [("export", _aoti_export)]
    if not args.no_compile:
        checks.append(("aot-inductor", _aoti_package))
        if on_gpu:
            checks.append(("torch.compile-train", _aoti_train))
    failed, state = 0, {}
    with tempfile.TemporaryDirectory() as tmp:       # (the package stays out of the session's results)
        for name, fn in checks:
            t0 = time.perf_counter()
            try:
                ok, details = fn(model, x, eager, dtype, state, tmp)
            except Exception as exc:  # noqa: BLE001  (recorded as a failure, with the error)
                ok, details = False, {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            rec = {"backend": "aoti", "dtype": str(dtype).split(".")[-1], "case": name,
                   "status": "ok" if ok else "FAIL", "seconds": round(time.perf_counter() - t0, 1), **details}
            print(f"aoti {name}: {rec['status']} {json.dumps(details)}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            failed += not ok
            if not ok and name == "export":
                break
    return 1 if failed else 0


def _aoti_export(model, x, eager, dtype, state, tmp):
    with torch.no_grad():
        ep = torch.export.export(model, (x[2],), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
        errs = {b: rel_err(ep.module()(x[b]), eager[b]) for b in (3, 5)}
    state["ep"] = ep
    ops = sorted({str(n.target) for n in ep.graph.nodes if "lisa_kernels" in str(n.target)})
    return bool(ops) and max(errs.values()) <= TOL[dtype], {"ops": ops, "errors": errs}


def _aoti_package(model, x, eager, dtype, state, tmp):
    import zipfile
    path = torch._inductor.aoti_compile_and_package(state["ep"], package_path=os.path.join(tmp, "lisa_model.pt2"))
    with zipfile.ZipFile(path) as z:      # the kernels' names: in the cubins' names or the C++ wrapper's source
        files = z.namelist()
        text = "\n".join(files) + "\n" + "\n".join(z.read(f).decode(errors="replace") for f in files
                                                   if f.endswith(".cpp"))
    packaged = [k for k in ("_prep_kernel", "_fwd_kernel") if k in text]
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        errs = {b: rel_err(runner(x[b]), eager[b]) for b in (3, 5)}
    on_gpu = x[2].is_cuda
    ok = max(errs.values()) <= TOL[dtype] and (len(packaged) == 2 or not on_gpu)
    return ok, {"errors": errs, "packaged_kernels": packaged, "files": len(files)}


def _aoti_train(model, x, eager, dtype, state, tmp):
    from torch._inductor.utils import run_and_get_code
    xs = [x[3].clone().requires_grad_(True) for _ in range(2)]
    model(xs[0]).float().square().sum().backward()
    ref = [xs[0].grad] + [p.grad for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)
    _, code = run_and_get_code(lambda: compiled(xs[1]).float().square().sum().backward())
    errs = [rel_err(a, b) for a, b in zip([xs[1].grad] + [p.grad for p in model.parameters()], ref)]
    kernels = [k for k in ("_fwd_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel", "_bwd_walk_kernel")
               if any(k in c for c in code)]
    return max(errs) <= 2 * TOL[dtype] and len(kernels) == 4, {"max_grad_error": max(errs), "kernels_in_code": kernels}


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
    lines += ["", *peer_targets(ok, keys)]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


PEER_TARGETS = {"fwd": 0.7, "fwd+bwd": 0.6}      # lisa-triton / flex-lisa time, at most (bf16, 14x14 to 64x64)


def peer_targets(ok: Dict, keys) -> List[str]:
    """The peer's targets: lisa-triton against flex-lisa (the same operator through FlexAttention) where both were
    timed, with flex-rpb (softmax with a relative-position bias through FlexAttention) beside them."""
    lines = [f"Targets: lisa-triton vs flex-lisa (at most {PEER_TARGETS['fwd']:g}x forward, "
             f"{PEER_TARGETS['fwd+bwd']:g}x forward+backward; bf16, 14x14 to 64x64)",
             f"{'grid':<10} {'D':>4} {'dtype':<9} {'mode':<8} {'triton ms':>9} {'flex ms':>9} {'time x':>7} "
             f"{'limit':>5} {'met':<4} {'rpb ms':>9}"]
    for grid, D, dtype, mode in keys:
        t, f = ok.get((grid, D, dtype, mode, "lisa-triton")), ok.get((grid, D, dtype, mode, "flex-lisa"))
        if not (t and f):
            continue
        rpb = ok.get((grid, D, dtype, mode, "flex-rpb"))
        ratio, limit = t["median_ms"] / f["median_ms"], PEER_TARGETS[mode] if mode in PEER_TARGETS else None
        met = "-" if limit is None else "yes" if ratio <= limit else "NO"
        lines.append(f"{grid:<10} {D:>4} {dtype:<9} {mode:<8} {t['median_ms']:9.3f} {f['median_ms']:9.3f} "
                     f"{ratio:7.2f} {limit if limit is not None else '-':>5} {met:<4} "
                     + (f"{rpb['median_ms']:9.3f}" if rpb else f"{'-':>9}"))
    if len(lines) == 2:
        lines.append("(no lisa-triton and flex-lisa timings of one point)")
    return lines


# ------------------------------------------------------------------------------------------------ plan
#
# What the GPU run's stages ask of Triton, counted on any machine without running a kernel (gpu_check.py plan; the
# dry run runs it first), and the warm-up that compiles it beforehand on many cores (gpu_check.py warm; the GPU run
# starts it in the background). An estimate; see plan().

SIMULATED_GPU = GPU("cuda", 90, 32)      # an H100's (and H200's) target (lisa_kernels.testing.DEVICES["h100"])

# The plan's defaults (plan --help), in seconds. Per compile (Triton's passes and ptxas for sm_90a, one thread) of
# a candidate of an autotuned kernel, of another kernel of triton_direct, of a triton-fft kernel, and per C launcher
# (Triton < 3.7 builds one with gcc per new kernel signature): measured 2026-12-07 with `gpu_check.py compile-time`
# on this repository's 2-core AMD EPYC, shared with other jobs (load 3-5.5): Triton 3.6 0.7 s, 0.6-0.9 s, 0.3 s
# and 0.4-0.9 s of CPU time each (0.85-1.5 s, 0.7-1.2 s, 0.4-0.9 s wall, depending on the load); Triton 3.8 0.8 s,
# 0.6 s, 0.3 s of CPU. The GPU machine's CPU is not known: taken as fast as this one, the wall times of a loaded
# machine. Then: a compile found in Triton's disk cache; one candidate's autotune benchmark (triton.testing.do_bench:
# 25 ms of warm-up and 100 ms of timed runs, each after a 256 MiB L2 flush, besides 7 runs of the kernel, added
# from the cost model); a stage's start-up (python, torch, CUDA, lisa_kernels); one correctness case (the call, the
# float64 reference, the comparison); one benchmark case's fixed cost (inputs, memory, records) besides its calls;
# the CUDA build (5 sources, MAX_JOBS=16); how much slower a compile runs while the build shares the cores; the
# warm-up's worker processes (0: no warm-up) and their start-up (the plan, spawning, imports). Last, FlexAttention's
# torch.compile per shape and dtype (backend flex, flex-lisa, flex-rpb: dynamo, Inductor's lowering and its Triton
# kernels; the warm-up does not make them, and Inductor's cache is not shared across these stages' shapes): a forward
# alone, and a forward with its backward (guesses, no GPU has compiled them here: the CPU forward compile takes
# 6.5-7 s on the 2-core development machine, Inductor's C++ kernel; the GPU's backward kernels about double the work);
# a case that check-flex compiled beforehand, which finds the compiled graphs in Inductor's disk caches (FX graph and
# AOTAutograd caches: dynamo's trace and the loading remain; 2.3-3.5 s for the CPU forward here); the check-flex
# stage's processes (gpu_check.py flex --jobs, each compiling in itself)
FLEX_PLAN_DEFAULTS = dict(flex_compile_s=6.0, flex_train_compile_s=15.0, flex_cached_s=3.0, flex_jobs=14)
PLAN_DEFAULTS = dict(compile_s=1.2, small_compile_s=0.9, fft_compile_s=0.5, launcher_s=0.9, cache_hit_s=0.05,
                     bench_s=0.15, startup_s=8.0, case_s=0.3, timing_case_s=0.3, build_s=150.0, build_slowdown=1.3,
                     softmax_tflops=200.0, warm_jobs=10, warm_startup_s=15.0, **FLEX_PLAN_DEFAULTS)
FLEX_NAMES = ("flex", "flex-lisa", "flex-rpb")       # what compiles through torch.compile(flex_attention)
# stages without Triton work of their own: their estimated seconds besides the start-up (memcheck: the sanitizer's
# start-up and its instrumented calls, a guess)
FIXED_SECONDS = {"env": 12.0, "overhead": 20.0, "memcheck": 30.0, "fit": 5.0,
                 # check-aoti: export, AOTInductor's compile of the Triton kernels (its own autotuning) and C++
                 # wrapper, torch.compile of the training step: a guess, no GPU has run it yet
                 "check-aoti": 40.0}
GPU_TRITON = "3.6"          # the GPU machine's Triton (the candidate lists differ by version: GPU_CONFIGS)
CHECK_BACKENDS = TRITON_BACKENDS      # gpu_session.sh's check stage; check-cuda does the extension's and direct
CHECK_DTYPES = ("bfloat16", "float16", "float32")


def _problem(grid, E, M, D, dtype, B=2, H=2, options=None, device="cpu"):
    """The Problem of a call with q, k, v (B, H, E + prod(grid), D) and an rpe of M groups, on ``device`` (the CPU:
    under :func:`_as_gpu` it stands for the simulated GPU's)."""
    options = options or {}
    mk = lambda *shape: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    N = E + math.prod(grid)
    table = tuple(grid) if options.get("boundary") == "circular" else tuple(2 * s - 1 for s in grid)
    p = lisa_kernels.check_inputs(mk(B, H, N, D), mk(B, H, N, D), mk(B, H, N, D), mk(H, M, *table), grid=tuple(grid),
                                  num_extra=E, rpe_extra=mk(H, M, 3) if E else None, **options)
    return dataclasses.replace(p, device=torch.device(device))


@contextlib.contextmanager
def _as_gpu(triton_version: str):
    """CPU problems stand for the simulated GPU's (the package's one device question, ``_device.gpu_of``), the
    Triton launcher takes ``triton_version``'s candidate lists, and ``backend="cuda"`` counts as built (the build
    stage's work), so that lisa-auto's choice is the GPU run's."""
    from lisa_kernels import _device, cuda_fft, triton_direct
    version = tuple(int(x) for x in triton_version.split(".")[:2])
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_device, "gpu_of", lambda d: SIMULATED_GPU
                                              if torch.device(d).type == "cpu" else None))
        stack.enter_context(mock.patch.object(triton_direct, "_triton_version", lambda: version))
        stack.enter_context(mock.patch.object(cuda_fft, "cuda_extension_reason", lambda: None))
        yield


def _kernel_params(kernel):
    """Triton's KernelParam list of a kernel (a JITFunction's own, or built from an interpreted one's function)."""
    if hasattr(kernel, "params"):
        return kernel.params
    cached = getattr(kernel, "_lisa_params", None)
    if cached is None:
        import inspect

        from triton.runtime.jit import KernelParam
        dns = kernel.kwargs.get("do_not_specialize") or ()
        dnsoa = kernel.kwargs.get("do_not_specialize_on_alignment") or ()
        cached = [KernelParam(i, prm, i in dns or prm.name in dns, i in dnsoa or prm.name in dnsoa)
                  for i, prm in enumerate(inspect.signature(kernel.fn).parameters.values())]
        kernel._lisa_params = cached
    return cached


def specialization(kernel, args: Dict, options: tuple) -> tuple:
    """The key under which Triton's JIT compiles a kernel for these arguments, as its binder computes it
    (``native_specialize_impl``): per argument its type and, for pointers and ints, divisibility by 16 (ints equal
    to 1 become constants), the constexprs' values; and the launch options (num_warps, num_stages). Placeholder
    ("meta") tensors carry their byte offsets, so pointer alignment comes out as on the GPU (whose allocations are
    256-byte aligned)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    key = []
    for prm in _kernel_params(kernel):
        value = args.get(prm.name, prm.default)
        if prm.is_constexpr:
            key.append(("constexpr", repr(value)))
        else:
            key.append(tuple(native_specialize_impl(BaseBackend, value, prm.is_const, not prm.do_not_specialize,
                                                    not prm.do_not_specialize_on_alignment)))
    return (kernel.__name__, tuple(key), options)


class TritonWork:
    """The Triton work of one process (a stage) of the GPU run, launch by launch, given the disk cache that the
    earlier stages left (``disk``, shared): a compile per new specialization (:func:`specialization`; one that is
    in the disk cache already is loaded instead), and per autotuner (one per launch name and candidate list, as
    ``triton_direct._tuned_kernel`` makes them) and new autotune key (the values of the kernel's ``_AUTOTUNE_KEY``
    arguments and every tensor argument's dtype, as Triton's ``Autotuner.run``) one tuning: each candidate compiled
    by the spill pruning, then each timed (those that survive the pruning: all of them, here). ``items`` lists the
    new compiles in order: (kernel, arguments, options, autotuned, new C launcher)."""

    def __init__(self, disk: set, launchers: set, triton_version: str):
        self.disk, self.launchers = disk, launchers
        self.old_launcher = tuple(int(x) for x in triton_version.split(".")[:2]) < (3, 7)
        self.jit, self.tunings = set(), set()
        self.counts = Counter()
        self.items: List[tuple] = []
        self.kernel_seconds = 0.0          # kernel time of the candidates' benchmark runs (7 calls each)

    def compile(self, kernel, args: Dict, options: tuple, tuned: bool = False) -> None:
        key = specialization(kernel, args, options)
        if key in self.jit:
            return
        self.jit.add(key)
        if key in self.disk:
            self.counts["cache_hits"] += 1
            return
        self.disk.add(key)
        self.counts["compiles"] += 1
        self.counts["tuned_compiles" if tuned else "small_compiles"] += 1
        self.counts["compiles:" + kernel.__name__] += 1
        signature = tuple("ptr" if s[0].startswith("*") else s[0] for s in key[1])
        new_launcher = self.old_launcher and signature not in self.launchers     # Triton < 3.7: gcc-built
        if new_launcher:
            self.launchers.add(signature)
            self.counts["launchers"] += 1
        self.items.append((kernel, args, options, tuned, new_launcher))

    def launch(self, launch, call_seconds: float = 0.0) -> None:
        """One launch of triton_direct (``call_seconds``: the whole call's estimated time, for the benchmark runs)."""
        from lisa_kernels.triton_direct import _AUTOTUNE_KEY
        configs = launch.configs()
        blocks = [({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                   (c["num_warps"], c["num_stages"])) for c in configs]
        if launch.tuned is None or launch.gpu is None or len(configs) == 1:
            self.compile(launch.kernel, {**launch.args, **blocks[0][0]}, blocks[0][1], launch.tuned is not None)
            return
        names = getattr(launch.kernel, "arg_names", ())
        tuner = (launch.name, tuple(tuple(sorted(c.items())) for c in configs))
        key = tuple(launch.args[a] for a in _AUTOTUNE_KEY if a in names and a in launch.args) + tuple(
            str(v.dtype) for v in launch.args.values() if hasattr(v, "dtype"))
        if (tuner, key) in self.tunings:
            return
        self.tunings.add((tuner, key))
        self.counts["autotunings"] += 1
        self.counts["candidate_compiles"] += len(configs)
        for extra, options in blocks:
            self.compile(launch.kernel, {**launch.args, **extra}, options, True)
        self.counts["candidates_run"] += len(configs)
        self.kernel_seconds += 7 * len(configs) * call_seconds / 4        # (a call's time over ~4 tuned kernels)

    def call(self, backend: str, p, backward: bool, has_rex: bool, call_seconds: float = 0.0) -> None:
        """One lisa_attention call of ``backend`` ("triton" or "triton-fft") on ``p``, forward (and backward)."""
        if backend == "triton":
            for launch in _launches(p, backward, has_rex):
                self.launch(launch, call_seconds)
        elif backend == "triton-fft":
            for kernel, args, options in _fft_calls(p, backward):
                self.compile(kernel, args, options)


_FFT_CALLS: Dict = {}


def _fft_calls(p, backward: bool) -> List:
    """The triton-fft kernel calls of one call of ``p`` (one per specialization), found by running the backend's
    host code on placeholder ("meta") tensors with each kernel replaced by a recorder: compose's core inputs (the
    grid tokens' float32 features and values, the linear or circular log table), then the forward's chunk loop and,
    with ``backward``, the backward's. The chunk plan is the GPU's (a device other than the CPU takes the whole
    fft_workspace_bytes budget); of the chunks, one of each kind is run (see distinct_chunks)."""
    key = (p.B, p.H, p.N, p.Dk, p.Dv, p.M, p.grid, p.num_extra, p.boundary, p.causal, backward)
    if key in _FFT_CALLS:
        return _FFT_CALLS[key]
    from lisa_kernels import ops, triton_fft
    calls = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
                options = (named.pop("num_warps", 4), named.pop("num_stages", 3))   # (Triton's CUDA defaults)
                calls.setdefault(specialization(self.kernel, named, options), (self.kernel, named, options))
            return call

    chunks = triton_fft._chunks

    def distinct_chunks(core, plan):
        """One chunk of each kind: the kernels see a chunk's starts as ints (0, 1, a multiple of 16 or another;
        the group's start exactly: it offsets a pointer) and its sizes; chunks of one kind make the same calls."""
        kinds = set()
        for sl in chunks(core, plan):
            kind = tuple((_int_kind(s.start) if i != 2 else s.start, s.stop - s.start) for i, s in enumerate(sl))
            if kind not in kinds:
                kinds.add(kind)
                yield sl

    E, circular = p.num_extra, p.boundary == "circular" and not p.causal
    mk = lambda *shape: torch.empty(*shape, device="meta", dtype=torch.float32)  # noqa: E731
    fq, fk = mk(p.B, p.H, p.N, p.Dk)[:, :, E:], mk(p.B, p.H, p.N, p.Dk)[:, :, E:]
    v = mk(p.B, p.H, p.N, p.Dv)[:, :, E:]
    table = mk(p.H, p.M, *(p.grid if circular else (2 * s - 1 for s in p.grid)))
    kernels = {n: getattr(triton_fft, n) for n in dir(triton_fft)
               if n.startswith("lisa_fft_") and n.endswith("_kernel")}
    with mock.patch.multiple(triton_fft, _chunks=distinct_chunks, **{n: Recorder(k) for n, k in kernels.items()}), \
            mock.patch.object(torch.Tensor, "masked_fill", _masked_fill):
        core = ops._core_problem(fq, v, p.M, p.grid, p.causal)
        num, den, below = triton_fft.triton_fft_forward(fq, fk, v, table, core, circular)
        if backward:
            triton_fft.triton_fft_backward(fq, fk, v, table, below, mk(*num.shape), mk(*den.shape), core, circular)
    _FFT_CALLS[key] = list(calls.values())
    return _FFT_CALLS[key]


def _masked_fill(self, mask, value):
    """Tensor.masked_fill as ATen's composite computes it on the CPU and CUDA (a contiguous copy of the broadcast
    input, filled in place): the meta device's decomposition keeps the mask's strides instead, and a size-1 dim's
    stride is a kernel's int argument (a stride of 1 is a constant to Triton)."""
    shape = torch.broadcast_shapes(self.shape, mask.shape)
    return self.expand(shape).clone(memory_format=torch.contiguous_format).masked_fill_(mask, value)


def _int_kind(x: int) -> str:
    return "0" if x == 0 else "1" if x == 1 else "16n" if x % 16 == 0 else "other"


def _call_seconds(backend: str, p, backward: bool) -> float:
    from lisa_kernels.dispatch import estimate_seconds
    return estimate_seconds(backend, p, backward, "sm_90") or 0.0


def _auto_choice(p, backward: bool) -> str:
    from lisa_kernels.dispatch import explain_problem
    return explain_problem(p, backward, details=False).chosen


def _check_work(work: TritonWork, cases, backends, dtypes) -> Dict:
    """gpu_check.py check's Triton work: per backend, dtype and case one forward and one backward."""
    n = 0
    for backend in backends:
        for dname in dtypes:
            for name, grid, E, M, D, options in cases:
                p = _problem(grid, E, M, D, DTYPES[dname], options=options)
                n += 1
                if lisa_kernels.backend_reason(backend, p) is None:
                    work.call(backend, p, True, bool(E), _call_seconds(backend, p, True))
    return {"cases": n}


def _sanitize_work(work: TritonWork, backends) -> Dict:
    """gpu_check.py sanitize-one's: one fp16 forward and backward per backend (6x7 + 1 token, D = 16)."""
    p = _problem((6, 7), 1, 1, 16, torch.float16)
    for backend in backends:
        if lisa_kernels.backend_reason(backend, p) is None:
            work.call(backend, p, True, True)
    return {"cases": len(backends)}


def _overhead_work(work: TritonWork, methods=("lisa-direct", "lisa-auto", "lisa-triton", "lisa-cuda")) -> Dict:
    """overhead.py on a GPU: the tiny point (2x2 + 1 token, D = 8, float32, no rpe_extra) with its methods, then
    the launch-bound point (14x14 + 1, D = 64, bf16) with lisa-auto and lisa-triton; fwd and fwd+bwd each."""
    points = [(_problem((2, 2), 1, 1, 8, torch.float32, B=1, H=1), methods),
              (_problem((14, 14), 1, 1, 64, torch.bfloat16, B=1, H=1), ("lisa-auto", "lisa-triton"))]
    chosen = {}
    for p, names in points:
        for backward in (False, True):
            for m in names:
                backend = _auto_choice(p, backward) if m == "lisa-auto" else m[len("lisa-"):]
                if m == "lisa-auto":
                    chosen[f"{'x'.join(map(str, p.grid))}+1 {'fwd+bwd' if backward else 'fwd'}"] = backend
                if backend in TRITON_BACKENDS and lisa_kernels.backend_reason(backend, p) is None:
                    work.call(backend, p, backward, False)
    return {"auto": chosen}


def _timing_cases(spec: Dict, bench: Dict, params: Dict):
    """benchmark.py's cases of one timing stage (bf16, H = 8), per grid, mode and method (--methods, then the stage's
    own): (label, method, backend, p, backward, seconds per call, or None where the harness skips it as too slow).
    LiSA's time per call is the cost model's, lisa-auto's backend the one it picks; softmax attention's (and
    flex-rpb's) is at the FLOP rate."""
    for grid in spec["grids"]:
        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            p = _problem(grid, 0, 1, spec["D"], torch.bfloat16, B=spec["B"], H=8)
            label = f"{'x'.join(map(str, grid))} {mode}"
            for m in list(bench["methods"]) + list(spec.get("methods", [])):
                backend = m
                if m.startswith("lisa-") or m == "flex-lisa":
                    backend = _auto_choice(p, backward) if m == "lisa-auto" else "flex" if m == "flex-lisa" \
                        else m[len("lisa-"):]
                    if lisa_kernels.backend_reason(backend, p) is not None:
                        continue
                    call = _call_seconds(backend, p, backward)
                    yield label, m, backend, p, backward, (call if call <= bench["max_seconds"] else None)
                else:
                    flops = 4 * p.B * p.H * p.N ** 2 * p.Dk * (3.5 if backward else 1.0)
                    yield label, m, backend, p, backward, flops / (params["softmax_tflops"] * 1e12)


def _flex_compile_seconds(backward: bool, params: Dict) -> float:
    return params["flex_train_compile_s" if backward else "flex_compile_s"]


def _timing_work(work: TritonWork, spec: Dict, bench: Dict, params: Dict, flex_warmed: bool = False) -> Dict:
    """benchmark.py's cases of one timing stage (_timing_cases). A LiSA method whose cost-model estimate is over
    --max-seconds is skipped (as the harness does). Run time per case: its fixed cost, then warm-up, timed and
    memory calls, at least --min-time of timed calls; a FlexAttention case's first call compiles it (a trace and
    Inductor's cache where check-flex compiled it beforehand: ``flex_warmed``)."""
    seconds, cases, chosen, skipped, flex = 0.0, 0, {}, [], []
    for label, m, backend, p, backward, call in _timing_cases(spec, bench, params):
        if m == "lisa-auto":
            chosen[label] = backend
        if call is None:
            skipped.append(f"{label} {m} (estimated {_call_seconds(backend, p, backward):.1f} s per call)")
            continue
        if backend in TRITON_BACKENDS:
            work.call(backend, p, backward, False, call)
        if backend in FLEX_NAMES:
            flex.append(params["flex_cached_s"] if flex_warmed else _flex_compile_seconds(backward, params))
        cases += 1
        seconds += params["timing_case_s"] + (bench["warmup"] + 1) * call + max(bench["repeats"] * call,
                                                                                bench["min_time"])
    return {"cases": cases, "run_s": seconds, "auto": chosen, "too_slow": skipped, "flex_compiles": len(flex),
            "flex_s": sum(flex)}


def _flex_check_work(work: TritonWork, stages: Sequence[Dict], bench: Dict, params: Dict) -> Dict:
    """gpu_check.py flex (the check-flex stage): FLEX_CHECK's cases, each a FlexAttention compile with its backward
    and the triton call it is compared with (its kernels from the check stage's cache, its autotuning anew), and one
    call of each later timing stage's FlexAttention case (its compile), in params["flex_jobs"] processes at once:
    the start-up, then the longest process's compiles (each job to the first free process)."""
    import heapq
    costs = []
    for dname in FLEX_CHECK["dtypes"]:
        for name, grid, E, M, D, options in [c for c in CASES if c[0] in FLEX_CHECK["cases"]]:
            p = _problem(grid, E, M, D, DTYPES[dname], options=options)
            costs.append(params["flex_train_compile_s"] + 2 * params["case_s"])
            if lisa_kernels.backend_reason(FLEX_CHECK["against"], p) is None:
                work.call(FLEX_CHECK["against"], p, True, bool(E), _call_seconds(FLEX_CHECK["against"], p, True))
    checks = len(costs)
    for spec in stages:
        if spec["name"].startswith("timing") and "grids" in spec:
            costs += [_flex_compile_seconds(backward, params) for _, _, backend, _, backward, call
                      in _timing_cases(spec, bench, params)
                      if backend in FLEX_NAMES and call is not None]
    free = [0.0] * int(params["flex_jobs"])
    for cost in sorted(costs, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + cost)
    return {"cases": checks, "warm_cases": len(costs) - checks, "flex_compiles": len(costs),
            "flex_s": max(free, default=0.0)}


def parse_stage(text: str) -> Dict:
    """NAME:CAP, or for a timing stage NAME:CAP:D:B:GRID[,GRID...][:+METHOD,...][:if-time-S] (gpu_session.sh's
    GPU_STAGES; +METHOD,...: methods it times besides --methods; if-time-S: it runs only if more than S seconds are
    left)."""
    parts = text.split(":")
    spec = {"name": parts[0], "cap": int(parts[1]), "if_time": None}
    if len(parts) > 4:
        spec.update(D=int(parts[2]), B=int(parts[3]),
                    grids=[tuple(int(s) for s in g.split("x")) for g in parts[4].split(",")])
    for extra in parts[5:]:
        if extra.startswith("if-time-"):
            spec["if_time"] = int(extra[len("if-time-"):])
        elif extra.startswith("+"):          # methods this stage times besides --methods
            spec["methods"] = extra[1:].split(",")
    return spec


RESERVE_S = 15         # gpu_session.sh's stage(): a stage's cap is at most the time left less this


def stage_work(stages: Sequence[Dict], triton: str, bench: Dict, params: Dict):
    """(stage, TritonWork, details) of each stage in order, the disk cache carried from one to the next."""
    disk, launchers = set(), set()
    flex_warmed = False           # whether a check-flex stage has compiled the timing stages' FlexAttention cases
    with _as_gpu(triton):
        for i, spec in enumerate(stages):
            name = spec["name"]
            work = TritonWork(disk, launchers, triton)
            if name == "check":
                info = _check_work(work, CASES, CHECK_BACKENDS, CHECK_DTYPES)
                info["run_s"] = info["cases"] * params["case_s"]
            elif name == "check-flex":
                info = _flex_check_work(work, stages[i + 1:], bench, params)
                flex_warmed = True
            elif name == "check-cuda":
                info = {"run_s": 2 * len(CHECK_DTYPES) * len(CASES) * params["case_s"]}
            elif name == "memcheck":
                info = {**_sanitize_work(work, GPU_KERNEL_BACKENDS), "run_s": FIXED_SECONDS[name]}
            elif name == "overhead":
                info = {**_overhead_work(work), "run_s": FIXED_SECONDS[name]}
            elif name.startswith("timing"):
                info = _timing_work(work, spec, bench, params, flex_warmed)
            else:
                info = {"run_s": FIXED_SECONDS.get(name, 0.0)}
            yield spec, work, info


def _compile_cost(item, params: Dict, slowdown: float) -> float:
    kernel, args, options, tuned, launcher = item
    each = params["compile_s"] if tuned else params["fft_compile_s"] if kernel.__name__.startswith("lisa_fft_") \
        else params["small_compile_s"]
    return each * slowdown + (params["launcher_s"] if launcher else 0.0)


def plan(args) -> int:
    """The GPU run's stages (``--stages``, as gpu_session.sh passes them) with, per stage, the Triton compiles
    (new specializations; one an earlier stage compiled comes from Triton's disk cache), the autotune keys tuned and
    the candidates compiled and timed for them, and an estimated time, compared with the stage's cap; and the whole
    run (stages one after another, each cut at its cap, the build waited for after check) with the budget.

    A stage's time: start-up + its compiles (compile_s per autotune candidate, fft_compile_s per triton-fft kernel,
    small_compile_s per other kernel, x build_slowdown while the CUDA build runs, + launcher_s per new C launcher on
    Triton < 3.7) + cache hits x
    cache_hit_s + candidates timed x bench_s (+ their kernel time) + its own runs. With the warm-up (warm_jobs > 0:
    gpu_check.py warm, started after env) the compiles are made beforehand by warm_jobs processes in the stages'
    order; a compile the warm-up has made by the time the stage needs it is a cache hit.

    An estimate: the specializations are those of Triton's own binder on placeholder tensors of the GPU run's
    shapes (so pointer alignment and ints divisible by 16 or equal to 1 come out as on the GPU), but a real call's
    tensors may differ in ways this does not see, the pruning may drop candidates (fewer benchmark runs), and the
    times are the parameters'."""
    if args.tiny:       # the dry run's check stage (its simulated counts are the test's comparison)
        return _plan_tiny(args)
    params = {k: getattr(args, k) for k in PLAN_DEFAULTS}
    result = make_plan([parse_stage(s) for s in args.stages], args.triton, _bench_args(args), params, args.budget)
    _print_plan(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0 if result["fits_budget"] and result["every_stage_fits_its_cap"] else 1


def _bench_args(args) -> Dict:
    return {"methods": args.methods, "repeats": args.repeats, "warmup": args.warmup, "min_time": args.min_time,
            "max_seconds": args.max_seconds}


def make_plan(stages, triton: str, bench: Dict, params: Dict, budget: float, works=None) -> Dict:
    """plan()'s table (a dict, as plan.json holds it); ``works``: stage_work's output, if computed already."""
    works = list(works if works is not None else stage_work(stages, triton, bench, params))
    jobs = int(params["warm_jobs"])
    rows, clock, needed, build_end, warm = [], 0.0, 0.0, -math.inf, None
    if jobs > 0 and works and works[0][0]["name"] != "env":     # (the warm-up and build start after env, if any)
        warm = _warm_schedule(works, params, 0.0, build_end)
    for spec, work, info in works:
        name, c = spec["name"], work.counts
        start = clock
        if name == "build":           # waits for the background build, started after env
            est = max(0.0, build_end - clock)
            compile_s = flex_s = 0.0
        else:
            t = clock + params["startup_s"]
            for item in work.items:   # the stage's own compiles, or the warm-up's where it is ahead
                if warm is not None and warm.get(id(item), math.inf) <= t:
                    t += params["cache_hit_s"]
                else:
                    t += _compile_cost(item, params, params["build_slowdown"] if t < build_end else 1.0)
            compile_s = t - clock - params["startup_s"]
            bench_s = c["candidates_run"] * params["bench_s"] + work.kernel_seconds
            flex_s = info.get("flex_s", 0.0) * (params["build_slowdown"] if t < build_end else 1.0)
            est = t - clock + c["cache_hits"] * params["cache_hit_s"] + bench_s + flex_s + info.get("run_s", 0.0)
        skipped = spec.get("if_time") is not None and budget - clock <= spec["if_time"]
        room = budget - clock - RESERVE_S
        skipped = "too little time left" if skipped else "budget spent" if room < 5 else None
        clock += 0.0 if skipped else min(est, spec["cap"], room)
        needed += 0.0 if skipped == "too little time left" else est
        if name == "env":
            build_end = clock + params["build_s"]
            warm = _warm_schedule(works, params, clock, build_end) if jobs > 0 else None
        rows.append({"stage": name, "cap_s": spec["cap"], "compiles": c["compiles"],
                     "tuned_compiles": c["tuned_compiles"], "small_compiles": c["small_compiles"],
                     "cache_hits": c["cache_hits"], "launchers": c["launchers"], "autotune_keys": c["autotunings"],
                     "candidate_compiles": c["candidate_compiles"], "candidates_run": c["candidates_run"],
                     "compile_s": round(compile_s, 1), "flex_compiles": info.get("flex_compiles", 0),
                     "flex_s": round(flex_s, 1),
                     "bench_s": round(c["candidates_run"] * params["bench_s"] + work.kernel_seconds, 1),
                     "run_s": round(info.get("run_s", 0.0), 1), "estimate_s": round(est, 1),
                     "fits_cap": est <= spec["cap"], "start_s": round(start, 1), "end_s": round(clock, 1),
                     "skipped": skipped,
                     "compiles_by_kernel": {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("compiles:")},
                     **{k: v for k, v in info.items() if k not in ("run_s", "flex_s", "flex_compiles")}})
    all_items = [item for _, work, _ in works for item in work.items]
    serial = sum(_compile_cost(item, params, 1.0) for item in all_items)
    # total_s: the run as the script runs it (each stage cut at its cap and at the budget); needed_s: what its
    # stages need uncut (an if-time stage skipped as in the run); it fits if that is within the budget and caps
    return {"gpu": "H100 / H200 (sm_90a), simulated", "triton": triton, "budget_s": budget, "params": params,
            "stages": rows, "total_s": round(clock, 1), "needed_s": round(needed, 1),
            "fits_budget": needed <= budget and not any(r["skipped"] == "budget spent" for r in rows),
            "every_stage_fits_its_cap": all(r["fits_cap"] for r in rows),
            "warm": None if warm is None else {"jobs": jobs, "compiles": len(all_items),
                                                "ends_s": round(max(warm.values(), default=clock), 1)},
            "compile_seconds_one_process": round(serial, 1)}


def _warm_schedule(works, params: Dict, start: float, build_end: float) -> Dict[int, float]:
    """When the warm-up (its jobs started at ``start``) has made each compile (by id of the item): the items in the
    stages' order, each to the first free process."""
    import heapq
    free = [start + params["warm_startup_s"]] * int(params["warm_jobs"])
    done = {}
    for _, work, _ in works:
        for item in work.items:
            t = heapq.heappop(free)
            t += _compile_cost(item, params, params["build_slowdown"] if t < build_end else 1.0)
            done[id(item)] = t
            heapq.heappush(free, t)
    return done


def _print_plan(result: Dict) -> None:
    p = result["params"]
    warm = result["warm"]
    print(f"Plan of the GPU run (Triton {result['triton']}, {result['gpu']}): per compile {p['compile_s']:g} s "
          f"(autotune candidates) / {p['small_compile_s']:g} s (other kernels) / {p['fft_compile_s']:g} s "
          f"(triton-fft), {p['bench_s']:g} s per candidate "
          f"timed, {p['startup_s']:g} s start-up per stage; "
          + (f"warm-up: {warm['jobs']} processes, its {warm['compiles']} compiles done at {warm['ends_s']:.0f} s"
             if warm else "no warm-up"))
    print(f"flex: {p['flex_compile_s']:g} s per FlexAttention compile, {p['flex_train_compile_s']:g} s with its "
          "backward (guesses)")
    print(f"{'stage':<13} {'cap':>4} {'compiles':>8} {'cached':>6} {'gcc':>4} {'keys':>5} {'cand.':>5} "
          f"{'compile s':>9} {'bench s':>7} {'flex':>4} {'flex s':>6} {'run s':>6} {'est. s':>7} {'fits':>4} "
          f"{'ends at':>7}")
    for r in result["stages"]:
        print(f"{r['stage']:<13} {r['cap_s']:>4} {r['compiles']:>8} {r['cache_hits']:>6} {r['launchers']:>4} "
              f"{r['autotune_keys']:>5} {r['candidates_run']:>5} {r['compile_s']:>9.1f} {r['bench_s']:>7.1f} "
              f"{r['flex_compiles']:>4} {r['flex_s']:>6.1f} "
              f"{r['run_s']:>6.1f} {r['estimate_s']:>7.1f} {'yes' if r['fits_cap'] else 'NO':>4} {r['end_s']:>7.1f}"
              + (f"  skipped: {r['skipped']}" if r["skipped"] else ""))
    for r in result["stages"]:
        for k in ("auto", "too_slow"):
            if r.get(k):
                print(f"  {r['stage']} {k}: " + ", ".join(f"{a}: {b}" for a, b in r[k].items())
                      if isinstance(r[k], dict) else f"  {r['stage']} {k}: " + "; ".join(r[k]))
    print(f"the stages need {result['needed_s']:.0f} s of the {result['budget_s']:g} s budget "
          f"({'fits' if result['fits_budget'] else 'OVER BUDGET'}; cut at the caps the run ends at "
          f"{result['total_s']:.0f} s); "
          f"{'every stage within its cap' if result['every_stage_fits_its_cap'] else 'some stage over its cap'}; "
          f"the compiles would take {result['compile_seconds_one_process']:.0f} s in one process")


def _plan_tiny(args) -> int:
    """The dry run's check stage (tiny cases, the installed Triton's candidates): the counts its simulated GPU
    records (check.jsonl) must be these."""
    version = ".".join(triton_version().split(".")[:2])
    work = TritonWork(set(), set(), version)
    with _as_gpu(version):
        _check_work(work, TINY_CASES, args.backends, args.dtypes)
    c = work.counts
    result = {"autotunings": c["autotunings"], "compiles": c["candidate_compiles"],
              "candidates_run": c["candidates_run"], "specializations": c["compiles"]}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


def triton_version() -> str:
    import triton
    return triton.__version__


# ------------------------------------------------------------------------------------------------ warm-up

def warm(args) -> int:
    """Compile the GPU run's Triton kernels into Triton's disk cache beforehand, ``--jobs`` processes at a time (the
    GPU machine has 16 cores; the stages compile in one thread each): the plan's compiles (:func:`stage_work`, the
    installed Triton's candidates) in the stages' order, each a ``warmup`` of the kernel for the simulated GPU's
    target (sm_90a: an H100's and an H200's), which needs no GPU; on Triton < 3.7 also each new C launcher, where
    the CUDA driver library is found. A stage that then needs a compile finds it in the disk cache (Triton's cache
    key is the kernel's source, the target, the options and the specialization, not the process or device), or
    compiles it itself if the warm-up is behind. Writes the plan (``--plan-out``) before it starts."""
    import concurrent.futures
    import multiprocessing
    params = {k: getattr(args, k) for k in PLAN_DEFAULTS}
    version = ".".join(triton_version().split(".")[:2])
    t0 = time.perf_counter()
    stages = [parse_stage(s) for s in args.stages]
    arch = SIMULATED_GPU.arch
    if torch.cuda.is_available():                       # the GPU's own target (an H100's and H200's: sm_90a)
        major, minor = torch.cuda.get_device_capability(0)
        arch = 10 * major + minor
    items, works = [], []
    for spec, work, info in stage_work(stages, version, _bench_args(args), params):
        works.append((spec, work, info))
        items += [(spec["name"], _portable(item) + (arch,)) for item in work.items]
        if args.limit is not None and len(items) >= args.limit:
            items = items[:args.limit]
            break
    if args.limit is None:
        result = make_plan(stages, version, _bench_args(args), params, args.budget, works)
        _print_plan(result)
        if args.plan_out:
            with open(args.plan_out, "w") as f:
                json.dump(result, f, indent=1)
    print(f"warm-up: {len(items)} compiles for sm_{arch} in {args.jobs} processes (planned in "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    failed, done, by_stage = 0, 0, Counter()
    # the workers compile: spawned (they import triton afresh, and are started as work is submitted) while the
    # environment says not to interpret
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # (gpu_session.sh stops it at its end)
        try:
            futures = {pool.submit(_warm_one, item): stage for stage, item in items}
            for fut in concurrent.futures.as_completed(futures):
                error = fut.result()
                done += 1
                by_stage[futures[fut]] += 1
                if error:
                    failed += 1
                    print(f"warm-up: {error}", flush=True)
                if done % 25 == 0 or done == len(items):
                    print(f"warm-up: {done}/{len(items)} compiled at {time.perf_counter() - t0:.0f} s "
                          f"({', '.join(f'{s} {n}' for s, n in by_stage.items())})", flush=True)
        finally:
            pool.shutdown(wait=done == len(items), cancel_futures=True)
    print(f"warm-up done: {done - failed} compiled, {failed} failed, {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def _portable(item) -> tuple:
    """A compile for a worker process: the kernel by module and name, tensors as (dtype, byte offset mod 16)."""
    kernel, args, options, tuned, launcher = item
    fn = getattr(kernel, "fn", kernel)
    plain = {k: ("tensor", str(v.dtype), v.data_ptr() % 16) if isinstance(v, torch.Tensor) else v
             for k, v in args.items()}
    return fn.__module__, kernel.__name__, plain, options, launcher


_WARM_DRIVER = []


def _warm_one(item) -> Optional[str]:
    """In a warm-up process: compile one kernel for the simulated GPU's target (and its C launcher on Triton < 3.7);
    None, or what failed."""
    import importlib

    from triton.runtime import driver
    module, name, args, (warps, stages), launcher, arch = item
    try:
        if not _WARM_DRIVER:        # Triton's driver for a GPU of that target, which needs no GPU
            from lisa_kernels.testing import DEVICES, FakeDevice, _make_driver
            h100 = DEVICES["h100"]
            _WARM_DRIVER.append(_make_driver(FakeDevice(GPU("cuda", arch, 32), f"sm_{arch}", h100.max_shared_mem),
                                             None))
            driver.set_active(_WARM_DRIVER[0])
        fn = getattr(importlib.import_module(module), name)
        if not hasattr(fn, "params"):
            return f"{name}: not compiled: Triton interprets kernels in this process (TRITON_INTERPRET=1)"
        real = {}
        for k, v in args.items():
            if isinstance(v, tuple) and v[:1] == ("tensor",):
                dtype = getattr(torch, v[1].replace("torch.", ""))
                t = torch.empty(64, dtype=dtype)
                real[k] = t[v[2] // t.element_size():] if v[2] else t
            else:
                real[k] = v
        compiled = fn.warmup(**real, num_warps=warps, num_stages=stages, grid=(1,))
        if launcher:
            try:
                from triton.backends.nvidia.driver import CudaLauncher
                CudaLauncher(compiled.src, compiled.metadata)      # built once per signature, into the disk cache
            except Exception:  # noqa: BLE001  (no CUDA driver library here: the stage builds it)
                pass
    except Exception as exc:  # noqa: BLE001  (reported; the stage compiles it itself)
        return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


# ------------------------------------------------------------------------------------------------ compile time

def _launches(p, backward: bool, has_rex: bool, device="meta", gpu=None) -> List:
    """The Triton direct launches of one call of ``p`` (the forward's, and with ``backward`` the backward's) for
    ``gpu`` (default: a simulated H100's target), on placeholder tensors of ``device``: like
    ``triton_direct.kernel_launches``, but with rpe_extra only where the call passes one (``has_rex``)."""
    from lisa_kernels import triton_direct as td
    gpu = gpu or SIMULATED_GPU
    B, H, N = p.B, p.H, p.N
    mk = lambda *shape: torch.empty(*shape, device=device, dtype=p.dtype)  # noqa: E731
    q, k, v = mk(B, H, N, p.Dk), mk(B, H, N, p.Dk), mk(B, H, N, p.Dv)
    rpe = mk(H, p.M, *p.rpe_table_shape)
    rex = mk(H, p.M, 3) if has_rex and p.num_extra else None
    fl, out, res, den, r, mx = td.forward_launches(q, k, v, rpe, rex, p, gpu)
    if not backward:
        return fl
    return fl + td.backward_launches(q, k, v, rpe, rex, out, res, den, r, mx, mk(B, H, N, p.Dv), p, gpu)[0]


def compile_time(args) -> int:
    """Seconds per Triton compile for sm_90a on this machine (no GPU needed): the first candidates of the forward
    and backward kernels of one problem (14x14 + 1 token, D = 64) per dtype, two untuned ones and the five
    triton-fft kernels, each compiled (the JIT's ``warmup``: Triton's
    passes and ptxas) in a fresh cache, one after another as the spill pruning compiles them; on Triton < 3.7 also
    the C launcher that Triton builds with the host's C compiler for each new kernel signature."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":       # (triton is imported already, interpreting)
        import tempfile
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache}
            cmd = [sys.executable, os.path.abspath(__file__), "compile-time", "--candidates", str(args.candidates),
                   "--dtypes", *args.dtypes]
            return subprocess.call(cmd + (["--out", args.out] if args.out else []), env=env)
    import tempfile

    import triton
    from triton.runtime import driver

    from lisa_kernels.testing import DEVICES, _make_driver
    driver.set_active(_make_driver(DEVICES["h100"], None))
    p = _problem((14, 14), 1, 1, 64, torch.bfloat16, B=2, H=2)
    rows = []

    def cpu_seconds():        # this process's and its children's (ptxas, gcc): a loaded machine's compiles wait
        import resource
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def timed(kind, name, kernel, kwargs):
        t0, c0 = time.perf_counter(), cpu_seconds()
        compiled = kernel.warmup(**kwargs, grid=(1,))
        rows.append({"kind": kind, "kernel": name, "seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0,
                     "options": {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)
                                 and k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "GATHER_T")}})
        print(f"{kind:<6} {name:<28} {str(rows[-1]['options']):<85} {rows[-1]['seconds']:6.2f} s "
              f"({rows[-1]['cpu_s']:.2f} s of CPU)", flush=True)
        return compiled

    for dname in args.dtypes:
        launches = {launch.name: launch
                    for launch in _launches(dataclasses.replace(p, dtype=DTYPES[dname]), True, True, device="cpu")}
        for name in ("fwd", "bwd_dkv", "bwd_dq", "bwd_walk", "prep", "table_fold"):
            launch = launches[name]
            for cfg in launch.configs()[:args.candidates if launch.tuned else 1]:
                compiled = timed("tuned" if launch.tuned else "small", f"{name} {dname}", launch.kernel,
                                 {**launch.args, **cfg})
    seen = set()
    for kernel, named, (warps, stages) in _fft_calls(dataclasses.replace(p, dtype=torch.float32), True):
        if kernel.__name__ in seen:
            continue
        seen.add(kernel.__name__)
        real = {k: torch.empty(16, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for k, v in named.items()}
        timed("small", kernel.__name__, kernel, {**real, "num_warps": warps, "num_stages": stages})
    launcher = None
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        from triton.backends.nvidia import driver as nv
        from triton.runtime.build import _build
        constants = {(compiled.src.fn.arg_names.index(k),) if isinstance(k, str) else k: v
                     for k, v in compiled.src.constants.items()}
        src = nv.make_launcher(constants, dict(compiled.src.signature), getattr(compiled.metadata, "tensordesc_meta",
                                                                                  None))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "launcher.c")
            with open(path, "w") as f:
                f.write(src)
            t0 = time.perf_counter()
            _build("launcher", path, tmp, [], nv.include_dirs, [], [])
            launcher = time.perf_counter() - t0
        print(f"C launcher (gcc): {launcher:.2f} s")
    def mean(kind, key):
        xs = [r[key] for r in rows[1:] if r["kind"] == kind]
        return sum(xs) / len(xs)
    info = {"triton": triton.__version__, "torch": torch.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "first_compile_s": rows[0]["seconds"],
            "tuned_compile_s": mean("tuned", "seconds"), "small_compile_s": mean("small", "seconds"),
            "tuned_compile_cpu_s": mean("tuned", "cpu_s"), "small_compile_cpu_s": mean("small", "cpu_s"),
            "launcher_s": launcher, "compiles": rows}
    print(f"triton {triton.__version__} on {info['cpu']} ({info['cores']} cores, load average "
          f"{info['load_average'][0]:.1f}): first compile {rows[0]['seconds']:.2f} s (with the compiler's start-up), "
          f"then per compile {info['tuned_compile_s']:.2f} s ({info['tuned_compile_cpu_s']:.2f} s of CPU) for "
          f"autotuned kernels' candidates, {info['small_compile_s']:.2f} s ({info['small_compile_cpu_s']:.2f} s of "
          f"CPU) for untuned and triton-fft kernels")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1, default=str)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


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
    c.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (names of CASES or TINY_CASES)")
    c.add_argument("--against", choices=BACKENDS,
                   help=f"also compare with this backend on the same inputs (limit {AGAINST_FACTOR}x the reference's)")
    fx = sub.add_parser("flex", help="backend flex's check and the timing stages' FlexAttention compiles, in parallel")
    fx.add_argument("--stages", nargs="+", default=[], metavar="NAME:CAP[:D:B:GRIDS[:+METHOD,...]]",
                    help="the timing stages, as gpu_session.sh passes them (their FlexAttention cases are compiled)")
    fx.add_argument("--methods", nargs="+", default=[], help="the timing stages' benchmark.py --methods")
    fx.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    fx.add_argument("--heads", type=int, default=8, help="the timing stages' H [8]")
    fx.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    fx.add_argument("--jobs", type=int, default=14, help="processes [14]")
    fx.add_argument("--tiny", action="store_true", help="the dry run's check: one tiny case, float32, the forward")
    fx.add_argument("--out", help="append one JSON line per check here")
    ao = sub.add_parser("aoti", help="a LiSA model through torch.export, AOTInductor and torch.compile vs eager")
    ao.add_argument("--tiny", action="store_true", help="a smaller model (the dry run)")
    ao.add_argument("--no-compile", action="store_true", help="the exported program only, no Inductor (the dry run)")
    ao.add_argument("--out")
    s = sub.add_parser("sanitize-one", help="one small fwd+bwd call of each backend")
    s.add_argument("backends", nargs="+", choices=BACKENDS)
    s.add_argument("--tiny", action="store_true", help="a smaller call (the dry run)")
    s.add_argument("--fake-gpu", help="simulate this GPU (a key of lisa_kernels.testing.DEVICES; the dry run)")
    m = sub.add_parser("summary", help="the targets table from benchmark.py results")
    m.add_argument("results", nargs="*")
    m.add_argument("--out")
    m.add_argument("--merge", help="also write the records of all results into one file (for fit_cost_model.py)")
    pl = sub.add_parser("plan", help="the GPU run's Triton compiles and autotunings per stage, its estimated times")
    wm = sub.add_parser("warm", help="compile the GPU run's Triton kernels into Triton's disk cache beforehand")
    for parser in (pl, wm):
        parser.add_argument("--stages", nargs="+", default=[], metavar="NAME:CAP[:D:B:GRIDS]",
                            help="the GPU run's stages in order, as gpu_session.sh passes them")
        parser.add_argument("--budget", type=float, default=530.0, help="the session's budget in seconds [530]")
        parser.add_argument("--methods", nargs="+", default=["sdpa-flash", "lisa-auto", "lisa-triton",
                                                             "lisa-triton-fft"],
                            help="the timing stages' benchmark.py --methods")
        parser.add_argument("--repeats", type=int, default=10)
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument("--min-time", type=float, default=0.1)
        parser.add_argument("--max-seconds", type=float, default=2.0)
        for k, v in PLAN_DEFAULTS.items():
            parser.add_argument("--" + k.replace("_", "-"), type=type(v), default=v, help=f"[{v:g}]")
    pl.add_argument("--triton", default=GPU_TRITON, help=f"the GPU machine's Triton version [{GPU_TRITON}]")
    pl.add_argument("--tiny", action="store_true", help="count the dry run's check stage instead (tiny cases, "
                                                        "the installed Triton)")
    pl.add_argument("--backends", nargs="+", default=list(CHECK_BACKENDS), choices=BACKENDS, help="(with --tiny)")
    pl.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="(with --tiny)")
    pl.add_argument("--out", help="write the plan (JSON) here")
    wm.add_argument("--jobs", type=int, default=10, help="compiling processes [10]")
    wm.add_argument("--limit", type=int, help="compile only the first this many (the dry run)")
    wm.add_argument("--plan-out", help="write the plan (JSON, for the installed Triton) here")
    ct = sub.add_parser("compile-time", help="seconds per Triton compile for sm_90a on this machine (no GPU needed)")
    ct.add_argument("--candidates", type=int, default=2, help="candidates compiled per kernel [2]")
    ct.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ct.add_argument("--out")
    args = ap.parse_args(argv)
    return {"env": lambda: (env(args), 0)[1], "check": lambda: check(args), "sanitize-one": lambda: sanitize_one(args),
            "summary": lambda: summary(args), "plan": lambda: plan(args), "warm": lambda: warm(args),
            "flex": lambda: flex(args), "aoti": lambda: aoti(args),
            "compile-time": lambda: compile_time(args)}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
