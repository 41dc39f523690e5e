"""``LiSAAttention``: a drop-in for timm's ViT ``Attention``, and ``LiSARPE``, the module holding its tables.

    attn = LiSAAttention(dim=192, num_heads=3, grid=(14, 14), num_extra=1)   # CLS + 14x14 patches
    y = attn(x)                                                               # x: (B, 1 + 196, 192)
    attn.set_grid((24, 24))                                                   # 384 px: tables resampled
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import lisa_attention
from ._validate import BOUNDARIES, FEATURE_MAPS, check_grid

__all__ = ["LiSARPE", "LiSAAttention", "resample_rpe"]


def _resample_axis(table: torch.Tensor, dim: int, old: int, new: int, circular: bool) -> torch.Tensor:
    """Linear interpolation of one axis of an RPE table from grid size ``old`` to ``new``.

    Offsets scale with the grid: zero boundary, entry e of 2S-1 holds offset e - (S-1), and new offset
    delta' reads old offset delta' * (S-1) / (S'-1) (the ends stay the ends); circular, entry e of S holds
    offset e and new offset e' reads old offset e' * S / S', wrapping around.
    """
    if old == new:
        return table
    device, dtype = table.device, table.dtype
    if circular:
        x = torch.arange(new, device=device, dtype=torch.float64) * (old / new)
        lo = torch.floor(x)
        w = (x - lo).to(dtype)
        i0 = lo.long() % old
        i1 = (i0 + 1) % old
    else:
        n_old, n_new = 2 * old - 1, 2 * new - 1
        if old == 1:   # a single offset (0): every new offset takes its value
            return table.expand(*[n_new if a == dim else s for a, s in enumerate(table.shape)]).clone()
        offsets = torch.arange(n_new, device=device, dtype=torch.float64) - (new - 1)
        x = (offsets * ((old - 1) / (new - 1) if new > 1 else 0.0) + (old - 1)).clamp(0, n_old - 1)
        lo = torch.floor(x).clamp(max=n_old - 2)
        w = (x - lo).to(dtype)
        i0 = lo.long()
        i1 = i0 + 1
    shape = [1] * table.dim()
    shape[dim] = -1
    w = w.view(shape)
    return table.index_select(dim, i0) * (1 - w) + table.index_select(dim, i1) * w


def resample_rpe(rpe: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                 boundary: str = "zero") -> torch.Tensor:
    """Resample an (H, M, table...) RPE table from ``old_grid`` to ``new_grid`` (separable linear interpolation)."""
    if len(old_grid) != len(new_grid):
        raise ValueError(f"new_grid must have {len(old_grid)} axes like the old grid {tuple(old_grid)}, "
                         f"got {tuple(new_grid)}")
    out = rpe
    for a, (s_old, s_new) in enumerate(zip(old_grid, new_grid)):
        out = _resample_axis(out, 2 + a, s_old, s_new, boundary == "circular")
    return out


class LiSARPE(nn.Module):
    """The learned tables: ``rpe`` (H, M, 2S-1 per axis, or S per axis for circular) and ``rpe_extra`` (H, M, 3).

    Both start at zero, where LiSA is plain (normalised) linear attention.
    """

    def __init__(self, num_heads: int, grid: Sequence[int], num_rpe: int = 1, num_extra: int = 0,
                 boundary: str = "zero"):
        super().__init__()
        self.grid = check_grid(grid)
        self.boundary = boundary
        table = self.grid if boundary == "circular" else tuple(2 * s - 1 for s in self.grid)
        self.rpe = nn.Parameter(torch.zeros(num_heads, num_rpe, *table))
        self.rpe_extra = nn.Parameter(torch.zeros(num_heads, num_rpe, 3)) if num_extra > 0 else None

    @torch.no_grad()
    def set_grid(self, new_grid: Sequence[int]) -> None:
        """Resample ``rpe`` to a new grid (resolution change); ``rpe_extra`` does not depend on the grid."""
        new_grid = check_grid(new_grid)
        table = resample_rpe(self.rpe.data, self.grid, new_grid, self.boundary)
        self.rpe = nn.Parameter(table.contiguous(), requires_grad=self.rpe.requires_grad)
        self.grid = new_grid

    def extra_repr(self) -> str:
        return f"grid={self.grid}, boundary={self.boundary!r}, rpe={tuple(self.rpe.shape)}"


class LiSAAttention(nn.Module):
    """LiSA self-attention with timm's ``Attention`` interface: (B, N, C) -> (B, N, C).

    ``qkv`` projection, ``num_heads`` heads of dim C / num_heads, LiSA in place of softmax attention,
    ``proj``. The first ``num_extra`` tokens (CLS, registers) are off the grid; the rest are the grid,
    row-major. ``attn_drop`` is accepted for compatibility but not applied (LiSA never forms the attention
    matrix), with a warning when it is nonzero. ``qk_norm``, ``scale_norm``, ``proj_bias``, ``norm_layer``,
    ``device`` and ``dtype`` are timm's. The RPE tables stay float32 under ``dtype`` only if not given.

    ``set_grid`` replaces the ``rpe`` parameter by a resampled one: call it before building the optimizer
    and before wrapping the model in DDP/FSDP.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, grid: Sequence[int], num_extra: int = 0, num_rpe: int = 1,
                 feature_map: str = "elu1", boundary: str = "zero", qk_norm: bool = False, scale_norm: bool = False,
                 proj_bias: bool = True, norm_layer: Optional[type] = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        head_dim = dim // num_heads
        if head_dim % num_rpe != 0:
            raise ValueError(f"the head dim {head_dim} (dim / num_heads) must be divisible by num_rpe={num_rpe}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {list(BOUNDARIES)}, got {boundary!r}")
        if attn_drop:
            warnings.warn("LiSAAttention: attn_drop is not applied (LiSA never forms the attention matrix)",
                          stacklevel=2)
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_extra, self.feature_map, self.backend = int(num_extra), feature_map, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        norm_layer = norm_layer or nn.LayerNorm
        self.q_norm = norm_layer(head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)       # kept for timm compatibility; never applied
        self.norm = norm_layer(dim, **factory) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe = LiSARPE(num_heads, grid, num_rpe, num_extra, boundary)
        if device is not None or dtype is not None:
            self.rpe.to(**{k: v for k, v in factory.items() if v is not None})

    @classmethod
    def configured(cls, **options) -> type:
        """A subclass with LiSA's options bound, for constructors that take an attention *class*.

        For example timm's ``VisionTransformer(attn_layer=LiSAAttention.configured(grid=(14, 14), num_extra=1))``:
        timm passes dim, num_heads, qkv_bias, ... and the bound options fill in grid and the rest.
        """
        base = cls

        class Configured(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**options, **kwargs})

        Configured.__name__ = Configured.__qualname__ = f"{cls.__name__}[{', '.join(f'{k}={v!r}' for k, v in options.items())}]"
        return Configured

    @property
    def grid(self) -> Tuple[int, ...]:
        return self.rpe.grid

    def set_grid(self, new_grid: Sequence[int]) -> None:
        """Change the token grid (e.g. (14, 14) -> (24, 24) for 384 px); the RPE tables are resampled."""
        self.rpe.set_grid(new_grid)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). ``is_causal=True`` (1D grids only) masks later tokens, as timm passes it."""
        if attn_mask is not None:
            raise ValueError("LiSAAttention does not take an attn_mask (got a tensor); LiSA has no masking "
                             "other than is_causal=True on 1D grids")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, C), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        rpe_extra = self.rpe.rpe_extra
        x = lisa_attention(q, k, v, self.rpe.rpe.to(q.dtype), grid=self.grid, num_extra=self.num_extra,
                           rpe_extra=None if rpe_extra is None else rpe_extra.to(q.dtype),
                           feature_map=self.feature_map, boundary=self.rpe.boundary, causal=bool(is_causal),
                           backend=self.backend)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))
