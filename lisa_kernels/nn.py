"""``LiSAAttention``: a drop-in for timm's ViT ``Attention``, and ``LiSARPE``, the module holding its tables.

    attn = LiSAAttention(dim=192, num_heads=3, grid=(14, 14), num_extra=1)   # CLS + 14x14 patches
    y = attn(x)                                                               # x: (B, 1 + 196, 192)
    attn.set_grid((24, 24))                                                   # 384 px: tables resampled

For timm models, ``convert_vit`` swaps every ``Attention`` of a ViT in one call and ``set_model_grid`` changes
the input size of a converted model (patch embedding, position embedding and every RPE table together):

    model = convert_vit(timm.create_model("vit_small_patch16_224", num_classes=10))
    set_model_grid(model, 384)
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import lisa_attention
from ._validate import BOUNDARIES, FEATURE_MAPS, check_grid

__all__ = ["LiSARPE", "LiSAAttention", "resample_rpe", "convert_vit", "set_model_grid"]


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


# ----------------------------------------------------------------------------------------------------------
# whole-model helpers for timm ViTs


def _timm_attention_types() -> Tuple[type, ...]:
    try:
        from timm.layers import Attention
    except ImportError:   # timm not installed (or too old to have timm.layers): only `types=` can match
        return ()
    return (Attention,)


def _find_vit(model: nn.Module) -> Optional[nn.Module]:
    """The model itself or its first submodule with a ``patch_embed`` and ``num_prefix_tokens`` (a timm ViT)."""
    for _, m in model.named_modules():
        if hasattr(m, "patch_embed") and hasattr(m, "num_prefix_tokens"):
            return m
    return None


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _describe(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


def convert_vit(model: nn.Module, *, grid: Optional[Sequence[int]] = None, num_extra: Optional[int] = None,
                num_rpe: int = 1, feature_map: str = "elu1", boundary: str = "zero", backend: str = "auto",
                types: Iterable[type] = (), strict: bool = True) -> nn.Module:
    """Replace every timm ``Attention`` of a ViT by a :class:`LiSAAttention`, in place, and return the model.

    Works on timm's ``VisionTransformer`` and its relatives that use timm's ``Attention`` (ViT, DeiT and
    DeiT-distilled, ViTs with register tokens, ``vit_*`` built with ``qk_norm`` ...), also when the ViT is
    wrapped (the first submodule with ``patch_embed`` and ``num_prefix_tokens`` is read). Each new module
    takes over the old one's ``qkv``, ``q_norm``, ``k_norm``, ``norm`` and ``proj`` submodules (so their
    weights, and the state-dict keys, are unchanged) and adds the RPE tables ``rpe.rpe``/``rpe.rpe_extra``,
    initialised to zero: a converted model computes plain normalised linear attention until they are trained.
    (A pretrained softmax ViT therefore changes its function when converted: fine-tune it.)

    Args:
        model: the model; it is modified in place (``copy.deepcopy`` it first to keep the original).
        grid: the token grid; default: ``patch_embed.grid_size`` of the ViT.
        num_extra: tokens before the grid; default: the ViT's ``num_prefix_tokens`` (CLS, distillation and
            register tokens).
        num_rpe, feature_map, boundary, backend: passed to every :class:`LiSAAttention`.
        types: further attention classes with timm's ``Attention`` interface to convert (``qkv``, ``proj``,
            ``num_heads``, ``head_dim``, optional ``q_norm``/``k_norm``/``norm``).
        strict: raise if, after conversion, a module whose class name contains ``Attention`` (other than
            ``LiSAAttention`` and attention-pooling heads ``AttentionPool*``) is left, e.g. timm's
            ``AttentionRope`` or ``EvaAttention``, which LiSA cannot replace. ``strict=False`` leaves them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: naming the module, when the grid or prefix count cannot be read, the ViT resizes its
            input per call (``dynamic_img_size=True``), an attention module uses a feature LiSAAttention does
            not have (gated output, ``attn_head_dim``/``dim_out`` different from ``dim``), no attention was
            found, or (``strict``) an attention module of another kind is left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    vit = _find_vit(model)
    if vit is not None and getattr(vit, "dynamic_img_size", False):
        raise ValueError(f"convert_vit: {_model_name(vit)} was built with dynamic_img_size=True, so its token grid "
                         f"changes with every input; LiSA's RPE tables are per grid: build it with a fixed "
                         f"img_size and change the size with lisa_kernels.nn.set_model_grid(model, img_size)")
    if grid is None:
        grid = getattr(getattr(vit, "patch_embed", None), "grid_size", None)
        if grid is None:
            raise ValueError(f"convert_vit: cannot read the token grid of {_model_name(model)} (no submodule with "
                             f"patch_embed.grid_size and num_prefix_tokens, as a timm VisionTransformer has); "
                             f"pass grid=(H, W)")
    grid = check_grid(grid)
    if num_extra is None:
        if vit is None:
            raise ValueError(f"convert_vit: cannot read the number of prefix tokens of {_model_name(model)} "
                             f"(no num_prefix_tokens attribute); pass num_extra=")
        num_extra = int(vit.num_prefix_tokens)
    if isinstance(num_extra, bool) or not isinstance(num_extra, int) or num_extra < 0:
        raise ValueError(f"num_extra must be an int >= 0, got {num_extra!r}")
    types = tuple(types)
    if not all(isinstance(t, type) for t in types):
        raise TypeError(f"types must be classes, got {types!r}")
    convertible = _timm_attention_types() + types

    targets: List[Tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if type(m) in convertible:
            targets.append((name, m))
    if strict:
        converted = {id(m) for _, m in targets}
        left = [_describe(n, m) for n, m in model.named_modules()
                if "Attention" in type(m).__name__ and id(m) not in converted and not isinstance(m, LiSAAttention)
                and not type(m).__name__.startswith("AttentionPool")]
        if left:
            raise ValueError(f"convert_vit: {len(left)} attention module(s) of {_model_name(model)} cannot be converted "
                             f"to LiSA: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''} (only timm's Attention "
                             f"and the classes passed in types= can); pass strict=False to convert the rest and "
                             f"keep these as they are")

    if not targets:
        raise ValueError(f"convert_vit: found no timm Attention module in {_model_name(model)}"
                         + ("" if _timm_attention_types() else " (timm is not installed)")
                         + "; pass types=(YourAttention,) for a class with timm's Attention interface")

    # build every replacement first, so that an error leaves the model untouched
    new_modules = [_lisa_from_timm(name, old, grid, num_extra, num_rpe, feature_map, boundary, backend)
                   for name, old in targets]
    dropped_p = max(float(getattr(getattr(old, "attn_drop", None), "p", 0.0) or 0.0) for _, old in targets)
    for (name, _), new in zip(targets, new_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    if dropped_p:
        warnings.warn(f"convert_vit: attention dropout (attn_drop up to {dropped_p}) is not applied by LiSAAttention "
                      f"(LiSA never forms the attention matrix)", stacklevel=2)
    return model


def _lisa_from_timm(name: str, old: nn.Module, grid, num_extra, num_rpe, feature_map, boundary,
                    backend) -> LiSAAttention:
    where = f"convert_vit: {_describe(name, old)}"
    qkv, proj = getattr(old, "qkv", None), getattr(old, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not hasattr(old, "num_heads"):
        raise ValueError(f"{where}: has no fused qkv/proj nn.Linear and num_heads, as timm's Attention has")
    dim, num_heads = qkv.in_features, int(old.num_heads)
    if getattr(old, "gate", None) is not None:
        raise ValueError(f"{where}: uses a gated output (gated=True), which LiSAAttention does not have")
    head_dim = int(getattr(old, "head_dim", dim // num_heads))
    if qkv.out_features != 3 * dim or num_heads * head_dim != dim or proj.in_features != dim or proj.out_features != dim:
        raise ValueError(f"{where}: qkv {qkv.in_features}->{qkv.out_features}, proj {proj.in_features}->"
                         f"{proj.out_features}, {num_heads} heads of {head_dim}: LiSAAttention needs "
                         f"num_heads * head_dim == dim and dim_out == dim (no attn_head_dim / dim_out)")
    try:
        new = LiSAAttention(dim, num_heads, qkv_bias=qkv.bias is not None, grid=grid, num_extra=num_extra,
                            num_rpe=num_rpe, feature_map=feature_map, boundary=boundary,
                            proj_bias=proj.bias is not None, backend=backend,
                            device=qkv.weight.device, dtype=qkv.weight.dtype)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    # take over the old submodules themselves: weights, norm types and dropout rates stay as they were
    new.qkv, new.proj = qkv, proj
    for sub in ("q_norm", "k_norm", "norm", "attn_drop", "proj_drop"):
        if isinstance(getattr(old, sub, None), nn.Module):
            setattr(new, sub, getattr(old, sub))
    new.train(old.training)
    return new


def set_model_grid(model: nn.Module, img_size: Union[int, Sequence[int], None] = None, *,
                   grid: Optional[Sequence[int]] = None) -> nn.Module:
    """Change the input size of a converted model: patch embedding, position embedding and every RPE table.

    ``set_model_grid(model, 384)`` on a converted timm ViT calls timm's ``model.set_input_size(img_size=384)``
    (which updates ``patch_embed`` and resamples the absolute position embedding as timm does), then
    ``set_grid(patch_embed.grid_size)`` on every :class:`LiSAAttention` (the RPE tables are resampled).
    ``set_model_grid(model, grid=(24, 24))`` only sets the grid of every LiSAAttention (for models that are
    not timm ViTs). Parameters are replaced: build the optimizer (and DDP/FSDP wrappers) afterwards.
    Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if (img_size is None) == (grid is None):
        raise ValueError("set_model_grid: pass exactly one of img_size and grid")
    lisa = [m for m in model.modules() if isinstance(m, LiSAAttention)]
    if not lisa:
        raise ValueError(f"set_model_grid: {_model_name(model)} has no LiSAAttention module "
                         f"(convert it first with lisa_kernels.nn.convert_vit)")
    if img_size is not None:
        if isinstance(img_size, bool) or not (isinstance(img_size, int) or (
                isinstance(img_size, (tuple, list)) and len(img_size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) for s in img_size))):
            raise ValueError(f"img_size must be an int or a pair of ints, got {img_size!r}")
        vit = _find_vit(model)
        if vit is None or not hasattr(vit, "set_input_size"):
            raise ValueError(f"set_model_grid: {_model_name(model)} has no timm ViT with set_input_size "
                             f"(timm >= 1.0 VisionTransformer); pass grid=(H, W) to set the LiSA grids only")
        vit.set_input_size(img_size=img_size)
        grid = tuple(vit.patch_embed.grid_size)
    grid = check_grid(grid)
    for m in lisa:
        if len(m.grid) != len(grid):
            raise ValueError(f"set_model_grid: the new grid {grid} has {len(grid)} axes, a LiSAAttention has "
                             f"the {len(m.grid)}-axis grid {m.grid}")
    for m in lisa:
        m.set_grid(grid)
    return model
