"""Simulated GPUs: the package's GPU host code, run on a machine without a GPU.

    import os; os.environ["TRITON_INTERPRET"] = "1"       # before triton (and so lisa_kernels) is imported
    import lisa_kernels
    from lisa_kernels.testing import fake_gpu

    with fake_gpu("h100") as sim:                          # CPU tensors now stand for an H100's
        out = lisa_kernels.lisa_attention(q, k, v, rpe, grid=(14, 14), backend="triton")
    print(sim.stats)                                       # compiles, autotunings, candidates run, per kernel

Inside the block the package takes the branches it takes on that GPU: the device class of the cost model and
``explain()``, ``backend="cuda"``'s device check (its passes run the compiled extension's CPU implementations of
the same element functions), and the Triton launcher's GPU branch: autotuning over the GPU's candidate configs, the
spill pruning, the GPU dot modes (bf16 dots included) and stores. The kernels themselves run in Triton's interpreter
on the CPU tensors. Nothing in the code under test knows about it; it is built on these extension points:

* ``lisa_kernels._device.gpu_of`` (``unittest.mock``): the CPU device is the chosen GPU.
* Triton's active driver (``triton.runtime.driver.set_active``): its target is the GPU's ``GPUTarget``, its device
  properties the GPU's (shared memory per block), and its benchmarker runs a candidate once instead of timing it.
* The autotuner's ranking (``triton.runtime.autotuner.Autotuner._bench``): every candidate that survives pruning
  runs once in the interpreter; ``prefer=k`` makes the k-th candidate of the list win (where it survives), so a
  test can check each candidate's result against the reference in turn.
* The spill pruning's compile (the interpreted kernels' ``warmup``): with ``compile=True`` each candidate is compiled
  for the GPU's target in a helper process that runs Triton without its interpreter (the JIT's own specialization
  and ptxas or the AMD backend, no GPU needed), and its shared memory, registers and spills are read from the
  binary; with ``compile=False`` (default, fast) each candidate is taken as fitting and spill-free.
* The interpreter's bf16 arithmetic (``triton.runtime.interpreter.InterpreterBuilder``): bf16 dot operands are
  widened to fp32 (the interpreter multiplied their bit patterns), fp32 -> bf16 casts round to nearest even (it
  truncated), and the package's inline PTX, packed bf16x2 products (``cvt.rn.bf16x2.f32``, ``fma.rn.bf16x2`` with
  a -0 addend), is emulated: round(round(a) * round(b)); bf16 constants get the method the interpreter lacks.
  (On a simulated AMD GPU the kernels take their portable form of those products instead, which runs as is.)

:func:`traced_gpu` is the other simulation, without the interpreter: fake CUDA tensors (``FakeTensorMode``) stand
for a GPU's and Triton compiles for its target, nothing runs; for tracing the Triton ops as torch.compile, torch.export
and AOTInductor do (``tests/test_triton_op.py``).

What it cannot show: speed, a real device's memory model (races between programs, which the interpreter runs one
after another), and code that only a GPU driver runs (CUDA streams, synchronisation); ``.coveragerc`` lists those
lines.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterator
from unittest import mock

import numpy as np
import torch

from . import _device, triton_direct
from ._device import GPU

__all__ = ["FakeDevice", "DEVICES", "fake_gpu", "traced_gpu", "Simulation", "stop_helper"]


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """A GPU to simulate: what the package's choices read (:class:`~lisa_kernels._device.GPU`) and what Triton's
    driver reports (shared memory a block may use, threads a block may have)."""

    gpu: GPU
    name: str
    max_shared_mem: int
    max_threads: int = 1024


DEVICES: Dict[str, FakeDevice] = {
    "a100": FakeDevice(GPU("cuda", 80, 32), "NVIDIA A100 (Ampere, sm_80)", 166912),
    "h100": FakeDevice(GPU("cuda", 90, 32), "NVIDIA H100 (Hopper, sm_90)", 232448),
    "b200": FakeDevice(GPU("cuda", 100, 32), "NVIDIA B200 (datacenter Blackwell, sm_100)", 232448),
    "rtx4090": FakeDevice(GPU("cuda", 89, 32), "NVIDIA RTX 4090 (Ada, consumer, sm_89)", 101376),
    "rtx5090": FakeDevice(GPU("cuda", 120, 32), "NVIDIA RTX 5090 (consumer Blackwell, sm_120)", 101376),
    "mi300x": FakeDevice(GPU("hip", "gfx942", 64), "AMD Instinct MI300X (CDNA 3, gfx942)", 65536),
    "mi355x": FakeDevice(GPU("hip", "gfx950", 64), "AMD Instinct MI355X (CDNA 4, gfx950)", 163840),
}


# ---------------------------------------------------------------- Triton's driver, for a GPU that is not there

class _Utils:
    def __init__(self, device: FakeDevice):
        self.device = device
        self.binary_resources = None       # (n_regs, n_spills) of the binary the helper process is about to load

    def get_device_properties(self, index):
        return {"max_shared_mem": self.device.max_shared_mem, "multiprocessor_count": 1, "max_num_regs": 65536,
                "warpSize": self.device.gpu.warp_size}

    def load_binary(self, name, kernel, shared, index):
        n_regs, n_spills = self.binary_resources
        return None, None, n_regs, n_spills, self.device.max_threads


class _NoLauncher:
    """The launcher of a compiled binary: a simulated GPU runs kernels in the interpreter, never a binary."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("lisa_kernels.testing: a compiled kernel cannot run on a simulated GPU")


_INDEX: Dict[FakeDevice, int] = {}


def _make_driver(device: FakeDevice, benchmarker):
    # Each simulated GPU is a device index of its own: Triton's JIT keeps its target and compiled kernels per device
    # index, and one helper process compiles for every simulated GPU.
    index = _INDEX.setdefault(device, len(_INDEX))

    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class FakeDriver(DriverBase):
        """Triton's view of the simulated GPU (``triton.runtime.driver.set_active``)."""

        def __init__(self):
            super().__init__()
            self.utils = _Utils(device)
            self.launcher_cls = _NoLauncher

        @classmethod
        def is_active(cls):
            return False          # never chosen by Triton on its own

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("a simulated GPU builds no launcher")

        def get_current_target(self):
            return GPUTarget(device.gpu.backend, device.gpu.arch, device.gpu.warp_size)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return index

        def get_current_stream(self, index=None):
            return 0

        def get_benchmarker(self):
            return benchmarker

    return FakeDriver()


# ---------------------------------------------------------------- compiling for the simulated GPU (helper process)

def _binary_resources(compiled, gpu: GPU):
    """(registers, spilled bytes) of a compiled kernel: from the cubin (cuobjdump) or the AMDGCN text."""
    if gpu.backend == "hip":
        text = compiled.asm["amdgcn"]
        regs = max(int(x) for x in re.findall(r"\.vgpr_count:\s+(\d+)", text))
        spills = sum(int(x) for x in re.findall(r"\.[vs]gpr_spill_count:\s+(\d+)", text))
        return regs, 4 * spills
    return _cubin_resources(compiled.asm["cubin"])


def _cubin_resources(cubin: bytes):
    """(registers, spilled bytes) of a cubin, read with the cuobjdump of Triton's wheel."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


_TORCH_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                     torch.int64, torch.int8, torch.uint8, torch.bool)}


def _compile_in_helper(module: str, kernel: str, args: dict, options: dict, device: FakeDevice):
    """In the helper process (Triton without its interpreter): the JIT's warmup of one candidate for the simulated
    GPU, then Triton's own resource checks. Returns ("ok", shared, registers, spills) or ("OutOfResources", text)."""
    import importlib

    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    fn = getattr(importlib.import_module(module), kernel)
    drv = _make_driver(device, None)
    driver.set_active(drv)
    real = {k: torch.empty(16, dtype=_TORCH_DTYPES[v[1]]) if isinstance(v, tuple) and v[:1] == ("tensor",) else v
            for k, v in args.items()}
    compiled = fn.warmup(**real, **options, grid=(1,))
    drv.utils.binary_resources = _binary_resources(compiled, device.gpu)
    try:
        compiled._init_handles()
    except OutOfResources as exc:
        return ("OutOfResources", str(exc))
    return ("ok", int(compiled.metadata.shared), int(compiled.n_regs), int(compiled.n_spills))


@functools.lru_cache(maxsize=1)
def _helper() -> ProcessPoolExecutor:
    """One helper process for every compile, started without the interpreter (Triton reads TRITON_INTERPRET when
    it is imported, and its interpreted language functions cannot be compiled)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(int).result()          # start it now, under this environment
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return pool


def stop_helper() -> None:
    """Stop the compile helper process, if one was started (the next compile starts another). Coverage.py writes a
    process's data when it ends: tests stop it before the measurement is reported."""
    if _helper.cache_info().currsize:
        _helper().shutdown(wait=True)
        _helper.cache_clear()


class _Binary:
    """What the spill pruning reads of a compiled candidate (``_init_handles``, ``n_regs``, ``n_spills``)."""

    def __init__(self, result):
        self.result = result
        self.n_regs = self.n_spills = None

    def _init_handles(self):
        from triton.runtime.errors import OutOfResources
        if self.result[0] == "OutOfResources":
            raise OutOfResources(0, 0, self.result[1])
        _, self.shared, self.n_regs, self.n_spills = self.result


# ---------------------------------------------------------------- the interpreter's bf16 arithmetic

def _as_f32(handle) -> np.ndarray:
    import triton.language as tl
    if handle.dtype.scalar == tl.bfloat16:
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data.astype(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest even, as a GPU's cvt.rn.bf16.f32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(x)
    return np.where(nan, 0x7FC0, rounded).astype(np.uint16)


# the package's inline PTX (triton_direct_kernels._bf16_products), its text with whitespace collapsed. Each is
# round(round(a) * round(b)) of its two operands (bf16 or fp32), a bf16 result; any other asm is not emulated.
_PACKED_BF16_PRODUCTS = (
    "{ .reg .b32 t, z; cvt.rn.bf16x2.f32 t, $2, $1; mov.b32 z, 0x80008000; fma.rn.bf16x2 $0, t, $3, z; }",
    "{ .reg .b32 a, r, z; cvt.rn.bf16x2.f32 a, $2, $1; cvt.rn.bf16x2.f32 r, $4, $3; mov.b32 z, 0x80008000; "
    "fma.rn.bf16x2 $0, a, r, z; }",
)


class _AsmResult:
    """What ``tl.inline_asm_elementwise`` reads of the builder's inline-asm op: its results."""

    def __init__(self, *handles):
        self.handles = handles

    def get_result(self, i):
        return self.handles[i]


def _interpreter_patches():
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    cast, dot, asm = InterpreterBuilder.cast_impl, InterpreterBuilder.create_dot, InterpreterBuilder.create_inline_asm

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            return TensorHandle(_round_bf16(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a, b = TensorHandle(_as_f32(a), tl.float32), TensorHandle(_as_f32(b), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_inline_asm(self, inline_asm, constraints, values, type, is_pure, pack):
        if " ".join(inline_asm.split()) not in _PACKED_BF16_PRODUCTS:
            return asm(self, inline_asm, constraints, values, type, is_pure, pack)
        x, y = (_as_f32(v) for v in values)
        a = (_round_bf16(x).astype(np.uint32) << 16).view(np.float32)
        b = (_round_bf16(y).astype(np.uint32) << 16).view(np.float32)
        return _AsmResult(TensorHandle(_round_bf16(a * b), tl.bfloat16))   # (a product of bf16s is exact in fp32)

    def get_bf16(self, value):          # (a bf16 constant: the interpreter has none)
        return TensorHandle(_round_bf16(np.array([value], dtype=np.float32)), tl.bfloat16)

    return [mock.patch.object(InterpreterBuilder, "get_bf16", get_bf16, create=True),
            mock.patch.object(InterpreterBuilder, "cast_impl", cast_impl),
            mock.patch.object(InterpreterBuilder, "create_dot", create_dot),
            mock.patch.object(InterpreterBuilder, "create_inline_asm", create_inline_asm)]


# ---------------------------------------------------------------- the simulation

class Simulation:
    """What a :func:`fake_gpu` block did: ``stats`` counts, per kernel name, "compiles" (candidates the pruning
    compiles for the target: a GPU compiles each; here they are compiled only with ``compile=True``), "autotunings" (tuning keys benchmarked), "candidates_run" (runs of a candidate while tuning) and
    "pruned" (candidates dropped by the pruning); ``winners`` lists (kernel, config) of each autotuning and
    ``candidates`` each kernel's candidate configs."""

    def __init__(self, device: FakeDevice, prefer: int, compile: bool):
        self.device, self.prefer, self.compile = device, prefer, compile
        self.stats: Dict[str, Counter] = {}
        self.winners = []
        self.candidates = {}        # kernel name -> its candidate configs (the autotuner's list, in order)

    def count(self, kernel: str, what: str, n: int = 1) -> None:
        self.stats.setdefault(kernel, Counter())[what] += n

    def totals(self) -> Counter:
        return sum(self.stats.values(), Counter())

    def benchmark(self, kernel_call, quantiles=None, **kwargs):
        kernel_call()                         # one run, in the interpreter: its result is checked, not its time
        return [0.0, 0.0, 0.0] if quantiles else 0.0

    def warmup(self, fn, args: dict, options: dict):
        """The spill pruning's compile of one candidate (an interpreted kernel's ``warmup``)."""
        name = fn.__name__
        self.count(name, "compiles")          # (a GPU compiles each; here only with compile=True)
        if not self.compile:
            return _Binary(("ok", 0, 0, 0))
        spec = {k: ("tensor", str(v.dtype)) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        return _Binary(_helper().submit(_compile_in_helper, fn.fn.__module__, name, spec, options,
                                        self.device).result())


@contextlib.contextmanager
def fake_gpu(device="h100", *, prefer: int = 0, compile: bool = False) -> Iterator[Simulation]:
    """Within the block, CPU tensors stand for those of ``device`` (a key of :data:`DEVICES`, or a
    :class:`FakeDevice`); see the module docstring. ``prefer``: which candidate of each autotuned kernel wins
    where it survives the pruning (0: the first, as on a GPU where it is the fastest). ``compile``: compile each
    candidate for the GPU's target (about 3-6 s each) and prune by its real resources, or take every candidate
    as fitting. Yields the :class:`Simulation`, whose ``stats`` count what ran. Needs TRITON_INTERPRET=1 set before
    triton was imported."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fake_gpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "triton (or lisa_kernels) is imported")
    dev = DEVICES[device] if isinstance(device, str) else device
    sim = Simulation(dev, prefer, compile)

    def gpu_of(d):
        return dev.gpu if torch.device(d).type == "cpu" else None

    bench = Autotuner._bench

    def ranked_bench(self, *args, config, **meta):
        sim.count(self.base_fn.__name__, "candidates_run")
        bench(self, *args, config=config, **meta)
        rank = (self.configs.index(config) - prefer) % len(self.configs)
        return [float(rank)] * 3

    prune = Autotuner.prune_configs

    def counted_prune(self, kwargs):
        kept = prune(self, kwargs)
        sim.count(self.base_fn.__name__, "autotunings")
        sim.count(self.base_fn.__name__, "pruned", len(self.configs) - len(kept))
        return kept

    run = Autotuner.run

    def noted_run(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        sim.winners.append((self.base_fn.__name__, self.best_config))
        sim.candidates[self.base_fn.__name__] = list(self.configs)
        return out

    def warmup(self, *args, grid, **kwargs):
        assert not args, "the launcher passes its arguments by name"
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        return sim.warmup(self, kwargs, options)

    saved = driver.__dict__.get("_active")
    patches = [mock.patch.object(_device, "gpu_of", gpu_of), mock.patch.object(Autotuner, "_bench", ranked_bench),
               mock.patch.object(Autotuner, "prune_configs", counted_prune), mock.patch.object(Autotuner, "run", noted_run),
               mock.patch.object(InterpretedFunction, "warmup", warmup),
               mock.patch.dict(triton_direct._TUNED, clear=True)] + _interpreter_patches()
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        driver.set_active(_make_driver(dev, sim.benchmark))
        stack.callback(driver.set_active, saved)
        yield sim


# ---------------------------------------------------------------- tracing for a simulated GPU (no interpreter)

class _CompilingUtils(_Utils):
    """The driver's binary loader of :func:`traced_gpu`: reads each binary's registers and spills (NVIDIA)."""

    def __init__(self, device: FakeDevice, sim: "Simulation"):
        super().__init__(device)
        self.sim = sim

    def load_binary(self, name, kernel, shared, index):
        self.sim.count(name, "compiles")
        self.binary_resources = _cubin_resources(kernel)
        return super().load_binary(name, kernel, shared, index)


@contextlib.contextmanager
def traced_gpu(device="h100") -> Iterator[Simulation]:
    """Within the block, fake CUDA tensors (``torch._subclasses.FakeTensorMode``) stand for those of ``device``
    (an NVIDIA key of :data:`DEVICES`) and Triton compiles for its target; nothing launches. For tracing the
    package's Triton ops as torch.compile, torch.export and AOTInductor do (their ``wrap_triton`` launches, the
    spill pruning's compiles) on a machine without a GPU: ``tests/test_triton_op.py``. Needs Triton without its
    interpreter (TRITON_INTERPRET unset when triton was imported). ``stats`` counts "compiles" per kernel."""
    from triton.runtime import driver

    dev = DEVICES[device] if isinstance(device, str) else device
    if dev.gpu.backend != "cuda":
        raise ValueError(f"traced_gpu reads NVIDIA binaries only, got {dev.name}")
    if not triton_direct.compiled_kernels():
        raise RuntimeError("traced_gpu compiles the kernels: import triton without TRITON_INTERPRET=1")
    sim = Simulation(dev, 0, True)
    drv = _make_driver(dev, sim.benchmark)
    drv.utils = _CompilingUtils(dev, sim)
    saved = driver.__dict__.get("_active")

    def gpu_of(d):
        return dev.gpu if torch.device(d).type == "cuda" else None

    with mock.patch.object(_device, "gpu_of", gpu_of), mock.patch.dict(triton_direct._TUNED, clear=True):
        driver.set_active(drv)
        try:
            yield sim
        finally:
            driver.set_active(saved)
