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

__all__ = ["GPU", "gpu_of", "COST_CLASSES", "ARCHITECTURES"]

COST_CLASSES = ("cpu", "sm_80", "sm_90")      # the device classes of cost_model.json

# The architectures the package knows: NVIDIA by compute capability (major * 10 + minor), AMD by gfx name.
# (family, name, the cost class fitted to this architecture or None). A GPU of an architecture without fitted
# constants borrows a class (GPU.cost_class) and says so (GPU.fitted).
ARCHITECTURES = {
    80: ("ampere", "Ampere", "sm_80"), 86: ("ampere", "Ampere (consumer)", None),
    87: ("ampere", "Ampere (Orin)", None), 89: ("ada", "Ada", None), 90: ("hopper", "Hopper", "sm_90"),
    100: ("blackwell", "Blackwell", None), 103: ("blackwell", "Blackwell Ultra", None),
    110: ("blackwell", "Blackwell (Thor)", None), 120: ("blackwell-consumer", "consumer Blackwell", None),
    121: ("blackwell-consumer", "consumer Blackwell (GB10)", None),
    "gfx90a": ("cdna2", "CDNA 2", None), "gfx942": ("cdna3", "CDNA 3", None), "gfx950": ("cdna4", "CDNA 4", None),
}


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
    def family(self) -> str:
        """The architecture family: "ampere", "ada", "hopper", "blackwell", "blackwell-consumer", "cdna2", "cdna3",
        "cdna4"; for one the package does not know, "nvidia-sm_<arch>" or "amd-<gfx name>"."""
        known = ARCHITECTURES.get(self.arch)
        if known is not None:
            return known[0]
        return f"nvidia-sm_{self.arch}" if self.backend == "cuda" else f"amd-{self.arch}"

    @property
    def architecture(self) -> str:
        """The architecture by name, with its target: "Hopper (sm_90)", "CDNA 3 (gfx942)"."""
        vendor, target = ("NVIDIA", f"sm_{self.arch}") if self.backend == "cuda" else ("AMD", str(self.arch))
        known = ARCHITECTURES.get(self.arch)
        return f"{vendor} {known[1] if known else 'unknown architecture'} ({target})"

    @property
    def fitted(self) -> bool:
        """Whether the cost model has constants fitted to this architecture (else it borrows :attr:`cost_class`)."""
        known = ARCHITECTURES.get(self.arch)
        return known is not None and known[2] is not None

    @property
    def cost_class(self) -> str:
        """The cost model's class: the one fitted to this architecture (Ampere sm_80: "sm_80"; Hopper: "sm_90");
        else borrowed: "sm_90" for NVIDIA capability >= 9 (Blackwell), "sm_80" for the rest (Ada, consumer Ampere,
        and AMD GPUs). A borrowed class is a guess, and :attr:`fitted` says so."""
        known = ARCHITECTURES.get(self.arch)
        if known is not None and known[2] is not None:
            return known[2]
        if self.backend == "cuda" and self.arch >= 90 and self.family != "blackwell-consumer":
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
