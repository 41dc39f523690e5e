"""What the Triton kernels of lisa_kernels would cost on a GPU, read from their compiled code (no GPU needed).

Every kernel that ``lisa_attention(..., backend="triton")`` launches is compiled, with each configuration the
launcher may pick (all autotune configs), for sm_90a (Hopper) and sm_80 (Ampere); so is a textbook
FlashAttention-2 in Triton (``yardstick_fa2.py``), in the same run. From each cubin:

* registers, stack bytes (> 0 means spills) and shared memory;
* the hot loop: the longest address range of the SASS that ends in a branch back to its start, and its
  instructions by class (tensor-core MMA, MUFU, loads, stores, atomics, integer, float, other);
* issue cycles per 1000 (query, key) pairs = loop instructions x warps / 4 schedulers / (BLOCK_M BLOCK_N / 1000):
  an SM issues at most 4 warp-instructions per cycle, so this is a floor on a tile's time from issue alone.

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


def hot_loop_mix(sass: str):
    """(number of instructions, Counter by class) of the longest backward-branch range (NOPs not counted)."""
    insns, loops = parse_sass(sass)
    if not loops:
        return 0, Counter()
    start, end = max(loops, key=lambda se: se[1] - se[0])
    mix = Counter(opclass(op) for op, _ in insns[start:end + 1] if not op.startswith("NOP"))
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
    case, yard, li, ci = job
    passes_launches = yardstick_launches(case) if yard else lisa_launches(case)
    pas, launch = passes_launches[li]
    config = launch.configs(interpreting=False)[ci]
    per_pair = launch.tuned is not None
    pairs = config["BLOCK_M"] * config["BLOCK_N"] if per_pair else None
    import torch
    import triton
    rec = dict(kernel=launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.name,
               name=launch.name, triton=triton.__version__, torch=torch.__version__.split("+")[0], arch=case.arch, dtype=case.dtype, D=case.D, M=case.M, grid=list(case.grid),
               E=case.E, causal=case.causal, boundary=case.boundary,
               **{"pass": ("yardstick-" + pas) if yard else pas},
               config=" ".join(f"{k}={v}" for k, v in config.items()), num_warps=config["num_warps"],
               num_stages=config["num_stages"], block_m=config.get("BLOCK_M"), block_n=config.get("BLOCK_N"))
    try:
        c = compile_launch(launch, config, case.arch)
    except Exception as exc:     # a config that does not compile is a finding, not a crash of the report
        rec.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return rec
    regs, stack, sass = resources(c.asm["cubin"])
    n, mix = hot_loop_mix(sass)
    rec.update(regs=regs, stack_bytes=stack, shared_bytes=int(c.metadata.shared), loop_instructions=n,
               loop_mix={k: mix.get(k, 0) for k in CLASSES}, tile_pairs=pairs,
               issue_cycles_per_1k_pairs=(n * config["num_warps"] / 4 / (pairs / 1000)) if per_pair else None)
    return rec


def jobs_for(case: Case, yard: bool):
    launches = yardstick_launches(case) if yard else lisa_launches(case)
    return [(case, yard, li, ci) for li, (_, launch) in enumerate(launches)
            for ci in range(len(launch.configs(interpreting=False)))]


# ---------------------------------------------------------------- summaries

def pass_totals(records):
    """{(case key, pass): (best total, first-config total, zero-spill?)} over the per-pair kernels."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("issue_cycles_per_1k_pairs") is None:
            continue
        key = (r["arch"], r["dtype"], r["D"], r["M"], tuple(r["grid"]), r["E"], r["causal"], r["boundary"],
               r["pass"])
        groups[key][r["name"]].append(r)
    out = {}
    for key, kernels in groups.items():
        kept = {name: launcher_choices(recs) for name, recs in kernels.items()}
        best = sum(min(x["issue_cycles_per_1k_pairs"] for x in recs) for recs in kept.values())
        first = sum(recs[0]["issue_cycles_per_1k_pairs"] for recs in kept.values())
        spills = max(x["stack_bytes"] for recs in kept.values() for x in recs)
        out[key] = (best, first, spills)
    return out


def launcher_choices(recs):
    """The configs of one kernel the launcher may run: the spill-free ones (it prunes the others before
    autotuning), or, if none is spill-free, the least-spilling one."""
    free = [r for r in recs if r["stack_bytes"] == 0]
    return free or [min(recs, key=lambda r: r["stack_bytes"])]


def render(records, meta) -> str:
    lines = [f"# Kernel report ({meta['date']}, triton {meta['triton']} with torch {meta['torch']}, "
             f"commit {meta['commit']})", "",
             "Compiled code of every Triton kernel of `backend=\"triton\"` and of a textbook FlashAttention-2 "
             "(`benchmarks/yardstick_fa2.py`); no GPU involved. Issue cycles per 1k (query, key) pairs = hot-loop "
             "instructions x warps / 4 / (tile pairs / 1000).", "",
             "| case | pass | kernel | config | regs | stack | smem | loop insns | mma | mufu | load | store | "
             "atomic | int | float | other | cycles/1k pairs |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    for r in records:
        case = f"{r['arch']} {r['dtype']} D={r['D']} M={r['M']} {'x'.join(map(str, r['grid']))}" + \
            (f" E={r['E']}" if r["E"] else "") + (" causal" if r["causal"] else "") + \
            (" circ" if r["boundary"] == "circular" else "")
        if "error" in r:
            lines.append(f"| {case} | {r['pass']} | {r['name']} | {r['config']} | compile error: {r['error']} |"
                         + " |" * 12)
            continue
        mix = r["loop_mix"]
        cyc = r["issue_cycles_per_1k_pairs"]
        lines.append(f"| {case} | {r['pass']} | {r['name']} | {r['config']} | {r['regs']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']} | {r['loop_instructions']} | "
                     + " | ".join(str(mix[k]) for k in CLASSES) + f" | {'-' if cyc is None else f'{cyc:.1f}'} |")
    lines += ["", "## Pass totals (best config per kernel; first config in brackets) and ratio to the yardstick", "",
              "| arch | dtype | D | M | grid | pass | LiSA | FlashAttention-2 | ratio | max stack bytes |",
              "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    totals = pass_totals(records)
    for key, (best, first, spills) in sorted(totals.items()):
        arch, dtype, D, M, grid, E, causal, boundary, pas = key
        if pas.startswith("yardstick"):
            continue
        yard = next((v for k, v in totals.items() if k[:3] == key[:3] and k[-1] == "yardstick-" + pas), None)
        ystr = f"{yard[0]:.1f} [{yard[1]:.1f}]" if yard else "-"
        ratio = f"{best / yard[0]:.2f}" if yard else "-"
        gname = "x".join(map(str, grid)) + (f"+{E}" if E else "") + (" causal" if causal else "") + \
            (" circ" if boundary == "circular" else "")
        lines.append(f"| {arch} | {dtype} | {D} | {M} | {gname} | {pas} | {best:.1f} [{first:.1f}] | {ystr} | {ratio} "
                     f"| {spills} |")
    return "\n".join(lines) + "\n"


def targets(records) -> list:
    """The issue's targets at sm_90a, bf16, D=64, M=1 (32x32 grid): fwd <= 100, bwd <= 250 issue cycles / 1k pairs,
    no spills."""
    out = []
    for key, (best, _first, spills) in pass_totals(records).items():
        arch, dtype, D, M, grid, E, causal, boundary, pas = key
        if (arch, dtype, D, M, grid, E, causal, boundary) != ("sm_90a", "bfloat16", 64, 1, (32, 32), 0, False, "zero"):
            continue
        limit = {"fwd": 100.0, "bwd": 250.0}.get(pas)
        if limit is not None:
            out.append(dict(target=f"{pas} <= {limit:g} cycles/1k pairs, 0 spills", value=best, spills=spills,
                            met=best <= limit and spills == 0))
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
                    help="the representative set CI compiles: both archs; bf16 D=64 M=1, fp16 D=128 M=4, fp32 D=64 "
                         "M=2, and the variants (overrides --arch/--dtype/--D/--M/--variants)")
    ap.add_argument("--no-yardstick", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", help="write the records (a JSON list) here")
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args(argv)

    cases = [Case(a, d, D, M) for a in args.arch for d in args.dtype for D in args.D for M in args.M]
    if args.ci:
        cases = [Case(a, d, D, M) for a in ARCHS for d, D, M in (("bfloat16", 64, 1), ("float16", 128, 4),
                                                                  ("float32", 64, 2))]
        cases += [Case(a, "bfloat16", 64, 1, grid=(14, 14), E=1) for a in ARCHS]
        cases += [Case("sm_90a", "bfloat16", 64, 2, grid=(1024,), causal=True),
                  Case("sm_90a", "float16", 64, 1, grid=(16, 16), boundary="circular"),
                  Case("sm_80", "bfloat16", 32, 1, grid=(8, 16, 16))]
    elif args.variants:
        a, d, D = args.arch[0], args.dtype[0], args.D[0]
        cases += [Case(a, d, D, 1, grid=(14, 14), E=1), Case(a, d, D, 2, grid=(1024,), causal=True),
                  Case(a, d, D, 1, grid=(16, 16), boundary="circular"), Case(a, d, D, 1, grid=(8, 16, 16))]
    jobs = [j for c in cases for j in jobs_for(c, False)]
    if not args.no_yardstick:
        seen = set()
        for c in cases:
            key = (c.arch, c.dtype, c.D)
            if key not in seen and c.M == 1 and c.E == 0:
                seen.add(key)
                jobs += jobs_for(c, True)
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
                torch=torch.__version__.split("+")[0], commit=commit)
    text = render(records, meta)
    print(text)
    tg = targets(records)
    for t in tg:
        print(f"target {t['target']}: {t['value']:.1f}, stack {t['spills']} -> {'met' if t['met'] else 'NOT met'}")
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
