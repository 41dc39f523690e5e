"""benchmarks/kernel_report.py and its yardstick: the SASS reading, the yardstick's correctness, and the
compiled-code properties of every Triton kernel of backend="triton" (no spills; the issue's cycle targets).

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
    assert proc.returncode == 0, proc.stdout[-2000:]


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


def test_backward_issue_cycles_target(ci_report):
    """sm_90a, bf16, D=64, M=1: the backward (dK/dV + dQ + the table gradient's walkers) at most 150 issue cycles
    per 1000 pairs, 0 spills."""
    t = _target(ci_report, "bwd M=1")
    assert t["met"], t


def test_forward_at_most_the_yardstick(ci_report):
    """sm_90a, bf16, D=64, M=1: the forward at most the FlashAttention-2 yardstick's forward in the same run."""
    t = _target(ci_report, "fwd M=1")
    assert t["met"], t


def test_backward_atomics_per_pair(ci_report):
    """Every backward per-pair kernel of every compiled case (1D causal, 2D with extra tokens, circular, 3D):
    at most 1/16 global atomic per pair on 1D and 2D grids, 1/8 on 3D (the kernels have none)."""
    t = _target(ci_report, "backward atomics")
    assert t["met"] and t["value"] == 0, t


@pytest.mark.xfail(strict=True, reason="not reached: M=4 is 2.1x M=1 forward (73.2 / 34.7) and 2.9x backward "
                                       "(378.9 / 130.4) on triton 3.8, 2.05x and 2.84x on 3.6. Each group costs CUDA-core "
                                       "instructions on every pair (forward 1/2, backward 4), which puts the backward's "
                                       "floor at 1.7x M=1 in this design (docs/kernel_report.md, 'Why M=4 stays above "
                                       "1.5x M=1'); the forward's is 1.34x, but its spill-free configs at M=4 take half "
                                       "M=1's pairs per thread")
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
def test_four_groups_at_most_one_and_a_half_of_one(ci_report, pas):
    """sm_90a, bf16, D=64: M=4 at most 1.5x M=1, forward and backward."""
    t = _target(ci_report, f"{pas} M=4")
    assert t["met"], t
