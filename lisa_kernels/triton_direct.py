"""Host side of ``backend="triton"``: the launch configs (autotuned on a GPU, spilling ones pruned) and the forward
/ backward launches of the kernels in :mod:`lisa_kernels.triton_direct_kernels` (whose docstring has the math) and
:mod:`lisa_kernels.triton_table_grad_kernels` (the table gradient's); the table layout and token indices they
read are :mod:`lisa_kernels._triton_layout`'s.

Forward: ``_prep_kernel`` (features, padded values, the pair table of key pairs) then ``_fwd_kernel``.
Backward: ``_bwd_prep_kernel`` (also the pair table of query pairs); ``_bwd_dkv_kernel``, ``_bwd_dq_kernel`` and
``_bwd_walk_kernel`` (the table gradient's sums along token diagonals; with extra tokens and ``rpe_extra`` also
``_bwd_extra_kernel``); ``_table_fold_kernel`` (the sums by table entry, written straight into d rpe for a zero
boundary) and, for circular tables, ``_table_grad_kernel`` (onto rpe / rpe_extra). No atomics: the backward is
deterministic. :func:`kernel_launches` lists the launches of a problem for ``benchmarks/kernel_report.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    HAS_TRITON = True
except ImportError:  # without triton
    HAS_TRITON = False

from . import _device
from ._device import GPU
from ._problem import Problem
from ._triton_layout import (
    Layout, WALK_GROUPS, WALK_TILE, _layout_of, _pair_steps, _table_constexprs, _walk_ident, layout, token_index)

__all__ = ["HAS_TRITON", "triton_direct_reason", "lisa_direct_fwd", "lisa_direct_bwd", "saved_table_shape",
           "kernel_launches", "GPU_CONFIGS"]

MAX_HEAD_DIM = 256
MAX_FUSED_GROUPS = 4          # RPE groups that share one A tile in a program


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _plain_interpreter(gpu: Optional[GPU]) -> bool:
    """Triton's interpreter on CPU tensors that stand for no GPU: its bf16 dots and casts are not a GPU's, so the
    kernels take fp32 dots and fp32 stores for bf16 there, and one small config (no autotuning). With a GPU (or a
    simulated one: lisa_kernels.testing.fake_gpu) the host code takes the GPU's branches."""
    return gpu is None and _interpreting()


def triton_device_reason(p: Problem) -> Optional[str]:
    """None if Triton kernels can run on ``p``'s device (a GPU, or the CPU interpreter), else why not."""
    if not HAS_TRITON:
        return "triton is not installed"
    on_gpu = p.device.type == "cuda" or _device.gpu_of(p.device) is not None
    if not on_gpu and not (p.device.type == "cpu" and _interpreting()):
        return f"inputs are on {p.device}: Triton needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"
    return None


def triton_direct_reason(p: Problem) -> Optional[str]:
    """None if the Triton direct kernel can run ``p``, else why not."""
    reason = triton_device_reason(p)
    if reason is not None:
        return reason
    if p.dtype == torch.float64:
        return "float64 is not supported by the Triton kernels (use 'direct' or 'fft')"
    gpu = _device.gpu_of(p.device)
    if gpu is not None and gpu.family not in VALIDATED_FAMILIES:
        return (f"no validated configs for {gpu.architecture}: the kernels' configs are compile-checked for "
                f"sm_80 to sm_120, gfx942 and gfx950 (benchmarks/kernel_report.py); backend='flex' (FlexAttention) "
                f"may run it")
    if p.num_extra and gpu is not None and gpu.family == "blackwell" and _triton_version() < (3, 7):
        return (f"triton {triton.__version__} cannot compile the extra tokens' gradient kernel for {gpu.architecture} "
                f"(a compiler error fixed in triton 3.7; benchmarks/results/kernel_matrix_*): use triton >= 3.7")
    if max(p.Dk, p.Dv // p.M) > MAX_HEAD_DIM:
        return f"head dim {max(p.Dk, p.Dv // p.M)} is over the kernel's limit of {MAX_HEAD_DIM}"
    work = _walk_workspace(p)
    if work > WALK_MAX_WORKSPACE:
        return (f"the table gradient's workspace would be {work >> 20} MiB (over {WALK_MAX_WORKSPACE >> 20} MiB: "
                f"3D grid planes of {p.grid[-2]}x{p.grid[-1]} need many walker phases); use 'fft'")
    return None


WALK_MAX_WORKSPACE = 1 << 30
# the GPU families whose compiled kernels benchmarks/kernel_report.py reads (sm_80, sm_89, sm_90a, sm_100a, sm_120,
# gfx942, gfx950): no spills, every kernel of the matrix compiles; other GPUs get no triton (auto takes another)
VALIDATED_FAMILIES = ("ampere", "ada", "hopper", "blackwell", "blackwell-consumer", "cdna3", "cdna4")


# ---------------------------------------------------------------- dtypes of the dots

def _store_dtype(dtype: torch.dtype, gpu: Optional[GPU]) -> torch.dtype:
    """The dtype the kernels write a result in: the result's own, except bf16 in the plain interpreter, whose bf16
    casts truncate (a GPU rounds to nearest): there the kernels write fp32 and torch rounds."""
    return torch.float32 if dtype == torch.bfloat16 and _plain_interpreter(gpu) else dtype


def _modes(dtype: torch.dtype, gpu: Optional[GPU]) -> Tuple[torch.dtype, int]:
    """(feature dtype, dot mode). Mode 0: 16-bit dots (bf16); mode 1: fp16 features and values, the dots with a
    weight- or gradient-side operand in tf32; mode 2: fp32 inputs, tf32x3 dots. The plain interpreter's bf16 dot
    is broken (TOOLCHAIN.md), so bf16 runs in mode 2 there."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _plain_interpreter(gpu)):
        return torch.float32, 2
    if dtype == torch.float16:
        return torch.float16, 1
    return torch.bfloat16, 0


def _isa(gpu: Optional[GPU]) -> int:
    """The kernels' ISA constexpr (triton_direct_kernels): 0 NVIDIA, or no GPU (the interpreter): inline PTX and
    tf32x3 dots; 1 AMD gfx942 (the one AMD target with tf32 dots): portable products, exact fp32 dots for fp32;
    2 other AMD GPUs: the same, with exact fp32 dots for fp16's tf32 ones too."""
    if gpu is None or gpu.backend != "hip":
        return 0
    return 1 if gpu.arch == "gfx942" else 2


BF16_SHAPES = False    # tests: the bf16 dot mode's code shapes (gd through a dot where _gd_dot says so, 2 groups
                       # per walker, the forward's table layout R16) at any mode


def _gd_dot(mode: int, gpu: Optional[GPU], kind: str = "extra", MC: int = 4, DKP: int = 64) -> bool:
    """Whether kernel ``kind`` ("dkv", "dq", "walk", "extra") adds gd to dW' = g' v^T through a 16-deep ones dot
    (bf16 dots only) rather than one add per pair. Chosen by the loops' bound (benchmarks/kernel_report.py, both
    Triton versions, every target): with one or two groups per program the loops are tensor-bound, and the dot's 16
    extra depth costs 7.8 tensor cycles per 1k pairs and group (sm_90a) where the add costs issue cycles they have
    to spare; with four they are issue-bound and the dot is the cheaper. So is every loop on datacenter Blackwell
    (tcgen05: twice Hopper's matrix rate), which keeps the dot. dK/dV with two groups at head dims over 64 spills
    with the add (triton 3.8), so it keeps the dot. The extra-token sums (O(N E) pairs) keep the dot."""
    if mode != 0 and not BF16_SHAPES:
        return False
    return (kind == "extra" or MC > 2 or (kind == "dkv" and MC == 2 and DKP > 64)
            or _matrix_family(gpu) == "tcgen05")


def _walk_groups(mode: int) -> int:
    """Groups per walker program: WALK_GROUPS with bf16 dots, 1 with fp32 operands (they take more registers)."""
    return WALK_GROUPS if mode == 0 or BF16_SHAPES else 1


def _tab16(mode: int) -> bool:
    """The forward reads its weights from R16, the pair table with a group's two tokens side by side (_pair_table):
    bf16 for the packed bf16x2 products of bf16 dots (_wmul); fp32 under BF16_SHAPES."""
    return mode == 0 or BF16_SHAPES


def _grad_dtype(mode: int) -> torch.dtype:
    """The dtype of g' = s g and of gd in the dots: bf16 in mode 0 (bf16 has fp32's range), else fp32 (fp16 could
    overflow: s is up to e^max / eps)."""
    return torch.bfloat16 if mode == 0 else torch.float32


if HAS_TRITON:
    from ._triton_compat import patch_interpreter
    patch_interpreter()          # Triton 3.6's interpreter and NumPy >= 2.4: runtime loop bounds (see there)
    from .triton_direct_kernels import _bwd_dkv_kernel, _bwd_dq_kernel, _bwd_prep_kernel, _fwd_kernel, _prep_kernel
    from .triton_table_grad_kernels import _bwd_extra_kernel, _bwd_walk_kernel, _table_fold_kernel, _table_grad_kernel
    KERNELS = [_prep_kernel, _fwd_kernel, _bwd_prep_kernel, _bwd_dkv_kernel, _bwd_dq_kernel, _bwd_walk_kernel,
               _bwd_extra_kernel, _table_fold_kernel, _table_grad_kernel]     # every kernel the launches run


# ---------------------------------------------------------------- launch configurations

def _triton_version() -> Tuple[int, int]:
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) if HAS_TRITON else (0, 0)


# Candidate configs (BLOCK_M, BLOCK_N, num_warps, num_stages, GATHER_T) per kernel, autotuned on a GPU, by the
# program's live state (gpu_configs) and per Triton version: 3.6 and 3.8 compile the same kernels differently (3.6
# wants the transposed gather, GATHER_T; see _gather). They are spill-free shapes found by compiling 50-80
# candidates per kernel for sm_90a, bf16 (D = 64 and 128, M = 1 and 4) with each version, leaving out those whose
# wgmma ptxas serializes, and listed best first by benchmarks/kernel_report.py's ranking: the loop's bound (the
# largest of its issue, tensor and atomic cycles), then its issue cycles (tests/test_kernel_report.py checks the
# first of the CI's cases). Configs that spill are pruned before tuning (:func:`_spill_free`).
# The walker's tiles are 64 x 64 (its fold assumes them); a program may take 64 x BLOCK_N of one. The
# interpreter takes one small config (16 x 16; the walker 64 x 64).
GPU_CONFIGS = {
    "3.8": {
        "light": {"fwd": [(64, 128, 4, 2, 0), (128, 64, 8, 1, 0), (64, 64, 4, 1, 0)],
                  "dq": [(128, 64, 8, 1, 0), (128, 32, 4, 1, 0), (64, 64, 4, 1, 0)],
                  "dkv": [(64, 128, 8, 1, 0), (64, 64, 4, 1, 0), (32, 64, 4, 1, 0)],
                  "walk": [(64, 64, 4, 1, 0), (64, 64, 4, 2, 0)]},
        "wide": {"fwd": [(128, 64, 8, 1, 0), (64, 64, 4, 1, 0)],
                 "dq": [(128, 64, 8, 1, 0), (64, 64, 4, 1, 0)],
                 "dkv": [(64, 128, 8, 1, 1), (32, 64, 4, 1, 0)],
                 "walk": [(64, 64, 4, 2, 0), (64, 64, 4, 1, 0)]},
        "group2": {"fwd": [(128, 64, 8, 1, 0), (64, 64, 4, 1, 0)],
                   "dq": [(64, 64, 4, 1, 0), (64, 64, 4, 2, 0)],
                   "dkv": [(32, 64, 4, 1, 0), (32, 128, 8, 1, 0)],
                   "walk": [(64, 64, 4, 1, 0), (64, 64, 4, 2, 0)]},
        "group4": {"fwd": [(64, 32, 4, 1, 0), (128, 64, 8, 1, 1), (128, 32, 8, 1, 0)],
                   "dq": [(32, 64, 4, 2, 0), (64, 32, 4, 1, 0)],
                   "dkv": [(32, 64, 4, 2, 0), (32, 128, 8, 1, 1)],
                   "walk": [(64, 64, 4, 1, 0), (64, 64, 8, 1, 0)]},
    },
    "3.6": {
        "light": {"fwd": [(64, 128, 4, 2, 1), (128, 64, 8, 1, 1), (64, 64, 4, 2, 1)],
                  "dq": [(128, 64, 8, 1, 1), (64, 64, 4, 2, 1), (64, 64, 4, 1, 0)],
                  "dkv": [(64, 128, 8, 1, 1), (64, 64, 4, 1, 1), (32, 64, 4, 1, 1)],
                  "walk": [(64, 64, 4, 1, 0), (64, 64, 4, 2, 0)]},
        "wide": {"fwd": [(128, 64, 8, 1, 1), (64, 64, 4, 1, 1)],
                 "dq": [(128, 64, 8, 1, 1), (64, 64, 4, 1, 1)],
                 "dkv": [(64, 128, 8, 1, 0), (32, 64, 4, 1, 1)],
                 "walk": [(64, 64, 4, 2, 0), (64, 64, 4, 1, 0)]},
        "group2": {"fwd": [(128, 64, 8, 1, 1), (128, 64, 8, 2, 0)],
                   "dq": [(128, 64, 8, 1, 1), (64, 64, 4, 1, 1)],
                   "dkv": [(32, 64, 4, 1, 1), (32, 128, 8, 1, 1)],
                   "walk": [(64, 64, 4, 1, 0), (64, 64, 4, 2, 0)]},
        "group4": {"fwd": [(64, 32, 4, 1, 1), (128, 32, 8, 1, 1), (128, 64, 8, 2, 0)],
                   "dq": [(32, 64, 4, 2, 1), (64, 32, 4, 2, 1)],
                   "dkv": [(32, 64, 4, 2, 1), (32, 128, 8, 1, 0)],
                   "walk": [(64, 64, 4, 1, 0), (64, 64, 8, 1, 0)]},
    },
}
# fp16 and fp32 inputs take tf32 / tf32x3 dots on fp32 operands, which need more registers: small tiles (and a
# walker 16 keys wide), GATHER_T left to the version's default. Per family of matrix instructions, since what fits
# changes with them (benchmarks/kernel_report.py --matrix; benchmarks/results/kernel_matrix_*): wgmma (Hopper) and
# tcgen05 (datacenter Blackwell) take tiles of 64 rows (32-row tiles fall back to mma.sync), and tcgen05's fp32
# tiles fit without spills at 8 warps; mma.sync (Ampere, Ada, consumer Blackwell) spills in the dK/dV and walker
# kernels at 4 warps where 8 warps or 16-key tiles do not; CDNA's MFMA fits the base list.
FP32_DOT_CONFIGS = {
    "mma": {"fwd": [(64, 32, 4, 2), (32, 32, 4, 1), (64, 32, 8, 1)],
            "dq": [(32, 32, 4, 1), (32, 32, 4, 2), (64, 16, 4, 1)],
            "dkv": [(32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 4, 1)],
            "walk": [(64, 16, 8, 1), (64, 16, 4, 2), (64, 16, 4, 1)]},
    "wgmma": {"fwd": [(64, 32, 4, 2), (64, 64, 4, 1), (32, 32, 4, 1)],
              "dq": [(64, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 2)],
              "dkv": [(32, 64, 8, 1), (16, 64, 4, 1), (32, 32, 4, 2)],
              "walk": [(64, 16, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2)]},
    "tcgen05": {"fwd": [(64, 32, 8, 1), (64, 32, 4, 2), (32, 32, 4, 1)],
                "dq": [(64, 32, 8, 1), (32, 32, 4, 1)],
                "dkv": [(32, 64, 8, 1), (32, 64, 8, 2), (32, 32, 4, 1)],
                "walk": [(64, 16, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2)]},
    "mfma": {"fwd": [(64, 32, 4, 2), (32, 32, 4, 1), (64, 64, 4, 1)],
             "dq": [(32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 4, 1)],
             "dkv": [(32, 32, 4, 1), (32, 32, 4, 2), (32, 64, 4, 1)],
             "walk": [(64, 16, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2)]},
}
INTERPRETER_CONFIG = (16, 16, 1, 1)


def _family() -> str:
    return "3.6" if _triton_version() < (3, 7) else "3.8"


def _matrix_family(gpu: Optional[GPU]) -> str:
    """The family of matrix instructions a GPU's dots compile to (the key of FP32_DOT_CONFIGS)."""
    if gpu is not None and gpu.backend == "hip":
        return "mfma"
    family = gpu.family if gpu is not None else "hopper"
    return {"hopper": "wgmma", "blackwell": "tcgen05"}.get(family, "mma")


def gpu_configs(kind: str, DKP: int, MC: int, MODE: int = 0, gpu: Optional[GPU] = None) -> list:
    """The candidates of a kernel: by the program's live state (one group at head dim <= 64 or above; 2 groups;
    3 or 4), the Triton version, and for fp16 / fp32 inputs (MODE 1, 2) FP32_DOT_CONFIGS of the GPU's family of
    matrix instructions (default: Hopper's)."""
    if MODE != 0:
        return FP32_DOT_CONFIGS[_matrix_family(gpu)][kind]
    cls = ("light" if DKP <= 64 else "wide") if MC == 1 else ("group2" if MC == 2 else "group4")
    return GPU_CONFIGS[_family()][cls][kind]


PREP_BLOCK_T = 32


def _group_chunk(M: int, DKP: int) -> int:
    """Groups per program: the largest divisor of M that is at most MAX_FUSED_GROUPS (2 for head dims over 64,
    whose tiles leave fewer registers)."""
    limit = MAX_FUSED_GROUPS if DKP <= 64 else 2
    return next(c for c in range(min(M, limit), 0, -1) if M % c == 0)


@dataclasses.dataclass
class Launch:
    """One kernel launch: the kernel, its arguments (by name) and its grid as a function of the block sizes."""

    name: str
    kernel: object
    args: dict
    grid: object                   # callable(meta) -> tuple, or a tuple
    tuned: Optional[str] = None    # key of GPU_CONFIGS when the block sizes are autotuned
    block_configs: Optional[list] = None     # (BLOCK_M, BLOCK_N, warps, stages) in place of GPU_CONFIGS[tuned]
    warps: int = 4                 # num_warps of an untuned launch
    pair_programs: int = 1         # programs that each process every (query, key) pair (group chunks and parts)
    gpu: Optional[GPU] = None      # the GPU it runs on (None: the plain interpreter, or a placeholder device)

    def configs(self, interpreting: Optional[bool] = None) -> List[dict]:
        """The launch options (and block sizes, for autotuned kernels) the launcher may use: the GPU's candidates,
        or the interpreter's one small config (default: where the launch has no GPU)."""
        if self.tuned is None:
            return [dict(num_warps=self.warps, num_stages=1)]
        if (self.gpu is None) if interpreting is None else interpreting:
            blocks = [(WALK_TILE, WALK_TILE, 1, 1) if self.tuned == "walk" else INTERPRETER_CONFIG
                      + (int(_gather_transposed()),)]
        else:
            blocks = self.block_configs or gpu_configs(self.tuned, self.args["DKP"], self.args["MC"],
                                                       self.args.get("MODE", 0), self.gpu)
        out = []
        for bm, bn, w, s, *gt in blocks:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            if "GATHER_T" in getattr(self.kernel, "arg_names", ()):
                cfg["GATHER_T"] = bool(gt[0]) if gt else _gather_transposed()
            out.append(cfg)
        return out


def _for_gpu(launches: List[Launch], gpu: Optional[GPU]) -> List[Launch]:
    for launch in launches:
        launch.gpu = gpu
    return launches


_TUNED: Dict[tuple, object] = {}           # (launch name, GPU, candidates) -> the autotuned kernel
_AUTOTUNE_KEY = ("N", "B", "DKP", "BLOCK_G", "MC", "NPAD", "TXP", "TW", "MODE", "CAUSAL")
_AUTOTUNER_OPTIONS = ("grid", "warmup")    # what Triton's autotuner adds to the arguments it gives early_config_prune

log = logging.getLogger(__name__)


def _compilable(arg):
    """What ``warmup`` compiles a candidate for, in place of an argument: the argument, except where torch.compile,
    torch.export and AOTInductor call the pruning while they trace: for a fake tensor (no data pointer) a small
    real one of its dtype, which specializes alike (16-byte aligned); for a symbolic size (a dynamic batch) the
    size it was traced with."""
    if isinstance(arg, torch.Tensor) and is_fake(arg):
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            return torch.empty(16, dtype=arg.dtype)
    if isinstance(arg, torch.SymInt):
        return arg.node.hint
    return arg


def _spill_free(kernel, gpu: GPU):
    """An ``early_config_prune`` for triton.autotune: compiles each candidate for the GPU in use (the JIT's own
    ``warmup``, whose binary the launch then reuses) and keeps those that fit it and do not spill. A candidate that
    does not fit (Triton's ``OutOfResources``: shared memory, threads) is dropped; if every one that fits spills,
    the one that spills least is kept. Each drop is logged (logger ``lisa_kernels.triton_direct``, INFO)."""
    from triton.runtime.errors import OutOfResources

    def prune(configs, named_args, **kwargs):
        args = {k: _compilable(v) for k, v in {**named_args, **kwargs}.items() if k not in _AUTOTUNER_OPTIONS}
        scored = []
        for cfg in configs:
            compiled = kernel.warmup(**args, **cfg.all_kwargs(), grid=(1,))
            try:
                compiled._init_handles()
            except OutOfResources as exc:
                log.info("%s on %s: %s dropped, it does not fit: %s", kernel.__name__, gpu, cfg, exc)
                continue
            scored.append((int(compiled.n_spills), cfg))
        if not scored:
            raise RuntimeError(f"{kernel.__name__}: no candidate config fits {gpu} ({len(configs)} tried; "
                               f"lisa_kernels.triton_direct.GPU_CONFIGS)")
        free = [cfg for spills, cfg in scored if spills == 0]
        for spills, cfg in scored:
            if spills and free:
                log.info("%s on %s: %s dropped, it spills %d bytes", kernel.__name__, gpu, cfg, spills)
        return free or [min(scored, key=lambda sc: sc[0])[1]]
    return prune


def _tuned_kernel(launch: Launch):
    """The autotuned wrapper of a kernel (GPU only), one per kernel, GPU and candidate list."""
    configs = launch.configs()
    cache_key = (launch.name, launch.gpu, tuple(tuple(sorted(c.items())) for c in configs))
    fn = _TUNED.get(cache_key)
    if fn is None:
        tconfigs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                  num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]
        tuning_key = [a for a in _AUTOTUNE_KEY if a in launch.kernel.arg_names]
        fn = triton.autotune(configs=tconfigs, key=tuning_key,
                             prune_configs_by={"early_config_prune": _spill_free(launch.kernel, launch.gpu)}
                             )(launch.kernel)
        _TUNED[cache_key] = fn
    return fn


def compiled_kernels() -> bool:
    """Whether the kernels are Triton's JIT functions (compiled for a GPU), not the interpreter's."""
    from triton.runtime.jit import JITFunction
    return isinstance(_fwd_kernel, JITFunction)


def _run(launch: Launch, traced: bool = False) -> None:
    """On a GPU, an autotuned launch goes through :func:`_tuned_kernel`; otherwise (the plain interpreter, untuned
    kernels) the launch takes its first config. ``traced`` (the launch's tensors are fake: torch.compile, torch.export
    and AOTInductor trace the ops of :mod:`lisa_kernels.ops`, ``torch.library.triton_op``s): the kernel goes through
    ``torch.library.wrap_triton``, which records the launch in the trace; a real call launches it directly."""
    tuned = launch.tuned is not None and launch.gpu is not None
    kernel = _tuned_kernel(launch) if tuned else launch.kernel
    if traced:
        kernel = torch.library.wrap_triton(kernel)
    if tuned:
        kernel[launch.grid](**launch.args)
        return
    cfg = launch.configs()[0]
    grid = launch.grid(cfg) if callable(launch.grid) else launch.grid
    kernel[grid](**launch.args, **cfg)


def _common(p: Problem, lay: Layout, gpu: Optional[GPU]) -> dict:
    M, G = p.M, p.Dv // p.M
    _, mode = _modes(p.dtype, gpu)
    DKP = max(16, triton.next_power_of_2(p.Dk))
    MC = _group_chunk(M, DKP)
    return dict(M=M, MC=MC, MCP=triton.next_power_of_2(MC), G=G, BLOCK_G=max(16, triton.next_power_of_2(G)),
                DKP=DKP, NPAD=lay.NPAD, TXP=lay.TXP, CAUSAL=p.causal, MODE=mode, ISA=_isa(gpu))


def _gather_transposed() -> bool:
    """The default GATHER_T (the configs set their own): Triton 3.6 lays a gather with unknown contiguity out
    column-major, 3.8 row-major; the kernels build the pointers so that each thread's per-iteration index is a
    single value either way (see _gather)."""
    return _triton_version() < (3, 7)


def _walk_workspace(p: Problem) -> int:
    """Bytes of the walkers' scratch: a 64 x 64 fp32 tile per (walker, phase, head, group slot)."""
    lay = layout(p)
    MC = _group_chunk(p.M, max(16, triton.next_power_of_2(p.Dk)))
    return (2 * lay.TW - 1) * lay.LW * p.H * (p.M // MC) * triton.next_power_of_2(MC) * WALK_TILE * WALK_TILE * 4


def saved_table_shape(grid, num_extra: int, boundary: str, causal: bool, H: int, M: int, Dk: int) -> Tuple[int, int]:
    """The shape of the pair table of key pairs that the forward returns for the backward:
    (H * chunks, copies * TXP * 2 * MCP)."""
    lay = _layout_of(tuple(grid), num_extra, boundary == "circular", causal)
    MC = _group_chunk(M, max(16, triton.next_power_of_2(Dk)))
    return H * (M // MC), _pair_steps(lay)[0] * lay.TXP * 2 * triton.next_power_of_2(MC)


def _strides(name: str, t: torch.Tensor) -> dict:
    return {f"s{name}{x}": t.stride(i) for i, x in enumerate("bhnd")}


def _prep_launch(q, k, v, rpe, rpe_extra, fq, fk, vp, r, r16, mx, p: Problem, lay: Layout, c: dict, ti,
                 ones: bool) -> Launch:
    B, H, N, Dk = q.shape
    n_feat = (lay.NPAD // PREP_BLOCK_T) * B * H
    tab = _table_constexprs(lay)
    args = dict(Q=q, K=k, V=v, FQ=fq, FK=fk, VP=vp, RPE=rpe, REX=rpe_extra if rpe_extra is not None else rpe, R=r,
                R16=r16, MX=mx, DELTAS=ti.DK, **_strides("q", q), **_strides("k", k), **_strides("v", v),
                H=H, N=N, DK=Dk, scale=p.scale, n_feat=n_feat,
                FEATURE=0 if p.feature_map == "elu1" else 1, HAS_REX=rpe_extra is not None, M=p.M, MC=c["MC"],
                MCP=c["MCP"], ND=len(ti.DK), G=c["G"], BLOCK_G=c["BLOCK_G"], TAB16=_tab16(c["MODE"]), ONES=ones, **tab,
                DKP=fq.shape[-1], NPAD=lay.NPAD, BLOCK_T=PREP_BLOCK_T, TBLOCK=min(1024, lay.TXP))
    return Launch("prep", _prep_kernel, args, (n_feat + H * (p.M // c["MC"]),))


def _token_buffers(q, lay: Layout, p: Problem, c: dict, gpu: Optional[GPU]):
    """fq, fk (B * H, NPAD, DKP) and the padded values (B * H, NPAD, M, BLOCK_G), in the dots' dtype."""
    B, H = q.shape[:2]
    fdt, _ = _modes(p.dtype, gpu)
    mk = functools.partial(torch.empty, device=q.device, dtype=fdt)
    return mk(B * H, lay.NPAD, c["DKP"]), mk(B * H, lay.NPAD, c["DKP"]), mk(B * H, lay.NPAD, p.M, c["BLOCK_G"])


def forward_launches(q, k, v, rpe, rpe_extra, p: Problem, gpu: Optional[GPU], traced: bool = False):
    """The forward's launches for ``gpu`` (None: the plain interpreter, or no GPU) and the tensors they write:
    (launches, out, res, den, r, mx). ``traced``: q is a trace's fake tensor (see :func:`_run`)."""
    B, H, N, Dk = q.shape
    lay = layout(p)
    c = _common(p, lay, gpu)
    # The row sums ride on the value dot where a padding column can hold 1 (G < BLOCK_G), or where widening the
    # value rows from 16 to 32 columns costs what the 16-column ones-dot does: ONES, BLOCK_G = the rows' width.
    ones = c["G"] < c["BLOCK_G"] or c["BLOCK_G"] == 16
    c = dict(c, BLOCK_G=max(c["BLOCK_G"], triton.next_power_of_2(c["G"] + 1)) if ones else c["BLOCK_G"])
    fq, fk, vp = _token_buffers(q, lay, p, c, gpu)
    r = torch.empty(saved_table_shape(p.grid, p.num_extra, p.boundary, p.causal, H, p.M, Dk), device=q.device,
                    dtype=torch.float32)
    # the forward's bf16 copy of the table (bf16 dots: packed products, see _wmul); r itself serves the backward
    tab16 = _tab16(c["MODE"])
    r16 = torch.empty(r.shape, device=q.device, dtype=torch.bfloat16 if c["MODE"] == 0 else torch.float32) \
        if tab16 else r
    mx = torch.empty(H * p.M, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, N, p.Dv, device=q.device, dtype=_store_dtype(q.dtype, gpu))
    den = torch.empty(B, H, N, p.M, device=q.device, dtype=torch.float32)
    residual = out.dtype != torch.float32
    res = torch.empty(B, H, N, p.Dv, device=q.device, dtype=q.dtype) if residual else out.new_empty(0)
    ti = token_index(lay, q.device, traced)
    fwd = dict(FQ=fq, FK=fk, VP=vp, R=r, R16=r16, AIX=ti.AIX, NB2=ti.NB2, MX=mx, Out=out, Res=res if residual else out,
               Den=den, sob=out.stride(0), soh=out.stride(1), son=out.stride(2), sod=out.stride(3), H=H, N=N, eps=p.eps,
               NORMALIZE=p.normalize, RESIDUAL=residual, NDK=len(ti.DK), TAB16=tab16, ONES=ones, **c)
    chunks = p.M // c["MC"]
    launches = [_prep_launch(q, k, v, rpe, rpe_extra, fq, fk, vp, r, r16, mx, p, lay, c, ti, ones),
                Launch("fwd", _fwd_kernel, fwd, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H, chunks),
                       tuned="fwd", pair_programs=chunks)]
    return _for_gpu(launches, gpu), out, res, den, r, mx


def lisa_direct_fwd(q, k, v, rpe, rpe_extra, p: Problem):
    """out (B, H, N, Dv) in q's dtype; for the backward: res = out - round(out) (16-bit inputs; else empty),
    den' (B, H, N, M) fp32, the interleaved extended table r' (:func:`saved_table_shape`) and its log-max mx."""
    traced = is_fake(q)
    launches, out, res, den, r, mx = forward_launches(q, k, v, rpe.contiguous(),
                                                      None if rpe_extra is None else rpe_extra.contiguous(), p,
                                                      _device.gpu_of(q.device), traced)
    for launch in launches:
        _run(launch, traced)
    if out.dtype != q.dtype:          # (interpreter, bf16: see _store_dtype)
        out32, out = out, out.to(q.dtype)
        res = (out32 - out.float()).to(q.dtype)
    return out, res, den, r, mx


def _table_grad_launch(dr, drpe, drex, p: Problem, lay: Layout) -> Launch:
    """dr: (H * M, TXP), rows ``dr.stride(0)`` apart."""
    tab = _table_constexprs(lay)
    args = dict(DR=dr, DRPE=drpe, DREX=drex if drex is not None else drpe, ROW=dr.stride(0), HAS_REX=drex is not None,
                BLOCK=256, **{k: tab[k] for k in ("S1", "S2", "S3", "L1", "L2", "L3", "R1LO", "R1HI", "R0LO", "R0HI",
                                                  "R2LO", "R2HI", "CIRC")})
    return Launch("table_grad", _table_grad_kernel, args, (p.H * p.M,))


EXTRA_BLOCK = 64


def backward_launches(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, p: Problem, gpu: Optional[GPU],
                      traced: bool = False):
    """The backward's launches for ``gpu`` and the tensors they write: (launches, dq, dk, dv, drpe, drex)."""
    B, H, N, Dk = q.shape
    lay = layout(p)
    c = _common(p, lay, gpu)
    chunks = p.M // c["MC"]
    fq, fk, vp = _token_buffers(q, lay, p, c, gpu)
    gdt = _grad_dtype(c["MODE"])
    gp = torch.empty(B * H, lay.NPAD, p.M, c["BLOCK_G"], device=q.device, dtype=gdt)
    gdx = torch.empty(B * H, lay.NPAD, p.M, 16, device=q.device, dtype=gdt)
    gd = torch.empty(B * H, lay.NPAD, p.M, device=q.device, dtype=torch.float32)
    dr = torch.empty(H * p.M, lay.TXP if lay.circular else 1, device=q.device, dtype=torch.float32)
    sdt = _store_dtype(q.dtype, gpu)
    if chunks == 1:      # written in the input dtypes; several chunks write fp32 partial sums
        dq, dk = (torch.empty(B, H, N, Dk, device=q.device, dtype=sdt) for _ in range(2))
        sdc = 0
    else:
        dq, dk = (torch.empty(chunks, B, H, N, Dk, device=q.device, dtype=torch.float32) for _ in range(2))
        sdc = dq.stride(0)
    dv = torch.empty(B, H, N, p.Dv, device=q.device, dtype=sdt)
    drpe = torch.empty(rpe.shape, device=q.device, dtype=sdt)
    drex = None if rpe_extra is None else torch.empty(rpe_extra.shape, device=q.device, dtype=sdt)
    ti = token_index(lay, q.device, traced)
    aix, nbx, wix = ti.AIX, ti.NBX, ti.WIX
    ndk, ndq = len(ti.DK), len(ti.DQ)
    rq = torch.empty(H * chunks, ndq * lay.TXP * 2 * c["MCP"], device=q.device, dtype=torch.float32)
    feature = 0 if p.feature_map == "elu1" else 1
    n_feat = (lay.NPAD // PREP_BLOCK_T) * B * H
    tab = _table_constexprs(lay)
    g = grad_out
    residual = res.numel() > 0
    prep = dict(Q=q, K=k, V=v, GO=g, O=out, RES=res if residual else out, DEN=den, MX=mx, FQ=fq, FK=fk, VP=vp, GP=gp,
                GDX=gdx, GD=gd, RPE=rpe, REX=rpe_extra if rpe_extra is not None else rpe, RQ=rq, DELTAS=ti.DQ,
                **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("g", g), **_strides("o", out),
                H=H, N=N, DK=Dk, scale=p.scale, eps=p.eps, n_feat=n_feat,
                FEATURE=feature, HAS_REX=rpe_extra is not None, M=p.M, MC=c["MC"], MCP=c["MCP"], ND=ndq, G=c["G"],
                BLOCK_G=c["BLOCK_G"], NORMALIZE=p.normalize, RESIDUAL=residual, DKP=c["DKP"], NPAD=lay.NPAD, **tab,
                TBLOCK=min(1024, lay.TXP), BLOCK_T=PREP_BLOCK_T)
    dkv = dict(FQ=fq, FK=fk, VP=vp, GP=gp, GDX=gdx, K=k, RQ=rq, AI2=ti.AI2, NBX=nbx, DKB=dk, DV=dv, **_strides("k", k),
               sdc=sdc, sdb=dk.stride(-4), sdh=dk.stride(-3), sdn=dk.stride(-2),
               sdvb=dv.stride(0), sdvh=dv.stride(1), sdvn=dv.stride(2), sdvd=dv.stride(3),
               H=H, N=N, DK=Dk, FEATURE=feature, NDQ=ndq, GD_DOT=_gd_dot(c["MODE"], gpu, "dkv", c["MC"], c["DKP"]),
               **c)
    dqa = dict(FQ=fq, FK=fk, VP=vp, GP=gp, GDX=gdx, GD=gd, MX=mx, Q=q, R=r, AIX=aix, NB2=ti.NB2, DQ=dq,
               **_strides("q", q), sdc=sdc, sdb=dq.stride(-4), sdh=dq.stride(-3), sdn=dq.stride(-2),
               H=H, N=N, DK=Dk, scale=p.scale, eps=p.eps, FEATURE=feature, NORMALIZE=p.normalize,
               NDK=ndk, GD_DOT=_gd_dot(c["MODE"], gpu, "dq", c["MC"], c["DKP"]), **c)
    n_walk = (2 * lay.TW - 1) * lay.LW
    scr = torch.empty(H * chunks * c["MCP"], n_walk, WALK_TILE, WALK_TILE, device=q.device, dtype=torch.float32)
    gd_dot = _gd_dot(c["MODE"], gpu, "walk", c["MC"], c["DKP"])
    mcw = min(c["MC"], _walk_groups(c["MODE"]))
    walk = dict(FQ=fq, FK=fk, VP=vp, GP=gp, GDX=gdx, WIX=wix, SCR=scr, B=B, H=H, n_walk=n_walk,
                M=p.M, MC=c["MC"], MCP=c["MCP"], MCW=mcw, BLOCK_G=c["BLOCK_G"], DKP=c["DKP"], NPAD=lay.NPAD, TW=lay.TW,
                LW=lay.LW, E=lay.E, IDENT=_walk_ident(lay), WT=WALK_TILE,
                CAUSAL=p.causal, MODE=c["MODE"], ISA=c["ISA"], GD_DOT=gd_dot)
    extra = lay.E > 0 and rpe_extra is not None
    identity0 = extra and p.normalize and not p.causal
    nt = lay.NPAD // EXTRA_BLOCK
    sx = torch.empty(B * H, chunks, nt, 3, c["MCP"], device=q.device, dtype=torch.float32) if extra else dr
    n_fold = H * p.M * 2 * lay.TW
    final = not lay.circular          # the fold writes d rpe (and d rpe_extra) itself
    fold = dict(SCR=scr, SX=sx, R=r, GD=gd, MX=mx, DR=drpe if final else dr,
                DREX=drex if drex is not None else drpe, B=B, H=H, eps=p.eps, n_walk=n_walk, n_fold=n_fold,
                M=p.M, MC=c["MC"], MCP=c["MCP"], TXP=lay.TXP, NDK=ndk, S1=lay.S[0], S2=lay.S[1], S3=lay.S[2],
                NDIM=lay.NDIM, T=lay.T, FINAL=final,
                P2=lay.P2, P3=lay.P3, TW=lay.TW, LW=lay.LW, E=lay.E, NPAD=lay.NPAD, NT=nt, R0LO=lay.R0[0],
                R1LO=lay.R1[0], R2LO=lay.R2[0], EXTRA=extra, IDENTITY0=identity0, BLOCK=WALK_TILE)
    launches = [Launch("bwd_prep", _bwd_prep_kernel, prep, (n_feat + H * chunks,)),
                Launch("bwd_dkv", _bwd_dkv_kernel, dkv, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H, chunks),
                       tuned="dkv", pair_programs=chunks),
                Launch("bwd_dq", _bwd_dq_kernel, dqa, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H, chunks),
                       tuned="dq", pair_programs=chunks),
                Launch("bwd_walk", _bwd_walk_kernel, walk,
                       lambda meta: (n_walk, H * chunks * (c["MC"] // mcw) * (WALK_TILE // meta["BLOCK_N"])),
                       tuned="walk", pair_programs=chunks * (c["MC"] // mcw))]
    if extra:
        ex = dict(FQ=fq, FK=fk, VP=vp, GP=gp, GDX=gdx, R=r, AIX=aix, NBX=nbx, SX=sx, N=N, H=H, M=p.M, MC=c["MC"],
                  MCP=c["MCP"], BLOCK_G=c["BLOCK_G"], DKP=c["DKP"], NPAD=lay.NPAD, TXP=lay.TXP, NDK=ndk, E=lay.E,
                  EP=max(16, triton.next_power_of_2(lay.E)), KIND0=not identity0, MODE=c["MODE"], ISA=c["ISA"],
                  GD_DOT=_gd_dot(c["MODE"], gpu), BLOCK=EXTRA_BLOCK)
        launches.append(Launch("bwd_extra", _bwd_extra_kernel, ex, (B * H, chunks, nt)))
    launches.append(Launch("table_fold", _table_fold_kernel, fold, (n_fold + (H * p.M if extra else 0),), warps=8))
    if not final:             # circular tables: each entry sums linear offsets that different folds wrote
        launches.append(_table_grad_launch(dr, drpe, drex, p, lay))
    return _for_gpu(launches, gpu), dq, dk, dv, drpe, drex


def lisa_direct_bwd(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, p: Problem):
    """dq, dk, dv (input dtypes), drpe (rpe's dtype) and drex (rpe_extra's, or None); deterministic (no
    atomics: the table gradient is summed in a fixed order)."""
    rpe = rpe.contiguous()
    rpe_extra = None if rpe_extra is None else rpe_extra.contiguous()
    traced = is_fake(q)
    launches, dq, dk, dv, drpe, drex = backward_launches(q, k, v, rpe, rpe_extra, out, res, den, r, mx, grad_out, p,
                                                         _device.gpu_of(q.device), traced)
    for launch in launches:
        _run(launch, traced)
    if dq.dim() == 5:
        dq, dk = dq.sum(0), dk.sum(0)
    dq, dk, dv, drpe = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drpe.to(rpe.dtype)   # (no-ops on a GPU)
    return dq, dk, dv, drpe, None if drex is None else drex.to(rpe_extra.dtype)


def kernel_launches(p: Problem, device="meta", gpu: Optional[GPU] = None) -> List[Tuple[str, Launch]]:
    """Every launch of one forward and one backward of ``p`` (pass "fwd" or "bwd") for ``gpu`` (default: the
    device's own, none for "meta"), on placeholder tensors of ``device`` (default "meta": nothing is allocated):
    what ``benchmarks/kernel_report.py`` compiles."""
    gpu = gpu or _device.gpu_of(device)
    B, H, N, Dk = p.B, p.H, p.N, p.Dk
    mk = functools.partial(torch.empty, device=device, dtype=p.dtype)
    q, k, v = mk(B, H, N, Dk), mk(B, H, N, Dk), mk(B, H, N, p.Dv)
    rpe = mk(p.H, p.M, *p.rpe_table_shape)
    rex = mk(p.H, p.M, 3) if p.num_extra else None
    fl, out, res, den, r, mx = forward_launches(q, k, v, rpe, rex, p, gpu)
    bl = backward_launches(q, k, v, rpe, rex, out, res, den, r, mx, mk(B, H, N, p.Dv), p, gpu)[0]
    return [("fwd", x) for x in fl] + [("bwd", x) for x in bl]
