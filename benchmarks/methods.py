"""What the benchmark runs: the cases, the methods and their inputs.

- ``Case`` (one measurement: a method on one grid, head dim, dtype and mode), ``parse_grid``, ``parse_point``
  and ``build_cases`` (the list of cases of a sweep, in the order they run);
- the method names (``METHODS``, ``METHOD_HELP``) and the baselines' attention: SDPA and its kernels, flash-attn,
  a Swin/BEiT-style dense relative-position bias (``dense_bias_attention``), plain linear attention, and the
  FlexAttention peers: ``flex-lisa`` (LiSA through ``backend="flex"``) and ``flex-rpb`` (softmax attention with a
  learned relative-position bias as a FlexAttention score_mod, ``flex_rpb_attention``);
- the inputs of a case (``make_inputs``) and the timed call on them (``make_call``: forward, backward or both);
- why a method cannot run a case (``cannot_run_reason``), the backend ``lisa-auto`` picks (``chosen_backend``);
- the FLOP model of each method (``FLOP_FORMULAS``, ``model_flops``).

Importing this module puts the lisa_kernels to benchmark on ``sys.path`` (``_library.py``): the one named by
``LISA_BENCH_LIBRARY_ROOT`` (set by ``compare.py`` to time a git ref's library), else the installed package,
else this checkout's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _library import use_library  # noqa: E402

# the lisa_kernels to benchmark: LISA_BENCH_LIBRARY_ROOT's (compare.py: a git ref's worktree), else the installed
# package, else this checkout's (_library.py)
LIBRARY_ROOT = use_library()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lisa_kernels  # noqa: E402


SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
SOFTMAX_METHODS = ("sdpa",) + tuple(SDPA_KERNELS) + ("flash-attn", "dense-bias")
BASELINES = SOFTMAX_METHODS + ("linear",)


def _lisa_backends():
    """The benchmarked library's backends as {name: form} ("dense", "direct" or "fft": the FLOP formula), in its
    registry's order; for an older library without one (compare.py), its names, with the kinds of its cost model."""
    try:
        from lisa_kernels.backends import REGISTRY
        return {b.name: b.form for b in REGISTRY}, [b.name for b in REGISTRY if b.cost is not None]
    except ImportError:
        from lisa_kernels import dispatch
        kinds = {n: c.get("kind", n) for cls in dispatch.COST_MODEL.values() if isinstance(cls, dict)
                 for n, c in cls.items() if isinstance(c, dict)}
        return {n: kinds.get(n, "dense") for n in lisa_kernels.BACKENDS if n != "auto"}, list(kinds)


LISA_FORMS, _MODELLED = _lisa_backends()
# LiSA backends timed as peers under a name of their own rather than as lisa-<name>: backend="flex" is the same
# operator through PyTorch's FlexAttention, the implementation a user could write without this package
PEER_BACKENDS = {"flex": "flex-lisa"}
# the backends with a cost model, lisa-auto, then the others (the reference)
LISA_METHODS = tuple(f"lisa-{b}" for b in [n for n in LISA_FORMS if n in _MODELLED and n not in PEER_BACKENDS]
                     + ["auto"] + [n for n in LISA_FORMS if n not in _MODELLED and n not in PEER_BACKENDS])
# FlexAttention peers, last of a point: flex-lisa (whether or not the library timed has backend "flex": compare.py
# times older ones, where it cannot run) and flex-rpb (softmax with a relative-position bias, written here)
FLEX_METHODS = ("flex-lisa", "flex-rpb")
METHODS = BASELINES + LISA_METHODS + FLEX_METHODS
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
    **{f"lisa-{b}": f"lisa_attention(..., backend={b!r})" for b in LISA_FORMS if b not in PEER_BACKENDS},
    "lisa-auto": "lisa_attention(..., backend='auto'); the record names the backend it chose",
    "flex-lisa": "lisa_attention(..., backend='flex'): the same operator through PyTorch's FlexAttention (compiled "
                 "per shape; no backward on the CPU)",
    "flex-rpb": "softmax(q k^T / sqrt(D) + table[h, p_i - p_j]) v through torch.compile(flex_attention), the bias a "
                "score_mod gathering a learned (H, prod(2S-1)) table (Swin-style; no backward on the CPU)",
}
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# model FLOPs of one call; the backward of a quadratic method counts 2.5x its forward (FlashAttention's
# convention: 5 matmuls against 2), of a linear-time one 2x
FLOP_FORMULAS = {
    "softmax": "fwd 4*B*H*N^2*D (q k^T and p v; softmax, bias and masking not counted)",
    "linear": "fwd 4*B*H*N*D*(D+1) (phi(k)^T v and phi(q) S with the normaliser)",
    "lisa-direct": "fwd 2*B*H*N*K*(Dk+Dv+M), K = N keys per query (the direct path's tile products, with the "
                   "RPE weight and the normaliser)",
    "lisa-fft": "fwd B*H*Dk*(Dv+M)*(5*P*log2(P) + 3*P + 4*N), P = product of the padded FFT sizes (a real FFT and "
                "its inverse, 2.5*P*log2(P) each, the spectral product, forming and contracting each channel)",
    "flex-lisa": "fwd 2*B*H*N^2*(M*Dk+Dv) (FlexAttention's q k^T once per RPE group, the kernel A_ij, and p v; "
                 "the log-weights in the score_mod not counted); flex-rpb counts as softmax",
    "backward": "bwd 2.5x fwd for softmax, lisa-direct and flex-lisa kinds, 2x for linear and lisa-fft kinds; "
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


Point = Tuple[Tuple[int, ...], int, str, Optional[Tuple[str, ...]]]


def parse_point(text: str) -> Point:
    """'256x256:32:fwd' -> ((256, 256), 32, 'fwd', None): one (grid, D, mode) point for --cases; an optional
    fourth field names the methods measured there: '256x256:32:fwd:sdpa,lisa-fft' -> (..., ('sdpa', 'lisa-fft'))."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[2] not in MODES:
        raise argparse.ArgumentTypeError(f"a case is GRID:D:MODE[:METHOD,...] with MODE one of {MODES}, got {text!r}")
    try:
        D = int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"D must be an integer in {text!r}") from None
    methods = None
    if len(parts) == 4:
        methods = tuple(parts[3].split(","))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r} in {text!r}")
    return parse_grid(parts[0]), D, parts[2], methods


def build_cases(args) -> List[Case]:
    """All cases, smallest grid first, the baseline first within a (grid, D, dtype, mode).

    The (grid, D, mode) points are the product of --grids, --dims and --modes, or exactly --cases. A point of
    --cases that names its methods runs those of --methods it names (and the baseline)."""
    def ordered(names):
        return sorted(set(names) | {args.baseline}, key=lambda m: (m != args.baseline, METHODS.index(m)))

    if getattr(args, "cases", None):
        points = sorted(set(args.cases), key=lambda c: (math.prod(c[0]), c[0], c[1], MODES.index(c[2])))
    else:
        grids = sorted(set(args.grids), key=lambda g: (math.prod(g), g))
        points = [(g, D, m, None) for g in grids for D in sorted(set(args.dims)) for m in MODES if m in args.modes]
    cases = []
    for grid, D, mode, only in points:
        methods = ordered(m for m in args.methods if only is None or m in only)
        for dtype in args.dtypes:
            for method in methods:
                cases.append(Case(grid, D, dtype, mode, method, args.batch, args.heads, args.device, args.repeats,
                                  args.warmup, args.min_time, args.rotate, args.seed + len(cases)))
    return cases


# ---------------------------------------------------------------------------------------------- methods

def lisa_backend(method: str) -> str:
    """The lisa_kernels backend a LiSA method calls: "lisa-fft" -> "fft", "flex-lisa" -> "flex"."""
    peers = {m: b for b, m in PEER_BACKENDS.items()}
    return peers[method] if method in peers else method[len("lisa-"):]


def is_lisa(method: str) -> bool:
    """Whether the method is lisa_attention (lisa-<backend>, or a peer backend such as flex-lisa)."""
    return method.startswith("lisa-") or method in PEER_BACKENDS.values()


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


def rpb_token_index(grid: Sequence[int], num_extra: int, device) -> torch.Tensor:
    """(N,) int32 lin[t] = position of token t dotted with the flat (2*S1-1) x (2*S2-1) x ... table's row-major
    strides (0 for the ``num_extra`` extra tokens, which come first), so that the pair (i, j) of grid tokens reads
    entry lin[i] - lin[j] + center, center = prod(2S-1) // 2 (offset 0): relative_index's entry, O(N) memory."""
    lin, stride = torch.zeros((), dtype=torch.long, device=device), 1
    for axis, s in reversed(list(enumerate(grid))):
        shape = [1] * len(grid)
        shape[axis] = s
        lin = lin + stride * torch.arange(s, device=device).reshape(shape)
        stride *= 2 * s - 1
    head = torch.zeros(num_extra, dtype=torch.long, device=device)
    return torch.cat([head, lin.reshape(-1)]).to(torch.int32)


def flex_module():
    """``torch.nn.attention.flex_attention``, or None in a torch without it."""
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:
        return None
    return module


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """flex_attention compiled once per shape (as lisa_kernels' backend "flex" does): its eager form is a slow
    math reference, and its CPU kernel exists only compiled."""
    return torch.compile(flex_module().flex_attention, dynamic=False, fullgraph=True)


def flex_rpb_attention(q, k, v, table, lin, num_extra: int = 0):
    """softmax_j(q_i . k_j / sqrt(D) + b_ij) v_j through FlexAttention, b_ij = table[h, lin[i] - lin[j] + center]
    for two grid tokens and 0 where i or j is an extra token: the relative-position bias of Swin-style models as a
    score_mod that gathers from the (H, T) table (T = prod(2S-1), center = T // 2) by the int32 token index
    ``lin`` (rpb_token_index); an appended zero entry T serves the extra tokens' pairs. Differentiable in q, k, v
    and the table where FlexAttention has a backward (CUDA)."""
    E, center = num_extra, table.shape[1] // 2
    padded = torch.cat([table, table.new_zeros(table.shape[0], 1)], dim=1)
    zero_entry = table.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        entry = torch.where((q_idx < E) | (kv_idx < E), zero_entry, lin[q_idx] - lin[kv_idx] + center)
        return score + padded[h, entry]

    # one compile per shape: dynamo's recompile limit (8 per function, shared with lisa_kernels' own compiled
    # flex_attention) would fall back to the slow eager form within a sweep
    limits = {"recompile_limit": 64, "accumulated_recompile_limit": 1024}
    with torch._dynamo.config.patch(**{k_: v_ for k_, v_ in limits.items() if hasattr(torch._dynamo.config, k_)}):
        return compiled_flex_attention()(q, k, v, score_mod=score_mod)


def flex_reason(device: str, dtype: str, mode: str) -> Optional[str]:
    """Why FlexAttention (flex-rpb) cannot run there, or None: the torch, the device, the dtype, and on the CPU
    the backward (its compiled CPU kernel is inference only)."""
    dev = torch.device(device).type
    if flex_module() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if dev not in ("cpu", "cuda"):
        return f"FlexAttention runs on CPU and CUDA devices, not {dev}"
    if dtype == "float64":
        return "FlexAttention's kernels take float16, bfloat16 and float32, not float64"
    if dev == "cpu" and not torch.cpu._is_avx2_supported():
        return "FlexAttention's compiled CPU kernel needs a CPU with AVX2"
    if dev == "cpu" and mode != "fwd":
        return "FlexAttention has no backward on the CPU (its compiled CPU kernel is inference only)"
    return None


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
    if m == "flex-rpb":
        return flex_rpb_attention(x["q"], x["k"], x["v"], x["table"], x["lin"])
    return lisa_kernels.lisa_attention(x["q"], x["k"], x["v"], x["rpe"], grid=case.grid,
                                       backend=lisa_backend(m))


def position_params(case: Case) -> List[str]:
    """The inputs besides q, k, v that the method learns (and so differentiates)."""
    if is_lisa(case.method):
        return ["rpe"]
    return ["table"] if case.method in ("dense-bias", "flex-rpb") else []


def make_inputs(case: Case, which: int = 0) -> Dict[str, torch.Tensor]:
    """Input set ``which`` of the case: random q, k, v (B, H, N, D), the method's position parameters and,
    when a backward is timed, the upstream gradient; leaves require grad then."""
    gen = torch.Generator().manual_seed(case.seed * 101 + which)
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=dev, dtype=dtype)

    shape = (case.B, case.H, case.N, case.D)
    x = {"q": randn(*shape), "k": randn(*shape), "v": randn(*shape)}
    if is_lisa(case.method):
        x["rpe"] = randn(case.H, 1, *(2 * s - 1 for s in case.grid), scale=0.1)
    if case.method in ("dense-bias", "flex-rpb"):
        x["table"] = randn(case.H, math.prod(2 * s - 1 for s in case.grid), scale=0.1)
    if case.method == "dense-bias":
        x["index"] = relative_index(case.grid, dev)
    if case.method == "flex-rpb":
        x["lin"] = rpb_token_index(case.grid, 0, dev)
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


@functools.lru_cache(maxsize=None)
def explain_case(case: Case, backward: Optional[bool] = None):
    """lisa_kernels.explain of the case's problem (cached: the sweep asks for the same case several times)."""
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
    if m == "flex-lisa" and "flex" not in LISA_FORMS:
        return "this lisa_kernels has no backend 'flex' (FlexAttention)"
    if is_lisa(m) and m != "lisa-auto":
        e = explain_case(case).estimates.get(lisa_backend(m))
        if e is not None and e.reason is not None:
            return e.reason
    if m in FLEX_METHODS:   # (flex-lisa: the CPU backward too, where the library's explain does not say it)
        return flex_reason(case.device, case.dtype, case.mode)
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
    if backend in SOFTMAX_METHODS or backend == "flex-rpb":
        return "softmax"
    name = lisa_backend(backend) if is_lisa(backend) else backend
    if name in PEER_BACKENDS:
        return PEER_BACKENDS[name]
    return "lisa-fft" if LISA_FORMS.get(name) == "fft" else "lisa-direct"


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
    elif kind == "flex-lisa":           # M = 1: 2 B H N^2 (M Dk + Dv)
        fwd, bwd = 2.0 * B * H * N * N * (D + D), 2.5
    else:
        P = math.prod(fft_sizes(case.grid, False))
        fwd, bwd = B * H * D * (D + 1) * (5.0 * P * math.log2(P) + 3.0 * P + 4.0 * N), 2.0
    return {"fwd": fwd, "bwd": bwd * fwd, "fwd+bwd": (1 + bwd) * fwd}[case.mode]
