"""benchmarks/kernel_report.py and its yardstick: the SASS and AMDGCN reading, the yardstick's correctness, the
kernel matrix's bookkeeping, and the compiled-code properties of every Triton kernel of backend="triton" (no
spills; the issue's cycle targets) and, on every target the report knows (sm_80 ... sm_120, gfx942, gfx950), of a
representative kernel (its numbers sane, its matrix instructions found).

Compiling for a GPU needs no GPU, but it needs Triton *without* its interpreter, so the compile test runs the
report in a subprocess with TRITON_INTERPRET unset.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lisa_kernels.triton_direct import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/                   MUFU.EX2 R3, R3 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R6.64] ;
        /*0040*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R8.64], R9 ;
        /*0050*/                   IMAD.WIDE R8, R2, 0x4, R10 ;
        /*0060*/                   FFMA R3, R4, R5, R3 ;
        /*0070*/                   NOP ;
        /*0080*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0090*/                   FADD R3, R4, R5 ;
        /*00a0*/                   BRA `(.L_x_1) ;
        /*00b0*/                   EXIT ;
"""


def test_hot_loop_is_the_longest_backward_branch():
    import kernel_report as kr
    n, mix = kr.hot_loop_mix(SASS)
    assert n == 7            # HGMMA .. BRA, the NOP not counted
    assert mix == {"mma": 1, "mufu": 1, "load": 1, "atomic": 1, "integer": 1, "float": 1, "other": 1}


def test_loop_metrics_from_sass_widths():
    """Per pair, from one 64x64 tile per iteration with 4 warps (128 lanes): the HGMMA is one warpgroup's
    m64n64k16 (65536 multiply-adds at 2048 per SM-cycle on sm_90), the LDGSTS.128 loads 16 bytes per lane and the
    REDG is one atomic of 4 bytes per lane."""
    import kernel_report as kr
    ops = kr.hot_loop(SASS)
    m = kr.loop_metrics(ops, num_warps=4, tile_pairs=64 * 64, arch_cc=90, atomics_per_sm_clock=1.0)
    assert m["atomics_per_pair"] == 128 / 4096
    assert m["load_bytes_per_pair"] == 16 * 128 / 4096
    assert m["store_bytes_per_pair"] == 4 * 128 / 4096
    assert m["mma_macs_per_pair"] == 64 * 64 * 16 / 4096
    assert m["tensor_cycles_per_1k_pairs"] == 1000 * 64 * 64 * 16 / 2048 / 4096
    assert m["atomic_cycles_per_1k_pairs"] == 1000 * 128 / 4096
    m8 = kr.loop_metrics(["HMMA.16816.F32.BF16", "LDG.E.64", "STG.E.U16", "RED.E.ADD.F32.FTZ.RN"], num_warps=8,
                         tile_pairs=128 * 64, arch_cc=80, atomics_per_sm_clock=0.5)
    lanes = 8 * 32 / (128 * 64)
    assert m8["mma_macs_per_pair"] == 16 * 8 * 16 * 8 / (128 * 64)
    assert m8["load_bytes_per_pair"] == 8 * lanes and m8["store_bytes_per_pair"] == (2 + 4) * lanes
    assert m8["atomic_cycles_per_1k_pairs"] == 1000 * lanes / 0.5


def test_opcodes_are_classified():
    import kernel_report as kr
    assert kr.opclass("HMMA.16816.F32.BF16") == "mma"
    assert kr.opclass("LDS.128") == "load" and kr.opclass("STS.64") == "store"
    assert kr.opclass("RED.E.ADD.F32") == "atomic" and kr.opclass("ISETP.GE.AND") == "integer"
    assert kr.opclass("F2FP.BF16.F32.PACK_AB") == "float"


# sm_100a: the instruction descriptor of each UTCHMMA comes from a UMOV (0x4200490: M=64, N=128, bf16); TMEM loads
# and stores; the mbarrier wait's retry is an out-of-line block after EXIT that jumps back into the loop (not a loop)
SASS_SM100 = """
        /*0000*/                   UMOV UR35, 0x4200490 ;
        /*0010*/                   UMOV UR41, 0x4110490 ;
.L_x_1:
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR57], R4 ;
        /*0030*/              @!P0 BRA `(.L_x_5) ;
.L_x_2:
        /*0040*/                   UTCHMMA gdesc[UR12], gdesc[UR14], tmem[UR62], tmem[UR34], idesc[UR35], !UPT ;
        /*0050*/                   UTCHMMA tmem[UR12], gdesc[UR16], tmem[UR10], tmem[UR40], idesc[UR41], UPT ;
        /*0060*/                   LDTM.16dp32bit_t0_t15.x64 R4, tmem[UR11+0x100000] ;
        /*0070*/                   STTM.16dp32bit_t0_t15.x32 tmem[UR11], R8 ;
        /*0080*/                   FFMA R3, R4, R5, R3 ;
        /*0090*/              @!P1 BRA.U `(.L_x_1) ;
        /*00a0*/                   EXIT ;
.L_x_5:
        /*00b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR57], R4 ;
        /*00c0*/              @!P0 BRA `(.L_x_5) ;
        /*00d0*/                   BRA `(.L_x_2) ;
"""


def test_blackwell_tcgen05_shapes_tmem_and_out_of_line_waits():
    """UTCHMMA gets the shape of its instruction descriptor (M=64 N=128 and N=64, k=16 for bf16), LDTM/STTM count
    as TMEM, the loop is .L_x_1 .. the BRA.U (not the retry block's jump back, which spans the EXIT), and the
    tensor cycles are one program's multiply-adds (tcgen05.mma is issued once per CTA) at B200's 4096 bf16
    multiply-adds per SM-cycle."""
    import kernel_report as kr
    assert kr.decode_idesc("UTCHMMA", 0x4200490) == (64, 128, 16, "BF16")
    assert kr.decode_idesc("UTCHMMA", 0x4110490) == (64, 64, 16, "BF16")
    ops = kr.hot_loop(SASS_SM100)
    assert ops == ["SYNCS.PHASECHK.TRANS64.TRYWAIT", "BRA", "UTCHMMA.64x128x16.BF16", "UTCHMMA.64x64x16.BF16",
                   "LDTM.16dp32bit_t0_t15.x64", "STTM.16dp32bit_t0_t15.x32", "FFMA", "BRA.U"]
    n, mix = kr.hot_loop_mix(SASS_SM100)
    assert mix["mma"] == 2 and mix["tmem"] == 2 and mix["float"] == 1
    m = kr.loop_metrics(ops, num_warps=4, tile_pairs=64 * 128, arch_cc="sm_100a", atomics_per_sm_clock=1.0)
    macs = 64 * 128 * 16 + 64 * 64 * 16
    assert m["mma_macs_per_pair"] == macs / (64 * 128)
    assert m["tensor_cycles_per_1k_pairs"] == 1000 * macs / 4096 / (64 * 128)
    assert kr.TARGETS["sm_100a"].issues_mma("UTCHMMA") and not kr.TARGETS["sm_100a"].issues_mma("UTCBAR")


AMDGCN = """
\t.amdgcn_target "amdgcn-amd-amdhsa--gfx942"
_k:
\ts_load_dwordx2 s[2:3], s[0:1], 0x0
\ts_cbranch_scc1 .LBB0_3
.LBB0_2:                                ; =>This Inner Loop Header: Depth=1
\t.loc\t1 120 20 is_stmt 1              ; k.py:120:20
\tglobal_load_dwordx4 v[146:149], v[18:19], off
\ts_waitcnt vmcnt(0)
\tds_read_b128 v[116:119], v97
\tv_mfma_f32_32x32x8_f16 v[18:33], v[116:117], v[108:109], v[18:33]
\tv_mfma_f32_32x32x4_xf32 v[34:49], v1, v2, v[34:49]
\tv_exp_f32_e32 v5, v5
\tv_add_u32_e32 v97, 0x2000, v83
\tv_fma_f32 v3, v4, v5, v3
\tglobal_atomic_add_f32 v[20:21], v6, off
\ts_nop 1
\ts_add_i32 s28, s28, 32
\ts_cmp_lt_i32 s28, s29
\ts_cbranch_scc1 .LBB0_2
.LBB0_3:
\tglobal_store_dwordx2 v[20:21], v[6:7], off
\ts_endpgm
.Lfunc_end0:
; NumVgprs: 154
; NumAgprs: 8
; TotalNumVgprs: 164
; ScratchSize: 0
; AccumOffset: 156
; Occupancy: 3
    .sgpr_count:     40
    .sgpr_spill_count: 0
    .vgpr_count:     164
    .vgpr_spill_count: 2
"""


def test_amdgcn_hot_loop_resources_and_mfma():
    """AMDGCN: the loop is .LBB0_2 .. its s_cbranch_scc1 (s_nop not counted); v_mfma MxNxK per wave at MI300X's
    rates (fp16 1024, xf32 512 multiply-adds per CU-cycle); 64-lane waves for the per-pair bytes; issue
    max(4 x VALU, all) x waves / 4; VGPRs, AGPRs, spills and occupancy (156 + 8 -> 168 of 512 per SIMD lane:
    3 waves) from the kernel info and metadata."""
    import kernel_report as kr
    n, mix = kr.hot_loop_mix(AMDGCN)
    assert n == 12
    assert mix == {"load": 2, "other": 2, "mma": 2, "mufu": 1, "integer": 3, "float": 1, "atomic": 1}
    ops = kr.hot_loop(AMDGCN)
    m = kr.loop_metrics(ops, num_warps=4, tile_pairs=64 * 32, arch_cc="gfx942", atomics_per_sm_clock=1.0)
    lanes = 64 * 4 / (64 * 32)
    assert m["load_bytes_per_pair"] == 16 * lanes and m["store_bytes_per_pair"] == 4 * lanes
    assert m["atomics_per_pair"] == lanes
    assert m["mma_macs_per_pair"] == 4 * (32 * 32 * 8 + 32 * 32 * 4) / (64 * 32)
    assert m["tensor_cycles_per_1k_pairs"] == 1000 * 4 * (32 * 32 * 8 / 1024 + 32 * 32 * 4 / 512) / (64 * 32)
    valu = 3                     # v_exp, v_add, v_fma (the v_mfma are not VALU)
    assert kr.issue_cycles(ops, 4, "gfx942") == max(4 * valu, n) * 4 / 4 == 12
    res = kr.amd_resources(AMDGCN)
    assert res == dict(vgprs=154, agprs=8, sgprs=40, vgpr_spills=2, sgpr_spills=0, scratch_bytes=0,
                       waves_per_simd=3, llvm_occupancy=3)
    assert kr.TARGETS["gfx950"].issues_mma("v_mfma_f32_16x16x32_bf16")
    assert kr._mma_macs("v_mfma_f32_32x32x4_2b_f16") == (32 * 32 * 4 * 2, "F16", "warp")
    assert kr._mma_macs("v_mfma_f32_16x16x32_bf16") == (16 * 16 * 32, "BF16", "warp")
    assert kr._mma_macs("v_mfma_f32_32x32x8bf16_1k") == (32 * 32 * 8, "BF16", "warp")


def test_fp16_hmma_takes_the_fp16_rate():
    """HMMA and HGMMA with fp16 inputs name no input type (HMMA.16816.F32): the fp16 rate, not tf32's."""
    import kernel_report as kr
    assert kr._mma_macs("HMMA.16816.F32") == (16 * 8 * 16, "F16", "warp")
    assert kr._mma_macs("HMMA.1684.F32.TF32") == (16 * 8 * 4, "TF32", "warp")
    assert kr._mma_macs("HGMMA.64x64x16.F32") == (64 * 64 * 16, "F16", "warpgroup")


def test_every_target_is_described():
    """Each --arch target: its backend, warp size, shared memory per block, a bf16 rate, its matrix opcodes."""
    import kernel_report as kr
    assert set(kr.TARGETS) == {"sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120", "gfx942", "gfx950"}
    limits = {"sm_80": 163, "sm_89": 99, "sm_90a": 227, "sm_100a": 227, "sm_120": 99, "gfx942": 64, "gfx950": 160}
    for name, t in kr.TARGETS.items():
        assert t.smem_limit == limits[name] * 1024
        assert t.warp_size == (64 if t.backend == "hip" else 32)
        assert t.mma_rate["BF16"] >= 256 and t.mma_rate["BF16"] == t.mma_rate["F16"]
    assert kr.target_of(90) is kr.TARGETS["sm_90a"] and kr.target_of("gfx950") is kr.TARGETS["gfx950"]


def test_compile_errors_are_one_line():
    """A front-end CompilationError gives its location and message; an MLIR / assembler failure its first
    "error:" diagnostic; an exception raised outside Triton's code is not taken for a compile failure."""
    import ast
    import kernel_report as kr
    from triton.compiler.errors import CompilationError
    node = ast.parse("x = f(a)").body[0]
    exc = CompilationError("x = f(a)", node, "TypeError(\"missing a required argument: 'ISA'\")")
    assert kr.compile_error_line(exc) == ("CompilationError: at 1:0: TypeError(\"missing a required argument: "
                                          "'ISA'\")")
    line = kr.compile_error_line(RuntimeError("LLD failed to link hsaco source /tmp/a into object file /tmp/b"),
                                 "<inline asm>:1:2: error: unexpected token at start of statement\nmore\n")
    assert line.startswith("RuntimeError: LLD failed") and "[<inline asm>:1:2: error: unexpected token" in line
    try:
        raise RuntimeError("not Triton's")
    except RuntimeError as e:
        assert not kr._raised_by_triton(e)


def _rec(name, arch, verdict, dtype="bfloat16", backend="triton", variant="", config="c0", **kw):
    return dict(backend=backend, name=name, kernel=name, arch=arch, dtype=dtype, verdict=verdict, variant=variant,
                config=config, D=64, M=1, grid=[32, 32], E=0, boundary="zero", has_dot=backend == "triton",
                shared_bytes=1024, smem_limit=65536, stack_bytes=0, mma_ops={}, **{"pass": "fwd"}, **kw)


def test_matrix_cells():
    """A launch is ok if one candidate is; a kernel is as bad as its worst launch variant; a compile error keeps its
    line; triton-fft's float32 records stand for every dtype."""
    import kernel_report as kr
    recs = [_rec("fwd", "gfx942", "spills", config="a"), _rec("fwd", "gfx942", "ok", config="b"),
            _rec("dq", "gfx942", "spills"), _rec("dq", "gfx942", "too-big+spills", config="c1"),
            _rec("dkv", "gfx942", "compile error", error="RuntimeError: boom"),
            _rec("fft_form", "gfx942", "ok", dtype="float32", backend="triton-fft", variant="HAS_LAST=0"),
            _rec("fft_form", "gfx942", "no-mma", dtype="float32", backend="triton-fft", variant="HAS_LAST=1")]
    cells = {(e["kernel"], e["dtype"]): e for e in kr.matrix(recs)}
    assert cells[("fwd", "bfloat16")]["status"] == "ok"
    assert cells[("dq", "bfloat16")]["status"] == "spills"
    assert cells[("dkv", "bfloat16")]["status"] == "compile error"
    assert cells[("dkv", "bfloat16")]["error"] == "RuntimeError: boom"
    assert {d for k, d in cells if k == "fft_form"} == set(kr.DTYPES)
    assert cells[("fft_form", "float16")]["status"] == "no-mma"
    text = kr.render_matrix(kr.matrix(recs), dict(date="d", triton="t", torch="x", commit="c", D=64, M=1))
    assert "| triton | fwd | bf16 | yes | ok |" in text and "RuntimeError: boom" in text


def test_the_fft_backend_kernels_are_reached():
    """The report reaches triton-fft's five kernels (recording the launches of its forward and backward on meta
    tensors), with every argument of each, and restores the module's kernels."""
    import kernel_report as kr
    from lisa_kernels import triton_fft
    before = triton_fft.lisa_fft_form_kernel
    launches = kr.fft_launches(kr.Case("sm_90a", "float32", 16, 1, grid=(8, 8), B=1, H=2))
    assert triton_fft.lisa_fft_form_kernel is before
    names = {launch.name for _, launch in launches}
    assert names == {"fft_form", "fft_spectral", "fft_contract", "fft_contract_mc", "fft_corr"}
    for _, launch in launches:
        assert set(launch.kernel.arg_names) <= set(launch.args), launch.name
    assert {p for p, _ in launches} == {"fft-fwd", "fft-bwd"}


def test_wgmma_serialization_advisory_is_read():
    """ptxas's advisory (as ptxas 12.x / 13.x print it) gives the reason; a log without one gives ""."""
    import kernel_report as kr
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
           "stage in the function '_fwd_kernel'\nptxas info    : Used 216 registers, used 1 barriers\n")
    assert kr.serialization_reason(log).startswith("non wgmma instructions defining accumulator registers")
    assert kr.serialization_reason("ptxas info    : Used 128 registers\n") == ""


NO_TRITON_RUNTIME = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
NO_TRITON_REASON = ("no CUDA GPU and TRITON_INTERPRET is not 1: the yardstick cannot run (tests/conftest.py sets the "
                    "interpreter on CPU machines)")


@pytest.mark.skipif(NO_TRITON_RUNTIME, reason=NO_TRITON_REASON)
def test_yardstick_is_a_real_flash_attention():
    """The yardstick's forward and gradients match F.scaled_dot_product_attention (fp32, ragged N; on a GPU
    SDPA is held to its math kernel, so that both sides are fp32-accurate)."""
    import yardstick_fa2
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (torch.randn(1, 2, 37, 16, generator=g).to(device) for _ in range(4))
    out, dq, dk, dv = yardstick_fa2.run(q, k, v, do)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*x)
    grads = torch.autograd.grad(ref, x, do)
    tol = 3e-3 if device == "cuda" else 2e-5          # (fp32 tl.dot takes tf32 on a GPU)
    for got, want in zip((out, dq, dk, dv), (ref,) + grads):
        assert torch.allclose(got, want, atol=tol, rtol=5 * tol), (got - want).abs().max()


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_report.py"), "--ci",
                           "--json", str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text()), proc


def test_every_kernel_compiles_without_spills(ci_report):
    """Every candidate config compiles for sm_90a and sm_80, and every kernel of backend="triton" has spill-free
    configs for the launcher to pick (it prunes the spilling ones before autotuning); the untuned kernels never
    spill. (The yardstick is not held to it: Triton 3.6 spills a few bytes in its delta kernel.)"""
    import kernel_report as kr
    records, proc = ci_report
    records = [r for r in records if r["arch"] in kr.DEFAULT_ARCHS and r["backend"] != "triton-fft"]
    errors = [(r["name"], r["arch"], r["dtype"], r["D"], r["M"], r["config"], r["error"])
              for r in records if "error" in r]
    assert not errors, errors
    groups = {}
    for r in records:
        if r["pass"].startswith("yardstick"):
            continue
        groups.setdefault((r["name"], r["arch"], r["dtype"], r["D"], r["M"], tuple(r["grid"]), r["E"], r["causal"],
                           r["boundary"]), []).append(r)
    spills = [(key, [(c["config"], c["stack_bytes"]) for c in recs]) for key, recs in groups.items()
              if any(c["stack_bytes"] > 0 for c in kr.launcher_choices(recs))
              and not recs[0]["pass"].startswith("yardstick")]     # (the yardstick's delta kernel spills on 3.6)
    assert not spills, spills
    lisa = {r["name"] for r in records if not r["pass"].startswith("yardstick")}
    assert lisa == {"prep", "fwd", "bwd_prep", "bwd_dkv", "bwd_dq", "bwd_walk", "bwd_extra", "table_fold",
                    "table_grad"}
    assert {r["arch"] for r in records} == {"sm_90a", "sm_80"}
    assert proc.returncode == (1 if any("error" in r for r in ci_report[0]) else 0), proc.stdout[-2000:]


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120", "gfx942", "gfx950"])
def test_every_target_compiles_with_its_matrix_instructions(ci_report, arch):
    """One kernel, one config per target (the forward, bf16, D=64, M=1): it compiles, its parsed numbers are sane
    (registers, shared memory within the target's limit, a hot loop with matrix instructions whose shapes are
    read, issue and tensor cycles), and it issues the target's matrix instructions (HMMA, HGMMA, UTCHMMA,
    v_mfma)."""
    import kernel_report as kr
    t = kr.TARGETS[arch]
    recs = [r for r in ci_report[0] if r["arch"] == arch and r["name"] == "fwd" and r["dtype"] == "bfloat16"
            and r["D"] == 64 and r["M"] == 1 and r["grid"] == [32, 32] and r["pass"] == "fwd"]
    assert recs, arch
    r = recs[0]
    assert "error" not in r, r["error"]
    assert r["family"] == t.family and r["smem_limit"] == t.smem_limit
    assert 0 < r["regs"] <= (512 if t.vendor == "amd" else 255)
    assert 0 < r["shared_bytes"] <= t.smem_limit and r["fits_shared"]
    assert r["has_dot"] and r["issues_mma"], r["mma_ops"]
    assert any(t.issues_mma(op) for op in r["mma_ops"]) and r["mma_ops"][next(iter(r["mma_ops"]))] > 0
    assert r["loop_instructions"] > 0 and r["loop_mix"]["mma"] > 0 and r["loop_mma_unknown"] == 0
    assert 0 < r["issue_cycles_per_1k_pairs"] < 1e4 and 0 < r["tensor_cycles_per_1k_pairs"] < 1e4
    assert r["bound"] in ("issue", "tensor", "atomic") and r["verdict"] in ("ok", "spills")
    if t.vendor == "amd":
        assert r["vgprs"] > 0 and 1 <= r["waves_per_simd"] <= 8
        # the compiler's own occupancy (it also counts LDS) is at most what the VGPRs allow
        assert r["llvm_occupancy"] is None or r["llvm_occupancy"] <= r["waves_per_simd"], r
    if arch == "sm_100a":
        assert r["loop_mix"]["tmem"] > 0 and r["tmem_ops"] > 0


def test_the_fft_backend_kernels_compile(ci_report):
    """triton-fft's kernels compile for sm_90a and gfx942, are read (registers, shared memory within the limit)
    and have no dots (no matrix instructions expected of them). Whether they spill is the matrix's to record:
    fft_spectral's int64 divisions spill 20 bytes around their calls on sm_90a (triton 3.8)."""
    recs = [r for r in ci_report[0] if r["backend"] == "triton-fft"]
    assert {(r["name"], r["arch"]) for r in recs} == {(n, a) for n in ("fft_form", "fft_spectral", "fft_contract",
                                                                         "fft_contract_mc", "fft_corr")
                                                      for a in ("sm_90a", "gfx942")}
    errors = [(r["name"], r["arch"], r["error"]) for r in recs if "error" in r]
    assert not errors, errors
    for r in recs:
        assert 0 < r["regs"] <= 512 and r["fits_shared"] and not r["has_dot"] and not r["issues_mma"], r
        assert r["verdict"] in ("ok", "spills"), r


def test_no_candidate_serializes_its_wgmma(ci_report):
    """sm_90a: ptxas serializes the wgmma of no candidate config of any kernel (each wgmma would wait for the one
    before: tensor-core latency the issue counts do not show). The loops over key tiles tell the compiler they
    run at least once (tl.assume), without which ptxas serialized most forward configs."""
    records, _ = ci_report
    serial = [(r["name"], r["dtype"], r["D"], r["M"], r["config"], r["wgmma_serialized"]) for r in records
              if r["arch"] == "sm_90a" and not r["pass"].startswith("yardstick") and r.get("wgmma_serialized")]
    assert not serial, serial
    assert any("wgmma_serialized" in r for r in records if r["arch"] == "sm_90a" and "error" not in r)


def _target(ci_report, prefix):
    import kernel_report as kr
    found = [t for t in kr.targets(ci_report[0]) if t["target"].startswith(prefix)]
    assert len(found) == 1, kr.targets(ci_report[0])
    return found[0]


BWD_NOT_REACHED = ("not reached: 250.0 tensor cycles per 1k pairs on both Triton versions against the yardstick's "
                   "218.8. Both are tensor-bound: LiSA's backward takes 8 matrix products per pair (dK/dV 4, dQ 2, "
                   "the table gradient's walker 2: it recomputes A and g'.v), FlashAttention-2's 7; "
                   "docs/kernel_report.md, 'Training at FlashAttention-2's cost'")
M4_NOT_REACHED = ("not reached: M=4's bound is 1.66x M=1's on triton 3.8 (414.6 / 250.0), 1.72x on 3.6 (431.2 / "
                  "250.0). At four groups dK/dV and dQ are issue-bound: per pair and group they take CUDA-core "
                  "instructions (a packed product, a conversion and an fp32 FFMA in dK/dV, an FFMA in dQ) that no "
                  "tiling removes (docs/kernel_report.md, 'Why M=4 stays above 1.5x M=1')")


@pytest.mark.xfail(strict=True, reason=BWD_NOT_REACHED)
def test_backward_bound_at_most_the_yardstick(ci_report):
    """sm_90a, bf16, D=64, M=1: the backward's bound (dK/dV + dQ + the table gradient's walkers, each at its
    lowest-bound spill-free config) at most the FlashAttention-2 yardstick's backward in the same run."""
    t = _target(ci_report, "bwd M=1 bound")
    assert t["met"], t


def test_backward_kernels_are_tensor_bound(ci_report):
    """sm_90a, bf16, D=64, M=1: each backward kernel's chosen config issues fewer cycles than its matrix work takes
    (its bound is its tensor cycles: what is left is the number of products), with no spills; the whole backward
    within 1.15x the yardstick's bound."""
    import kernel_report as kr
    tot = kr.pass_totals(ci_report[0])
    key = kr.TARGET_CASE + (1, (32, 32), 0, False, "zero")
    bwd, yard = tot[key + ("bwd",)], tot[key + ("yardstick-bwd",)]
    assert set(bwd["kernel_bounds"]) == {"bwd_dkv", "bwd_dq", "bwd_walk"}
    for name, (bound, issue, tensor) in bwd["kernel_bounds"].items():
        assert issue < tensor == bound, (name, bound, issue, tensor)
    assert bwd["spills"] == 0 and bwd["bound"] <= 1.15 * yard["bound"], (bwd, yard)


def test_forward_at_most_the_yardstick(ci_report):
    """sm_90a, bf16, D=64, M=1: the forward's bound at most the FlashAttention-2 yardstick's forward in the same
    run."""
    t = _target(ci_report, "fwd M=1 bound")
    assert t["met"], t


def test_launcher_lists_the_best_config_first(ci_report):
    """sm_90a, bf16, D=64, M=1 and 4: each tuned kernel's first candidate (what runs where nothing is autotuned
    yet, and the config a fake GPU's autotuning prefers) is one the report ranks first: the lowest bound, then the
    fewest issue cycles, among the spill-free configs (kernel_report.candidate_order)."""
    import kernel_report as kr
    records = ci_report[0]
    rank = {(kr.case_key(r) + (r["name"],), r["config_index"]): kr._rank(r) for r in records
            if r.get("issue_cycles_per_1k_pairs") is not None}
    checked = 0
    for key, order in kr.candidate_order(records).items():
        if key[:3] != kr.TARGET_CASE or key[4] != (32, 32) or key[5:8] != (0, False, "zero"):
            continue
        assert rank[(key, 0)] == rank[(key, order[0])], (key, order, rank[(key, 0)], rank[(key, order[0])])
        checked += 1
    assert checked == 8, checked          # fwd, dkv, dq, walk at M = 1 and 4


def test_four_groups_forward_at_most_one_and_a_half_of_one(ci_report):
    """sm_90a, bf16, D=64: the forward's bound at M=4 at most 1.5x M=1's (the groups share A and the gather)."""
    t = _target(ci_report, "fwd M=4")
    assert t["met"], t


@pytest.mark.xfail(strict=True, reason=M4_NOT_REACHED)
def test_four_groups_backward_at_most_1_3x_one(ci_report):
    """sm_90a, bf16, D=64: the backward's bound at M=4 at most 1.3x M=1's."""
    t = _target(ci_report, "bwd M=4")
    assert t["met"], t


def test_backward_atomics_per_pair(ci_report):
    """Every backward per-pair kernel of every compiled case (1D causal, 2D with extra tokens, circular, 3D):
    at most 1/16 global atomic per pair on 1D and 2D grids, 1/8 on 3D (the kernels have none)."""
    t = _target(ci_report, "backward atomics")
    assert t["met"] and t["value"] == 0, t
