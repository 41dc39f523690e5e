"""What the Triton kernels of lisa_kernels would cost on a GPU, read from their compiled code (no GPU needed).

Every kernel that ``lisa_attention(..., backend="triton")`` launches is compiled, with each configuration the
launcher may pick (all autotune configs), for sm_90a (Hopper) and sm_80 (Ampere); so is a textbook
FlashAttention-2 in Triton (``yardstick_fa2.py``), in the same run. From each cubin:

* registers, stack bytes (> 0 means spills) and shared memory;
* the hot loop: the longest address range of the SASS that ends in a branch back to its start, and its
  instructions by class (tensor-core MMA, MUFU, loads, stores, atomics, integer, float, other);
* issue cycles per 1000 (query, key) pairs = loop instructions x warps / 4 schedulers / (BLOCK_M BLOCK_N / 1000)
  x the programs that process each pair (M > 4 RPE groups split into chunks, each a program over all pairs; the
  table-gradient walkers take 2 groups each): an SM issues at most 4 warp-instructions per cycle, so this is a
  floor on a tile's time from issue alone;
* per pair, from the loop's instructions and their widths (every lane active, each warp of the program):
  global atomics (lane operations of RED/ATOM), global bytes loaded (LDG, LDGSTS) and stored (STG, RED);
* tensor-core cycles per 1k pairs: the loop's MMA work (HGMMA m64nNk, HMMA m16n8k) at the dense rate of the
  arch and input type (sm_90: 2048 bf16/fp16 and 1024 tf32 multiply-adds per SM per cycle, the 989 TFLOP/s of
  an H100 SXM at 1.83 GHz; sm_80: half that, the 312 TFLOP/s of an A100);
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
launcher prunes configs that spill before autotuning, so each kernel contributes its best spill-free config
(what autotuning would aim for; the least-spilling one if none is spill-free); the first kept config's total is
printed too.

    python benchmarks/kernel_report.py                                   # the full matrix, ~10 min on 2 cores
    python benchmarks/kernel_report.py --arch sm_90a --dtype bfloat16 --D 64 --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

ARCHS = {"sm_90a": 90, "sm_80": 80}
DTYPES = ("bfloat16", "float16", "float32")
CLASSES = ("mma", "mufu", "load", "store", "atomic", "integer", "float", "other")

_OPCLASS = [
    ("mma", ("HGMMA", "HMMA", "IMMA", "DMMA", "WARPGROUP")),
    ("mufu", ("MUFU",)),
    ("atomic", ("RED", "REDG", "REDAS", "REDUX", "ATOM", "ATOMG", "ATOMS", "UTMAREDG")),
    ("load", ("LDG", "LDGSTS", "LDS", "LDSM", "LDL", "LD", "LDC", "ULDC", "UTMALDG", "LDGDEPBAR", "UBLKCP")),
    ("store", ("STG", "STS", "STL", "ST", "STSM", "UTMASTG")),
    ("integer", ("IMAD", "IADD3", "IADD", "ISETP", "LOP3", "LOP", "SEL", "SHF", "SHL", "SHR", "LEA", "IMNMX",
                 "VIMNMX", "PRMT", "MOV", "IABS", "IMUL", "FLO", "POPC", "BREV", "SGXT", "BMSK", "VIADD", "UIADD3",
                 "UIMAD", "ULOP3", "USEL", "USHF", "ULEA", "UMOV", "UISETP", "UPRMT", "UFLO", "UPOPC", "USGXT",
                 "UBMSK", "ULOP", "ISCADD", "P2R", "R2P", "PLOP3", "UPLOP3", "R2UR", "S2UR", "S2R", "CS2R", "I2F",
                 "I2FP", "F2I", "UVIADD", "VIADDMNMX")),
    ("float", ("FFMA", "FMUL", "FADD", "FSETP", "FMNMX", "FSEL", "FSET", "F2F", "F2FP", "HADD2", "HMUL2", "HFMA2",
               "HSETP2", "HMNMX2", "FCHK", "FRND", "DADD", "DMUL", "DFMA", "FSWZADD", "FMUL2", "FADD2", "FFMA2")),
]


def opclass(opcode: str) -> str:
    base = opcode.split(".")[0]
    for name, ops in _OPCLASS:
        if base in ops:
            return name
    return "other"


ATOMICS_PER_SM_CLOCK = 1.0
# dense tensor-core multiply-adds per SM per cycle, by arch and input type
MMA_RATE = {90: {"BF16": 2048, "F16": 2048, "TF32": 1024, "E4M3": 4096, "E5M2": 4096},
            80: {"BF16": 1024, "F16": 1024, "TF32": 512}}


def _width(opcode: str) -> int:
    """Bytes per lane of a global load / store / atomic opcode (32-bit unless the opcode says otherwise)."""
    parts = opcode.split(".")
    for p in parts[1:]:
        if p in ("128", "64", "32"):
            return int(p) // 8
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16", "F16", "BF16"):
            return 2
    return 4


def _mma_macs(opcode: str):
    """(multiply-adds per instruction per issuing unit, input type, per-warpgroup?) of an MMA opcode, or None.
    HGMMA.64x128x16.F32.BF16 is one warpgroup's m64n128k16; HMMA.16816.F32.BF16 one warp's m16n8k16."""
    parts = opcode.split(".")
    base = parts[0]
    if base == "HGMMA" and len(parts) > 1 and "x" in parts[1]:
        m, n, k = (int(x) for x in parts[1].split("x"))
        return m * n * k, parts[-1], True
    if base == "HMMA" and len(parts) > 1 and parts[1].isdigit():
        shape = parts[1]
        m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])
        return m * n * k, parts[-1], False
    return None


def loop_metrics(ops, num_warps: int, tile_pairs: int, arch_cc: int, atomics_per_sm_clock: float):
    """Per-pair figures of a hot loop given as a list of opcodes (one tile of tile_pairs pairs per iteration)."""
    lanes = 32 * num_warps / tile_pairs
    atom = load = store = macs = 0.0
    tensor_cycles = 0.0
    for op in ops:
        base = op.split(".")[0]
        if base in ("RED", "REDG", "ATOM", "ATOMG"):
            atom += lanes
            store += _width(op) * lanes
        elif base in ("LDG", "LDGSTS"):
            load += _width(op) * lanes
        elif base == "STG":
            store += _width(op) * lanes
        mma = _mma_macs(op)
        if mma is not None:
            per, ty, group = mma
            per_program = per * (num_warps / 4 if group else num_warps)
            macs += per_program / tile_pairs
            tensor_cycles += per_program / MMA_RATE[arch_cc].get(ty, MMA_RATE[arch_cc]["TF32"]) / tile_pairs
    return dict(atomics_per_pair=atom, load_bytes_per_pair=load, store_bytes_per_pair=store, mma_macs_per_pair=macs,
                tensor_cycles_per_1k_pairs=1000 * tensor_cycles,
                atomic_cycles_per_1k_pairs=1000 * atom / atomics_per_sm_clock)


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
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        return ty, spec == "D"
    except Exception:   # other triton versions: the same rules by hand
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


def compile_launch(launch, config: dict, arch: str):
    """triton.compile of one launch for one config and arch; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = launch.kernel
    args = dict(launch.args)
    args.update({k: v for k, v in config.items() if k not in ("num_warps", "num_stages")})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        value = args[name]
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
    target = GPUTarget("cuda", ARCHS[arch], 32)
    return triton.compile(src, target=target,
                          options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def parse_sass(sass: str):
    """(instructions, loops): instructions as (opcode, text) in order; loops as (start, end) index ranges of
    backward branches (end is the branch)."""
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
    loops = [(labels[t], i) for i, t in branches if t in labels and labels[t] <= i]
    return insns, loops


def hot_loop(sass: str):
    """The opcodes of the longest backward-branch range (NOPs not counted)."""
    insns, loops = parse_sass(sass)
    if not loops:
        return []
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return [op for op, _ in insns[start:end + 1] if not op.startswith("NOP")]


def hot_loop_mix(sass: str):
    """(number of instructions, Counter by class) of the longest backward-branch range (NOPs not counted)."""
    mix = Counter(opclass(op) for op in hot_loop(sass))
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
    import torch
    from lisa_kernels._validate import Problem
    from lisa_kernels.triton_direct import kernel_launches
    N = case.E + math.prod(case.grid)
    p = Problem(B=case.B, H=case.H, N=N, Dk=case.D, Dv=case.D, M=case.M, grid=tuple(case.grid), num_extra=case.E,
                feature_map="elu1", normalize=True, eps=1e-6, boundary=case.boundary, causal=case.causal, scale=1.0,
                dtype=getattr(torch, case.dtype), device=torch.device("meta"))
    return kernel_launches(p)


def yardstick_launches(case: Case):
    import torch
    import yardstick_fa2
    N = max(128, -(-math.prod(case.grid) // 128) * 128)
    return yardstick_fa2.launches(case.B, case.H, N, case.D, getattr(torch, case.dtype))[0]


def run_job(job):
    """Compile one (case, yardstick?, launch index, config index); returns one record."""
    os.environ.pop("TRITON_INTERPRET", None)
    case, yard, li, ci, atomic_rate = job
    passes_launches = yardstick_launches(case) if yard else lisa_launches(case)
    pas, launch = passes_launches[li]
    config = launch.configs(interpreting=False)[ci]
    per_pair = launch.tuned is not None
    pairs = config["BLOCK_M"] * config["BLOCK_N"] if per_pair else None
    reps = getattr(launch, "pair_programs", 1)
    import torch
    import triton
    rec = dict(kernel=launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.name,
               name=launch.name, triton=triton.__version__, torch=torch.__version__.split("+")[0], arch=case.arch,
               dtype=case.dtype, D=case.D, M=case.M, grid=list(case.grid),
               E=case.E, causal=case.causal, boundary=case.boundary,
               **{"pass": ("yardstick-" + pas) if yard else pas},
               config=" ".join(f"{k}={v}" for k, v in config.items()), num_warps=config["num_warps"],
               num_stages=config["num_stages"], block_m=config.get("BLOCK_M"), block_n=config.get("BLOCK_N"),
               pair_programs=reps)
    try:
        c = compile_launch(launch, config, case.arch)
    except Exception as exc:     # a config that does not compile is a finding, not a crash of the report
        rec.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return rec
    regs, stack, sass = resources(c.asm["cubin"])
    serialized = wgmma_serialized(c.asm["ptx"], case.arch) if case.arch == "sm_90a" else ""
    ops = hot_loop(sass)
    mix = Counter(opclass(op) for op in ops)
    n = len(ops)
    rec.update(regs=regs, stack_bytes=stack, shared_bytes=int(c.metadata.shared), loop_instructions=n,
               wgmma_serialized=serialized,
               loop_mix={k: mix.get(k, 0) for k in CLASSES}, tile_pairs=pairs,
               issue_cycles_per_1k_pairs=(reps * n * config["num_warps"] / 4 / (pairs / 1000)) if per_pair else None)
    if per_pair:
        rec.update({k: reps * v for k, v in loop_metrics(ops, config["num_warps"], pairs, ARCHS[case.arch],
                                                         atomic_rate).items()}, atomics_per_sm_clock=atomic_rate)
        rec["bound_cycles_per_1k_pairs"] = max(rec["issue_cycles_per_1k_pairs"], rec["tensor_cycles_per_1k_pairs"],
                                               rec["atomic_cycles_per_1k_pairs"])
        rec["bound"] = max(("issue", "tensor", "atomic"), key=lambda k: rec[f"{k}_cycles_per_1k_pairs"])
    return rec


def jobs_for(case: Case, yard: bool, atomic_rate: float = ATOMICS_PER_SM_CLOCK):
    launches = yardstick_launches(case) if yard else lisa_launches(case)
    return [(case, yard, li, ci, atomic_rate) for li, (_, launch) in enumerate(launches)
            for ci in range(len(launch.configs(interpreting=False)))]


# ---------------------------------------------------------------- summaries

PER_PAIR = ("atomics_per_pair", "load_bytes_per_pair", "store_bytes_per_pair", "tensor_cycles_per_1k_pairs",
            "atomic_cycles_per_1k_pairs", "bound_cycles_per_1k_pairs")


def case_key(r):
    return (r["arch"], r["dtype"], r["D"], r["M"], tuple(r["grid"]), r["E"], r["causal"], r["boundary"])


def pass_totals(records):
    """{(case key..., pass): totals} over the per-pair kernels of each pass. Each kernel contributes the config
    the launcher may keep (spill-free) with the fewest issue cycles; ``best`` sums their issue cycles, ``first``
    the first kept config's, ``spills`` is the largest stack of the kept configs, and the per-pair figures
    (PER_PAIR) are summed over the chosen configs; ``max_atomics_per_pair`` is the largest of one kernel."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("issue_cycles_per_1k_pairs") is None:
            continue
        groups[case_key(r) + (r["pass"],)][r["name"]].append(r)
    out = {}
    for key, kernels in groups.items():
        kept = {name: launcher_choices(recs) for name, recs in kernels.items()}
        chosen = [min(recs, key=lambda x: x["issue_cycles_per_1k_pairs"]) for recs in kept.values()]
        tot = dict(best=sum(x["issue_cycles_per_1k_pairs"] for x in chosen),
                   first=sum(recs[0]["issue_cycles_per_1k_pairs"] for recs in kept.values()),
                   spills=max(x["stack_bytes"] for recs in kept.values() for x in recs),
                   kernels={x["name"]: x["config"] for x in chosen},
                   max_atomics_per_pair=max(x.get("atomics_per_pair", 0.0) for x in chosen))
        for f in PER_PAIR:
            tot[f] = sum(x.get(f, 0.0) for x in chosen)
        out[key] = tot
    return out


def launcher_choices(recs):
    """The configs of one kernel the launcher may run: the spill-free ones (it prunes the others before
    autotuning), or, if none is spill-free, the least-spilling one. Among spill-free configs, those whose wgmma
    ptxas serializes count only if all are: their issue cycles understate their time, so a GPU's autotuning
    would not keep them."""
    free = [r for r in recs if r["stack_bytes"] == 0]
    fast = [r for r in free if not r.get("wgmma_serialized")]
    return fast or free or [min(recs, key=lambda r: r["stack_bytes"])]


def _case_name(key):
    arch, dtype, D, M, grid, E, causal, boundary = key[:8]
    return "x".join(map(str, grid)) + (f"+{E}" if E else "") + (" causal" if causal else "") + \
        (" circ" if boundary == "circular" else "")


def _num(x, fmt=".1f"):
    return "-" if x is None else format(x, fmt)


def render(records, meta) -> str:
    lines = [f"# Kernel report ({meta['date']}, triton {meta['triton']} with torch {meta['torch']}, "
             f"commit {meta['commit']})", "",
             "Compiled code of every Triton kernel of `backend=\"triton\"` and of a textbook FlashAttention-2 "
             "(`benchmarks/yardstick_fa2.py`); no GPU involved. Per 1k (query, key) pairs: issue cycles = hot-loop "
             "instructions x warps / 4 / (tile pairs / 1000); tensor cycles = the loop's MMA multiply-adds at the "
             "arch's dense rate; atomic cycles = its global atomics at an assumed "
             f"{meta['atomics_per_sm_clock']:g} per SM per cycle (an estimate, see the script's docstring); bound = "
             "the largest of the three. Atomics and bytes are per pair, from the SASS widths, every lane counted "
             "(stored bytes include the atomics'). wgmma: `serialized` where ptxas makes every wgmma wait for the one "
             "before (its advisory C7515); such configs are not chosen where a spill-free one is not.", "",
             "| case | pass | kernel | config | regs | stack | smem | wgmma | loop insns | mma | mufu | load | store | "
             "atomic | int | float | other | issue/1k | tensor/1k | atomics/pair | B loaded/pair | B stored/pair | "
             "bound/1k |",
             "| --- | --- | --- | --- |" + " ---: |" * 3 + " --- |" + " ---: |" * 15]
    for r in records:
        case = f"{r['arch']} {r['dtype']} D={r['D']} M={r['M']} " + _case_name(case_key(r))
        if "error" in r:
            lines.append(f"| {case} | {r['pass']} | {r['name']} | {r['config']} | compile error: {r['error']} |"
                         + " |" * 18)
            continue
        mix = r["loop_mix"]
        bound = r.get("bound_cycles_per_1k_pairs")
        lines.append(f"| {case} | {r['pass']} | {r['name']} | {r['config']} | {r['regs']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']} | {'serialized' if r.get('wgmma_serialized') else '-'} | "
                     f"{r['loop_instructions']} | "
                     + " | ".join(str(mix[k]) for k in CLASSES)
                     + f" | {_num(r['issue_cycles_per_1k_pairs'])} | {_num(r.get('tensor_cycles_per_1k_pairs'))} | "
                     f"{_num(r.get('atomics_per_pair'), '.3f')} | {_num(r.get('load_bytes_per_pair'), '.2f')} | "
                     f"{_num(r.get('store_bytes_per_pair'), '.2f')} | "
                     + ("-" if bound is None else f"{bound:.1f} ({r['bound']})") + " |")
    lines += ["", "## Pass totals and the yardstick", "",
              "Sum over the pass's per-pair kernels, each at its best spill-free config (the first config's issue "
              "total in brackets). Atomics: the pass's sum, and in brackets the most of one kernel.", "",
              "| arch | dtype | D | M | grid | pass | issue/1k | FA2 issue/1k | ratio | tensor/1k | atomics/pair | "
              "B loaded/pair | B stored/pair | bound/1k | FA2 bound/1k | max stack |",
              "| --- | --- | ---: | ---: | --- | --- |" + " ---: |" * 10]
    totals = pass_totals(records)
    for key, t in sorted(totals.items()):
        pas = key[-1]
        if pas.startswith("yardstick"):
            continue
        yard = next((v for k, v in totals.items() if k[:3] == key[:3] and k[-1] == "yardstick-" + pas), None)
        ystr = f"{yard['best']:.1f} [{yard['first']:.1f}]" if yard else "-"
        ratio = f"{t['best'] / yard['best']:.2f}" if yard else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_case_name(key)} | {pas} | "
                     f"{t['best']:.1f} [{t['first']:.1f}] | {ystr} | {ratio} | {t['tensor_cycles_per_1k_pairs']:.1f} | "
                     f"{t['atomics_per_pair']:.3f} [{t['max_atomics_per_pair']:.3f}] | "
                     f"{t['load_bytes_per_pair']:.2f} | {t['store_bytes_per_pair']:.2f} | "
                     f"{t['bound_cycles_per_1k_pairs']:.1f} | "
                     f"{_num(yard['bound_cycles_per_1k_pairs'] if yard else None)} "
                     f"| {t['spills']} |")
    return "\n".join(lines) + "\n"


TARGET_CASE = ("sm_90a", "bfloat16", 64)
BWD_LIMIT = 150.0
M_RATIO = 1.5


def targets(records) -> list:
    """The issue's targets, for those of its cases that the records hold (sm_90a, bf16, D=64, the 32x32 grid):
    backward M=1 <= 150 issue cycles / 1k pairs; forward M=1 <= the yardstick's forward in the same run; M=4
    forward and backward <= 1.5x M=1's; 0 spills; and on every compiled case, each backward per-pair kernel at most
    1/16 global atomic per pair on 1D and 2D grids and 1/8 on 3D ones."""
    tot = pass_totals(records)
    out = []

    def get(M, pas):
        return tot.get(TARGET_CASE + (M, (32, 32), 0, False, "zero", pas))

    fwd1, bwd1, fwd4, bwd4, yfwd = get(1, "fwd"), get(1, "bwd"), get(4, "fwd"), get(4, "bwd"), \
        get(1, "yardstick-fwd")
    if bwd1:
        out.append(dict(target=f"bwd M=1 <= {BWD_LIMIT:g} issue cycles/1k pairs, 0 spills", value=bwd1["best"],
                        limit=BWD_LIMIT, spills=bwd1["spills"], met=bwd1["best"] <= BWD_LIMIT and bwd1["spills"] == 0))
    if fwd1 and yfwd:
        out.append(dict(target="fwd M=1 <= the yardstick's fwd, 0 spills", value=fwd1["best"], limit=yfwd["best"],
                        spills=fwd1["spills"], met=fwd1["best"] <= yfwd["best"] and fwd1["spills"] == 0))
    for one, four, name in ((fwd1, fwd4, "fwd"), (bwd1, bwd4, "bwd")):
        if one and four:
            out.append(dict(target=f"{name} M=4 <= {M_RATIO:g}x {name} M=1, 0 spills", value=four["best"] / one["best"],
                            limit=M_RATIO, spills=four["spills"],
                            met=four["best"] <= M_RATIO * one["best"] and four["spills"] == 0))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--dtype", nargs="*", default=["bfloat16", "float16"], choices=DTYPES)
    ap.add_argument("--D", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--M", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--variants", action="store_true",
                    help="also compile ViT (E=1), causal 1D, circular and 3D variants at the first arch/dtype/D")
    ap.add_argument("--ci", action="store_true",
                    help="the representative set CI compiles: sm_90a bf16 D=64 M=1 and M=4 (the targets), fp16 D=128 "
                         "M=4; sm_80 bf16 D=64 M=1, fp32 D=64 M=2; and the variants (overrides --arch/--dtype/--D/"
                         "--M/--variants)")
    ap.add_argument("--no-yardstick", action="store_true")
    ap.add_argument("--atomics-per-sm-clock", type=float, default=ATOMICS_PER_SM_CLOCK,
                    help="the L2 atomic rate that the atomic time assumes (4-byte reductions per SM per cycle)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", help="write the records (a JSON list) here")
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args(argv)

    cases = [Case(a, d, D, M) for a in args.arch for d in args.dtype for D in args.D for M in args.M]
    if args.ci:
        cases = [Case("sm_90a", "bfloat16", 64, 1), Case("sm_90a", "bfloat16", 64, 4),
                 Case("sm_90a", "float16", 128, 4), Case("sm_80", "bfloat16", 64, 1), Case("sm_80", "float32", 64, 2)]
        cases += [Case(a, "bfloat16", 64, 1, grid=(14, 14), E=1) for a in ARCHS]
        cases += [Case("sm_90a", "bfloat16", 64, 2, grid=(1024,), causal=True),
                  Case("sm_90a", "float16", 64, 1, grid=(16, 16), boundary="circular"),
                  Case("sm_80", "bfloat16", 32, 1, grid=(8, 16, 16))]
    elif args.variants:
        a, d, D = args.arch[0], args.dtype[0], args.D[0]
        cases += [Case(a, d, D, 1, grid=(14, 14), E=1), Case(a, d, D, 2, grid=(1024,), causal=True),
                  Case(a, d, D, 1, grid=(16, 16), boundary="circular"), Case(a, d, D, 1, grid=(8, 16, 16))]
    jobs = [j for c in cases for j in jobs_for(c, False, args.atomics_per_sm_clock)]
    if not args.no_yardstick:
        seen = set()
        for c in cases:
            key = (c.arch, c.dtype, c.D)
            if key not in seen and c.M == 1 and c.E == 0:
                seen.add(key)
                jobs += jobs_for(c, True, args.atomics_per_sm_clock)
    import triton
    print(f"compiling {len(jobs)} kernel configs with {args.jobs} processes, triton {triton.__version__} ...",
          flush=True)
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(run_job, jobs))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = "?"
    import torch
    meta = dict(date=datetime.date.today().isoformat(), triton=triton.__version__,
                torch=torch.__version__.split("+")[0], commit=commit, atomics_per_sm_clock=args.atomics_per_sm_clock)
    text = render(records, meta)
    print(text)
    tg = targets(records)
    for t in tg:
        print(f"target {t['target']}: {t['value']:.3g} (limit {t['limit']:.3g}), stack {t['spills']} -> "
              f"{'met' if t['met'] else 'NOT met'}")
    errors = [r for r in records if "error" in r]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
