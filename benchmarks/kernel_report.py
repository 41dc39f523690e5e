"""What the Triton kernels of lisa_kernels would cost on a GPU, read from their compiled code (no GPU needed).

Every kernel that ``lisa_attention(..., backend="triton")`` launches is compiled, with each configuration the
launcher may pick (all autotune configs), for the chosen targets (``--arch``: sm_80 Ampere, sm_89 Ada, sm_90a
Hopper, sm_100a datacenter Blackwell, sm_120 consumer Blackwell, gfx942 CDNA 3, gfx950 CDNA 4; TARGETS below has
each one's limits and matrix rates); so is a textbook FlashAttention-2 in Triton (``yardstick_fa2.py``), in the
same run. The launcher is asked for each target's launches (``kernel_launches(p, gpu=GPU(...))``), so its
per-target choices come along. From each binary:

* NVIDIA (cuobjdump's resource usage, nvdisasm's SASS): registers, stack bytes (> 0 means spills), shared
  memory; AMD (``compiled.asm["amdgcn"]`` and its metadata): VGPRs, AGPRs, SGPRs, VGPR / SGPR spills, scratch
  bytes, LDS bytes, and the occupancy (waves per SIMD) that the VGPRs allow;
* whether the kernel fits the target (shared memory / LDS within what one block may use, no spill: stack 0 on
  NVIDIA; no spill and no scratch on AMD) and whether it issues the target's matrix instructions (HMMA on
  sm_80 / sm_89 / sm_120, HGMMA on sm_90a, UTC*MMA (tcgen05.mma) on sm_100a, v_mfma on AMD): ``verdict``;
* the hot loop: the longest address range that ends in a branch back to its start (SASS: BRA; AMDGCN:
  s_cbranch_* / s_branch to an earlier label), and its instructions by class (matrix, TMEM load/store, MUFU /
  transcendental, loads, stores, atomics, integer, float, other);
* issue cycles per 1000 (query, key) pairs = loop instructions x warps / 4 schedulers / (BLOCK_M BLOCK_N / 1000)
  x the programs that process each pair (M > 4 RPE groups split into chunks, each a program over all pairs; the
  table-gradient walkers take 2 groups each): an SM issues at most 4 warp-instructions per cycle, so this is a
  floor on a tile's time from issue alone. On AMD a CU's 4 SIMDs issue one instruction each per cycle, and a
  16-lane SIMD takes 4 cycles for a wave64 VALU instruction: max(4 x VALU, all) x waves / 4;
* per pair, from the loop's instructions and their widths (every lane active, each warp of the program):
  global atomics (lane operations of RED/ATOM, global/buffer_atomic), global bytes loaded (LDG, LDGSTS,
  global/buffer_load) and stored (STG, RED, global/buffer_store);
* tensor cycles per 1k pairs: the loop's matrix work (HGMMA m64nNk per warpgroup, HMMA m16n8k per warp, UTC*MMA
  per program with the M, N of its instruction descriptor, v_mfma MxNxK per wave) at the target's dense rate per
  SM / CU and input type (TARGETS, with the published numbers they come from);
* atomic cycles per 1k pairs: the atomics at an assumed L2 rate of ATOMICS_PER_SM_CLOCK 4-byte reductions per
  SM per cycle (``--atomics-per-sm-clock``). This is an estimate: NVIDIA publishes no L2 atomic throughput and
  none was measured here; one operation per SM-cycle is the order of the L2's 32-byte sector rate per SM
  (132 SMs x 1.8 GHz x 32 B = 7.6 TB/s). A GPU run should replace it;
* bound = the largest of the three: the floor on the loop's time that the report can see;
* whether ptxas serializes the kernel's wgmma (sm_90a; its advisory, from ptxas -v on the kernel's PTX): every
  wgmma then waits for the one before, a cost the counts above do not show, so the totals skip such configs
  where the kernel has a spill-free one that is not serialized.

A pass's total is the sum over its per-pair kernels (those whose loop runs over tiles of pairs); the O(N)
kernels (feature and table preparation, the table-gradient fold) are listed with no per-pair figure. The
launcher prunes configs that spill before autotuning, so each kernel contributes its spill-free config with the
lowest bound (then the fewest issue cycles: what autotuning would aim for; the least-spilling one if none is
spill-free), and the pass's total is the sum of those bounds, with the issue and tensor cycles beside it; the
first kept config's total is printed too. ``candidate_order`` ranks each kernel's configs the same way: the
launcher lists its candidates in that order (tests/test_kernel_report.py checks the first).

``--matrix``: for every kernel of ``backend="triton"`` and of ``backend="triton-fft"`` (its kernels, reached by
recording the launches of ``triton_fft_forward`` / ``triton_fft_backward`` on meta tensors), every dtype and
every target, compile the launcher's candidate configs and record whether at least one candidate of each launch
compiles, fits and issues matrix instructions (kernels with no ``tt.dot``, all of triton-fft's, are not held to
the last). A compile error is recorded with its first line.

    python benchmarks/kernel_report.py                                   # sm_90a and sm_80, ~10 min on 2 cores
    python benchmarks/kernel_report.py --arch sm_100a gfx942 --dtype bfloat16 --D 64 --json out.json
    python benchmarks/kernel_report.py --matrix --save benchmarks/results  # every kernel x dtype x target
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

DTYPES = ("bfloat16", "float16", "float32")
CLASSES = ("mma", "tmem", "mufu", "load", "store", "atomic", "integer", "float", "other")


# ---------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    """One compile target: what Triton compiles for (``GPUTarget(backend, arch, warp_size)``) and the limits and
    rates of the GPU the report reads it against."""

    name: str             # the --arch name
    backend: str          # "cuda" or "hip"
    arch: object          # compute capability (int) or gfx name
    warp_size: int
    family: str
    gpu: str              # the GPU whose numbers the rates are
    smem_limit: int       # bytes of shared memory (LDS) one block (workgroup) may use
    mma_rate: dict        # dense multiply-adds per SM (CU) per clock, by input type
    mma_ops: tuple        # opcode prefixes of the target's matrix instructions (issues_mma)
    mma_name: str         # those instructions, as the report names them

    @property
    def vendor(self) -> str:
        return "nvidia" if self.backend == "cuda" else "amd"

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget(self.backend, self.arch, self.warp_size)

    def issues_mma(self, opcode: str) -> bool:
        return opcode.startswith(self.mma_ops) and (self.arch != 100 or opcode.split(".")[0].endswith("MMA"))


KIB = 1024
# Shared memory: what a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin, CUDA C Programming Guide,
# "Compute capabilities" table; 1 KB of each SM's is reserved): A100 164 KB per SM -> 163 KB a block; Ada and
# consumer Blackwell 100 KB -> 99 KB; H100 and B200 228 KB -> 227 KB. LDS: 64 KB per CU on CDNA 3 (MI300X
# ISA guide), 160 KB on CDNA 4 (MI355X, CDNA 4 white paper); a workgroup may use all of it.
#
# Dense matrix rates, multiply-adds per SM (CU) per clock = the published dense TFLOPS / 2 / units / boost clock:
# * A100 SXM (whitepaper): 312 TF bf16/fp16, 156 TF tf32; 108 SMs at 1.41 GHz -> 1024, 512; int8 2048.
# * sm_89: GeForce RTX 4090 (Ada whitepaper, appendix): 165.2 TF fp16/bf16 with fp32 accumulate (330.3 with fp16
#   accumulate), 82.6 TF tf32, 330.3 TF fp8 with fp32 accumulate; 128 SMs at 2.52 GHz -> 256, 128, 512. The
#   kernels accumulate in fp32, which GeForce parts run at half rate; an L40S (same sm_89: 362 TF bf16, 183 TF
#   tf32, 733 TF fp8 on 142 SMs at 2.52 GHz) runs it at full rate: 512, 256, 1024, twice these.
# * H100 SXM (Hopper whitepaper): 989 TF bf16/fp16, 495 tf32, 1979 fp8; 132 SMs at 1.83 GHz -> 2048, 1024, 4096.
# * B200 (HGX B200 datasheet): 2.25 PF bf16/fp16, 1.1 PF tf32, 4.5 PF fp8/int8 dense; 148 SMs at ~1.86 GHz ->
#   4096, 2048, 8192.
# * sm_120: GeForce RTX 5090 (RTX Blackwell whitepaper): 209.5 TF fp16/bf16 with fp32 accumulate (419 with fp16
#   accumulate), 104.8 TF tf32, 419 TF fp8 with fp32 accumulate; 170 SMs at 2.41 GHz -> 256, 128, 512 (the RTX
#   PRO 6000, also sm_120, runs fp32 accumulate at full rate: twice these).
# * MI300X (AMD CDNA 3 white paper / datasheet): 1307 TF fp16/bf16, 654 TF tf32 (xf32), 163 TF fp32 matrix,
#   2615 TF fp8, 81.7 TF fp64 matrix; 304 CUs at 2.1 GHz -> 1024, 512, 128, 2048, 64.
# * MI355X (AMD CDNA 4 white paper / datasheet): 2.5 PF fp16/bf16, 157 TF fp32 matrix, 5 PF fp8, 78.6 TF fp64
#   matrix; no tf32; 256 CUs at 2.4 GHz -> 2048, 128, 4096, 64 (ISSCC 2026: 8192 fp8 flops per CU per clock).
TARGETS = {t.name: t for t in (
    Target("sm_80", "cuda", 80, 32, "Ampere", "A100 SXM", 163 * KIB,
           {"BF16": 1024, "F16": 1024, "TF32": 512, "I8": 2048}, ("HMMA",), "HMMA"),
    Target("sm_89", "cuda", 89, 32, "Ada", "RTX 4090 (L40S: 2x)", 99 * KIB,
           {"BF16": 256, "F16": 256, "TF32": 128, "E4M3": 512, "E5M2": 512, "I8": 1024}, ("HMMA",), "HMMA"),
    Target("sm_90a", "cuda", 90, 32, "Hopper", "H100 SXM", 227 * KIB,
           {"BF16": 2048, "F16": 2048, "TF32": 1024, "E4M3": 4096, "E5M2": 4096, "I8": 4096}, ("HGMMA",), "HGMMA"),
    Target("sm_100a", "cuda", 100, 32, "Blackwell", "B200", 227 * KIB,
           {"BF16": 4096, "F16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192, "I8": 8192}, ("UTC",),
           "UTC*MMA"),
    Target("sm_120", "cuda", 120, 32, "consumer Blackwell", "RTX 5090", 99 * KIB,
           {"BF16": 256, "F16": 256, "TF32": 128, "E4M3": 512, "E5M2": 512, "I8": 1024}, ("HMMA",), "HMMA"),
    Target("gfx942", "hip", "gfx942", 64, "CDNA 3", "MI300X", 64 * KIB,
           {"BF16": 1024, "F16": 1024, "TF32": 512, "F32": 128, "E4M3": 2048, "I8": 2048, "F64": 64},
           ("v_mfma",), "v_mfma"),
    Target("gfx950", "hip", "gfx950", 64, "CDNA 4", "MI355X", 160 * KIB,
           {"BF16": 2048, "F16": 2048, "F32": 128, "E4M3": 4096, "I8": 4096, "F64": 64}, ("v_mfma",), "v_mfma"),
)}
ARCHS = tuple(TARGETS)
DEFAULT_ARCHS = ("sm_90a", "sm_80")
_BY_CC = {t.arch: t for t in TARGETS.values() if t.backend == "cuda"}
MMA_RATE = {t.arch: t.mma_rate for t in TARGETS.values()}     # (by capability / gfx name, as before)


def target_of(arch) -> Target:
    """A Target by --arch name, or by compute capability (80, 90, ...) / gfx name."""
    if isinstance(arch, Target):
        return arch
    return TARGETS[arch] if arch in TARGETS else _BY_CC[arch] if arch in _BY_CC else \
        next(t for t in TARGETS.values() if t.arch == arch)


def gpu_of_target(t: Target):
    """The launcher's description of the target's GPU (lisa_kernels._device.GPU)."""
    from lisa_kernels._device import GPU
    return GPU(t.backend, t.arch, t.warp_size)


# ---------------------------------------------------------------- instruction classes

_OPCLASS = [
    ("mma", ("HGMMA", "HMMA", "IMMA", "DMMA", "WARPGROUP", "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA", "UTCMXQMMA")),
    ("tmem", ("LDTM", "STTM", "UTCCP", "UTCSHIFT")),
    ("mufu", ("MUFU",)),
    ("atomic", ("RED", "REDG", "REDAS", "REDUX", "ATOM", "ATOMG", "ATOMS", "UTMAREDG")),
    ("load", ("LDG", "LDGSTS", "LDS", "LDSM", "LDL", "LD", "LDC", "ULDC", "UTMALDG", "LDGDEPBAR", "UBLKCP", "LDCU")),
    ("store", ("STG", "STS", "STL", "ST", "STSM", "UTMASTG")),
    ("integer", ("IMAD", "IADD3", "IADD", "ISETP", "LOP3", "LOP", "SEL", "SHF", "SHL", "SHR", "LEA", "IMNMX",
                 "VIMNMX", "PRMT", "MOV", "IABS", "IMUL", "FLO", "POPC", "BREV", "SGXT", "BMSK", "VIADD", "UIADD3",
                 "UIMAD", "ULOP3", "USEL", "USHF", "ULEA", "UMOV", "UISETP", "UPRMT", "UFLO", "UPOPC", "USGXT",
                 "UBMSK", "ULOP", "ISCADD", "P2R", "R2P", "PLOP3", "UPLOP3", "R2UR", "S2UR", "S2R", "CS2R", "I2F",
                 "I2FP", "F2I", "UVIADD", "VIADDMNMX")),
    ("float", ("FFMA", "FMUL", "FADD", "FSETP", "FMNMX", "FSEL", "FSET", "F2F", "F2FP", "HADD2", "HMUL2", "HFMA2",
               "HSETP2", "HMNMX2", "FCHK", "FRND", "DADD", "DMUL", "DFMA", "FSWZADD", "FMUL2", "FADD2", "FFMA2")),
]

# AMDGCN (CDNA): by opcode prefix, in this order
_AMD_CLASS = [
    ("mma", ("v_mfma", "v_smfmac")),
    ("mufu", ("v_exp_", "v_log_", "v_rcp_", "v_rsq_", "v_sqrt_", "v_sin_", "v_cos_")),
    ("atomic", ("global_atomic", "buffer_atomic", "flat_atomic")),
    ("load", ("global_load", "buffer_load", "flat_load", "scratch_load", "ds_read", "ds_load", "s_load",
              "s_buffer_load")),
    ("store", ("global_store", "buffer_store", "flat_store", "scratch_store", "ds_write", "ds_store")),
    ("other", ("s_waitcnt", "s_barrier", "s_branch", "s_cbranch", "s_nop", "s_setprio", "s_sleep", "s_endpgm",
               "s_sched", "s_trap", "s_sendmsg", "s_setreg", "s_getreg", "s_dcache", "s_icache", "s_setpc",
               "s_swappc", "s_memtime", "buffer_wbl2", "buffer_inv", "ds_bpermute", "ds_permute", "ds_swizzle")),
]
_AMD_FLOAT = re.compile(r"_(?:pk_)?(?:f16|bf16|f32|f64|xf32)\b|_f32_|_f16_|_bf16_|^v_pk_(?:fma|mul|add)_f|^v_cvt_")


def is_amd(opcode: str) -> bool:
    return opcode[:1].islower()


def opclass(opcode: str) -> str:
    if is_amd(opcode):
        for name, prefixes in _AMD_CLASS:
            if opcode.startswith(prefixes):
                return name
        if opcode.startswith("v_"):
            return "float" if _AMD_FLOAT.search(opcode) else "integer"
        return "integer" if opcode.startswith("s_") else "other"
    base = opcode.split(".")[0]
    for name, ops in _OPCLASS:
        if base in ops:
            return name
    return "other"


ATOMICS_PER_SM_CLOCK = 1.0


def _width(opcode: str) -> int:
    """Bytes per lane of a global load / store / atomic opcode (32-bit unless the opcode says otherwise)."""
    if is_amd(opcode):
        m = re.search(r"(dwordx(\d)|dword|b(32|64|96|128)|ubyte|sbyte|byte|ushort|sshort|short|u8|i8|u16|i16|d16)",
                      opcode[opcode.index("_") + 1:])
        if not m:
            return 4
        w = m.group(1)
        if w.startswith("dwordx"):
            return 4 * int(m.group(2))
        if m.group(3):
            return int(m.group(3)) // 8
        return 4 if w == "dword" else 1 if w in ("ubyte", "sbyte", "byte", "u8", "i8") else 2
    parts = opcode.split(".")
    for p in parts[1:]:
        if p in ("128", "64", "32"):
            return int(p) // 8
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16", "F16", "BF16"):
            return 2
    return 4


_INPUT_TYPES = ("BF16", "TF32", "E4M3", "E5M2", "S8", "U8", "F64")
_MFMA = re.compile(r"^v_mfma_(?:scale_)?(?:f32|i32|f64)_(\d+)x(\d+)x(\d+)(?:_(\d+)b)?_?([a-z0-9_]*)$")


def _mfma_type(suffix: str) -> str:
    for key, ty in (("bf16", "BF16"), ("xf32", "TF32"), ("f16", "F16"), ("f8f6f4", "E4M3"), ("fp8", "E4M3"),
                    ("bf8", "E4M3"), ("i8", "I8"), ("f64", "F64"), ("f32", "F32")):
        if key in suffix:
            return ty
    return "F32"


def _mma_macs(opcode: str):
    """(multiply-adds per instruction per issuing unit, input type, issuing unit) of a matrix opcode, or None.
    The unit: "warp" (HMMA, v_mfma: per wave), "warpgroup" (HGMMA) or "program" (UTC*MMA: tcgen05.mma, issued by
    one thread for the CTA). HGMMA.64x128x16.F32.BF16 is one warpgroup's m64n128k16; HMMA.16816.F32.BF16 one warp's
    m16n8k16 (fp16 inputs carry no input type: HMMA.16816.F32); UTCHMMA.64x128x16.BF16 the shape that
    :func:`annotate_utc` read from the instruction descriptor; v_mfma_f32_32x32x8_f16 one wave's m32n32k8 (times
    its blocks, v_mfma_f32_32x32x4_2b_f16)."""
    if is_amd(opcode):
        m = _MFMA.match(opcode)
        if not m:
            return None
        M, N, K = int(m.group(1)), int(m.group(2)), int(m.group(3))
        return M * N * K * int(m.group(4) or 1), _mfma_type(m.group(5)), "warp"
    parts = opcode.split(".")
    base = parts[0]
    ty = next((p for p in parts[2:] if p in _INPUT_TYPES), "F16")
    ty = {"S8": "I8", "U8": "I8"}.get(ty, ty)
    if base in ("HGMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA") and len(parts) > 1 and parts[1].count("x") == 2:
        m, n, k = (int(x) for x in parts[1].split("x"))
        return m * n * k, ty, "warpgroup" if base == "HGMMA" else "program"
    if base == "HMMA" and len(parts) > 1 and parts[1].isdigit():
        shape = parts[1]
        m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])
        return m * n * k, ty, "warp"
    return None


def _unit_count(unit: str, num_warps: int) -> float:
    return {"warp": num_warps, "warpgroup": num_warps / 4, "program": 1}[unit]


def _is_global(opcode: str, kind: str) -> bool:
    if is_amd(opcode):
        return opcode.startswith(tuple(f"{p}_{kind}" for p in ("global", "buffer", "flat")))
    base = opcode.split(".")[0]
    return base in {"atomic": ("RED", "REDG", "ATOM", "ATOMG"), "load": ("LDG", "LDGSTS"), "store": ("STG",)}[kind]


def loop_metrics(ops, num_warps: int, tile_pairs: int, arch_cc, atomics_per_sm_clock: float):
    """Per-pair figures of a hot loop given as a list of opcodes (one tile of tile_pairs pairs per iteration) on
    ``arch_cc``: a target (its --arch name), or a compute capability (90) / gfx name."""
    t = target_of(arch_cc)
    lanes = t.warp_size * num_warps / tile_pairs
    atom = load = store = macs = 0.0
    tensor_cycles = 0.0
    for op in ops:
        if _is_global(op, "atomic"):
            atom += lanes
            store += _width(op) * lanes
        elif _is_global(op, "load"):
            load += _width(op) * lanes
        elif _is_global(op, "store"):
            store += _width(op) * lanes
        mma = _mma_macs(op)
        if mma is not None:
            per, ty, unit = mma
            per_program = per * _unit_count(unit, num_warps)
            macs += per_program / tile_pairs
            rate = t.mma_rate.get(ty) or t.mma_rate.get("TF32") or t.mma_rate["F32"]
            tensor_cycles += per_program / rate / tile_pairs
    return dict(atomics_per_pair=atom, load_bytes_per_pair=load, store_bytes_per_pair=store, mma_macs_per_pair=macs,
                tensor_cycles_per_1k_pairs=1000 * tensor_cycles,
                atomic_cycles_per_1k_pairs=1000 * atom / atomics_per_sm_clock)


def issue_cycles(ops, num_warps: int, arch) -> float:
    """Issue cycles of one pass through the loop by one program: NVIDIA: instructions x warps / 4 (an SM's 4
    schedulers issue one warp-instruction each per cycle); AMD: max(4 x VALU, all) x waves / 4 (a CU's 4 SIMDs
    issue one instruction each per cycle, and a wave64 VALU instruction takes a 16-lane SIMD 4 cycles)."""
    if target_of(arch).vendor == "amd":
        valu = sum(1 for op in ops if op.startswith("v_") and opclass(op) != "mma")
        return max(4 * valu, len(ops)) * num_warps / 4
    return len(ops) * num_warps / 4


# ---------------------------------------------------------------- compiling one launch

def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _specialize(value):
    """(type, divisible-by-16) of one non-constexpr argument, as Triton's launcher specializes it."""
    import torch
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:       # other triton versions: the same rules by hand
        native_specialize_impl = None
    if native_specialize_impl is not None:
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        return ty, spec == "D"
    if isinstance(value, torch.Tensor):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64", torch.float64: "fp64"}
        return "*" + names[value.dtype], True
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if abs(value) < 2**31 else "i64"), value % 16 == 0
    return "fp32", False


class LaunchArgumentError(Exception):
    """A launch that does not give one of its kernel's arguments (a launcher / kernel mismatch)."""


def compile_launch(launch, config: dict, arch):
    """triton.compile of one launch for one config and target (a --arch name or Target); returns the
    CompiledKernel. A config without num_stages compiles with the backend's default (as a plain launch does)."""
    import triton
    from triton.compiler import ASTSource
    fn = launch.kernel
    args = dict(launch.args)
    args.update({k: v for k, v in config.items() if k not in ("num_warps", "num_stages")})
    missing = [name for i, name in enumerate(fn.arg_names) if name not in args and not fn.params[i].has_default]
    if missing:
        raise LaunchArgumentError(f"the launch gives no {', '.join(missing)} (arguments of {fn.__name__})")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        value = args[name] if name in args else param.default
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        ty, div16 = _specialize(value)
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = ty
        if div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return triton.compile(src, target=target_of(arch).gpu_target(), options=options)


def _compile_failures():
    """The exceptions by which Triton reports a failed compile: its own (CompilationError from the front end,
    PTXASError, OutOfResources: all TritonError) and RuntimeError, which its backends raise for a failed MLIR
    pass pipeline, LLVM, ptxas (older versions) or ld.lld (AMD)."""
    from triton.errors import TritonError
    return TritonError, RuntimeError


@contextlib.contextmanager
def _stderr_to(path):
    """Redirect file descriptor 2 (where MLIR, LLVM and the assemblers print their diagnostics) to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _raised_by_triton(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc``'s traceback is Triton's own code (its compiler and
    backends), i.e. the exception reports a failed compile and not a bug in this script."""
    import triton
    root = os.path.dirname(os.path.abspath(triton.__file__))
    tb, last = exc.__traceback__, None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and os.path.abspath(last).startswith(root)


def compile_error_line(exc: BaseException, diagnostics: str = "") -> str:
    """One line for a failed compile: the exception's type and first line; for the front end's CompilationError
    (whose first line is only "at L:C:") its location and its message's last line; and the compiler's first
    "error:" diagnostic where the message does not carry it (MLIR, LLVM, the assemblers print theirs)."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if type(exc).__name__ == "CompilationError" and re.match(r"^at \d+:\d+:$", first):
        msg = getattr(exc, "error_message", None) or (lines[-1] if len(lines) > 1 else "")
        first = f"{first} {str(msg).strip().splitlines()[-1] if str(msg).strip() else ''}".strip()
    diag = next((ln.strip() for ln in diagnostics.splitlines() if re.search(r"\berror\b", ln)), "")
    if diag and diag not in first:
        first += f" [{diag}]"
    return f"{type(exc).__name__}: {first}"[:400]


def try_compile(launch, config: dict, arch):
    """(CompiledKernel, None) or (None, (kind, one line)) where kind is "compile error" or "too-big" (Triton's
    OutOfResources). Only compile failures are caught: TritonError, and RuntimeError raised from Triton's own
    code (its backends raise plain RuntimeError for failed pass pipelines, ptxas and ld.lld); a RuntimeError from
    anywhere else, and every other exception, is a bug of this script (or the launcher) and propagates."""
    from triton.runtime.errors import OutOfResources
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as f:
        log = f.name
    try:
        try:
            with _stderr_to(log):
                return compile_launch(launch, config, arch), None
        except _compile_failures() as exc:
            if isinstance(exc, RuntimeError) and not _raised_by_triton(exc):
                raise
            with open(log, errors="replace") as f:
                diagnostics = f.read()
            kind = "too-big" if isinstance(exc, OutOfResources) else "compile error"
            return None, (kind, compile_error_line(exc, diagnostics))
        except LaunchArgumentError as exc:
            return None, ("compile error", f"{type(exc).__name__}: {exc}")
    finally:
        os.unlink(log)


# ---------------------------------------------------------------- reading SASS

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def parse_sass(sass: str):
    """(instructions, loops): instructions as (opcode, text) in order; loops as (start, end) index ranges of
    backward branches (end is the branch), jumps back from out-of-line blocks left out (:func:`_loops`)."""
    insns, labels, branches = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _INSN.search(line)
        if not m:
            continue
        text = m.group(2).strip()
        body = re.sub(r"^@!?U?P\w+\s+", "", text)
        opcode = body.split()[0] if body else ""
        b = _BRANCH.search(body)
        if b and opcode.startswith("BRA"):
            branches.append((len(insns), b.group(1)))
        insns.append((opcode, text))
    return insns, _loops(insns, labels, branches, ("EXIT", "RET"))


def _loops(insns, labels, branches, ends):
    """The (start, end) ranges of the backward branches, leaving out a branch to itself (the SASS program's
    trailer, ``.L_x_9: BRA .L_x_9`` after its EXIT) and ranges with an unconditional end of the program (EXIT,
    RET; s_endpgm) inside: the jumps back from out-of-line blocks after the function's end (on sm_100a every
    mbarrier wait's retry is one), not loops."""
    stops = [i for i, (op, text) in enumerate(insns) if op.split(".")[0] in ends and text.startswith(op)]
    return [(labels[t], i) for i, t in branches
            if t in labels and labels[t] < i and not any(labels[t] <= s < i for s in stops)]


_UMOV = re.compile(r"^(?:@!?U?P\w+\s+)?UMOV\s+(UR\d+),\s*(0x[0-9a-fA-F]+|\d+)\s*$")
_IDESC = re.compile(r"idesc\[(UR\d+)\]")
# tcgen05.mma instruction descriptor (PTX ISA, "Instruction descriptor" of .kind::f16 / tf32 / f8f6f4 / i8): A type
# in bits 7-9, N >> 3 in bits 17-22, M >> 4 in bits 24-28. K per instruction follows from the kind: 32 bytes of A.
_UTC_TYPES = {"UTCHMMA": {0: ("F16", 16), 1: ("BF16", 16), 2: ("TF32", 8)},
              "UTCQMMA": {0: ("E4M3", 32), 1: ("E5M2", 32)},
              "UTCIMMA": {0: ("I8", 32), 1: ("I8", 32)}}


def decode_idesc(base: str, idesc: int):
    """(M, N, K, input type) of a tcgen05.mma instruction descriptor, or None."""
    kinds = _UTC_TYPES.get(base)
    if kinds is None:
        return None
    ty, k = kinds.get((idesc >> 7) & 7, next(iter(kinds.values())))
    m, n = ((idesc >> 24) & 0x1F) << 4, ((idesc >> 17) & 0x3F) << 3
    return (m, n, k, ty) if m and n else None


def annotate_utc(insns):
    """The instructions with each UTC*MMA (tcgen05.mma) opcode given its shape, UTCHMMA.64x128x16.BF16, from the
    instruction descriptor that the last ``UMOV URx, imm`` before it put in its idesc register (the SASS names
    the register, not the shape); left as is where no such UMOV is found."""
    ur, out = {}, []
    for opcode, text in insns:
        m = _UMOV.match(text)
        if m:
            ur[m.group(1)] = int(m.group(2), 0)
        base = opcode.split(".")[0]
        if base.startswith("UTC") and base.endswith("MMA"):
            d = _IDESC.search(text)
            shape = decode_idesc(base, ur[d.group(1)]) if d and d.group(1) in ur else None
            if shape:
                opcode = f"{base}.{shape[0]}x{shape[1]}x{shape[2]}.{shape[3]}" + opcode[len(base):]
        out.append((opcode, text))
    return out


# ---------------------------------------------------------------- reading AMDGCN

_AMD_LABEL = re.compile(r"^([.\w$]+):")
_AMD_INSN = re.compile(r"^\s+([a-z][a-z0-9_]*)(?:\s+([^;]*))?")


def parse_amdgcn(asm: str):
    """(instructions, loops) of AMDGCN assembly, as :func:`parse_sass`: a loop is a branch (s_cbranch_*,
    s_branch) to a label at or before it. Directives, comments and the metadata after the function are skipped."""
    insns, labels, branches = [], {}, []
    for line in asm.splitlines():
        if line.startswith(".Lfunc_end"):
            break
        m = _AMD_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(insns)
            continue
        m = _AMD_INSN.match(line)
        if not m:
            continue
        opcode, operands = m.group(1), (m.group(2) or "").strip()
        if opcode.startswith("s_cbranch") or opcode == "s_branch":
            branches.append((len(insns), operands.split()[0] if operands else ""))
        insns.append((opcode, f"{opcode} {operands}".strip()))
    return insns, _loops(insns, labels, branches, ("s_endpgm",))


def parse_code(code: str):
    """parse_sass (UTC*MMA shapes annotated) or parse_amdgcn, whichever ``code`` is."""
    if _INSN.search(code):
        insns, loops = parse_sass(code)
        return annotate_utc(insns), loops
    return parse_amdgcn(code)


def _nop(opcode: str) -> bool:
    return opcode.startswith(("NOP", "s_nop"))


def hot_loop(code: str):
    """The opcodes of the longest backward-branch range of SASS or AMDGCN (NOPs not counted)."""
    insns, loops = parse_code(code)
    if not loops:
        return []
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return [op for op, _ in insns[start:end + 1] if not _nop(op)]


def hot_loop_mix(code: str):
    """(number of instructions, Counter by class) of the longest backward-branch range (NOPs not counted)."""
    mix = Counter(opclass(op) for op in hot_loop(code))
    return sum(mix.values()), mix


def resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, stack, sass


def _amd_field(asm: str, *names):
    for name in names:
        m = re.search(rf"^\s*;\s*{name}:\s*(\d+)", asm, re.M) or re.search(rf"^\s*\.{name}:\s*(\d+)", asm, re.M)
        if m:
            return int(m.group(1))
    return None


AMD_VGPRS_PER_SIMD = 512      # per lane of a SIMD, architected and accumulation VGPRs together (gfx90a and later)
AMD_MAX_WAVES_PER_SIMD = 8


def amd_resources(asm: str) -> dict:
    """Register, spill, scratch and occupancy figures of an AMDGCN kernel, from the compiler's kernel-info comments
    and the code object's metadata (``.vgpr_count``, ``.vgpr_spill_count``, ...) in the assembly text.
    Occupancy: waves per SIMD that the VGPRs allow: the architected VGPRs (to AccumOffset) and the AGPRs share
    512 per SIMD lane on CDNA 2-4, allocated in granules of 8; at most 8 waves."""
    vgprs = _amd_field(asm, "NumVgprs", "vgpr_count") or 0
    agprs = _amd_field(asm, "NumAgprs", "agpr_count") or 0
    accum = _amd_field(asm, "AccumOffset")
    total = (accum if agprs and accum else -(-vgprs // 4) * 4) + agprs
    granules = max(8, -(-total // 8) * 8)
    return dict(vgprs=vgprs, agprs=agprs, sgprs=_amd_field(asm, "TotalNumSgprs", "sgpr_count") or 0,
                vgpr_spills=_amd_field(asm, "vgpr_spill_count") or 0,
                sgpr_spills=_amd_field(asm, "sgpr_spill_count") or 0,
                scratch_bytes=_amd_field(asm, "ScratchSize", "private_segment_fixed_size") or 0,
                waves_per_simd=min(AMD_MAX_WAVES_PER_SIMD, AMD_VGPRS_PER_SIMD // granules),
                llvm_occupancy=_amd_field(asm, "Occupancy"))


_SERIAL = re.compile(r"wgmma\.mma_async instructions are serialized due to (.*?) in the function")


def wgmma_serialized(ptx: str, arch: str) -> str:
    """ptxas's reason for serializing a kernel's wgmma (its performance advisory C7515 / C7510: every wgmma then
    waits for the one before, so the tensor cores idle through each one's latency, which issue counts do not
    show), or "" if it does not. Triton compiles with the same ptxas, whose advisories it does not show."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_tool("ptxas"), f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    return serialization_reason(out.stdout + out.stderr)


def serialization_reason(ptxas_log: str) -> str:
    m = _SERIAL.search(ptxas_log)
    return m.group(1) if m else ""


# ---------------------------------------------------------------- the jobs

@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    dtype: str
    D: int
    M: int
    grid: tuple = (32, 32)
    E: int = 0
    causal: bool = False
    boundary: str = "zero"
    B: int = 4
    H: int = 8

    @property
    def label(self):
        extra = (f" E={self.E}" if self.E else "") + (" causal" if self.causal else "") + \
            (" circular" if self.boundary == "circular" else "")
        return f"{self.arch} {self.dtype} D={self.D} M={self.M} grid={'x'.join(map(str, self.grid))}{extra}"


def lisa_launches(case: Case):
    """The launches of one forward and backward of backend="triton" for the case's target (the launcher told
    which GPU it launches on)."""
    import torch
    from lisa_kernels._validate import Problem
    from lisa_kernels.triton_direct import kernel_launches
    N = case.E + math.prod(case.grid)
    p = Problem(B=case.B, H=case.H, N=N, Dk=case.D, Dv=case.D, M=case.M, grid=tuple(case.grid), num_extra=case.E,
                feature_map="elu1", normalize=True, eps=1e-6, boundary=case.boundary, causal=case.causal, scale=1.0,
                dtype=getattr(torch, case.dtype), device=torch.device("meta"))
    return kernel_launches(p, gpu=gpu_of_target(target_of(case.arch)))


def yardstick_launches(case: Case):
    import torch
    import yardstick_fa2
    N = max(128, -(-math.prod(case.grid) // 128) * 128)
    return yardstick_fa2.launches(case.B, case.H, N, case.D, getattr(torch, case.dtype))[0]


@dataclasses.dataclass
class PlainLaunch:
    """A launch of a kernel with no tuned configs (triton-fft's): its arguments by name and the one config it
    runs with (Triton's defaults: 4 warps, the backend's num_stages)."""

    name: str
    kernel: object
    args: dict
    variant: str = ""
    tuned: Optional[str] = None
    pair_programs: int = 1

    def configs(self, interpreting=None):
        return [dict(num_warps=4)]


def _constexpr_names(fn):
    """The constexpr parameters of a @triton.jit function (also under the interpreter, whose functions have no
    ``params``)."""
    if hasattr(fn, "params"):
        return [p.name for p in fn.params if p.is_constexpr]
    import inspect
    return [n for n, p in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(p.annotation)]


def fft_launches(case: Case):
    """The distinct launches (kernel and constexpr arguments) of one forward and backward of backend="triton-fft"
    (:func:`lisa_kernels.triton_fft.triton_fft_forward` / ``_backward``), recorded by running them on meta tensors
    with the module's kernels replaced by recorders (restored afterwards). The core computes in float32 whatever
    the inputs' dtype (the backend upcasts), so the case's dtype does not change them."""
    import torch
    from lisa_kernels import triton_fft as tf
    from lisa_kernels._validate import Problem
    seen = {}

    class Recorder:
        def __init__(self, kernel, pas):
            self.kernel, self.pas = kernel, pas

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                fn = self.kernel
                named = dict(zip(fn.arg_names, args), **kwargs)
                cx = tuple((n, named[n]) for n in _constexpr_names(fn))
                key = (fn.__name__, cx)
                if key not in seen:
                    short = "fft_" + fn.__name__.replace("lisa_fft_", "").replace("_kernel", "")
                    seen[key] = (self.pas[0], PlainLaunch(short, fn, named,
                                                          " ".join(f"{n}={int(v) if isinstance(v, bool) else v}"
                                                                   for n, v in cx)))
            return launch

    names = [n for n in dir(tf) if n.startswith("lisa_fft_") and n.endswith("_kernel")]
    saved = {n: getattr(tf, n) for n in names}
    pas = ["fft-fwd"]
    try:
        for n in names:
            setattr(tf, n, Recorder(saved[n], pas))
        N = math.prod(case.grid)
        p = Problem(B=case.B, H=case.H, N=N, Dk=case.D, Dv=case.D, M=case.M, grid=tuple(case.grid), num_extra=0,
                    feature_map="elu1", normalize=True, eps=1e-6, boundary=case.boundary, causal=False, scale=1.0,
                    dtype=torch.float32, device=torch.device("meta"))
        mk = functools.partial(torch.zeros, device="meta", dtype=torch.float32)
        fq, fk, v = mk(case.B, case.H, N, case.D), mk(case.B, case.H, N, case.D), mk(case.B, case.H, N, case.D)
        circular = case.boundary == "circular"
        logtab = mk(case.H, case.M, *p.rpe_table_shape)
        num, den, below = tf.triton_fft_forward(fq, fk, v, logtab, p, circular)
        pas[0] = "fft-bwd"
        tf.triton_fft_backward(fq, fk, v, logtab, below, mk(case.B, case.H, N, case.D), mk(case.B, case.H, N, case.M),
                               p, circular)
    finally:
        for n, k in saved.items():
            setattr(tf, n, k)
    return list(seen.values())


SOURCES = {"triton": lisa_launches, "yardstick": yardstick_launches, "triton-fft": fft_launches}


@functools.lru_cache(maxsize=64)
def launches_of(source: str, case: Case):
    return SOURCES[source](case)


@dataclasses.dataclass(frozen=True)
class Job:
    source: str            # "triton", "yardstick" or "triton-fft"
    case: Case
    launch: int            # index into launches_of(source, case)
    config: int            # index into the launch's configs
    atomic_rate: float = ATOMICS_PER_SM_CLOCK


def _has_dot(compiled) -> bool:
    ttir = compiled.asm.get("ttir", "")
    return bool(re.search(r"\btt\.dot(?:_scaled)?\b", ttir if isinstance(ttir, str) else ""))


def _matrix_op(opcode: str) -> bool:
    """A matrix instruction (the "mma" class less Hopper's WARPGROUP.ARRIVE / DEPBAR fences)."""
    return opclass(opcode) == "mma" and not opcode.startswith("WARPGROUP")


def verdict(rec) -> str:
    """"ok", or what stops the config on its target, joined by "+": "too-big" (shared memory / LDS over what a
    block may use), "spills", "no-mma" (a kernel with dots that issues none of the target's matrix instructions);
    or the failed compile's kind."""
    if "error" in rec:
        return rec.get("error_kind", "compile error")
    problems = [name for name, bad in (("too-big", not rec["fits_shared"]), ("spills", rec["spills"]),
                                       ("no-mma", rec["has_dot"] and not rec["issues_mma"])) if bad]
    return "+".join(problems) or "ok"


def analyze(c, t: Target, config: dict, per_pair: bool, pairs, reps: int, atomic_rate: float) -> dict:
    """The report's figures of one compiled kernel on target ``t``."""
    num_warps = config.get("num_warps", 4)
    shared = int(c.metadata.shared)
    rec = dict(shared_bytes=shared, smem_limit=t.smem_limit, fits_shared=shared <= t.smem_limit, has_dot=_has_dot(c))
    if t.vendor == "nvidia":
        regs, stack, code = resources(c.asm["cubin"])
        rec.update(regs=regs, stack_bytes=stack, spills=stack > 0,
                   tmem_cols=int(getattr(c.metadata, "tmem_size", 0) or 0))
        rec["wgmma_serialized"] = wgmma_serialized(c.asm["ptx"], t.name) if t.arch == 90 else ""
    else:
        code = c.asm["amdgcn"]
        amd = amd_resources(code)
        rec.update(amd, regs=amd["vgprs"], stack_bytes=amd["scratch_bytes"],
                   spills=bool(amd["vgpr_spills"] or amd["sgpr_spills"] or amd["scratch_bytes"]))
    insns, loops = parse_code(code)
    kernel_mma = Counter(op.split(".")[0] for op, _ in insns if _matrix_op(op))
    rec.update(mma_ops=dict(kernel_mma), issues_mma=any(t.issues_mma(op) for op in kernel_mma),
               tmem_ops=sum(1 for op, _ in insns if opclass(op) == "tmem"))
    ops = []
    if loops:
        start, end = max(loops, key=lambda se: se[1] - se[0])
        ops = [op for op, _ in insns[start:end + 1] if not _nop(op)]
    mix = Counter(opclass(op) for op in ops)
    rec.update(loop_instructions=len(ops), loop_mix={k: mix.get(k, 0) for k in CLASSES}, tile_pairs=pairs,
               loop_mma_unknown=sum(1 for op in ops if _matrix_op(op) and _mma_macs(op) is None),
               issue_cycles_per_1k_pairs=(reps * issue_cycles(ops, num_warps, t) / (pairs / 1000))
               if per_pair else None)
    if per_pair:
        rec.update({k: reps * v for k, v in loop_metrics(ops, num_warps, pairs, t, atomic_rate).items()},
                   atomics_per_sm_clock=atomic_rate)
        rec["bound_cycles_per_1k_pairs"] = max(rec["issue_cycles_per_1k_pairs"], rec["tensor_cycles_per_1k_pairs"],
                                               rec["atomic_cycles_per_1k_pairs"])
        rec["bound"] = max(("issue", "tensor", "atomic"), key=lambda k: rec[f"{k}_cycles_per_1k_pairs"])
    return rec


def run_job(job: Job):
    """Compile one (source, case, launch, config) for the case's target; returns one record."""
    os.environ.pop("TRITON_INTERPRET", None)
    case = job.case
    t = target_of(case.arch)
    pas, launch = launches_of(job.source, case)[job.launch]
    config = launch.configs(interpreting=False)[job.config]
    per_pair = launch.tuned is not None
    pairs = config["BLOCK_M"] * config["BLOCK_N"] if per_pair else None
    reps = getattr(launch, "pair_programs", 1)
    import torch
    import triton
    rec = dict(backend=job.source, kernel=launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.name,
               name=launch.name, variant=getattr(launch, "variant", ""), triton=triton.__version__,
               torch=torch.__version__.split("+")[0], arch=case.arch, family=t.family, dtype=case.dtype, D=case.D,
               M=case.M, grid=list(case.grid), E=case.E, causal=case.causal, boundary=case.boundary,
               **{"pass": ("yardstick-" + pas) if job.source == "yardstick" else pas},
               config=" ".join(f"{k}={v}" for k, v in config.items()), config_index=job.config,
               num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages"),
               block_m=config.get("BLOCK_M"), block_n=config.get("BLOCK_N"), pair_programs=reps)
    c, failure = try_compile(launch, config, t)
    if failure is not None:
        rec.update(error_kind=failure[0], error=failure[1])
    else:
        rec.update(analyze(c, t, config, per_pair, pairs, reps, job.atomic_rate))
    rec["verdict"] = verdict(rec)
    return rec


def jobs_for(case: Case, source="triton", atomic_rate: float = ATOMICS_PER_SM_CLOCK, only=None, first_config=False):
    """The jobs of a case: every launch (or those named in ``only``) and every config (or the first)."""
    if source is True or source is False:          # (the former signature: yardstick?)
        source = "yardstick" if source else "triton"
    out = []
    for li, (_, launch) in enumerate(launches_of(source, case)):
        if only is not None and launch.name not in only:
            continue
        n = 1 if first_config else len(launch.configs(interpreting=False))
        out += [Job(source, case, li, ci, atomic_rate) for ci in range(n)]
    return out


def _crashed(job: Job, why: str) -> dict:
    pas, launch = launches_of(job.source, job.case)[job.launch]
    config = launch.configs(interpreting=False)[job.config]
    return dict(backend=job.source, kernel=getattr(getattr(launch.kernel, "fn", None), "__name__", launch.name),
                name=launch.name, variant=getattr(launch, "variant", ""), arch=job.case.arch, dtype=job.case.dtype,
                D=job.case.D, M=job.case.M, grid=list(job.case.grid), E=job.case.E, causal=job.case.causal,
                boundary=job.case.boundary, **{"pass": ("yardstick-" + pas) if job.source == "yardstick" else pas},
                config=" ".join(f"{k}={v}" for k, v in config.items()), config_index=job.config,
                error_kind="compile error", error=why, verdict="compile error")


def run_jobs(jobs, workers: int = 2, progress=None):
    """run_job over ``jobs`` in ``workers`` processes, records in the jobs' order. A compiler that kills its
    process (an LLVM abort) breaks the pool: the jobs left unfinished are then run again, each in a process of its
    own, and one whose process dies again is recorded as a compile error."""
    results = [None] * len(jobs)
    broken = []
    with cf.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        for done, f in enumerate(cf.as_completed(futures), 1):
            i = futures[f]
            try:
                results[i] = f.result()
            except cf.process.BrokenProcessPool:
                broken.append(i)
            if progress:
                progress(done, len(jobs))
    for i in broken:
        with cf.ProcessPoolExecutor(max_workers=1) as pool:
            try:
                results[i] = pool.submit(run_job, jobs[i]).result()
            except cf.process.BrokenProcessPool:
                results[i] = _crashed(jobs[i], "the compiler's process died (a crash, not an exception)")
    return results


# ---------------------------------------------------------------- summaries

PER_PAIR = ("atomics_per_pair", "load_bytes_per_pair", "store_bytes_per_pair", "tensor_cycles_per_1k_pairs",
            "atomic_cycles_per_1k_pairs", "bound_cycles_per_1k_pairs")


def case_key(r):
    return (r["arch"], r["dtype"], r["D"], r["M"], tuple(r["grid"]), r["E"], r["causal"], r["boundary"])


def _spills(r) -> bool:
    return r["spills"] if "spills" in r else r["stack_bytes"] > 0


def _rank(r):
    """How the report (and the launcher's candidate order) ranks the configs of one kernel: by the loop's bound,
    the largest of its issue, tensor and atomic cycles (the time it predicts), then by issue cycles (the one a
    tensor-bound loop can still lose: latency it has less room to hide)."""
    return (r["bound_cycles_per_1k_pairs"], r["issue_cycles_per_1k_pairs"])


def pass_totals(records):
    """{(case key..., pass): totals} over the per-pair kernels of each pass. Each kernel contributes the config
    the launcher may keep (spill-free) with the lowest bound (:func:`_rank`); ``bound`` sums their bounds (the
    pass's predicted cycles per 1k pairs), ``issue`` and ``tensor`` their issue and tensor cycles, ``first`` the
    bounds of each kernel's first kept config (the launcher's first candidate), ``spills`` is the largest stack
    of the kept configs, and the per-pair figures (PER_PAIR) are summed over the chosen configs;
    ``max_atomics_per_pair`` is the largest of one kernel."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("issue_cycles_per_1k_pairs") is None:
            continue
        groups[case_key(r) + (r["pass"],)][r["name"]].append(r)
    out = {}
    for key, kernels in groups.items():
        kept = {name: launcher_choices(recs) for name, recs in kernels.items()}
        chosen = [min(recs, key=_rank) for recs in kept.values()]
        tot = dict(bound=sum(x["bound_cycles_per_1k_pairs"] for x in chosen),
                   issue=sum(x["issue_cycles_per_1k_pairs"] for x in chosen),
                   tensor=sum(x["tensor_cycles_per_1k_pairs"] for x in chosen),
                   first=sum(recs[0]["bound_cycles_per_1k_pairs"] for recs in kept.values()),
                   spills=max(x["stack_bytes"] for recs in kept.values() for x in recs),
                   kernels={x["name"]: x["config"] for x in chosen},
                   kernel_bounds={x["name"]: (x["bound_cycles_per_1k_pairs"], x["issue_cycles_per_1k_pairs"],
                                              x["tensor_cycles_per_1k_pairs"]) for x in chosen},
                   max_atomics_per_pair=max(x.get("atomics_per_pair", 0.0) for x in chosen))
        for f in PER_PAIR:
            tot[f] = sum(x.get(f, 0.0) for x in chosen)
        out[key] = tot
    return out


def candidate_order(records):
    """{(case key..., kernel name): [config indices]}: each tuned kernel's configs as the launcher should list
    them, the kept ones (:func:`launcher_choices`) by :func:`_rank`, then the rest in their order. A launcher
    list whose first index is not the first here leads with a config the report ranks lower."""
    groups = defaultdict(list)
    for r in records:
        if r.get("issue_cycles_per_1k_pairs") is not None and not r["pass"].startswith("yardstick"):
            groups[case_key(r) + (r["name"],)].append(r)
    out = {}
    for key, recs in groups.items():
        kept = sorted(launcher_choices(recs), key=_rank)
        ids = [r["config_index"] for r in kept]
        out[key] = ids + sorted(r["config_index"] for r in recs if r["config_index"] not in ids)
    return out


def launcher_choices(recs):
    """The configs of one kernel the launcher may run: the spill-free ones (it prunes the others before
    autotuning), or, if none is spill-free, the least-spilling one. Among spill-free configs, those whose wgmma
    ptxas serializes count only if all are: their issue cycles understate their time, so a GPU's autotuning
    would not keep them."""
    free = [r for r in recs if not _spills(r)]
    fast = [r for r in free if not r.get("wgmma_serialized")]
    return fast or free or [min(recs, key=lambda r: r["stack_bytes"])]


def _case_name(key):
    arch, dtype, D, M, grid, E, causal, boundary = key[:8]
    return "x".join(map(str, grid)) + (f"+{E}" if E else "") + (" causal" if causal else "") + \
        (" circ" if boundary == "circular" else "")


def _num(x, fmt=".1f"):
    return "-" if x is None else format(x, fmt)


def _regs(r) -> str:
    """NVIDIA: registers; AMD: VGPRs+AGPRs and the waves per SIMD they allow."""
    if "vgprs" in r:
        return f"{r['vgprs']}v+{r['agprs']}a ({r['waves_per_simd']}w)"
    return str(r["regs"])


def _stack(r) -> str:
    """NVIDIA: stack bytes; AMD: scratch bytes, and VGPR/SGPR spills where there are any."""
    if "vgprs" in r:
        sp = f" sp {r['vgpr_spills']}v/{r['sgpr_spills']}s" if r["vgpr_spills"] or r["sgpr_spills"] else ""
        return f"{r['scratch_bytes']}{sp}"
    return str(r["stack_bytes"])


def render(records, meta) -> str:
    lines = [f"# Kernel report ({meta['date']}, triton {meta['triton']} with torch {meta['torch']}, "
             f"commit {meta['commit']})", "",
             "Compiled code of every Triton kernel of `backend=\"triton\"` and of a textbook FlashAttention-2 "
             "(`benchmarks/yardstick_fa2.py`); no GPU involved. Per 1k (query, key) pairs: issue cycles = hot-loop "
             "instructions x warps / 4 / (tile pairs / 1000) (AMD: max(4 x VALU, all) x waves / 4); tensor cycles = "
             "the loop's matrix multiply-adds at the target's dense rate; atomic cycles = its global atomics at an "
             f"assumed {meta['atomics_per_sm_clock']:g} per SM per cycle (an estimate, see the script's docstring); "
             "bound = the largest of the three. Atomics and bytes are per pair, from the instructions' widths, every "
             "lane counted (stored bytes include the atomics'). regs: NVIDIA registers; AMD VGPRs + AGPRs and the "
             "waves per SIMD they allow. stack: NVIDIA stack bytes; AMD scratch bytes (and spilled VGPRs / SGPRs). "
             "verdict: ok, or too-big (shared memory / LDS over the target's limit), spills, no-mma (dots without "
             "the target's matrix instructions). wgmma: `serialized` where ptxas makes every wgmma wait for the one "
             "before (its advisory C7515); such configs are not chosen where a spill-free one is not.", "",
             "| case | pass | kernel | config | regs | stack | smem | verdict | wgmma | loop insns | mma | tmem | "
             "mufu | load | store | atomic | int | float | other | issue/1k | tensor/1k | atomics/pair | "
             "B loaded/pair | B stored/pair | bound/1k |",
             "| --- | --- | --- | --- |" + " ---: |" * 3 + " --- | --- |" + " ---: |" * 16]
    for r in records:
        case = f"{r['arch']} {r['dtype']} D={r['D']} M={r['M']} " + _case_name(case_key(r))
        if "error" in r:
            lines.append(f"| {case} | {r['pass']} | {r['name']} | {r['config']} | {r['verdict']}: {r['error']} |"
                         + " |" * 20)
            continue
        mix = r["loop_mix"]
        bound = r.get("bound_cycles_per_1k_pairs")
        lines.append(f"| {case} | {r['pass']} | {r['name']} | {r['config']} | {_regs(r)} | {_stack(r)} | "
                     f"{r['shared_bytes']} | {r.get('verdict', '-')} | "
                     f"{'serialized' if r.get('wgmma_serialized') else '-'} | {r['loop_instructions']} | "
                     + " | ".join(str(mix.get(k, 0)) for k in CLASSES)
                     + f" | {_num(r['issue_cycles_per_1k_pairs'])} | {_num(r.get('tensor_cycles_per_1k_pairs'))} | "
                     f"{_num(r.get('atomics_per_pair'), '.3f')} | {_num(r.get('load_bytes_per_pair'), '.2f')} | "
                     f"{_num(r.get('store_bytes_per_pair'), '.2f')} | "
                     + ("-" if bound is None else f"{bound:.1f} ({r['bound']})") + " |")
    lines += ["", "## Pass totals and the yardstick", "",
              "Sum over the pass's per-pair kernels, each at its spill-free config with the lowest bound (in brackets "
              "the sum of each kernel's first candidate's bound), with their issue and tensor cycles beside it; the "
              "yardstick's the same way. Atomics: the pass's sum, and in brackets the most of one kernel.", "",
              "| arch | dtype | D | M | grid | pass | bound/1k | FA2 bound/1k | ratio | issue/1k | FA2 issue/1k | "
              "tensor/1k | FA2 tensor/1k | atomics/pair | B loaded/pair | B stored/pair | max stack |",
              "| --- | --- | ---: | ---: | --- | --- |" + " ---: |" * 11]
    totals = pass_totals(records)
    for key, t in sorted(totals.items()):
        pas = key[-1]
        if pas.startswith("yardstick"):
            continue
        yard = next((v for k, v in totals.items() if k[:3] == key[:3] and k[-1] == "yardstick-" + pas), None)
        ratio = f"{t['bound'] / yard['bound']:.2f}" if yard else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_case_name(key)} | {pas} | "
                     f"{t['bound']:.1f} [{t['first']:.1f}] | {_num(yard['bound'] if yard else None)} | {ratio} | "
                     f"{t['issue']:.1f} | {_num(yard['issue'] if yard else None)} | {t['tensor']:.1f} | "
                     f"{_num(yard['tensor'] if yard else None)} | "
                     f"{t['atomics_per_pair']:.3f} [{t['max_atomics_per_pair']:.3f}] | "
                     f"{t['load_bytes_per_pair']:.2f} | {t['store_bytes_per_pair']:.2f} | {t['spills']} |")
    return "\n".join(lines) + "\n"


TARGET_CASE = ("sm_90a", "bfloat16", 64)
BWD_ISSUE_LIMIT = 150.0
FWD_M_RATIO = 1.5
BWD_M_RATIO = 1.3


def targets(records) -> list:
    """The issues' targets, for those of their cases that the records hold (sm_90a, bf16, D=64, the 32x32 grid),
    each pass's figure the sum of its kernels' bounds (:func:`pass_totals`) unless said: backward M=1 at most the
    yardstick's backward in the same run, and at most 150 issue cycles / 1k pairs; forward M=1 at most the
    yardstick's forward; forward M=4 at most 1.5x M=1, backward M=4 at most 1.3x M=1; 0 spills; and on every
    compiled case, each backward per-pair kernel at most 1/16 global atomic per pair on 1D and 2D grids and 1/8 on
    3D ones."""
    tot = pass_totals(records)
    out = []

    def get(M, pas):
        return tot.get(TARGET_CASE + (M, (32, 32), 0, False, "zero", pas))

    fwd1, bwd1, fwd4, bwd4 = get(1, "fwd"), get(1, "bwd"), get(4, "fwd"), get(4, "bwd")
    yfwd, ybwd = get(1, "yardstick-fwd"), get(1, "yardstick-bwd")
    if bwd1 and ybwd:
        out.append(dict(target="bwd M=1 bound <= the yardstick's backward bound, 0 spills", value=bwd1["bound"],
                        limit=ybwd["bound"], spills=bwd1["spills"],
                        met=bwd1["bound"] <= ybwd["bound"] and bwd1["spills"] == 0))
    if bwd1:
        out.append(dict(target=f"bwd M=1 <= {BWD_ISSUE_LIMIT:g} issue cycles/1k pairs, 0 spills", value=bwd1["issue"],
                        limit=BWD_ISSUE_LIMIT, spills=bwd1["spills"],
                        met=bwd1["issue"] <= BWD_ISSUE_LIMIT and bwd1["spills"] == 0))
    if fwd1 and yfwd:
        out.append(dict(target="fwd M=1 bound <= the yardstick's forward bound, 0 spills", value=fwd1["bound"],
                        limit=yfwd["bound"], spills=fwd1["spills"],
                        met=fwd1["bound"] <= yfwd["bound"] and fwd1["spills"] == 0))
    for one, four, name, ratio in ((fwd1, fwd4, "fwd", FWD_M_RATIO), (bwd1, bwd4, "bwd", BWD_M_RATIO)):
        if one and four:
            out.append(dict(target=f"{name} M=4 bound <= {ratio:g}x {name} M=1, 0 spills",
                            value=four["bound"] / one["bound"], limit=ratio, spills=four["spills"],
                            met=four["bound"] <= ratio * one["bound"] and four["spills"] == 0))
    worst = {}
    for key, t in tot.items():
        if key[-1] != "bwd":
            continue
        dims = len(key[4])
        limit = 1 / 8 if dims == 3 else 1 / 16
        worst[key] = (t["max_atomics_per_pair"], limit)
    if worst:
        key, (value, limit) = max(worst.items(), key=lambda kv: kv[1][0] / kv[1][1])
        out.append(dict(target="backward atomics/pair per kernel <= 1/16 (1D, 2D) and 1/8 (3D), every case",
                        value=value, limit=limit, case=" ".join(map(str, key[:4])) + " " + _case_name(key),
                        spills=0, met=all(v <= lim for v, lim in worst.values())))
    return out


# ---------------------------------------------------------------- the matrix

# the worst first: a variant's status is its best config's, a kernel's the worst of its variants'
_RANK = {"ok": 0, "no-mma": 1, "spills": 2, "too-big": 3, "compile error": 4}


def _status_rank(status: str):
    parts = status.split("+")
    return max(_RANK.get(p, 4) for p in parts), len(parts)


def matrix_cases(D: int = 64, M: int = 1):
    """The problems whose launches the matrix compiles, per dtype and target: a 32x32 grid (every kernel of a
    zero-boundary problem) and a 14x14 grid with one extra token and a circular table (bwd_extra, table_grad)."""
    return [dict(D=D, M=M), dict(D=D, M=M, grid=(14, 14), E=1, boundary="circular")]


def matrix_jobs(archs, dtypes, D: int = 64, M: int = 1, fft: bool = True):
    """Every candidate config of every launch of the matrix cases (each launch name once per dtype and target: its
    first case), and triton-fft's launches once per target (float32: the dtype does not change them)."""
    jobs = []
    for a in archs:
        for d in dtypes:
            seen = set()
            for kw in matrix_cases(D, M):
                case = Case(a, d, **kw)
                names = {launch.name for _, launch in launches_of("triton", case)} - seen
                jobs += jobs_for(case, "triton", only=names)
                seen |= names
        if fft:
            jobs += jobs_for(Case(a, "float32", D, M), "triton-fft")
    return jobs


def matrix(records, dtypes=DTYPES):
    """One entry per (backend, kernel, dtype, target): ``status`` (ok, or the problems of the best config:
    too-big / spills / no-mma, or compile error) and the configs behind it. A launch (one variant of a kernel) is
    ok if at least one of its candidate configs is; a kernel is ok if every variant that the cases launch is.
    triton-fft's records (compiled once, float32) stand for every dtype."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in records:
        for d in (dtypes if r["backend"] == "triton-fft" else (r["dtype"],)):
            groups[(r["backend"], r["name"], d, r["arch"])][(r["pass"], r["variant"], r["D"], r["M"],
                                                              tuple(r["grid"]), r["E"], r["boundary"])].append(r)
    out = []
    for (backend, name, dtype, arch), variants in groups.items():
        worst = None
        for recs in variants.values():
            best = min(recs, key=lambda r: _status_rank(r["verdict"]))
            if worst is None or _status_rank(best["verdict"]) > _status_rank(worst["verdict"]):
                worst = best
        entry = dict(backend=backend, kernel=name, dtype=dtype, arch=arch, status=worst["verdict"],
                     has_dot=max((r["has_dot"] for recs in variants.values() for r in recs if "has_dot" in r),
                                 default=None),
                     configs={v[1] or "": [dict(config=r["config"], verdict=r["verdict"]) for r in recs]
                              for v, recs in variants.items()},
                     example=worst["config"])
        if "error" in worst:
            entry["error"] = worst["error"]
        elif worst["verdict"] != "ok":
            entry.update(shared_bytes=worst["shared_bytes"], smem_limit=worst["smem_limit"],
                         stack_bytes=worst["stack_bytes"], mma_ops=worst.get("mma_ops", {}),
                         spill=_stack(worst) if "vgprs" not in worst else
                         f"scratch {worst['scratch_bytes']} B, spills {worst['vgpr_spills']} VGPR "
                         f"{worst['sgpr_spills']} SGPR")
        out.append(entry)
    order = {a: i for i, a in enumerate(TARGETS)}
    kernel_order = defaultdict(lambda: len(kernel_order))
    for r in records:
        kernel_order[(r["backend"], r["name"])]
    out.sort(key=lambda e: (e["backend"] != "triton", kernel_order[(e["backend"], e["kernel"])],
                            DTYPES.index(e["dtype"]), order.get(e["arch"], 99)))
    return out


_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def render_matrix(entries, meta) -> str:
    archs = [a for a in TARGETS if any(e["arch"] == a for e in entries)]
    cell = {(e["backend"], e["kernel"], e["dtype"], e["arch"]): e for e in entries}
    rows = list(dict.fromkeys((e["backend"], e["kernel"], e["dtype"]) for e in entries))
    lines = [f"# Kernel matrix ({meta['date']}, triton {meta['triton']} with torch {meta['torch']}, commit "
             f"{meta['commit']})", "",
             "Every kernel of `backend=\"triton\"` and `backend=\"triton-fft\"`, every dtype and target, compiled with "
             "each candidate config of the launcher (`kernel_report.py --matrix`; no GPU involved). A cell is `ok` "
             "where at least one candidate of each launch compiles, fits the target (shared memory / LDS within "
             "what a block may use; no spill: NVIDIA stack 0, AMD no spill and no scratch) and, for a kernel with "
             "dots, issues the target's matrix instructions; else the best candidate's problems: `too-big`, "
             "`spills`, `no-mma`, or `compile error` (its first line below). triton-fft's kernels compute in "
             "float32 whatever the dtype (the backend upcasts) and have no dots: one compile stands for all three "
             "dtypes. dots: whether the kernel has `tl.dot` (`?` where no candidate compiled). "
             f"Problem: D={meta['D']}, M={meta['M']}, 32x32 grid (and 14x14 with one extra token and a "
             "circular table for bwd_extra and table_grad).", "",
             "| backend | kernel | dtype | dots | " + " | ".join(
                 f"{a} ({TARGETS[a].gpu.split(' (')[0]})" for a in archs) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(archs)]
    for backend, kernel, dtype in rows:
        es = [cell.get((backend, kernel, dtype, a)) for a in archs]
        known = [e["has_dot"] for e in es if e and e["has_dot"] is not None]
        dots = "?" if not known else "yes" if any(known) else "no"
        lines.append(f"| {backend} | {kernel} | {_SHORT.get(dtype, dtype)} | {dots} | "
                     + " | ".join("-" if e is None else f"**{e['status']}**" if e["status"] != "ok" else "ok"
                                  for e in es) + " |")
    counts = Counter(e["status"] for e in entries)
    lines += ["", "Cells: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: _RANK.get(
        kv[0].split("+")[0], 4))) + f" (of {len(entries)}).", ""]
    errors = defaultdict(list)
    others = []
    for e in entries:
        if "error" in e:
            errors[e["error"]].append(e)
        elif e["status"] != "ok":
            others.append(e)
    if errors:
        lines += ["## Compile errors", "", "| error (first line) | where |", "| --- | --- |"]
        for err, es in errors.items():
            where = "; ".join(f"{e['kernel']} {_SHORT.get(e['dtype'], e['dtype'])} {e['arch']}" for e in es)
            lines.append(f"| {err.replace('|', '/')} | {where} |")
        lines.append("")
    if others:
        lines += ["## Other problems", "", "The best candidate of each cell that is not ok (NVIDIA: stack bytes; AMD: "
                  "scratch bytes and spilled VGPRs / SGPRs, the latter into VGPR lanes).", "",
                  "| kernel | dtype | target | status | config | smem / limit | stack / spills | matrix instructions |",
                  "| --- | --- | --- | --- | --- | ---: | ---: | --- |"]
        for e in others:
            mma = ", ".join(f"{k} {v}" for k, v in e.get("mma_ops", {}).items()) or "none"
            lines.append(f"| {e['kernel']} | {_SHORT.get(e['dtype'], e['dtype'])} | {e['arch']} | {e['status']} | "
                         f"{e['example']} | {e['shared_bytes']} / {e['smem_limit']} | {e['spill']} | {mma} |")
        lines.append("")
    lines += ["## Targets", "", "| target | family | GPU of the rates | shared memory / LDS per block | warp | matrix "
              "instructions | dense multiply-adds per SM (CU) per clock |",
              "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for a in archs:
        t = TARGETS[a]
        lines.append(f"| {a} | {t.family} | {t.gpu} | {t.smem_limit // KIB} KiB | {t.warp_size} | {t.mma_name} | "
                     + ", ".join(f"{k} {v}" for k, v in t.mma_rate.items()) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def ci_jobs(atomic_rate: float = ATOMICS_PER_SM_CLOCK):
    """The representative set CI compiles: sm_90a bf16 D=64 M=1 and M=4 (the targets), fp16 D=128 M=4; sm_80 bf16
    D=64 M=1, fp32 D=64 M=2; the variants (ViT, causal 1D, circular, 3D) and the yardstick; and on every other
    target one kernel, one config: the forward's first candidate, bf16, D=64, M=1; and triton-fft's kernels
    (each once) for sm_90a and gfx942."""
    cases = [Case("sm_90a", "bfloat16", 64, 1), Case("sm_90a", "bfloat16", 64, 4),
             Case("sm_90a", "float16", 128, 4), Case("sm_80", "bfloat16", 64, 1), Case("sm_80", "float32", 64, 2)]
    cases += [Case(a, "bfloat16", 64, 1, grid=(14, 14), E=1) for a in DEFAULT_ARCHS]
    cases += [Case("sm_90a", "bfloat16", 64, 2, grid=(1024,), causal=True),
              Case("sm_90a", "float16", 64, 1, grid=(16, 16), boundary="circular"),
              Case("sm_80", "bfloat16", 32, 1, grid=(8, 16, 16))]
    jobs = [j for c in cases for j in jobs_for(c, "triton", atomic_rate)]
    jobs += [j for c in cases if c.M == 1 and c.E == 0 and c.dtype == "bfloat16" and c.grid == (32, 32)
             for j in jobs_for(c, "yardstick", atomic_rate)]
    jobs += [j for a in TARGETS if a not in DEFAULT_ARCHS
             for j in jobs_for(Case(a, "bfloat16", 64, 1), "triton", atomic_rate, only={"fwd"}, first_config=True)]
    for a in ("sm_90a", "gfx942"):       # triton-fft: each kernel once (its first variant), NVIDIA and AMD
        case = Case(a, "float32", 64, 1)
        first = {}
        for i, (_, launch) in enumerate(launches_of("triton-fft", case)):
            first.setdefault(launch.name, i)
        jobs += [Job("triton-fft", case, i, 0, atomic_rate) for i in first.values()]
    return jobs


def _meta(args, triton_version):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "lisa_kernels"],
                               capture_output=True, text=True, cwd=os.path.dirname(HERE)).stdout.strip()
        commit += " + uncommitted changes to lisa_kernels" if dirty else ""
    except OSError:
        commit = "?"
    import torch
    return dict(date=datetime.date.today().isoformat(), triton=triton_version, torch=torch.__version__.split("+")[0],
                commit=commit, atomics_per_sm_clock=args.atomics_per_sm_clock)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="*", default=None, choices=list(TARGETS) + ["all"],
                    help=f"targets (default {' '.join(DEFAULT_ARCHS)}; --matrix: all)")
    ap.add_argument("--dtype", nargs="*", default=None, choices=DTYPES,
                    help="default bfloat16 float16 (--matrix: all three)")
    ap.add_argument("--D", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--M", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--variants", action="store_true",
                    help="also compile ViT (E=1), causal 1D, circular and 3D variants at the first arch/dtype/D")
    ap.add_argument("--ci", action="store_true",
                    help="the representative set CI compiles: sm_90a bf16 D=64 M=1 and M=4 (the targets), fp16 D=128 "
                         "M=4; sm_80 bf16 D=64 M=1, fp32 D=64 M=2; the variants; and on every other target the "
                         "forward's first config, bf16 D=64 M=1 (overrides --arch/--dtype/--D/--M/--variants)")
    ap.add_argument("--matrix", action="store_true",
                    help="every kernel of triton and triton-fft x dtype x target (--arch, --dtype; D and M: the first "
                         "of --D, --M): whether a candidate config of each compiles spill-free, fits and issues "
                         "matrix instructions")
    ap.add_argument("--no-fft", action="store_true", help="--matrix without triton-fft's kernels")
    ap.add_argument("--no-yardstick", action="store_true")
    ap.add_argument("--atomics-per-sm-clock", type=float, default=ATOMICS_PER_SM_CLOCK,
                    help="the L2 atomic rate that the atomic time assumes (4-byte reductions per SM per cycle)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--json", help="write the records (a JSON list; --matrix: an object) here")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--save", metavar="DIR", help="--matrix: write DIR/kernel_matrix_<date>_triton<version>.json "
                                                  "and .md")
    args = ap.parse_args(argv)
    archs = list(TARGETS) if args.arch is None and args.matrix or args.arch and "all" in args.arch else \
        args.arch or list(DEFAULT_ARCHS)
    dtypes = args.dtype or (list(DTYPES) if args.matrix else ["bfloat16", "float16"])

    import triton
    if args.matrix:
        jobs = matrix_jobs(archs, dtypes, args.D[0], args.M[0], fft=not args.no_fft)
    elif args.ci:
        jobs = ci_jobs(args.atomics_per_sm_clock)
    else:
        cases = [Case(a, d, D, M) for a in archs for d in dtypes for D in args.D for M in args.M]
        if args.variants:
            a, d, D = archs[0], dtypes[0], args.D[0]
            cases += [Case(a, d, D, 1, grid=(14, 14), E=1), Case(a, d, D, 2, grid=(1024,), causal=True),
                      Case(a, d, D, 1, grid=(16, 16), boundary="circular"), Case(a, d, D, 1, grid=(8, 16, 16))]
        jobs = [j for c in cases for j in jobs_for(c, "triton", args.atomics_per_sm_clock)]
        if not args.no_yardstick:
            seen = set()
            for c in cases:
                key = (c.arch, c.dtype, c.D)
                if key not in seen and c.M == 1 and c.E == 0:
                    seen.add(key)
                    jobs += jobs_for(c, "yardstick", args.atomics_per_sm_clock)
    print(f"compiling {len(jobs)} kernel configs with {args.jobs} processes, triton {triton.__version__} ...",
          flush=True)
    step = max(1, len(jobs) // 20)

    def progress(done, total):
        if done % step == 0 or done == total:
            print(f"  {done}/{total}", flush=True)

    records = run_jobs(jobs, args.jobs, progress)
    meta = _meta(args, triton.__version__)
    errors = [r for r in records if "error" in r]
    if args.matrix:
        meta.update(D=args.D[0], M=args.M[0], archs=archs, dtypes=dtypes)
        entries = matrix(records, dtypes)
        text = render_matrix(entries, meta)
        print(text)
        out = dict(meta=meta, matrix=entries, records=records)
        paths = [args.json, args.markdown]
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            stem = os.path.join(args.save, f"kernel_matrix_{meta['date']}_triton{triton.__version__}")
            paths = [args.json or stem + ".json", args.markdown or stem + ".md"]
        if paths[0]:
            with open(paths[0], "w") as f:
                json.dump(out, f, indent=1)
        if paths[1]:
            with open(paths[1], "w") as f:
                f.write(text)
        if any(p for p in paths):
            print("wrote " + ", ".join(p for p in paths if p))
        return 1 if any(e["status"] != "ok" for e in entries) else 0
    text = render(records, meta)
    print(text)
    for t in targets(records):
        print(f"target {t['target']}: {t['value']:.3g} (limit {t['limit']:.3g}), stack {t['spills']} -> "
              f"{'met' if t['met'] else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
