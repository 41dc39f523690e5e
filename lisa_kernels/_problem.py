"""The sizes and options of one call, after validation: what every backend's can-run check, cost estimate and
implementation read (``lisa_kernels._validate.check_inputs`` builds it)."""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import torch

__all__ = ["Problem"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """The sizes and options of one call, after validation."""

    B: int
    H: int
    N: int
    Dk: int
    Dv: int
    M: int
    grid: Tuple[int, ...]
    num_extra: int
    feature_map: str
    normalize: bool
    eps: float
    boundary: str
    causal: bool
    scale: float
    dtype: torch.dtype
    device: torch.device

    @property
    def num_grid(self) -> int:
        return math.prod(self.grid)

    @property
    def rpe_table_shape(self) -> Tuple[int, ...]:
        """Offsets per axis of the rpe table: ``2S-1`` (zero boundary) or ``S`` (circular)."""
        if self.boundary == "circular":
            return tuple(self.grid)
        return tuple(2 * s - 1 for s in self.grid)
