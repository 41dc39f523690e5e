"""LiSA ViTs registered in timm's model registry: ``timm.create_model("lisa_vit_small_patch16_224", num_classes=10)``.

    import lisa_kernels            # any import of lisa_kernels registers the models once timm is imported
    import timm
    model = timm.create_model("lisa_vit_tiny_patch16_224", num_classes=100, num_rpe=2)

Each model is timm's ``VisionTransformer`` of the same name without the ``lisa_`` prefix (same depth,
width, heads, patch size, CLS token and learned position embedding) with every ``Attention`` replaced by
:class:`lisa_kernels.nn.LiSAAttention` through :func:`lisa_kernels.nn.convert_vit` (grid and prefix-token
count read from the built model, so ``img_size``, ``patch_size``, ``reg_tokens``, ``class_token`` ... are
honoured). The LiSA options ``num_rpe``, ``feature_map``, ``boundary`` and ``backend`` may be passed to
``timm.create_model``; every other keyword goes to timm's ``VisionTransformer``.

There are no pretrained weights: ``pretrained=True`` raises. To start from a pretrained softmax ViT, convert
it (and fine-tune: the attention changes): ``convert_vit(timm.create_model("vit_small_patch16_224",
pretrained=True))``.

Importing this module imports timm and registers the models (it raises ImportError without timm).
``import lisa_kernels`` does not import timm: it registers the models when timm is imported, or at once if
timm already is (see ``lisa_kernels._register_timm_models_on_import``).
"""

from __future__ import annotations

try:
    import timm  # noqa: F401
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
    from timm.models.vision_transformer import VisionTransformer
except ImportError as e:  # without timm
    raise ImportError(f"lisa_kernels.models needs timm (`pip install timm`): {e}") from e

from .nn import convert_vit

__all__ = ["lisa_vit_tiny_patch16_224", "lisa_vit_small_patch16_224", "MODEL_NAMES", "LISA_OPTIONS"]

LISA_OPTIONS = ("num_rpe", "feature_map", "boundary", "backend")


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.proj",
            "classifier": "head", "license": "BSD-3-Clause", **kwargs}


default_cfgs = generate_default_cfgs({
    "lisa_vit_tiny_patch16_224": _cfg(),
    "lisa_vit_small_patch16_224": _cfg(),
})


def _create_lisa_vit(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> VisionTransformer:
    if pretrained:
        base = variant[len("lisa_"):]
        raise ValueError(f"{variant}: no pretrained weights exist yet; use pretrained=False, or convert a pretrained "
                         f"softmax ViT and fine-tune it: lisa_kernels.nn.convert_vit(timm.create_model("
                         f"{base!r}, pretrained=True))")
    options = {k: kwargs.pop(k) for k in LISA_OPTIONS if k in kwargs}
    if kwargs.get("features_only"):
        raise ValueError(f"{variant}: features_only=True is not supported; use forward_intermediates() "
                         f"or get_intermediate_layers() of the model")
    if kwargs.get("dynamic_img_size"):
        raise ValueError(f"{variant}: dynamic_img_size=True is not supported (LiSA's RPE tables are per grid); "
                         f"change the input size with lisa_kernels.nn.set_model_grid(model, img_size)")
    model = build_model_with_cfg(VisionTransformer, variant, pretrained=False, **dict(model_args, **kwargs))
    return convert_vit(model, **options)


@register_model
def lisa_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """LiSA-ViT-Tiny/16 (the layout of timm's ``vit_tiny_patch16_224``): 12 blocks, dim 192, 3 heads, 14x14 grid + CLS."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_lisa_vit("lisa_vit_tiny_patch16_224", pretrained, model_args, kwargs)


@register_model
def lisa_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """LiSA-ViT-Small/16 (the layout of timm's ``vit_small_patch16_224``): 12 blocks, dim 384, 6 heads, 14x14 grid + CLS."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_lisa_vit("lisa_vit_small_patch16_224", pretrained, model_args, kwargs)


MODEL_NAMES = ("lisa_vit_tiny_patch16_224", "lisa_vit_small_patch16_224")
