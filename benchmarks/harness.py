"""How the benchmark measures: timing, peak memory, one process per case, estimates and the sweep loop.

- ``time_calls_cpu`` / ``time_calls_cuda``: warm-up calls, then timed calls (``perf_counter``; CUDA events);
- ``measure_cpu`` / ``measure_cuda`` / ``measure``: one case's times and peak memory (``RssSampler`` samples the
  resident set size on the CPU) as a record;
- ``measure_in_subprocess``: one case in a fresh child process forked from a server that has only imported the
  libraries (the CPU default, for a clean memory baseline);
- ``estimate``: the time per call of a case before running it (LiSA's cost model, or a baseline's own time on a
  smaller grid), on which too slow cases are skipped;
- ``Clock``: the wall time of a case predicted from that estimate and the cases so far, for the time left on
  the progress line and for the time budget (``--budget-seconds``);
- ``run_case`` / ``run_sweep``: every case in turn, a progress line each, partial results saved as they come.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import multiprocessing
import os
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from methods import (Case, cannot_run_reason, chosen_backend, explain_case, flop_kind, is_lisa, lisa_backend,
                     make_call, make_inputs, model_flops)
from reports import duration_text, seconds_text, write_json

MIB = 2.0 ** 20


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


def time_calls_cpu(call: Callable[[int], None], case: Case) -> List[float]:
    """Warm-up calls, then at least ``repeats`` timed calls and more (up to 1000) until ``min_time`` is spent."""
    for i in range(case.warmup):
        call(i % case.rotate)
    times: List[float] = []
    while len(times) < case.repeats or (sum(times) < case.min_time and len(times) < 1000):
        t0 = time.perf_counter()
        call(len(times) % case.rotate)
        times.append(time.perf_counter() - t0)
    return times


def time_calls_cuda(call: Callable[[int], None], case: Case) -> List[float]:
    """Warm-up calls, then rounds of ``repeats`` timed calls (events read after one synchronize per round)
    until ``min_time`` is spent, up to 1000 calls."""
    for i in range(case.warmup):
        call(i % case.rotate)
    torch.cuda.synchronize()
    times: List[float] = []
    while not times or (sum(times) < case.min_time and len(times) < 1000):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(case.repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            call((len(times) + i) % case.rotate)
            end.record()
        torch.cuda.synchronize()
        times += [start.elapsed_time(end) / 1e3 for start, end in events]
    return times


def measure_cpu(case: Case) -> Dict:
    """Time one case on the CPU and sample its RSS (run it in a fresh process for a clean baseline)."""
    tiny = dataclasses.replace(case, grid=tuple(min(s, 4) for s in case.grid), rotate=1)
    make_call(tiny, [make_inputs(tiny)])(0)       # load and initialise the libraries the method uses
    sets = [make_inputs(case, i) for i in range(case.rotate)]
    call = make_call(case, sets)                  # for "bwd", this runs the forwards
    times = time_calls_cpu(call, case)            # with the allocator as users have it
    if _IN_CHILD:                                 # (in the main process it would slow every later case)
        fixed_mmap_threshold()
    gc.collect()
    hwm_ok = reset_hwm()
    with RssSampler() as sampler:                 # then one more call for the memory
        base = sampler.peak
        call(0)
    hwm = read_hwm() if hwm_ok else None
    return {"times_s": times, "peak_mib": (sampler.peak - base) / MIB, "rss_samples": sampler.samples,
            "peak_mib_hwm": None if hwm is None else (hwm - base) / MIB}


MMAP_THRESHOLD = 1 << 20     # bytes: for the memory call, every block this large is its own mapping


def fixed_mmap_threshold() -> bool:
    """Make glibc map every block of MMAP_THRESHOLD bytes or more on its own and unmap it when freed, and give
    free heap memory back (malloc_trim). Its default adaptive threshold serves large blocks from the heap after
    the first large free and keeps freed ones resident, so a call's outputs could reuse them unseen by the RSS.
    Only for the memory call: fresh mappings cost page faults, which would slow the timed calls (by 1.4-2x for
    allocation-heavy paths on the development CPU). False where this is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, MMAP_THRESHOLD) == 1           # -3: M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def measure_cuda(case: Case) -> Dict:
    """Time one case on the GPU; then its peak memory over one more call, from the caching allocator's statistics
    (after the timed calls: the first calls autotune, and Triton's benchmarking allocates a 256 MiB scratch buffer to
    flush the L2 cache, which is not the method's memory)."""
    sets = [make_inputs(case, i) for i in range(case.rotate)]
    call = make_call(case, sets)
    times = time_calls_cuda(call, case)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call(0)
    torch.cuda.synchronize()
    return {"times_s": times, "peak_mib": (torch.cuda.max_memory_allocated() - base) / MIB}


def measure(case: Case) -> Dict:
    """Measure one case in this process: a record with status "ok", or "failed" and the reason."""
    on_cuda = case.device.startswith("cuda")
    try:
        m = measure_cuda(case) if on_cuda else measure_cpu(case)
    except Exception as exc:  # noqa: BLE001  (a failing case is a result, not the end of the sweep)
        m = {"status": "failed", "reason": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
    if on_cuda:
        gc.collect()
        torch.cuda.empty_cache()     # after an out-of-memory error, give the next case a clean device
    if "reason" in m:
        return m
    times = m.pop("times_s")
    return {"status": "ok", "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "calls": len(times), "times_ms": [1e3 * t for t in times[:100]], **m}


# ------------------------------------------------------------------------------- one process per case

_CONTEXT = None


_IN_CHILD = False     # True in a child process that measures one case


def _child(case_json: str, conn) -> None:
    global _IN_CHILD
    _IN_CHILD = True
    conn.send(measure(Case.from_json(case_json)))
    conn.close()


def measure_in_subprocess(case: Case, timeout: float) -> Dict:
    """Measure one case in a fresh child process, forked from a server process that has imported torch but run
    nothing (so each case starts clean, without paying torch's import again)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # torch only: the server imports before it has the parent's sys.path, so a lisa_kernels preloaded there
        # could be the current directory's rather than the one chosen (_library.py); each child imports it
        _CONTEXT.set_forkserver_preload(["torch"])
    receive, send = _CONTEXT.Pipe(duplex=False)
    proc = _CONTEXT.Process(target=_child, args=(case.to_json(), send), daemon=True)
    proc.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        return {"status": "failed", "reason": f"worker timed out after {timeout:.0f} s"}
    except EOFError:            # the child died without a result (e.g. killed for memory)
        proc.join()
        return {"status": "failed", "reason": f"worker exited with code {proc.exitcode} and no result"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receive.close()


# ---------------------------------------------------------------------------------------- estimates

def lisa_model_seconds(case: Case) -> Optional[float]:
    """lisa_kernels' cost-model estimate of one call of the backend the case runs (bwd: fwd+bwd minus fwd)."""
    e = explain_case(case)
    name = e.chosen if case.method == "lisa-auto" else lisa_backend(case.method)
    est = e.estimates[name].seconds if name in e.estimates else None
    if est is not None and case.mode == "bwd":
        fwd = explain_case(case, backward=False).estimates[name].seconds
        est = est - (fwd or 0.0)
    return est


def record_seconds(r: Dict) -> Optional[float]:
    """A record's time per call: measured median, or the estimate it was skipped on."""
    if r["status"] == "ok":
        return r["median_ms"] / 1e3
    if r["status"] == "skipped":
        return r.get("estimate_s")
    return None


def previous_grid_record(case: Case, records: Sequence[Dict]) -> Optional[Dict]:
    """The record of the same method, D, dtype, mode and grid rank on the largest smaller grid."""
    key = (case.method, case.D, case.dtype, case.mode, len(case.grid))
    same = [r for r in records if (r["method"], r["D"], r["dtype"], r["mode"], len(r["grid"])) == key
            and r["N"] < case.N and record_seconds(r) is not None]
    return max(same, key=lambda r: r["N"]) if same else None


def largest_record(case: Case, records: Sequence[Dict]) -> Optional[Dict]:
    """The record of the same method and dtype (any D, mode or grid) on the largest grid."""
    same = [r for r in records if (r["method"], r["dtype"]) == (case.method, case.dtype)
            and record_seconds(r) is not None]
    return max(same, key=lambda r: r["N"]) if same else None


MODEL_SOURCE = "lisa_kernels cost model (dispatch.estimate_seconds)"
BUDGET_MARGIN = 1.5     # a case must fit in the time budget at 1.5x its predicted time (a busy machine)


def estimate(case: Case, records: Sequence[Dict]) -> Tuple[Optional[float], str]:
    """(seconds per call, how it was estimated); None where there is nothing to estimate from.

    LiSA (flex-lisa too): its cost model. A baseline: its own time on the previous, smaller grid of the same D, mode
    and rank, times N^2 (N for linear attention); else its time at another point, times the ratio of the FLOP
    model."""
    if is_lisa(case.method):
        return lisa_model_seconds(case), MODEL_SOURCE
    prev = previous_grid_record(case, records)
    if prev is not None:
        power = 1 if case.method == "linear" else 2
        return (record_seconds(prev) * (case.N / prev["N"]) ** power,
                f"N^{power} extrapolation from {prev['grid_label']}")
    other = largest_record(case, records)
    if other is None:
        return None, "first grid: not estimated"
    at_other = dataclasses.replace(case, grid=tuple(other["grid"]), D=other["D"], mode=other["mode"])
    return (record_seconds(other) * model_flops(case, case.method) / model_flops(at_other, case.method),
            f"FLOP-model scaling from {other['grid_label']} D={other['D']} {other['mode']}")


def backend_name(case: Case) -> str:
    """The LiSA backend a case runs ("direct", "fft", ...; for lisa-auto the one it picks)."""
    name = chosen_backend(case)
    return lisa_backend(name) if is_lisa(name) else name


class Clock:
    """The sweep's wall time: elapsed, predicted for a case, left, against the budget (0: none).

    A case takes about ``overhead + t * calls``: ``t`` its estimate per call, ``calls`` the warm-up, the timed
    calls (at least --repeats and --min-time), the memory call on the CPU and the forwards a "bwd" case makes
    first; ``overhead`` (the child process, the inputs) is the median over the cases measured so far, 0.5 s
    before the first. A cost-model estimate is scaled by how that backend's measured times compared with
    the model so far (sum of measured / sum of modelled times, so that the large cases weigh most).
    With a budget, run_case skips a case predicted to end past it and stops a child process still running
    when it runs out."""

    def __init__(self, started: float, budget: float = 0.0):
        self.started = started
        self.budget = budget
        self.overheads: List[float] = []
        self.model_sums: Dict[str, List[float]] = {}      # backend: [measured s, modelled s], summed

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @staticmethod
    def calls_seconds(case: Case, t: float) -> float:
        untimed = case.warmup + (case.device == "cpu") + (case.rotate if case.mode == "bwd" else 0)
        return t * untimed + max(t * case.repeats, case.min_time)

    def model_factor(self, backend: str) -> float:
        """Measured / modelled time so far, for this backend (or for all of them before its first case)."""
        sums = self.model_sums.get(backend) or [sum(s[i] for s in self.model_sums.values()) for i in (0, 1)]
        return sums[0] / sums[1] if sums[1] > 0 else 1.0

    def case_seconds(self, case: Case, est: Optional[float], source: str) -> float:
        t = est or 0.0
        if source == MODEL_SOURCE:
            t *= self.model_factor(backend_name(case))
        overhead = statistics.median(self.overheads) if self.overheads else 0.5
        return overhead + self.calls_seconds(case, t)

    def learn(self, case: Case, rec: Dict) -> None:
        """Take in a finished case's record (its wall time and, measured, its time per call)."""
        if rec["status"] != "ok":
            return
        t = rec["median_ms"] / 1e3
        self.overheads.append(max(0.0, rec["wall_s"] - self.calls_seconds(case, t)))
        if rec["estimate_source"] == MODEL_SOURCE and rec["estimate_s"]:
            sums = self.model_sums.setdefault(backend_name(case), [0.0, 0.0])
            sums[0] += t
            sums[1] += rec["estimate_s"]

    def over_budget(self, seconds: float) -> bool:
        """Whether a case predicted to take ``seconds`` would end past the budget (with BUDGET_MARGIN)."""
        return bool(self.budget) and self.elapsed() + BUDGET_MARGIN * seconds > self.budget

    def time_left(self, cases: Sequence[Case], records: Sequence[Dict], max_seconds: float) -> float:
        """Predicted seconds to run ``cases`` after ``records``: each one estimated as run_case will, a case
        that will be skipped counting nothing (capped by the budget left)."""
        seen = list(records)
        total = 0.0
        for case in cases:
            if cannot_run_reason(case) is not None:
                continue
            est, source = estimate(case, seen)
            seen.append({"method": case.method, "dtype": case.dtype, "D": case.D, "mode": case.mode,
                         "grid": list(case.grid), "grid_label": case.grid_label, "N": case.N,
                         "status": "skipped", "estimate_s": est})    # for the next grid's extrapolation
            if est is None or est <= max_seconds:
                total += self.case_seconds(case, est, source)
        if self.budget:
            total = min(total, max(0.0, self.budget - self.elapsed()))
        return total


# -------------------------------------------------------------------------------------------- sweep

def base_record(case: Case) -> Dict:
    backend = chosen_backend(case)
    return {"grid": list(case.grid), "grid_label": case.grid_label, "N": case.N, "D": case.D, "dtype": case.dtype,
            "mode": case.mode, "method": case.method, "backend": backend, "B": case.B, "H": case.H,
            "repeats": case.repeats, "warmup": case.warmup, "rotate": case.rotate, "seed": case.seed,
            "flop_kind": flop_kind(backend), "flops": model_flops(case, backend)}


def baseline_record(records: Sequence[Dict], rec: Dict, baseline: str) -> Optional[Dict]:
    for r in records:
        if r["method"] == baseline and r["status"] == "ok" and \
                (r["grid"], r["D"], r["dtype"], r["mode"]) == (rec["grid"], rec["D"], rec["dtype"], rec["mode"]):
            return r
    return None


def run_case(case: Case, records: Sequence[Dict], args, clock: Optional[Clock] = None) -> Dict:
    """Estimate, then skip or measure one case; returns its record (with ``wall_s``, the time it took)."""
    t0 = time.perf_counter()
    rec = measure_case(case, records, args, clock or Clock(t0))
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


def measure_case(case: Case, records: Sequence[Dict], args, clock: Clock) -> Dict:
    """run_case's work: skipped (cannot run, estimated too slow, over the time budget), or measured."""
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
    predicted = clock.case_seconds(case, est, source)
    if clock.over_budget(predicted):
        rec.update(status="skipped", reason=f"over the time budget: predicted {seconds_text(predicted)}, "
                                            f"{seconds_text(max(0.0, clock.budget - clock.elapsed()))} left")
        return rec
    if case.device == "cpu" and not args.in_process:
        timeout = 120 + 5 * (case.repeats + case.warmup) * max(args.max_seconds, est or 0)
        budget_left = clock.budget - clock.elapsed() if clock.budget else math.inf
        result = measure_in_subprocess(case, min(timeout, max(1.0, budget_left)))
        if budget_left < timeout and result.get("reason", "").startswith("worker timed out"):   # stopped at the budget
            result = {"status": "skipped", "reason": f"over the time budget: stopped after {seconds_text(budget_left)}"}
        rec.update(result)
    else:
        rec.update(measure(case))
    if rec["status"] == "ok":
        rec["tflops"] = rec["flops"] / (rec["median_ms"] * 1e-3) / 1e12
        base = rec if case.method == args.baseline else baseline_record(records, rec, args.baseline)
        rec["ratio_base"] = None if base is None else rec["median_ms"] / base["median_ms"]
        rec["memory_ratio_base"] = None if base is None or base["peak_mib"] <= 0 else \
            rec["peak_mib"] / base["peak_mib"]
    return rec


def progress_line(i: int, n: int, case: Case, rec: Dict, baseline: str) -> str:
    head = f"[{i:>{len(str(n))}}/{n}] {case.label}"
    if rec["status"] == "skipped" and rec["estimate_s"] is None:
        return f"{head} skipped: {rec['reason']}"
    if rec.get("reason") == "estimated too slow":
        return f"{head} skipped: estimated too slow ({seconds_text(rec['estimate_s'])} > --max-seconds)"
    if rec["status"] == "skipped":
        return f"{head} skipped: {rec['reason']}"
    if rec["status"] == "failed":
        return f"{head} FAILED: {rec['reason']}"
    backend = f" ({rec['backend']})" if case.method == "lisa-auto" else ""
    ratio = "   -   " if rec.get("ratio_base") is None else f"x{rec['ratio_base']:6.2f}"
    return (f"{head}{backend:<12} {rec['median_ms']:10.3f} ms  {ratio} {baseline}  "
            f"{rec['tflops']:8.3f} TFLOP/s  peak {rec['peak_mib']:8.1f} MiB")


def run_sweep(cases: Sequence[Case], args, meta: Dict, tmp_path: str, started: Optional[float] = None) -> List[Dict]:
    """Run every case in order, printing a line per case (with the time it took and the time left) and saving
    partial results to ``tmp_path``. ``started``: when the command began, for ``args.budget_seconds``."""
    clock = Clock(time.perf_counter() if started is None else started, getattr(args, "budget_seconds", 0) or 0)
    left = clock.time_left(cases, [], args.max_seconds)
    budget = f" (budget {seconds_text(clock.budget)} from the start)" if clock.budget else ""
    print(f"about {duration_text(left)} by the estimates{budget}", flush=True)
    records: List[Dict] = []
    for i, case in enumerate(cases, 1):
        rec = run_case(case, records, args, clock)
        records.append(rec)
        clock.learn(case, rec)
        left = clock.time_left(cases[i:], records, args.max_seconds)
        left_text = f", ~{duration_text(left)} left" if i < len(cases) else ""
        print(f"{progress_line(i, len(cases), case, rec, args.baseline)}  | {seconds_text(rec['wall_s'])}{left_text}",
              flush=True)
        write_json(tmp_path, {"meta": meta, "records": records})
    return records
