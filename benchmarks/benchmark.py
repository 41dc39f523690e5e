"""Time LiSA's backends against FlashAttention-style softmax attention and the other usual baselines.

    python benchmarks/benchmark.py                       # the default sweep on cuda if present, else cpu
    python benchmarks/benchmark.py --quick               # a tiny sweep (smoke test, ~1 minute on a CPU)
    python benchmarks/benchmark.py --grids 64x64 16x64x64 --dims 64 --modes fwd+bwd --methods sdpa lisa-auto

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

Writes ``<out>.json`` (metadata, one record per case, the issue's targets), ``<out>.csv`` (the records),
``<out>.md`` (tables), ``<out>.png`` (time vs tokens) and ``<out>_speedup.png`` (baseline / lisa-auto, grid
x D), by default under benchmarks/results/. ``benchmarks/compare.py`` compares two runs or two git refs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import math
import multiprocessing
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
# the lisa_kernels to benchmark: this checkout's, or another one's (benchmarks/compare.py sets this to a
# worktree of a git ref so that the same harness times two versions of the library)
LIBRARY_ROOT = os.environ.get("LISA_BENCH_LIBRARY_ROOT") or REPO_ROOT
if LIBRARY_ROOT not in sys.path:
    sys.path.insert(0, LIBRARY_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lisa_kernels  # noqa: E402

SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
SOFTMAX_METHODS = ("sdpa",) + tuple(SDPA_KERNELS) + ("flash-attn", "dense-bias")
BASELINES = SOFTMAX_METHODS + ("linear",)
LISA_METHODS = tuple(f"lisa-{b}" for b in ("direct", "fft", "auto", "triton", "triton-fft", "cuda", "reference"))
METHODS = BASELINES + LISA_METHODS
METHOD_HELP = {
    "sdpa": "F.scaled_dot_product_attention, torch's own kernel choice",
    "sdpa-flash": "SDPA restricted to its FlashAttention-2 kernel (sdpa_kernel(SDPBackend.FLASH_ATTENTION))",
    "sdpa-efficient": "SDPA restricted to the memory-efficient kernel",
    "sdpa-cudnn": "SDPA restricted to the cuDNN kernel",
    "sdpa-math": "SDPA restricted to the math (unfused PyTorch) kernel",
    "flash-attn": "the flash-attn package's flash_attn_func (FlashAttention 2.x, or 4 via flash_attn.cute)",
    "dense-bias": "softmax(q k^T / sqrt(D) + B) v with B[h, i, j] = table[h, offset(i, j)] gathered each call "
                  "(Swin/BEiT-style relative position bias; SDPA with a float attn_mask), table learned",
    "linear": "plain linear attention phi(q) (phi(k)^T v) / (phi(q) sum phi(k)), phi = elu + 1",
    **{f"lisa-{b}": f"lisa_attention(..., backend={b!r})" for b in ("direct", "fft", "triton", "triton-fft",
                                                                     "cuda", "reference")},
    "lisa-auto": "lisa_attention(..., backend='auto'); the record names the backend it chose",
}
CPU_DEFAULT_METHODS = ("sdpa", "dense-bias", "linear", "lisa-direct", "lisa-fft", "lisa-auto")
GPU_DEFAULT_METHODS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn", "dense-bias", "linear",
                       "lisa-direct", "lisa-fft", "lisa-auto", "lisa-triton", "lisa-triton-fft", "lisa-cuda")
MODES = ("fwd", "bwd", "fwd+bwd")
DEFAULT_MODES = ("fwd", "fwd+bwd")
DEFAULT_GRIDS = ("7x7", "14x14", "28x28", "32x32", "56x56", "64x64", "128x128", "256x256", "8x32x32", "16x64x64")
DEFAULT_DIMS = (32, 64, 128)
QUICK_GRIDS = ("14x14", "32x32")
QUICK_DIMS = (32,)
DEFAULT_MAX_SECONDS = 25.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
RESULTS_DIR = os.path.join(HERE, "results")
MIB = 2.0 ** 20

# model FLOPs of one call; the backward of a quadratic method counts 2.5x its forward (FlashAttention's
# convention: 5 matmuls against 2), of a linear-time one 2x
FLOP_FORMULAS = {
    "softmax": "fwd 4*B*H*N^2*D (q k^T and p v; softmax, bias and masking not counted)",
    "linear": "fwd 4*B*H*N*D*(D+1) (phi(k)^T v and phi(q) S with the normaliser)",
    "lisa-direct": "fwd 2*B*H*N*K*(Dk+Dv+M), K = N keys per query (the direct path's tile products, with the "
                   "RPE weight and the normaliser)",
    "lisa-fft": "fwd B*H*Dk*(Dv+M)*(5*P*log2(P) + 3*P + 4*N), P = product of the padded FFT sizes (a real FFT and "
                "its inverse, 2.5*P*log2(P) each, the spectral product, forming and contracting each channel)",
    "backward": "bwd 2.5x fwd for softmax and lisa-direct kinds, 2x for linear and lisa-fft kinds; "
                "fwd+bwd = fwd + bwd",
}


# ----------------------------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: a method on one problem size, in one dtype and mode."""

    grid: Tuple[int, ...]
    D: int
    dtype: str
    mode: str
    method: str
    B: int
    H: int
    device: str
    repeats: int
    warmup: int
    min_time: float
    rotate: int
    seed: int

    @property
    def N(self) -> int:
        return math.prod(self.grid)

    @property
    def grid_label(self) -> str:
        return "x".join(map(str, self.grid))

    @property
    def label(self) -> str:
        return f"{self.grid_label:>9} N={self.N:<6} D={self.D:<3} {self.dtype:<8} {self.mode:<7} {self.method:<14}"

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


def parse_point(text: str) -> Tuple[Tuple[int, ...], int, str]:
    """'256x256:32:fwd' -> ((256, 256), 32, 'fwd'): one (grid, D, mode) point for --cases."""
    parts = text.split(":")
    if len(parts) != 3 or parts[2] not in MODES:
        raise argparse.ArgumentTypeError(f"a case is GRID:D:MODE with MODE one of {MODES}, got {text!r}")
    try:
        D = int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"D must be an integer in {text!r}") from None
    return parse_grid(parts[0]), D, parts[2]


def build_cases(args) -> List[Case]:
    """All cases, smallest grid first, the baseline first within a (grid, D, dtype, mode).

    The (grid, D, mode) points are the product of --grids, --dims and --modes, or exactly --cases."""
    methods = sorted(set(args.methods), key=lambda m: (m != args.baseline, METHODS.index(m)))
    if getattr(args, "cases", None):
        points = sorted(set(args.cases), key=lambda c: (math.prod(c[0]), c[0], c[1], MODES.index(c[2])))
    else:
        grids = sorted(set(args.grids), key=lambda g: (math.prod(g), g))
        points = [(g, D, m) for g in grids for D in sorted(set(args.dims)) for m in MODES if m in args.modes]
    cases = []
    for grid, D, mode in points:
        for dtype in args.dtypes:
            for method in methods:
                cases.append(Case(grid, D, dtype, mode, method, args.batch, args.heads, args.device, args.repeats,
                                  args.warmup, args.min_time, args.rotate, args.seed + len(cases)))
    return cases


# ---------------------------------------------------------------------------------------------- methods

def lisa_backend(method: str) -> str:
    return method[len("lisa-"):]


def relative_index(grid: Sequence[int], device) -> torch.Tensor:
    """(N, N) int64 index into a flattened (2*S1-1) x (2*S2-1) x ... table of offsets i - j (row-major)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, device=device) for s in grid], indexing="ij"),
                         dim=-1).reshape(-1, len(grid))
    offset = coords[:, None, :] - coords[None, :, :] + torch.tensor([s - 1 for s in grid], device=device)
    index = torch.zeros(offset.shape[:2], dtype=torch.long, device=device)
    for a, s in enumerate(grid):
        index = index * (2 * s - 1) + offset[..., a]
    return index


def dense_bias_attention(q, k, v, table, index):
    """softmax(q k^T / sqrt(D) + B) v with B[h, i, j] = table[h, index[i, j]], the relative position bias."""
    bias = table[:, index]                                            # (H, N, N), gathered on every call
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


def linear_attention(q, k, v, eps: float = 1e-6):
    """phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j) + eps), phi = elu + 1: LiSA with every RPE weight 1."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    num = torch.einsum("bhnd,bhde->bhne", q, kv)
    den = torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + eps
    return num / den.unsqueeze(-1)


def flash_attn_func():
    """The flash-attn package's ``flash_attn_func`` (FlashAttention 4's cute interface first), or None."""
    for module in ("flash_attn.cute", "flash_attn"):
        try:
            return getattr(__import__(module, fromlist=["flash_attn_func"]), "flash_attn_func")
        except Exception:  # noqa: BLE001  (absent, or present but unusable here: not a baseline then)
            continue
    return None


def sdpa_context(method: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[method]))


def forward(case: Case, x: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The case's attention on one input set (q, k, v are (B, H, N, D))."""
    m = case.method
    if m == "sdpa":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])
    if m in SDPA_KERNELS:
        with sdpa_context(m):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])
    if m == "flash-attn":   # flash-attn's layout is (B, N, H, D)
        out = flash_attn_func()(*(x[n].transpose(1, 2) for n in "qkv"))
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    if m == "dense-bias":
        return dense_bias_attention(x["q"], x["k"], x["v"], x["table"], x["index"])
    if m == "linear":
        return linear_attention(x["q"], x["k"], x["v"])
    return lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=case.grid,
                                       backend=lisa_backend(m))


def position_params(case: Case) -> List[str]:
    """The inputs besides q, k, v that the method learns (and so differentiates)."""
    if case.method.startswith("lisa-"):
        return ["rpe"]
    return ["table"] if case.method == "dense-bias" else []


def make_inputs(case: Case, which: int = 0) -> Dict[str, torch.Tensor]:
    """Input set ``which`` of the case: random q, k, v (B, H, N, D), the method's position parameters and,
    when a backward is timed, the upstream gradient; leaves require grad then."""
    gen = torch.Generator().manual_seed(case.seed * 101 + which)
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=dev, dtype=dtype)

    shape = (case.B, case.H, case.N, case.D)
    x = {"q": randn(*shape), "k": randn(*shape), "v": randn(*shape)}
    if case.method.startswith("lisa-"):
        x["rpe"] = randn(case.H, 1, *(2 * s - 1 for s in case.grid), scale=0.1)
    if case.method == "dense-bias":
        x["table"] = randn(case.H, math.prod(2 * s - 1 for s in case.grid), scale=0.1)
        x["index"] = relative_index(case.grid, dev)
    if case.mode != "fwd":
        x["grad_out"] = randn(*shape)
        for name in ["q", "k", "v"] + position_params(case):
            x[name].requires_grad_(True)
    return x


def make_call(case: Case, sets: Sequence[Dict[str, torch.Tensor]]) -> Callable[[int], None]:
    """The timed unit on input set i: the forward, the backward of a prepared output, or both."""
    def wrt(x):
        return [x[n] for n in ["q", "k", "v"] + position_params(case)]

    if case.mode == "fwd":
        def call(i):
            forward(case, sets[i])
    elif case.mode == "bwd":
        outs = [forward(case, x) for x in sets]

        def call(i):
            torch.autograd.grad(outs[i], wrt(sets[i]), sets[i]["grad_out"], retain_graph=True)
    else:
        def call(i):
            x = sets[i]
            torch.autograd.grad(forward(case, x), wrt(x), x["grad_out"])
    return call


def problem_view(case: Case) -> Dict[str, torch.Tensor]:
    """Zero-memory stand-ins with the case's shapes (expanded scalars), enough for lisa_kernels.explain."""
    one = torch.zeros((), device=torch.device(case.device), dtype=DTYPES[case.dtype])
    qkv = one.expand(case.B, case.H, case.N, case.D)
    return {"q": qkv, "k": qkv, "v": qkv, "rpe": one.expand(case.H, 1, *(2 * s - 1 for s in case.grid))}


def explain_case(case: Case, backward: Optional[bool] = None):
    x = problem_view(case)
    backward = case.mode != "fwd" if backward is None else backward
    return lisa_kernels.explain(x["q"], x["k"], x["v"], x["rpe"], grid=case.grid, backward=backward)


def memory_limit_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_PROBED: Dict[Tuple, Optional[str]] = {}


def probe_reason(case: Case) -> Optional[str]:
    """Run the method once on a tiny input of the case's dtype, device and mode: None, or why it failed."""
    key = (case.method, case.D, case.dtype, case.mode, case.device)
    if key not in _PROBED:
        tiny = dataclasses.replace(case, grid=(8,), B=1, H=1, rotate=1)
        try:
            x = make_inputs(tiny)
            make_call(tiny, [x])(0)
            _PROBED[key] = None
        except Exception as exc:  # noqa: BLE001  (the failure is the answer)
            text = " ".join(str(exc).split()) or type(exc).__name__
            _PROBED[key] = f"{case.method} fails on a tiny {case.dtype} input on {case.device}: {text[:200]}"
    return _PROBED[key]


def cannot_run_reason(case: Case) -> Optional[str]:
    """Why the case's method cannot run it (lisa_kernels' reason, a missing package, memory); None if it can."""
    m = case.method
    if m.startswith("lisa-") and m != "lisa-auto":
        e = explain_case(case).estimates.get(lisa_backend(m))
        if e is not None and e.reason is not None:
            return e.reason
    if m == "flash-attn":
        if not case.device.startswith("cuda"):
            return "flash-attn runs on CUDA devices only"
        if flash_attn_func() is None:
            return "the flash-attn package is not installed (pip install flash-attn)"
    if m == "dense-bias":   # the (H, N, N) bias, its index and (backward) the bias gradient and probabilities
        need = case.N ** 2 * (8 + case.H * case.B * torch.finfo(DTYPES[case.dtype]).bits // 8
                              * (1 if case.mode == "fwd" else 4))
        limit = 0.6 * memory_limit_bytes(case.device)
        if need > limit:
            return f"the dense (H, N, N) bias needs about {need / 2**30:.0f} GiB, over 60% of the device's memory"
    if m in SDPA_KERNELS or m in ("flash-attn", "dense-bias", "linear"):
        return probe_reason(case)
    return None


def chosen_backend(case: Case) -> str:
    """The backend that actually runs: the method itself, or for lisa-auto the backend it picks."""
    return explain_case(case).chosen if case.method == "lisa-auto" else case.method


def flop_kind(backend: str) -> str:
    """Which FLOP_FORMULAS entry a method (or the backend lisa-auto chose) follows."""
    if backend == "linear":
        return "linear"
    if backend in SOFTMAX_METHODS:
        return "softmax"
    name = backend[len("lisa-"):] if backend.startswith("lisa-") else backend
    return "lisa-fft" if name in ("fft", "triton-fft", "cuda") else "lisa-direct"


def model_flops(case: Case, backend: str) -> float:
    """FLOPs of one call by FLOP_FORMULAS (B, H, N, D from the case; M = 1)."""
    from lisa_kernels.fft import fft_sizes
    B, H, N, D = case.B, case.H, case.N, case.D
    kind = flop_kind(backend)
    if kind == "softmax":
        fwd, bwd = 4.0 * B * H * N * N * D, 2.5
    elif kind == "linear":
        fwd, bwd = 4.0 * B * H * N * D * (D + 1), 2.0
    elif kind == "lisa-direct":
        fwd, bwd = 2.0 * B * H * N * N * (2 * D + 1), 2.5
    else:
        P = math.prod(fft_sizes(case.grid, False))
        fwd, bwd = B * H * D * (D + 1) * (5.0 * P * math.log2(P) + 3.0 * P + 4.0 * N), 2.0
    return {"fwd": fwd, "bwd": bwd * fwd, "fwd+bwd": (1 + bwd) * fwd}[case.mode]


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
    """Time one case on the GPU; peak memory from the caching allocator's statistics."""
    sets = [make_inputs(case, i) for i in range(case.rotate)]
    call = make_call(case, sets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = time_calls_cuda(call, case)
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
    """Measure one case in a fresh child process, forked from a server process that has imported torch and
    lisa_kernels but run nothing (so each case starts clean, without paying the imports again)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "lisa_kernels", __name__])
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


def estimate(case: Case, records: Sequence[Dict]) -> Tuple[Optional[float], str]:
    """(seconds per call, how it was estimated); None where there is nothing to estimate from."""
    if case.method.startswith("lisa-"):
        return lisa_model_seconds(case), "lisa_kernels cost model (dispatch.estimate_seconds)"
    prev = previous_grid_record(case, records)
    if prev is None:
        return None, "first grid: not estimated"
    power = 1 if case.method == "linear" else 2
    return (record_seconds(prev) * (case.N / prev["N"]) ** power,
            f"N^{power} extrapolation from {prev['grid_label']}")


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
        timeout = 120 + 5 * (case.repeats + case.warmup) * max(args.max_seconds, est or 0)
        rec.update(measure_in_subprocess(case, timeout))
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
    if rec["status"] == "skipped":
        return f"{head} skipped: estimated too slow ({seconds_text(rec['estimate_s'])} > --max-seconds)"
    if rec["status"] == "failed":
        return f"{head} FAILED: {rec['reason']}"
    backend = f" ({rec['backend']})" if case.method == "lisa-auto" else ""
    ratio = "   -   " if rec.get("ratio_base") is None else f"x{rec['ratio_base']:6.2f}"
    return (f"{head}{backend:<12} {rec['median_ms']:10.3f} ms  {ratio} {baseline}  "
            f"{rec['tflops']:8.3f} TFLOP/s  peak {rec['peak_mib']:8.1f} MiB")


def run_sweep(cases: Sequence[Case], args, meta: Dict, tmp_path: str) -> List[Dict]:
    """Run every case in order, printing a line per case and saving partial results to ``tmp_path``."""
    records: List[Dict] = []
    for i, case in enumerate(cases, 1):
        rec = run_case(case, records, args)
        records.append(rec)
        print(progress_line(i, len(cases), case, rec, args.baseline), flush=True)
        write_json(tmp_path, {"meta": meta, "records": records})
    return records


# ------------------------------------------------------------------------------------------- targets

def find(records, method: str, grid_label: str, D: int, mode: str, dtype: Optional[str] = None) -> Optional[Dict]:
    for r in records:
        if (r["method"], r["grid_label"], r["D"], r["mode"], r["status"]) == (method, grid_label, D, mode, "ok") \
                and (dtype is None or r["dtype"] == dtype):
            return r
    return None


def fft_scaling(records, small: str, large: str, dtype: str, limit: float = 5.0) -> Dict:
    """Time ratio of lisa-fft (D=32, fwd) between two grids."""
    a, b = find(records, "lisa-fft", small, 32, "fwd", dtype), find(records, "lisa-fft", large, 32, "fwd", dtype)
    ratio = None if a is None or b is None else b["median_ms"] / a["median_ms"]
    return {"grids": f"{large} / {small}", "tokens_ratio": None if a is None or b is None else b["N"] / a["N"],
            "ratio": ratio, "limit": limit, "met": None if ratio is None else ratio <= limit}


def auto_vs_base(records, grid_label: str, D: int, mode: str, dtype: str, limit: float, what: str = "time",
                 at_most: bool = True) -> Dict:
    """lisa-auto's time (or peak memory) over the baseline's at one point, against a limit."""
    out = {"grid": grid_label, "ratio": None, "limit": limit, "met": None, "backend": None}
    r = find(records, "lisa-auto", grid_label, D, mode, dtype)
    key = "ratio_base" if what == "time" else "memory_ratio_base"
    if r is not None and r.get(key) is not None:
        ratio = r[key] if at_most else 1.0 / r[key]
        out.update(ratio=ratio, met=ratio <= limit if at_most else ratio >= limit, backend=r["backend"])
    return out


def method_vs(records, method: str, other: str, grid_label: str, D: int, mode: str, dtype: str,
              limit: float) -> Dict:
    """One method's median time over another's at one point of the same run, against a limit."""
    a, b = find(records, method, grid_label, D, mode, dtype), find(records, other, grid_label, D, mode, dtype)
    ratio = None if a is None or b is None else a["median_ms"] / b["median_ms"]
    return {"grid": grid_label, "D": D, "mode": mode, "versus": other, "ratio": ratio, "limit": limit,
            "met": None if ratio is None else ratio <= limit}


def compute_targets(records: Sequence[Dict], meta: Dict) -> Dict:
    """Issue 2's CPU targets (float32) and issue 6's GPU targets (bf16, D=64, fwd+bwd), on this run's data."""
    fa_grids = ("14x14", "28x28", "32x32", "56x56", "64x64", "128x128", "256x256")
    return {
        "baseline": meta["baseline"], "device": meta["device_name"],
        "fft_scaling_d32_fwd_float32": [fft_scaling(records, "32x32", "64x64", "float32"),
                                        fft_scaling(records, "64x64", "128x128", "float32"),
                                        fft_scaling(records, "128x128", "256x256", "float32")],
        "fft_speed_float32": [method_vs(records, "lisa-fft", "sdpa", "256x256", 32, "fwd", "float32", 0.4),
                              method_vs(records, "lisa-fft", "lisa-direct", "128x128", 64, "fwd+bwd", "float32", 1.0),
                              method_vs(records, "lisa-fft", "sdpa", "16x64x64", 32, "fwd", "float32", 0.6)],
        "auto_within_3x_base_d64_fwd_float32": [auto_vs_base(records, g, 64, "fwd", "float32", 3.0)
                                                for g in ("32x32", "64x64", "128x128")],
        "auto_within_1x_base_d64_fwdbwd_bf16": [auto_vs_base(records, g, 64, "fwd+bwd", "bfloat16", 1.0)
                                                for g in fa_grids],
        "auto_speedup_2x_d64_fwdbwd_bf16": [auto_vs_base(records, g, 64, "fwd+bwd", "bfloat16", 2.0, at_most=False)
                                            for g in ("256x256", "16x64x64")],
        "auto_memory_within_1.1x_d64_fwdbwd_bf16": [auto_vs_base(records, g, 64, "fwd+bwd", "bfloat16", 1.1,
                                                                 what="memory") for g in fa_grids + ("16x64x64",)],
    }


def targets_text(targets: Dict) -> str:
    def verdict(t):
        return "not measured" if t["ratio"] is None else f"{t['ratio']:.2f} (limit {t['limit']:g}: " \
            f"{'met' if t['met'] else 'NOT met'})"
    base = targets["baseline"]
    lines = [f"Targets (baseline: {base}):"]
    for t in targets["fft_scaling_d32_fwd_float32"]:
        lines.append(f"  lisa-fft time ratio {t['grids']} (D=32, fwd, float32): {verdict(t)}")
    for t in targets.get("fft_speed_float32", []):
        lines.append(f"  lisa-fft / {t['versus']} time at {t['grid']} (D={t['D']}, {t['mode']}, float32): {verdict(t)}")
    titles = {"auto_within_3x_base_d64_fwd_float32": f"lisa-auto / {base} time (D=64, fwd, float32)",
              "auto_within_1x_base_d64_fwdbwd_bf16": f"lisa-auto / {base} time (D=64, fwd+bwd, bf16)",
              "auto_speedup_2x_d64_fwdbwd_bf16": f"{base} / lisa-auto time, at least (D=64, fwd+bwd, bf16)",
              "auto_memory_within_1.1x_d64_fwdbwd_bf16": f"lisa-auto / {base} peak memory (D=64, fwd+bwd, bf16)"}
    for key, title in titles.items():
        if all(t["ratio"] is None for t in targets[key]):
            lines.append(f"  {title}: not measured")
            continue
        for t in targets[key]:
            via = f" via {t['backend']}" if t["backend"] else ""
            lines.append(f"  {title} at {t['grid']}{via}: {verdict(t)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reports

def seconds_text(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def title_line(meta: Dict) -> str:
    cores = f", {meta['cores']} cores" if meta["device"] == "cpu" else ""
    return (f"{meta['device_name']}{cores}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
            f"B={meta['B']}, H={meta['H']}, median of >= {meta['repeats']} calls after {meta['warmup']} warm-up; "
            f"{meta['date'][:10]}, commit {(meta['git_commit'] or '?')[:10]}")


def speedup_grid(records: Sequence[Dict], dtype: str, mode: str) -> Tuple[List[str], List[int], Dict]:
    """Grids (by N), Ds, and {(grid, D): baseline time / lisa-auto time} for one dtype and mode."""
    cells = {}
    for r in records:
        if (r["method"], r["dtype"], r["mode"], r["status"]) == ("lisa-auto", dtype, mode, "ok") \
                and r.get("ratio_base"):
            cells[(r["grid_label"], r["D"])] = 1.0 / r["ratio_base"]
    grids = [g for _, g in sorted({(r["N"], r["grid_label"]) for r in records})]
    dims = sorted({r["D"] for r in records})
    return grids, dims, cells


def summary_tables(records: Sequence[Dict], meta: Dict) -> str:
    """Per (dtype, mode): baseline time / lisa-auto time on each grid and D (> 1: LiSA is faster)."""
    out = []
    for dtype in meta["dtypes"]:
        for mode in meta["modes"]:
            grids, dims, cells = speedup_grid(records, dtype, mode)
            if not cells:
                continue
            out += [f"Speedup of lisa-auto over {meta['baseline']} ({dtype}, {mode}; > 1 means LiSA is faster)", "",
                    "| grid | N | " + " | ".join(f"D={d}" for d in dims) + " |",
                    "| --- | ---: |" + " ---: |" * len(dims)]
            for g in grids:
                n = math.prod(parse_grid(g))
                out.append(f"| {g} | {n} | " + " | ".join(fmt(cells.get((g, d)), ".2f") for d in dims) + " |")
            out.append("")
    return "\n".join(out)


def markdown_table(records: Sequence[Dict], meta: Dict) -> str:
    base = meta["baseline"]
    lines = [f"LiSA vs {base} on {title_line(meta)}", "", summary_tables(records, meta),
             f"| grid | N | D | dtype | mode | method | median ms | x {base} | TFLOP/s | peak MiB |",
             "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        method = f"{r['method']} ({r['backend']})" if r["method"] == "lisa-auto" else r["method"]
        if r["status"] == "ok":
            cells = (fmt(r["median_ms"], ".3f"), fmt(r.get("ratio_base"), ".2f"), fmt(r["tflops"], ".3f"),
                     fmt(r["peak_mib"], ".1f"))
        elif r["status"] == "skipped" and r["estimate_s"] is not None:
            cells = (f"skipped (est. {seconds_text(r['estimate_s'])})", "-", "-", "-")
        elif r["status"] == "skipped":
            cells = ("cannot run", "-", "-", "-")
        else:
            cells = ("failed", "-", "-", "-")
        lines.append(f"| {r['grid_label']} | {r['N']} | {r['D']} | {r['dtype']} | {r['mode']} | {method} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("grid_label", "N", "D", "dtype", "mode", "method", "backend", "B", "H", "status", "reason",
               "median_ms", "min_ms", "ratio_base", "tflops", "flops", "flop_kind", "peak_mib", "memory_ratio_base",
               "estimate_s", "calls", "repeats", "warmup", "rotate", "seed")


def write_csv(path: str, records: Sequence[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in CSV_COLUMNS})


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None


COLORS = {"sdpa": "black", "sdpa-flash": "black", "sdpa-efficient": "dimgray", "sdpa-cudnn": "gray",
          "sdpa-math": "silver", "flash-attn": "tab:brown", "dense-bias": "tab:red", "linear": "tab:purple",
          "lisa-direct": "tab:blue", "lisa-fft": "tab:orange", "lisa-auto": "tab:green", "lisa-triton": "tab:cyan",
          "lisa-triton-fft": "tab:olive", "lisa-cuda": "tab:pink", "lisa-reference": "lightgray"}


def plot_times(records: Sequence[Dict], meta: Dict, path: str) -> bool:
    """Median time vs tokens N, log-log, one line per method; a panel per (dtype, D) row and mode column."""
    plt = _pyplot()
    if plt is None:
        return False
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    rows = [(t, d) for t in meta["dtypes"] for d in sorted({r["D"] for r in records})]
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(6 * len(modes), 4.2 * len(rows)), squeeze=False)
    for (dtype, D), ax_row in zip(rows, axes):
        for ax, mode in zip(ax_row, modes):
            for method in METHODS:
                pts = sorted((r["N"], r["median_ms"]) for r in records if (r["method"], r["D"], r["dtype"], r["mode"],
                             r["status"]) == (method, D, dtype, mode, "ok"))
                if pts:   # "auto" as a wide translucent band under the backend it picked
                    style = dict(linewidth=6, alpha=0.3, zorder=1) if method == "lisa-auto" else dict(zorder=2)
                    dashed = "--" if method in BASELINES else "-"
                    ax.plot(*zip(*pts), dashed, marker="o", markersize=3, color=COLORS.get(method), label=method,
                            **style)
            ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="median ms per call",
                   title=f"{mode}, D={D}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"LiSA vs baselines\n{title_line(meta)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_speedup(records: Sequence[Dict], meta: Dict, path: str) -> bool:
    """Heatmaps of baseline time / lisa-auto time over grid x D, a panel per (dtype, mode)."""
    plt = _pyplot()
    if plt is None:
        return False
    import numpy as np
    from matplotlib.colors import LogNorm
    panels = [(t, m) for t in meta["dtypes"] for m in meta["modes"] if speedup_grid(records, t, m)[2]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 6.5), squeeze=False,
                             gridspec_kw={"wspace": 0.5})
    for ax, (dtype, mode) in zip(axes[0], panels):
        grids, dims, cells = speedup_grid(records, dtype, mode)
        data = np.array([[cells.get((g, d), np.nan) for d in dims] for g in grids])
        image = ax.imshow(data, cmap="RdYlGn", norm=LogNorm(vmin=1 / 16, vmax=16), aspect="auto")
        for i, g in enumerate(grids):
            for j, d in enumerate(dims):
                ax.text(j, i, "-" if math.isnan(data[i, j]) else f"{data[i, j]:.2g}", ha="center", va="center",
                        fontsize=8)
        ax.set(xticks=range(len(dims)), xticklabels=[f"D={d}" for d in dims], yticks=range(len(grids)),
               yticklabels=grids, title=f"{dtype}, {mode}")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{meta['baseline']} time / lisa-auto time (>1: LiSA faster)")
    fig.suptitle(f"Speedup of lisa-auto over {meta['baseline']}\n{title_line(meta)}", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ metadata

TIMING_METHOD = {
    "cpu": "time.perf_counter around each call; warm-up calls, then the median (and min) of the timed calls; "
           "calls cycle through the rotated input sets",
    "cuda": "a torch.cuda.Event pair around each call, read after one synchronize; warm-up calls, then the "
            "median (and min); calls cycle through the rotated input sets",
}
MEMORY_METHOD = {
    "cpu": ("each case in a fresh child process (forked from a server that has only imported the libraries); "
            "after the timed calls, glibc is set to map every block of 1 MiB or more on its own (mallopt "
            "M_MMAP_THRESHOLD, then malloc_trim) so that RSS follows the live allocations, and one more call is "
            "made while a background thread samples RSS from /proc/self/statm every ~1 ms; peak_mib = peak RSS "
            "- RSS just before that call. "
            "peak_mib_hwm is the kernel's VmHWM after resetting it (/proc/self/clear_refs) minus the same "
            "baseline, as a cross-check"),
    "cuda": ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
             "torch.cuda.memory_allocated() once the inputs exist (the caching allocator's live tensors)"),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str) -> Tuple[Optional[str], Optional[bool]]:
    def git(*a):
        return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10)
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


def device_class(device: str) -> str:
    """The cost model's device class (lisa_kernels.dispatch), e.g. "cpu", "sm_90"."""
    from lisa_kernels import dispatch
    return dispatch._device_class(torch.device(device))


def metadata(args, argv: Sequence[str]) -> Dict:
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    commit, dirty = git_commit(LIBRARY_ROOT)
    return {
        "device": args.device, "device_class": device_class(args.device),
        "device_name": torch.cuda.get_device_name(args.device) if dev == "cuda" else cpu_model(),
        "compute_capability": list(torch.cuda.get_device_capability(args.device)) if dev == "cuda" else None,
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": version_of("triton"),
        "cuda": torch.version.cuda, "lisa_kernels": lisa_kernels.__version__, "flash_attn": version_of("flash_attn"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty,
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], REPO_ROOT) if sys.argv[0] else "benchmark.py"]
                              + list(argv)),
        "benchmark_argv": list(argv), "baseline": args.baseline, "methods": list(args.methods),
        "dtypes": list(args.dtypes), "modes": [m for m in MODES if m in args.modes], "B": args.batch,
        "H": args.heads, "repeats": args.repeats, "warmup": args.warmup, "min_time_s": args.min_time,
        "rotate": args.rotate,
        "max_seconds": args.max_seconds, "in_process": bool(args.in_process),
        "timing_method": TIMING_METHOD[dev],
        "memory_method": MEMORY_METHOD[dev] if not (dev == "cpu" and args.in_process) else
        ("all cases in one process (--in-process): RSS growth during one extra call after the timed calls, under "
         "glibc's default allocator, which can reuse freed blocks unseen (an under-count)"),
        "flop_formulas": FLOP_FORMULAS, "method_help": {m: METHOD_HELP[m] for m in args.methods},
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="methods:\n" + "\n".join(f"  {m:<15} {h}" for m, h in METHOD_HELP.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", nargs="+", type=parse_grid, metavar="SxS",
                    help=f"token grids, e.g. 64x64 (2D), 1024 (1D), 8x32x32 (3D) [default: {' '.join(DEFAULT_GRIDS)}]")
    ap.add_argument("--cases", nargs="+", type=parse_point, metavar="GRID:D:MODE",
                    help="measure exactly these points instead of --grids x --dims x --modes, e.g. "
                         "256x256:32:fwd 128x128:64:fwd+bwd")
    ap.add_argument("--dims", nargs="+", type=int, metavar="D",
                    help=f"head dims D (Dk = Dv) [default: {' '.join(map(str, DEFAULT_DIMS))}]")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                    help=f"[default: {' '.join(DEFAULT_MODES)}]")
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
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny sweep for smoke tests: grids {' '.join(QUICK_GRIDS)}, D=32, 2 repeats "
                         "(explicit --grids/--dims/--repeats still win)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; case i uses seed + i [default: 0]")
    ap.add_argument("--in-process", action="store_true",
                    help="on the CPU, measure in this process instead of a fresh child process per case "
                         "(memory numbers less clean)")
    ap.add_argument("--out", help="output JSON path; .csv, .md and .png files are written next to it "
                                  "[default: benchmarks/results/<device>_<date>.json]")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
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
    if args.cases:
        args.grids = sorted({c[0] for c in args.cases}, key=lambda g: (math.prod(g), g))
        args.dims = sorted({c[1] for c in args.cases})
        args.modes = [m for m in MODES if any(c[2] == m for c in args.cases)]
    args.grids = args.grids or [parse_grid(g) for g in (QUICK_GRIDS if args.quick else DEFAULT_GRIDS)]
    args.dims = args.dims or list(QUICK_DIMS if args.quick else DEFAULT_DIMS)
    args.repeats = args.repeats or (2 if args.quick else 30 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if on_cuda else 0.5)
    args.dtypes = args.dtypes or (["bfloat16"] if on_cuda else ["float32"])
    args.baseline = args.baseline or ("sdpa-flash" if on_cuda else "sdpa")
    args.methods = list(dict.fromkeys([args.baseline] + list(args.methods or default_methods(args.device))))
    if args.baseline not in METHODS:
        ap.error(f"--baseline must be one of the methods, got {args.baseline!r}")
    if min(args.batch, args.heads, args.repeats, args.rotate, *args.dims) < 1 or args.warmup < 0:
        ap.error("--batch, --heads, --repeats, --rotate and --dims must be positive, --warmup at least 0")
    return args


def default_methods(device: str) -> List[str]:
    """The CPU's default methods; on a GPU also every compiled LiSA backend that can run there."""
    if not device.startswith("cuda"):
        return list(CPU_DEFAULT_METHODS)
    return list(GPU_DEFAULT_METHODS)


def finish(records: List[Dict], meta: Dict, json_path: str, no_plot: bool, remeasure: bool = True) -> Dict:
    """Write the JSON, CSV, markdown and plots next to each other and print the tables and the targets."""
    if remeasure:
        meta["load_average_end"] = os.getloadavg()
    targets = compute_targets(records, meta)
    table = markdown_table(records, meta)
    stem = os.path.splitext(json_path)[0]
    write_json(json_path, {"meta": meta, "targets": targets, "records": records})
    write_csv(stem + ".csv", records)
    with open(stem + ".md", "w") as f:
        f.write(table)
    written = [json_path, stem + ".csv", stem + ".md"]
    if not no_plot:
        written += [p for p, ok in ((stem + ".png", plot_times(records, meta, stem + ".png")),
                                    (stem + "_speedup.png", plot_speedup(records, meta, stem + "_speedup.png"))) if ok]
    print("\n" + table)
    print(targets_text(targets))
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in written))
    return targets


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        finish(saved["records"], saved["meta"], os.path.abspath(args.report), args.no_plot, remeasure=False)
        return 0
    json_path = os.path.abspath(args.out or default_out(args.device, args.quick))
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    meta = metadata(args, argv)
    cases = build_cases(args)
    print(f"{len(cases)} cases on {meta['device_name']} ({args.device}, {' '.join(args.dtypes)}, B={args.batch}, "
          f"H={args.heads}, {args.repeats} repeats, --max-seconds {args.max_seconds:g}; lisa_kernels from "
          f"{os.path.relpath(os.path.dirname(lisa_kernels.__file__))})", flush=True)
    t0 = time.perf_counter()
    records = run_sweep(cases, args, meta, json_path + ".tmp")
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    finish(records, meta, json_path, args.no_plot)
    os.remove(json_path + ".tmp")
    print(f"sweep took {meta['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
