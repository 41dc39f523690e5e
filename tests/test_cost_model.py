"""The cost model behind backend="auto" against the committed benchmark results.

For each device class, the latest committed ``benchmarks/results/{cpu,cuda}_*.json`` of that class
(meta["device_class"], or "cpu" for CPU runs; a results file git does not track, such as the one
``python benchmarks/run.py`` has just written on a possibly busy machine, is not read): at every stored (grid, D, mode, B, H, dtype) point where at least two exact fast LiSA
backends were measured, the one the cost model picks among them must be within 1.2x of the fastest measured.
GPU classes are evaluated on any machine (``device_class=`` is explicit). Plus unit tests of the device
classes and of ``dtype_factor``.
"""

import glob
import json
import math
import os
import subprocess

import pytest
import torch

from lisa_kernels import dispatch
from lisa_kernels._validate import Problem
from lisa_kernels.backends import REGISTRY
from lisa_kernels.dispatch import choose_among, estimate_seconds

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
FAST = tuple(b.name for b in REGISTRY if b.cost is not None)      # the backends with constants
WITHIN = 1.2


def _device_class(meta):
    return meta.get("device_class") or ("cpu" if meta.get("device") == "cpu" else None)


def _committed(paths):
    """The paths among ``paths`` that git tracks; all of them outside a git checkout (e.g. an sdist)."""
    try:
        git = subprocess.run(["git", "ls-files", "--", *paths], cwd=RESULTS_DIR, capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return paths
    if git.returncode != 0:
        return paths
    tracked = {os.path.basename(p) for p in git.stdout.split()}
    return [p for p in paths if os.path.basename(p) in tracked]


def _latest_per_class():
    """{device class: (file name, data)} of the latest committed results file of each class."""
    latest = {}
    paths = glob.glob(os.path.join(RESULTS_DIR, "cpu_*.json")) + glob.glob(os.path.join(RESULTS_DIR, "cuda_*.json"))
    for path in _committed(paths):
        with open(path) as f:
            data = json.load(f)
        cls = _device_class(data.get("meta", {}))
        order = (str(data.get("meta", {}).get("date", "")), os.path.basename(path))
        if cls in dispatch.COST_MODEL and (cls not in latest or order > latest[cls][0]):
            latest[cls] = (order, os.path.basename(path), data)
    return {cls: (name, data) for cls, (_, name, data) in latest.items()}


def _points():
    points = []
    for cls, (name, data) in sorted(_latest_per_class().items()):
        measured = {}
        for r in data["records"]:
            backend = r["method"][5:] if r["method"].startswith("lisa-") else None
            if r.get("status") == "ok" and backend in FAST and r["mode"] in ("fwd", "fwd+bwd"):
                key = (tuple(r["grid"]), r["D"], r["mode"], r["B"], r["H"], r["dtype"])
                measured.setdefault(key, {})[backend] = r["median_ms"]
        points += [(cls, name, key, times) for key, times in sorted(measured.items()) if len(times) >= 2]
    return points


def _problem(grid, D, B, H, dtype):
    """The problem of a benchmark point (benchmarks/benchmark.py: M = 1, zero boundary, not causal)."""
    return Problem(B=B, H=H, N=math.prod(grid), Dk=D, Dv=D, M=1, grid=grid, num_extra=0, feature_map="elu1",
                   normalize=True, eps=1e-6, boundary="zero", causal=False, scale=1.0, dtype=getattr(torch, dtype),
                   device=torch.device("cpu"))


POINTS = _points()


@pytest.mark.skipif(not POINTS, reason="no committed benchmark results with two or more fast LiSA backends "
                                       "measured at a point (benchmarks/results/cpu_*.json, cuda_*.json)")
@pytest.mark.parametrize("cls,name,key,times", POINTS,
                         ids=[f"{c}-{'x'.join(map(str, k[0]))}-D{k[1]}-{k[2]}-{k[5]}" for c, _, k, _ in POINTS])
def test_auto_is_within_1_2x_of_the_best_measured(cls, name, key, times):
    grid, D, mode, B, H, dtype = key
    names = [n for n in FAST if n in times]
    chosen = choose_among(names, _problem(grid, D, B, H, dtype), backward=mode != "fwd", device_class=cls)
    assert times[chosen] <= WITHIN * min(times.values()), f"{name}: the {cls} model picked {chosen}: {times} ms"


def test_every_device_class_has_a_source():
    for cls in dispatch.DEVICE_CLASSES:
        entry = dispatch.COST_MODEL[cls]
        assert isinstance(entry["measured"], bool) and isinstance(entry["source"], str) and entry["source"]
        assert "direct" in entry and "fft" in entry, cls


@pytest.mark.parametrize("capability,cls", [((7, 0), "sm_80"), ((7, 5), "sm_80"), ((8, 0), "sm_80"),
                                            ((8, 6), "sm_80"), ((8, 9), "sm_80"), ((9, 0), "sm_90"),
                                            ((10, 0), "sm_90"), ((12, 0), "sm_80")])
def test_device_class_of_a_gpu_follows_its_capability(capability, cls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dispatch._device_class(torch.device("cuda", 0)) == cls
    assert dispatch._device_class(torch.device("cpu")) == "cpu"
    assert dispatch._device_class(torch.device("meta")) == "cpu"


def test_explanation_says_when_the_class_is_a_guess(monkeypatch):
    p = _problem((16,), 16, 1, 1, "float32")
    text = str(dispatch.explain_problem(p, backward=False))
    assert "device class cpu" in text
    assert ("(unmeasured guess)" in text) is (not dispatch.COST_MODEL["cpu"]["measured"])
    monkeypatch.setitem(dispatch.COST_MODEL, "cpu", {**dispatch.COST_MODEL["cpu"], "measured": False})
    assert "device class cpu (unmeasured guess)" in str(dispatch.explain_problem(p, backward=False))


def test_dtype_factor_multiplies_the_estimate(monkeypatch):
    entry = dispatch.COST_MODEL["sm_90"]
    fast = {**entry["triton"], "dtype_factor": {"bfloat16": 1.3, "float16": 0.5}}
    monkeypatch.setitem(dispatch.COST_MODEL, "sm_90", {**entry, "triton": fast})
    p32, pbf, p16, p64 = (_problem((64, 64), 32, 2, 4, dt) for dt in ("float32", "bfloat16", "float16", "float64"))
    for backward in (False, True):
        t32 = estimate_seconds("triton", p32, backward, device_class="sm_90")
        assert estimate_seconds("triton", pbf, backward, device_class="sm_90") == pytest.approx(1.3 * t32)
        assert estimate_seconds("triton", p16, backward, device_class="sm_90") == pytest.approx(0.5 * t32)
        assert estimate_seconds("triton", p64, backward, device_class="sm_90") == pytest.approx(t32)  # missing: 1
    # a factor can flip the choice
    assert choose_among(["triton", "cuda"], p32, False, "sm_90") == "triton"
    slow = {**fast, "dtype_factor": {"bfloat16": 1e6}}
    monkeypatch.setitem(dispatch.COST_MODEL, "sm_90", {**entry, "triton": slow})
    assert choose_among(["triton", "cuda"], pbf, False, "sm_90") == "cuda"


def test_explicit_device_class_and_choose_among():
    p = _problem((32, 32), 32, 1, 4, "float32")
    assert estimate_seconds("direct", p, False) == estimate_seconds("direct", p, False, device_class="cpu")
    # a GPU class is faster than the CPU and knows the GPU backends; the CPU class does not
    assert estimate_seconds("direct", p, False, "sm_90") < estimate_seconds("direct", p, False, "cpu")
    assert estimate_seconds("direct", p, False, "sm_80") > estimate_seconds("direct", p, False, "sm_90")
    assert estimate_seconds("triton", p, False, "cpu") is None
    assert estimate_seconds("triton", p, False, "sm_80") is not None
    for cls in dispatch.DEVICE_CLASSES:
        names = [n for n in FAST if n in dispatch.COST_MODEL[cls]]
        chosen = choose_among(names, p, True, cls)
        assert chosen == min(names, key=lambda n: estimate_seconds(n, p, True, cls))
    assert choose_among(["reference", "fft"], p, False, "cpu") == "fft"        # unmodelled names are ignored
    with pytest.raises(ValueError, match="no cost model"):
        choose_among(["reference"], p, False, "cpu")


def test_an_unknown_architecture_says_so():
    """A GPU the package does not know is named as such and borrows a class (NVIDIA Turing here; an AMD RDNA)."""
    from lisa_kernels._device import GPU
    turing, rdna = GPU("cuda", 75, 32), GPU("hip", "gfx1100", 32)
    assert turing.family == "nvidia-sm_75" and turing.architecture == "NVIDIA unknown architecture (sm_75)"
    assert rdna.family == "amd-gfx1100" and rdna.architecture == "AMD unknown architecture (gfx1100)"
    assert not turing.fitted and not rdna.fitted and turing.cost_class == rdna.cost_class == "sm_80"
