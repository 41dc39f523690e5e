"""``convert_vit``, ``set_model_grid`` and the timm-registered LiSA ViTs (lisa_kernels.nn, lisa_kernels.models).

Real timm models, built with ``pretrained=False`` (no network), kept shallow (``depth=2``) or small
(``img_size=96``: a 6x6 grid) so that every test runs in seconds on a CPU. The RPE tables are set to random
values where LiSA's structure must be exercised; the zero-RPE test compares against a plain linear attention
written here, independently of lisa_kernels.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import timm
    from timm.layers import Attention as TimmAttention
except ImportError as e:  # pragma: no cover - timm is in the `test` extra
    pytest.skip(f"timm is not installed ({e}); `pip install timm` or `pip install .[test]`",
                allow_module_level=True)

import lisa_kernels.models  # noqa: F401  (registers the lisa_vit_* models)
from lisa_kernels.nn import LiSAAttention, convert_vit, set_model_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lisa(model):
    return [m for m in model.modules() if isinstance(m, LiSAAttention)]


def _randomize_rpe(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _lisa(model):
            for p in m.rpe.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _small_vit(name="vit_tiny_patch16_224", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"img_size": 96, "depth": 2, **kw}
    return timm.create_model(name, pretrained=False, **kw).eval()


# ----------------------------------------------------------------------------------------------------------
# convert_vit on real timm models


@pytest.mark.parametrize("name, kw, num_extra", [
    ("vit_tiny_patch16_224", {}, 1),
    ("deit_tiny_distilled_patch16_224", {}, 2),                      # CLS + distillation token
    ("vit_tiny_patch16_224", {"reg_tokens": 4, "no_embed_class": True}, 5),   # CLS + 4 registers
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
    ("vit_tiny_patch16_224", {"qk_norm": True}, 1),
])
def test_convert_reads_grid_and_prefix_tokens(name, kw, num_extra):
    ref = _small_vit(name, **kw)
    model = convert_vit(copy.deepcopy(ref))
    lisa = _lisa(model)
    assert len(lisa) == 2 and not any(isinstance(m, TimmAttention) for m in model.modules())
    for m in lisa:
        assert m.grid == (6, 6) and m.num_extra == num_extra == ref.num_prefix_tokens
        assert m.rpe.rpe.shape == (3, 1, 11, 11) and torch.count_nonzero(m.rpe.rpe) == 0
        assert (m.rpe.rpe_extra is None) == (num_extra == 0)
    # the timm weights are carried over under the same keys; only the RPE tables are new
    sd, ref_sd = model.state_dict(), ref.state_dict()
    new_keys = {f"blocks.{i}.attn.rpe.{t}" for i in range(2) for t in (("rpe", "rpe_extra") if num_extra else ("rpe",))}
    assert set(sd) == set(ref_sd) | new_keys
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert model(x).shape == ref(x).shape


def test_convert_real_vit_forward_backward():
    """A full-width vit_tiny_patch16_224 at 224 px (3 of its 12 blocks), converted in one call."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, num_classes=10)
    out_ref_shape = model(torch.randn(1, 3, 224, 224)).shape
    assert convert_vit(model) is model                     # in place, returns the model
    _randomize_rpe(model)
    model.train()
    x = torch.randn(2, 3, 224, 224)
    feats = model.forward_features(x)
    out = model.forward_head(feats)
    assert out.shape == (2, 10) and out_ref_shape == (1, 10) and torch.isfinite(out).all()
    # the CLS logits alone give the last block's grid table no gradient (see test_timm.py): add the patch tokens
    (out.square().mean() + feats[:, 1:].square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for i, m in enumerate(_lisa(model)):
        assert m.grid == (14, 14) and m.num_extra == 1
        assert m.rpe.rpe.grad.abs().sum() > 0 and m.rpe.rpe_extra.grad.abs().sum() > 0, f"block {i}"


class _PlainLinearAttention(nn.Module):
    """Normalised linear attention (phi = elu + 1, eps = 1e-6) written out here, with a timm Attention's weights."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, attn_mask=None, is_causal=False):
        a = self.attn
        B, N, C = x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(a.q_norm(q)) + 1, F.elu(a.k_norm(k)) + 1
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        num = torch.einsum("bhnd,bhde->bhne", q, kv)
        den = torch.einsum("bhnd,bhd->bhn", q, k.sum(2))[..., None]
        y = (num / (den + 1e-6)).transpose(1, 2).reshape(B, N, C)
        return a.proj(a.norm(y))


@pytest.mark.parametrize("name, kw", [("vit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}),
                                      ("vit_tiny_patch16_224", {"reg_tokens": 2, "qk_norm": True})])
def test_zero_rpe_equals_plain_linear_attention(name, kw):
    ref = _small_vit(name, **kw)
    plain = copy.deepcopy(ref)
    for blk in plain.blocks:
        blk.attn = _PlainLinearAttention(blk.attn)
    lisa = convert_vit(copy.deepcopy(ref))
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        y_plain, y_lisa, y_softmax = plain(x), lisa(x), ref(x)
        torch.testing.assert_close(y_lisa, y_plain, rtol=1e-4, atol=1e-5)
        assert (y_softmax - y_plain).abs().max() > 1e-3            # the comparison can tell attentions apart
        _randomize_rpe(lisa)
        assert (lisa(x) - y_plain).abs().max() > 1e-3              # and nonzero tables change the output


def test_state_dict_round_trip():
    model = _randomize_rpe(convert_vit(_small_vit(seed=0)), seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = convert_vit(_small_vit(seed=5))                   # different weights, zero tables
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (other(x) - model(x)).abs().max() > 1e-3
        other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    # the registered model has the same keys and shapes as a converted timm ViT of the same layout
    reg = timm.create_model("lisa_vit_tiny_patch16_224", img_size=96, depth=2).eval()
    reg.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(reg(x), model(x), rtol=0, atol=0)


def test_set_model_grid_changes_image_size():
    model = _randomize_rpe(convert_vit(_small_vit()))       # 96 px: 6x6 grid
    before = [m.rpe.rpe.detach().clone() for m in _lisa(model)]
    assert set_model_grid(model, 160) is model
    assert tuple(model.patch_embed.grid_size) == (10, 10) and tuple(model.patch_embed.img_size) == (160, 160)
    assert model.pos_embed.shape == (1, 1 + 100, 192)        # timm's position-embedding resampling
    for m, b in zip(_lisa(model), before):
        assert m.grid == (10, 10) and m.rpe.rpe.shape == (3, 1, 19, 19)
        torch.testing.assert_close(m.rpe.rpe[..., 9, 9], b[..., 5, 5])      # offset (0, 0) keeps its value
        torch.testing.assert_close(m.rpe.rpe[..., 0, -1], b[..., 0, -1])    # so do the corner offsets
    model.train()
    out = model(torch.randn(2, 3, 160, 160))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(m.rpe.rpe.grad is not None and m.rpe.rpe.grad.shape == (3, 1, 19, 19) for m in _lisa(model))
    with pytest.raises(Exception):                             # timm checks the input size: the old size is gone
        model(torch.randn(1, 3, 96, 96))
    set_model_grid(model, (96, 128))                           # a non-square size
    assert all(m.grid == (6, 8) for m in _lisa(model))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 1000)
    set_model_grid(model, grid=(4, 4))                         # only the LiSA grids
    assert all(m.grid == (4, 4) for m in _lisa(model))


def test_set_model_grid_errors():
    model = convert_vit(_small_vit())
    with pytest.raises(ValueError, match="exactly one of img_size and grid"):
        set_model_grid(model)
    with pytest.raises(ValueError, match="exactly one of img_size and grid"):
        set_model_grid(model, 96, grid=(6, 6))
    with pytest.raises(ValueError, match="img_size must be"):
        set_model_grid(model, 96.0)
    with pytest.raises(ValueError, match="axes"):
        set_model_grid(model, grid=(2, 2, 2))
    with pytest.raises(ValueError, match="no LiSAAttention"):
        set_model_grid(_small_vit(), 128)
    with pytest.raises(TypeError, match="nn.Module"):
        set_model_grid("vit", 128)


# ----------------------------------------------------------------------------------------------------------
# what convert_vit cannot convert


def test_convert_errors_name_the_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_vit("vit_tiny_patch16_224")
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(EvaAttention\)"):
        convert_vit(eva)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        convert_vit(_small_vit(dynamic_img_size=True))
    with pytest.raises(ValueError, match="cannot read the token grid of Sequential"):
        convert_vit(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="found no timm Attention module in Sequential"):
        convert_vit(nn.Sequential(nn.Linear(4, 4)), grid=(2, 2), num_extra=0)
    gated = _small_vit()
    gated.blocks[1].attn = TimmAttention(192, 3, qkv_bias=True, gated=True)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn \(Attention\): uses a gated output"):
        convert_vit(gated)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\): the head dim 64 .* num_rpe=3"):
        convert_vit(_small_vit(), num_rpe=3)
    assert isinstance(gated.blocks[0].attn, TimmAttention)     # a failed conversion leaves the model as it was


def test_convert_argument_errors():
    """The arguments convert_vit cannot use, and modules without timm's Attention interface, are named."""
    with pytest.raises(ValueError, match="num_extra must be an int >= 0, got -1"):
        convert_vit(_small_vit(), num_extra=-1)
    with pytest.raises(TypeError, match="types must be classes"):
        convert_vit(_small_vit(), types=("Attention",))
    with pytest.raises(ValueError, match="cannot read the number of prefix tokens of Sequential"):
        convert_vit(nn.Sequential(MyAttention(32, 2)), grid=(4, 4), types=(MyAttention,))
    with pytest.raises(ValueError, match=r"0 \(Linear\): has no fused qkv/proj nn.Linear and num_heads"):
        convert_vit(nn.Sequential(nn.Linear(8, 8)), grid=(2, 2), num_extra=0, types=(nn.Linear,))
    odd = MyAttention(32, 2)
    odd.proj = nn.Linear(32, 16)
    with pytest.raises(ValueError, match=r"qkv 32->96, proj 32->16, 2 heads of 16: LiSAAttention needs"):
        convert_vit(nn.Sequential(odd), grid=(4, 4), num_extra=0, types=(MyAttention,))
    with pytest.raises(ValueError, match="features_only=True is not supported"):
        timm.create_model("lisa_vit_tiny_patch16_224", depth=1, features_only=True)


def test_set_model_grid_without_a_timm_vit():
    seq = convert_vit(nn.Sequential(MyAttention(32, 2)), grid=(4, 4), num_extra=0, types=(MyAttention,))
    with pytest.raises(ValueError, match="has no timm ViT with set_input_size"):
        set_model_grid(seq, 64)
    set_model_grid(seq, grid=(3, 5))
    assert seq[0].grid == (3, 5) and "grid=(3, 5)" in repr(seq[0])


class MyAttention(nn.Module):
    """Not timm's class, but timm's Attention interface (qkv, proj, num_heads, head_dim)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., : x.shape[-1]])


def test_unknown_attention_strict_and_types():
    model = _small_vit()
    model.blocks[1].attn = MyAttention(192, 3)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn \(MyAttention\).*strict=False"):
        convert_vit(model)
    assert isinstance(model.blocks[0].attn, TimmAttention)     # untouched by the failed call
    partial = convert_vit(copy.deepcopy(model), strict=False)
    assert isinstance(partial.blocks[0].attn, LiSAAttention) and isinstance(partial.blocks[1].attn, MyAttention)
    full = convert_vit(copy.deepcopy(model), types=(MyAttention,))
    assert all(isinstance(b.attn, LiSAAttention) for b in full.blocks)
    torch.testing.assert_close(full.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    # a model that is no timm ViT: the grid and prefix count are given
    seq = nn.Sequential(MyAttention(32, 2), MyAttention(32, 2))
    convert_vit(seq, grid=(4, 4), num_extra=1, types=(MyAttention,), num_rpe=2, boundary="circular")
    assert all(isinstance(m, LiSAAttention) and m.grid == (4, 4) and m.rpe.rpe.shape == (2, 2, 4, 4) for m in seq)
    assert seq(torch.randn(2, 17, 32)).shape == (2, 17, 32)


def test_attn_drop_warns_once():
    model = _small_vit(attn_drop_rate=0.1)
    with pytest.warns(UserWarning, match="attention dropout") as rec:
        convert_vit(model)
    assert len([w for w in rec if "attn_drop" in str(w.message)]) == 1


# ----------------------------------------------------------------------------------------------------------
# the registered models


@pytest.mark.parametrize("name, dim, heads", [("lisa_vit_tiny_patch16_224", 192, 3),
                                              ("lisa_vit_small_patch16_224", 384, 6)])
def test_create_model(name, dim, heads):
    assert name in timm.list_models("lisa_*") and name not in timm.list_models("lisa_*", pretrained=True)
    model = timm.create_model(name, num_classes=7)
    assert len(model.blocks) == 12 and model.embed_dim == dim and model.num_classes == 7
    lisa = _lisa(model)
    assert len(lisa) == 12 and all(m.grid == (14, 14) and m.num_extra == 1 and m.num_heads == heads for m in lisa)
    assert model.pretrained_cfg["architecture"] == name
    model.blocks = model.blocks[:2]                            # forward/backward on 2 of 12 blocks (speed)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_create_model_options_and_pretrained():
    model = timm.create_model("lisa_vit_tiny_patch16_224", depth=1, img_size=128, reg_tokens=4, num_rpe=2,
                              embed_dim=96, boundary="circular", num_classes=0)
    m = model.blocks[0].attn
    assert isinstance(m, LiSAAttention) and m.grid == (8, 8) and m.num_extra == 5
    assert m.rpe.rpe.shape == (3, 2, 8, 8) and m.rpe.boundary == "circular"
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 96)
    with pytest.raises(ValueError, match="no pretrained weights exist yet"):
        timm.create_model("lisa_vit_small_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        timm.create_model("lisa_vit_tiny_patch16_224", dynamic_img_size=True)


@pytest.mark.parametrize("code", [
    # `import lisa_kernels` alone does not import timm, yet registers the models once timm is imported
    "import sys, lisa_kernels; assert 'timm' not in sys.modules; import timm; "
    "m = timm.create_model('lisa_vit_small_patch16_224', depth=1, num_classes=3); print(type(m.blocks[0].attn).__name__)",
    # timm first, then lisa_kernels.nn
    "import timm, lisa_kernels.nn; m = timm.create_model('lisa_vit_tiny_patch16_224', depth=1); "
    "print(type(m.blocks[0].attn).__name__)",
])
def test_registration_after_import(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "LiSAAttention"


def test_registration_when_timm_is_already_imported():
    """The in-process half of the two import orders: with timm in sys.modules the registration runs at once."""
    import lisa_kernels
    assert "timm" in sys.modules
    lisa_kernels._register_timm_models_on_import()
    assert "lisa_vit_tiny_patch16_224" in timm.list_models("lisa_vit_*")
    assert not any(type(f).__name__ == "_TimmFinder" for f in sys.meta_path)


# ----------------------------------------------------------------------------------------------------------
# the digits example (examples/digits_vit.py): 2 steps per variant, in-process, with and without tqdm


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_digits_example_smoke(tmp_path, monkeypatch, with_tqdm):
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (in the `test` extra)")
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits_vit", os.path.join(ROOT, "examples", "digits_vit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not with_tqdm:
        monkeypatch.setattr(mod, "tqdm", None)
    threads = torch.get_num_threads()
    try:
        res = mod.main(["--seeds", "0", "--steps", "2", "--depth", "2", "--out", str(tmp_path / "d")])
    finally:
        torch.set_num_threads(threads)
    for v in ("lisa", "linear", "softmax"):
        assert 0.0 <= res[v]["0"]["test_acc"] <= 1.0 and len(res[v]["0"]["train_loss"]) == 2
    tot_lisa, tr_lisa = res["lisa"]["params"]
    tot_lin, tr_lin = res["linear"]["params"]
    assert tot_lisa == tot_lin == tr_lisa and tr_lin == res["softmax"]["params"][1] < tr_lisa
    assert res["linear"]["0"]["max_abs_rpe"] == 0.0 and res["lisa"]["0"]["max_abs_rpe"] > 0.0
    assert (tmp_path / "d.json").exists() and "mean ± std" in (tmp_path / "d.md").read_text()
