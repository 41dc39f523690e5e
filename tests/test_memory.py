"""The fast paths keep their workspace within the configured budget: peak resident memory of one call.

Each case runs tests/memory_probe.py in a fresh process (see its docstring for how the peak is measured:
the kernel's high-water mark VmHWM, reset right before the call). The problems are chosen so that the
unchunked work would need hundreds of MiB (the fft path's Dk x (Dv + M) x prod(FFT sizes) field, the direct
path's N x N weights) while the budget is a few MiB, and the bound is

    growth <= 2 x budget + 16 x (one O(N D) tensor) + 8 MiB

* 2 x budget: the budget sizes the main buffers (the fft chunk's padded field and spectra, the direct block's
  weight tile); around them live a few smaller per-chunk temporaries (crops, products, anti-diagonal sums).
  Measured on the development machine, the growth grows with the budget at 0.75-0.9 x (fft) and 0.8-1.1 x
  (direct forward, whose one tile is exactly the budget plus the block's outputs) the budget.
* 16 x (B H N (Dk + Dv + M) itemsize): the O(N D) tensors of a call (phi(q), phi(k), [v, 1], the outputs, the
  gradients and their staging copies): measured ~4 of them in a forward, ~10 in a forward + backward.
* 8 MiB: allocator slack (small blocks stay in glibc's heap) and per-call bookkeeping.

Each test also checks that the unchunked size is several times that bound, so that the test can fail, and
``test_probe_sees_an_unbounded_workspace`` shows that the probe does see a workspace that ignores the budget.
"""

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
SLACK = 8 * MiB
ND_TENSORS = 16
BUDGET_FACTOR = 2

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"),
                                reason="peak memory is read from /proc/self/status (Linux only)")


def probe(cfg):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "memory_probe.py"), json.dumps(cfg)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"memory probe failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nd_bytes(cfg):
    N = math.prod(cfg["grid"])
    return cfg["B"] * cfg["H"] * N * (cfg["Dk"] + cfg["Dv"] + cfg.get("M", 1)) * 4


def bound(cfg):
    return BUDGET_FACTOR * cfg["budget"] + ND_TENSORS * nd_bytes(cfg) + SLACK


def fmt(report):
    return {mode: f"{r['growth'] / MiB:.1f} MiB ({r['method']}, {r['seconds']:.2f} s)" for mode, r in report.items()}


def assert_within_bound(cfg, unbounded: str) -> None:
    """Probe cfg's backend (forward and backward): each peak growth must stay within bound(cfg)."""
    report = probe(cfg)
    for mode, r in report.items():
        assert r["growth"] <= bound(cfg), (
            f"{cfg['backend']} {mode}: peak memory grew by {r['growth'] / MiB:.1f} MiB, over the bound of "
            f"{bound(cfg) / MiB:.1f} MiB (budget {cfg['budget'] / MiB:.0f} MiB; {unbounded}): {fmt(report)}")


def test_fft_workspace_stays_within_budget():
    from lisa_kernels.fft import fft_sizes
    cfg = dict(backend="fft", grid=[64, 64], B=1, H=1, Dk=64, Dv=64, M=1, budget=8 * MiB)
    P = math.prod(fft_sizes(tuple(cfg["grid"]), False))
    field = cfg["Dk"] * (cfg["Dv"] + cfg["M"]) * P * 4 * cfg["B"] * cfg["H"]
    assert field >= 4 * bound(cfg), "the problem is too small for this test to tell chunked from unchunked"
    assert_within_bound(cfg, f"the unchunked field is {field / MiB:.0f} MiB")


@pytest.mark.parametrize("python_direct", [True, False], ids=["torch-ops", "fused-kernel"])
def test_direct_workspace_stays_within_budget(python_direct):
    """The blocked loop of PyTorch ops within its budget; and the extension's fused CPU kernel (where built),
    whose tiles are a few hundred KiB whatever the budget, within the same bound."""
    cfg = dict(backend="direct", grid=[12000], B=1, H=1, Dk=16, Dv=16, M=1, budget=4 * MiB,
               python_direct=python_direct)
    N = math.prod(cfg["grid"])
    weights = cfg["B"] * cfg["H"] * cfg["M"] * N * N * 4
    assert weights >= 4 * bound(cfg), "the problem is too small for this test to tell blocked from unblocked"
    assert_within_bound(cfg, f"the N x N weights are {weights / MiB:.0f} MiB")


def test_probe_sees_an_unbounded_workspace():
    """The same measurement with the budget raised to 4 GiB (one block holds all N x N weights) is far over the
    bound computed for the small budget: the probe is not blind to a workspace that ignores the budget."""
    small = dict(backend="direct", grid=[8000], B=1, H=1, Dk=16, Dv=16, M=1, budget=4 * MiB, python_direct=True)
    report = probe(dict(small, budget=4 * 2**30 - 1, modes=["forward"]))
    weights = 8000 * 8000 * 4
    assert report["forward"]["growth"] >= 0.9 * weights > 2 * bound(small), fmt(report)
