"""The GPU host code, run under a simulated GPU (lisa_kernels.testing.fake_gpu): for each device class (Ampere,
Hopper, datacenter and consumer Blackwell, Ada, AMD CDNA) the backends triton, triton-fft and cuda take the branches
they take on that GPU (autotuning over the GPU's candidates, the spill pruning, the GPU dot modes, bf16 included;
the cost model's device class), their kernels run in Triton's interpreter (or the extension's CPU passes), and the
forward and every gradient are compared with the float64 reference on random configurations.

Low precision: the error against float64 must stay within FLOOR[dtype] (the tolerances of the interpreter tests,
tests/test_triton_direct.py) or 4x the error that rounding the inputs to that dtype alone causes, whichever is
larger (PyTorch's reference run in fp16 overflows on some of these random tables, so it is no yardstick here;
tests/test_triton_direct.py::test_triton_low_precision_like_flash_attention holds the kernels to it on a GPU).
"""

import logging
import os
import random
import zlib

import pytest
import torch

import lisa_kernels
from lisa_kernels import _device, triton_direct as TD
from lisa_kernels._device import GPU
from lisa_kernels.cuda_fft import cuda_extension_reason
from lisa_test_utils import errors, forward_backward, make_inputs

pytestmark = [pytest.mark.skipif(not TD.HAS_TRITON, reason="triton is not installed"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                 reason="a simulated GPU runs its kernels in Triton's interpreter (no real GPU here)")]

if TD.HAS_TRITON:
    from lisa_kernels.testing import DEVICES, fake_gpu

@pytest.fixture(scope="module", autouse=True)
def _stop_the_compile_helper():
    """The compile helper process ends with this module, so that coverage.py (patch = subprocess in .coveragerc)
    has its data before the report."""
    yield
    from lisa_kernels.testing import stop_helper
    stop_helper()


# every device class; LISA_FAKE_GPU_CLASSES narrows the per-class tests (CI's oldest stage: the GPU machine's
# torch and triton, so its H100, and the B200 whose triton-3.6 limit the backend works around)
ALL_CLASSES = ("a100", "h100", "b200", "rtx5090", "rtx4090", "mi300x", "mi355x")
CLASSES = tuple(os.environ.get("LISA_FAKE_GPU_CLASSES", " ".join(ALL_CLASSES)).split())
FLOOR = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _draw(seed: int) -> dict:
    """A random configuration with awkward sizes (one token, head dim 1, Dk != Dv, odd grids)."""
    rng = random.Random(seed)
    dims = rng.choice([1, 2, 2, 3])
    grid = {1: lambda: (rng.randint(1, 23),), 2: lambda: (rng.randint(1, 6), rng.randint(1, 7)),
            3: lambda: (rng.randint(1, 3), rng.randint(1, 3), rng.randint(2, 4))}[dims]()
    M = rng.choice([1, 2, 4])
    E = rng.choice([0, 1, 2])
    return dict(grid=grid, E=E, M=M, Dk=rng.choice([1, 3, 8]), Dv=M * rng.choice([1, 3, 4]),
                boundary=rng.choice(["zero", "circular"]), causal=dims == 1 and rng.random() < 0.5,
                normalize=rng.random() < 0.8, feature_map=rng.choice(["elu1", "relu"]), B=rng.choice([1, 2]),
                H=rng.choice([1, 2]), seed=rng.randrange(1 << 30))


def _options(c):
    return dict(grid=c["grid"], num_extra=c["E"], boundary=c["boundary"], causal=c["causal"],
                normalize=c["normalize"], feature_map=c["feature_map"])


def _check(backend, c, dtype, results=None, **fake):
    """Forward and every gradient of ``backend`` under fake_gpu(**fake), against the float64 reference, within
    max(FLOOR[dtype], 4x the error of the reference on the inputs rounded to ``dtype``). Returns the Simulation
    (and appends the forward and gradients to ``results``, if given)."""
    inputs = make_inputs(c["grid"], E=c["E"], M=c["M"], Dk=c["Dk"], Dv=c["Dv"], B=c["B"], H=c["H"],
                         boundary=c["boundary"], seed=c["seed"])
    opts = _options(c)
    upstream = torch.randn(inputs["v"].shape, generator=torch.Generator().manual_seed(c["seed"] + 1),
                           dtype=torch.float64)
    expected = forward_backward(inputs, "reference", upstream, **opts)
    rounded = {n: None if t is None else t.detach().to(dtype).float().requires_grad_() for n, t in inputs.items()}
    own = errors(forward_backward(rounded, "reference", upstream.to(dtype).float(), **opts), expected, floor=1e-3)
    low = {n: None if t is None else t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    with fake_gpu(**fake) as sim:
        result = forward_backward(low, backend, upstream.to(dtype), **opts)
    assert result[0].dtype == dtype
    errs = errors(result, expected, floor=1e-3)
    bad = {n: (e, own[n]) for n, e in errs.items() if not e <= max(FLOOR[dtype], 4 * own[n])}
    assert not bad, f"{backend} on {fake.get('device')} {dtype} {c}: errors (this, reference in {dtype}): {bad}"
    if results is not None:
        results.append(result)
    return sim


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("device", CLASSES)
def test_triton_on_every_device_class(device, dtype):
    c = _draw(zlib.crc32(f"{device} {dtype}".encode()))
    if DEVICES[device].gpu.family == "blackwell" and TD._triton_version() < (3, 7):
        c["E"] = 0              # (triton 3.6 cannot compile bwd_extra for sm_100: the backend refuses extra tokens)
    sim = _check("triton", c, dtype, device=device)
    tuned = {k for k, n in sim.stats.items() if n["autotunings"]}
    assert {"_fwd_kernel", "_bwd_dkv_kernel", "_bwd_dq_kernel", "_bwd_walk_kernel"} <= tuned, sim.stats
    assert sim.totals()["candidates_run"] >= 8, sim.stats          # several candidates per kernel, each run


@pytest.mark.parametrize("device,dtype", [("h100", torch.bfloat16), ("h100", torch.float32),
                                          ("b200", torch.float32), ("rtx4090", torch.float32)], ids=str)
@pytest.mark.parametrize("prefer", [1, 2])
def test_every_autotune_candidate_matches_the_reference(prefer, device, dtype):
    """Each candidate config of each kernel wins in turn (prefer=k: the k-th; the lists differ per family of
    matrix instructions: wgmma, tcgen05, mma.sync) and its result is checked; prefer 0 is
    test_triton_on_every_device_class."""
    c = dict(grid=(5, 6), E=0 if device == "b200" else 1, M=2, Dk=8, Dv=6, boundary="zero", causal=False,
             normalize=True, feature_map="elu1", B=2, H=2, seed=7 + prefer)
    sim = _check("triton", c, dtype, device=device, prefer=prefer)
    chosen = {name: cfg for name, cfg in sim.winners}
    assert len(chosen) == 4, sim.winners
    for name, cfg in sim.winners:
        assert cfg == sim.candidates[name][prefer % len(sim.candidates[name])], (name, cfg, sim.candidates[name])


@pytest.mark.parametrize("device,isa", [("a100", 0), ("h100", 0), ("rtx5090", 0), ("mi300x", 1), ("mi355x", 2)])
def test_each_gpu_gets_its_kernel_forms(device, isa):
    """The launcher sets the kernels' ISA constexpr from the GPU: 0 NVIDIA (inline PTX products, tf32x3 dots), 1
    AMD gfx942 (portable products, ieee dots for fp32, tf32 ones for fp16), 2 other AMD (ieee for both); 0 with no
    GPU (the plain interpreter)."""
    p = lisa_kernels.check_inputs(*(torch.randn(1, 1, 17, 8, dtype=torch.bfloat16) for _ in range(3)),
                                  torch.randn(1, 2, 7, 7, dtype=torch.bfloat16), grid=(4, 4), num_extra=1,
                                  rpe_extra=torch.randn(1, 2, 3, dtype=torch.bfloat16))
    for gpu, want in ((DEVICES[device].gpu, isa), (None, 0)):
        dots = {launch.name: launch.args["ISA"] for _, launch in TD.kernel_launches(p, device="meta", gpu=gpu)
                if "ISA" in launch.args}
        assert set(dots) == {"fwd", "bwd_dkv", "bwd_dq", "bwd_walk", "bwd_extra"}, dots
        assert set(dots.values()) == {want}, dots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_nvidia_and_amd_kernel_forms_agree(dtype, monkeypatch):
    """Each form of what only some targets have (ISA 0: inline PTX bf16x2 products, emulated by testing.py as
    round(round(a) round(b)), tf32x3 dots; 1 and 2: the portable products and ieee dots of AMD GPUs) on one
    simulated GPU, a random configuration with 4 groups per program (dK/dV's packed products too): each matches the
    reference, and they agree bitwise (the interpreter's dots are fp32 whatever their precision)."""
    c = _draw(zlib.crc32(f"forms {dtype}".encode()))
    c.update(M=4, Dv=4 * (c["Dv"] // c["M"]))
    results = []
    for isa in (0, 1, 2):
        monkeypatch.setattr(TD, "_isa", lambda gpu, isa=isa: isa)
        _check("triton", c, dtype, results=results, device="mi300x")
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert grads.keys() == results[0][1].keys()
        for name, g in grads.items():
            assert torch.equal(g, results[0][1][name]), name


@pytest.mark.parametrize("device", CLASSES)
def test_triton_fft_on_every_device_class(device):
    c = dict(_draw(zlib.crc32(device.encode()) + 1), causal=False)
    _check("triton-fft", c, torch.float32, device=device)


@pytest.mark.skipif(cuda_extension_reason() is not None, reason=f"backend='cuda': {cuda_extension_reason()}")
@pytest.mark.parametrize("device", ("a100", "h100", "rtx4090"))
def test_cuda_backend_host_code_on_a_simulated_gpu(device):
    """backend="cuda": its host code on a (simulated) GPU, the extension's passes by their CPU implementations."""
    _check("cuda", _draw(zlib.crc32(device.encode()) + 2), torch.float32, device=device)


def test_spill_pruning_compiles_for_the_gpu(caplog):
    """compile=True: each candidate is compiled for sm_90 (the helper process, no interpreter) and one that spills
    or does not fit is dropped before tuning; the winner is a candidate that fits. Without the pruning's fix (it
    passed the autotuner's grid and warmup to the compile twice, and a broad except kept every candidate) nothing
    was dropped."""
    p = lisa_kernels.check_inputs(*(torch.randn(1, 1, 17, 64, dtype=torch.bfloat16) for _ in range(3)),
                                  torch.randn(1, 4, 7, 7, dtype=torch.bfloat16), grid=(4, 4), num_extra=1)
    h100 = DEVICES["h100"].gpu
    fwd = [launch for _, launch in TD.kernel_launches(p, device="cpu", gpu=h100)][:2]
    assert fwd[1].name == "fwd"
    fwd[1].block_configs = [(256, 256, 4, 1), (64, 32, 4, 1)]       # 256 x 256 with 4 warps: spills on any GPU
    caplog.set_level(logging.INFO, logger="lisa_kernels.triton_direct")
    for launch in fwd:
        launch.args = {k: (torch.rand_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                       for k, v in launch.args.items()}
    with fake_gpu("h100", compile=True) as sim:
        for launch in fwd:
            TD._run(launch)
    assert sim.stats["_fwd_kernel"]["compiles"] == 2, sim.stats
    assert sim.stats["_fwd_kernel"]["pruned"] == 1, sim.stats
    assert [(n, c.kwargs["BLOCK_M"]) for n, c in sim.winners] == [("_fwd_kernel", 64)]
    assert any("256" in r.getMessage() and ("spills" in r.getMessage() or "does not fit" in r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_pruning_drops_what_does_not_fit_and_says_when_nothing_does(caplog):
    """A GPU with 1 KiB of shared memory a block: every candidate compiles for sm_90 but Triton's OutOfResources
    rejects it; each is logged as dropped, and the launch fails with a RuntimeError that names the kernel."""
    from lisa_kernels.testing import FakeDevice
    tiny = FakeDevice(GPU("cuda", 90, 32), "a Hopper with 1 KiB of shared memory", max_shared_mem=1024)
    q, k, v = (torch.randn(1, 1, 13, 16, dtype=torch.bfloat16) for _ in range(3))
    rpe = torch.randn(1, 1, 5, 7, dtype=torch.bfloat16)
    caplog.set_level(logging.INFO, logger="lisa_kernels.triton_direct")
    with fake_gpu(tiny, compile=True), pytest.raises(RuntimeError, match="_fwd_kernel: no candidate config fits"):
        lisa_kernels.lisa_attention(q, k, v, rpe, grid=(3, 4), num_extra=1, backend="triton")
    assert any("does not fit" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_triton_bf16_with_compiled_candidates_on_hopper():
    """The whole bf16 path as an H100 takes it: every candidate compiled for sm_90 and pruned, then run."""
    c = dict(grid=(4, 5), E=1, M=1, Dk=16, Dv=16, boundary="zero", causal=False, normalize=True,
             feature_map="elu1", B=1, H=2, seed=3)
    sim = _check("triton", c, torch.bfloat16, device="h100", compile=True)
    assert sim.totals()["compiles"] >= 8, sim.stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("device", ["mi300x", "mi355x"])
def test_triton_on_amd_with_compiled_candidates(device, dtype):
    """Compiled for gfx942 (MI300X) and gfx950 (MI355X), every candidate, then run: no NVIDIA-only code reaches an
    AMD target (issue 29: the bf16 kernels' packed products were inline PTX, the fp32 dots tf32x3, and gfx950 has
    no tf32 dots either). Two groups per program, so that dK/dV's packed products are compiled too."""
    c = dict(grid=(3, 3), E=0, M=2, Dk=8, Dv=8, boundary="zero", causal=False, normalize=True,
             feature_map="elu1", B=1, H=1, seed=5)
    sim = _check("triton", c, dtype, device=device, compile=True)
    assert sim.totals()["compiles"] >= 8, sim.stats


def test_first_autotuned_launch_on_a_gpu_caches_its_wrapper():
    """The GPU branch of the launcher: the first autotuned launch raised TypeError (unhashable list) when its cache
    key was overwritten by the tuning key. Two calls: the second reuses the wrapper (no new autotuning)."""
    q, k, v = (torch.randn(1, 1, 13, 4) for _ in range(3))
    rpe = torch.randn(1, 1, 5, 7)
    with fake_gpu("a100") as sim:
        for _ in range(2):
            lisa_kernels.lisa_attention(q, k, v, rpe, grid=(3, 4), num_extra=1, backend="triton")
        assert len(TD._TUNED) == 1
    assert sim.stats["_fwd_kernel"]["autotunings"] == 1, sim.stats


@pytest.mark.parametrize("device,cls,name", [
    ("a100", "sm_80", "NVIDIA Ampere (sm_80)"), ("h100", "sm_90", "NVIDIA Hopper (sm_90)"),
    ("b200", "sm_90", "NVIDIA Blackwell (sm_100)"), ("rtx4090", "sm_80", "NVIDIA Ada (sm_89)"),
    ("rtx5090", "sm_80", "NVIDIA consumer Blackwell (sm_120)"), ("mi300x", "sm_80", "AMD CDNA 3 (gfx942)")])
def test_explain_sees_the_simulated_gpu(device, cls, name):
    """explain() names the architecture, and where the cost model has no constants fitted to it (all but Ampere
    sm_80 and Hopper), says that its estimates borrow another class's."""
    q, k, v = (torch.randn(2, 2, 50, 16) for _ in range(3))
    rpe = torch.randn(2, 1, 13, 13)
    with fake_gpu(device):
        ex = lisa_kernels.explain(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], rpe, grid=(7, 7))
        assert ex.device_class == cls and ex.device == name
        assert ex.fitted is (device in ("a100", "h100"))
        head = str(ex).splitlines()[0]
        assert name in head and ("borrow" in head) is (not ex.fitted), head
        assert ex.estimates["triton"].reason is None
        assert (ex.estimates["cuda"].reason is None) == (cuda_extension_reason() is None)
    assert lisa_kernels.explain(q, k, v, rpe, grid=(7, 7), num_extra=1).device_class == "cpu"


@pytest.mark.parametrize("device,target", [("h100", ("cuda", 90, 32)), ("mi300x", ("hip", "gfx942", 64))])
def test_the_simulated_driver_runs_nothing_real(device, target):
    """Triton sees the simulated GPU's target through the active driver, which is never picked by Triton on its own,
    builds no launcher, and refuses to run a binary; and the previous driver is back afterwards."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    before = driver._active            # None on a machine without a GPU
    with fake_gpu(device):
        fake = driver.active
        assert type(fake).is_active() is False
        assert fake.get_current_target() == GPUTarget(*target)
        assert fake.get_active_torch_device() == torch.device("cpu")
        with pytest.raises(NotImplementedError, match="builds no launcher"):
            fake.map_python_to_cpp_type("i32")
        with pytest.raises(RuntimeError, match="cannot run on a simulated GPU"):
            fake.launcher_cls(None, None)()
    assert driver._active is before


def test_triton_36_on_blackwell_refuses_extra_tokens(monkeypatch):
    """Triton 3.6 fails to compile bwd_extra for sm_100a (the kernel matrix): the backend says so before any
    kernel, for problems with extra tokens, and auto goes elsewhere; 3.7 and later, or no extra tokens, run."""
    q, k, v = (torch.randn(1, 1, 10, 4) for _ in range(3))
    rpe = torch.randn(1, 1, 5, 5)
    with fake_gpu("b200"):
        monkeypatch.setattr(TD, "_triton_version", lambda: (3, 6))
        reason = lisa_kernels.explain(q, k, v, rpe, grid=(3, 3), num_extra=1).estimates["triton"].reason
        assert reason.startswith("triton") and "Blackwell (sm_100)" in reason and "triton >= 3.7" in reason
        assert lisa_kernels.explain(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], rpe, grid=(3, 3)).estimates[
            "triton"].reason is None
        monkeypatch.setattr(TD, "_triton_version", lambda: (3, 8))
        assert lisa_kernels.explain(q, k, v, rpe, grid=(3, 3), num_extra=1).estimates["triton"].reason is None


def test_fake_gpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with fake_gpu("h100"):
            pass


@pytest.mark.parametrize("hip,capability,props,expected", [
    (None, (8, 6), None, GPU("cuda", 86, 32)), (None, (12, 0), None, GPU("cuda", 120, 32)),
    ("6.4", (9, 4), "gfx942:sramecc+:xnack-", GPU("hip", "gfx942", 64))])
def test_gpu_of_reads_torch(monkeypatch, hip, capability, props, expected):
    """gpu_of on a real (here mocked) torch.cuda device: NVIDIA by capability; AMD by its gfx name (its
    capability 9.4 is not a Hopper's)."""
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: type("P", (), {"gcnArchName": props}))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _device.gpu_of(torch.device("cuda")) == expected
    assert _device.gpu_of("cpu") is None and _device.gpu_of("meta") is None
