"""LiSAAttention as a drop-in for timm's ViT ``Attention`` (docs/models.md).

Builds ``vit_tiny_patch16_224`` with ``pretrained=False`` (no download, no network), replaces every block's
``attn`` with ``LiSAAttention(dim, num_heads, qkv_bias=True, grid=(14, 14), num_extra=1)`` (the CLS token is
the extra token), copying the timm module's ``qkv``/``proj`` weights, and checks: the state-dict keys line
up, timm's own ``Block.forward`` can call it (whatever keyword arguments the installed timm passes), forward
and backward at 224 px reach every block's RPE tables, the output depends on the RPE tables, and 384 px
fine-tuning (``model.set_input_size(img_size=384)`` + ``set_grid((24, 24))``) runs forward and backward.

To stay fast on a CPU, the model keeps only its first ``DEPTH`` = 3 of 12 blocks (``model.blocks[:3]``);
every block is the same, so depth adds nothing to what is checked. The RPE tables are set to random values
(not their zero init) so that LiSA's structure is really exercised.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

try:
    import timm
    from timm.models.vision_transformer import Attention as TimmAttention
except ImportError as e:  # pragma: no cover - timm is in the `test` extra
    pytest.skip(f"timm is not installed ({e}); `pip install timm` or `pip install .[test]`",
                allow_module_level=True)

from lisa_kernels.nn import LiSAAttention, convert_vit

MODEL = "vit_tiny_patch16_224"
DEPTH = 3
GRID_224, GRID_384 = (14, 14), (24, 24)


@pytest.fixture(scope="module")
def timm_vit():
    """The plain timm model (softmax attention), first DEPTH blocks; tests deep-copy it."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False)
    model.blocks = model.blocks[:DEPTH]
    assert model.num_prefix_tokens == 1 and model.patch_embed.grid_size == GRID_224
    return model.eval()


def _to_lisa(attn: torch.nn.Module, grid, rpe_std: float = 0.5) -> LiSAAttention:
    dim = attn.qkv.in_features
    lisa = LiSAAttention(dim, num_heads=attn.num_heads, qkv_bias=attn.qkv.bias is not None, grid=grid,
                         num_extra=1)
    missing, unexpected = lisa.load_state_dict(attn.state_dict(), strict=False)
    assert sorted(missing) == ["rpe.rpe", "rpe.rpe_extra"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        lisa.rpe.rpe.normal_(0.0, rpe_std)
        lisa.rpe.rpe_extra.normal_(0.0, rpe_std)
    return lisa


def _lisa_vit(timm_vit, seed: int = 0):
    model = copy.deepcopy(timm_vit)
    torch.manual_seed(seed)
    for blk in model.blocks:
        assert isinstance(blk.attn, TimmAttention)
        blk.attn = _to_lisa(blk.attn, GRID_224)
    return model


def _lisa_modules(model):
    return [m for m in model.modules() if isinstance(m, LiSAAttention)]


def _forward_loss(model, x):
    """``model(x)`` split into its two halves, with a loss on the logits and on the patch tokens.

    The classifier reads only the CLS token, and in the last block the CLS output does not depend on the
    grid-to-grid table ``rpe`` (only on ``rpe_extra``), so a loss on the logits alone gives the last
    block's ``rpe`` an exactly zero gradient. The patch-token term makes every table matter.
    """
    feats = model.forward_features(x)
    out = model.forward_head(feats)
    return out, out.square().mean() + feats[:, 1:].square().mean()


def _attn_call_in_block_source(block) -> str:
    """How the installed timm's Block.forward calls its attention (for messages)."""
    src = inspect.getsource(type(block).forward)
    return "\n".join(line.strip() for line in src.splitlines() if "self.attn(" in line) or src


def test_state_dict_lines_up(timm_vit):
    model = _lisa_vit(timm_vit)
    for blk, ref in zip(model.blocks, timm_vit.blocks):
        sd, ref_sd = blk.attn.state_dict(), ref.attn.state_dict()
        assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= set(ref_sd)
        assert set(sd) == set(ref_sd) | {"rpe.rpe", "rpe.rpe_extra"}
        for k, v in ref_sd.items():
            assert torch.equal(sd[k], v), k
        assert sd["rpe.rpe"].shape == (3, 1, 2 * 14 - 1, 2 * 14 - 1)
        assert sd["rpe.rpe_extra"].shape == (3, 1, 3)
    # a checkpoint of the plain timm model loads into the LiSA model; only the RPE tables are new
    missing, unexpected = model.load_state_dict(timm_vit.state_dict(), strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"blocks.{i}.attn.rpe.{t}" for i in range(DEPTH) for t in ("rpe", "rpe_extra"))


def test_block_calls_attention(timm_vit):
    """timm's own Block.forward calls ``self.attn`` with whatever keywords this timm version passes."""
    model = _lisa_vit(timm_vit)
    blk = model.blocks[0]
    x = torch.randn(2, 1 + 14 * 14, blk.attn.qkv.in_features)
    h = blk.norm1(x)
    with torch.no_grad():
        y = blk.attn(h)                               # older timm: self.attn(self.norm1(x))
        torch.testing.assert_close(blk.attn(h, attn_mask=None), y)
        try:
            out = blk(x)                              # the installed timm's call
        except TypeError as e:
            pytest.fail(f"timm {timm.__version__} Block.forward calls `{_attn_call_in_block_source(blk)}`, "
                        f"which LiSAAttention.forward does not accept: {e}")
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_forward_backward_224(timm_vit):
    model = _lisa_vit(timm_vit).train()
    x = torch.randn(2, 3, 224, 224)
    out, loss = _forward_loss(model, x)
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()
    loss.backward()
    lisa = _lisa_modules(model)
    assert len(lisa) == DEPTH
    for i, m in enumerate(lisa):
        for name, p in (("rpe", m.rpe.rpe), ("rpe_extra", m.rpe.rpe_extra)):
            assert p.grad is not None, f"block {i} {name}: no gradient"
            assert torch.isfinite(p.grad).all(), f"block {i} {name}: non-finite gradient"
            assert p.grad.abs().sum() > 0, f"block {i} {name}: zero gradient"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_output_depends_on_rpe(timm_vit):
    model = _lisa_vit(timm_vit)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        base = model(x)
        m = _lisa_modules(model)[0]   # not the last block: there only rpe_extra reaches the CLS token
        old = m.rpe.rpe.clone()
        m.rpe.rpe.add_(torch.randn_like(m.rpe.rpe))
        changed = model(x)
        m.rpe.rpe.copy_(old)
        torch.testing.assert_close(model(x), base)    # restoring the table restores the output
        m.rpe.rpe_extra.add_(torch.randn_like(m.rpe.rpe_extra))
        changed_extra = model(x)
    assert (changed - base).abs().max() > 1e-4 * base.abs().max()
    assert (changed_extra - base).abs().max() > 1e-4 * base.abs().max()


def test_finetune_384(timm_vit):
    model = _lisa_vit(timm_vit).train()
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=384)
    else:  # older timm: rebuild at 384 px and resample the position embedding into it
        from timm.layers import resample_abs_pos_embed
        sd = model.state_dict()
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=GRID_384, old_size=GRID_224,
                                                 num_prefix_tokens=1)
        old_model = model
        model = timm.create_model(MODEL, pretrained=False, img_size=384)
        model.blocks = model.blocks[:DEPTH]
        for blk, old_blk in zip(model.blocks, old_model.blocks):
            blk.attn = old_blk.attn
        model.load_state_dict(sd)
        model.train()
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 192)
    lisa = _lisa_modules(model)
    before = [m.rpe.rpe.detach().clone() for m in lisa]
    for m in lisa:
        m.set_grid(GRID_384)
    for m, b in zip(lisa, before):
        assert m.grid == GRID_384
        assert m.rpe.rpe.shape == (3, 1, 47, 47)
        # the centre offset (0, 0) and the corner offsets keep their values under the resampling
        torch.testing.assert_close(m.rpe.rpe[..., 23, 23], b[..., 13, 13])
        torch.testing.assert_close(m.rpe.rpe[..., 0, 0], b[..., 0, 0])

    x = torch.randn(2, 3, 384, 384)
    out, loss = _forward_loss(model, x)
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()
    loss.backward()
    for i, m in enumerate(lisa):
        for name, p in (("rpe", m.rpe.rpe), ("rpe_extra", m.rpe.rpe_extra)):
            assert p.grad is not None and p.grad.shape == p.shape, f"block {i} {name}"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"block {i} {name}"


def test_attn_layer_class_builds_a_lisa_vit():
    """timm builds the model itself from ``attn_layer=LiSAAttention.configured(...)`` (timm needs a class)."""
    layer = LiSAAttention.configured(grid=(14, 14), num_extra=1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, attn_layer=layer)
    attns = [block.attn for block in model.blocks]
    assert all(isinstance(a, LiSAAttention) and a.grid == (14, 14) and a.num_extra == 1 for a in attns)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_convert_vit_matches_the_hand_swap(timm_vit):
    """``convert_vit`` (one call) builds the same model as the swap by hand above: same keys, same outputs."""
    hand = _lisa_vit(timm_vit)
    conv = convert_vit(copy.deepcopy(timm_vit))
    assert [type(b.attn) for b in conv.blocks] == [LiSAAttention] * DEPTH
    assert all(m.grid == GRID_224 and m.num_extra == 1 for m in _lisa_modules(conv))
    conv.load_state_dict(hand.state_dict(), strict=True)     # the random RPE tables of the hand-made model
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), hand(x), rtol=0, atol=0)
