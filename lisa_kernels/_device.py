"""Which GPU a device is: the one question behind every GPU-specific choice of the package.

:func:`gpu_of` answers it for a ``torch.device``: a :class:`GPU` (vendor backend, architecture, warp size) for a
CUDA or ROCm device, ``None`` for anything else (the CPU, Triton's interpreter, "meta"). Everything that depends on
the GPU asks here and nowhere else:

* the cost model's device class (``dispatch``): :attr:`GPU.cost_class`;
* whether ``backend="cuda"`` can run (a GPU is needed);
* the Triton launcher (``triton_direct``): whether it autotunes, its dot modes, and the target its spill pruning
  compiles for (Triton's ``GPUTarget(backend, arch, warp_size)``).

``lisa_kernels.testing.fake_gpu`` replaces :func:`gpu_of` (with ``unittest.mock``) so that CPU tensors stand for a
chosen GPU's: the tests run this host code on machines without one.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

__all__ = ["GPU", "gpu_of", "COST_CLASSES"]

COST_CLASSES = ("cpu", "sm_80", "sm_90")      # the device classes of cost_model.json


@dataclasses.dataclass(frozen=True)
class GPU:
    """A GPU as the package's choices see it.

    ``backend``: "cuda" (NVIDIA) or "hip" (AMD, PyTorch's ROCm build, whose devices are ``torch.cuda`` devices);
    ``arch``: the compute capability as major * 10 + minor for NVIDIA (80, 89, 90, 100, 120), the gfx name for AMD
    ("gfx942"); ``warp_size``: 32 (NVIDIA) or 64 (AMD CDNA): Triton's ``GPUTarget(backend, arch, warp_size)``."""

    backend: str
    arch: Union[int, str]
    warp_size: int

    @property
    def cost_class(self) -> str:
        """The cost model's class: "sm_90" for NVIDIA capability >= 9 (Hopper and later), else "sm_80" (Ampere,
        Ada and older, and AMD GPUs: no class of their own yet, the A100-class guess)."""
        if self.backend == "cuda" and self.arch >= 90:
            return "sm_90"
        return "sm_80"


def _cuda_gpu(index: int) -> GPU:
    if torch.version.hip:        # (ROCm reports a capability too, e.g. 9.4 on an MI300X: not a Hopper)
        return GPU("hip", str(torch.cuda.get_device_properties(index).gcnArchName).split(":")[0], 64)
    major, minor = torch.cuda.get_device_capability(index)
    return GPU("cuda", 10 * major + minor, 32)


def gpu_of(device: Union[torch.device, str]) -> Optional[GPU]:
    """The GPU of ``device``, or None where it is not a GPU (CPU, meta, ...)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())
