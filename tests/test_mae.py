"""Tests for maedet.models.mae: masking, patch layout, loss, position tables,
checkpoint compatibility with the MAE release and timm, and a short training run."""

import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maedet.builders import build_mae_model, load_pretrain_config
from maedet.models.mae import MaskedAutoencoderViT, masking_noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Model sizes live in the configs only; these build the MAE of a shipped config.
MAE_CONFIGS = {
    "mae_vit_tiny_patch16": "configs/quickstart/mae_tiny.yaml",
    "mae_vit_base_patch16": "configs/mae/mae_vit_base_patch16.yaml",
    "mae_vit_large_patch16": "configs/mae/mae_vit_large_patch16.yaml",
    "mae_vit_huge_patch14": "configs/mae/mae_vit_huge_patch14.yaml",
}


def mae_from_config(name, **overrides):
    cfg = load_pretrain_config(os.path.join(REPO, MAE_CONFIGS[name]), [f"model.{k}={v}" for k, v in overrides.items()])
    return build_mae_model(cfg.model)


def mae_vit_tiny_patch16(**kw):
    kw.setdefault("img_size", 224)
    return mae_from_config("mae_vit_tiny_patch16", **kw)


def mae_vit_base_patch16(**kw):
    return mae_from_config("mae_vit_base_patch16", **kw)


def mae_vit_large_patch16(**kw):
    return mae_from_config("mae_vit_large_patch16", **kw)


def mae_vit_huge_patch14(**kw):
    return mae_from_config("mae_vit_huge_patch14", **kw)


MAE_MODELS = {name: globals()[name] for name in MAE_CONFIGS}


def _tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("img_size", 64)
    kw.setdefault("norm_pix_loss", False)
    return mae_vit_tiny_patch16(**kw)


# ---------------------------------------------------------------------- masking
@pytest.mark.parametrize("mask_ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_random_masking_counts_and_restore(mask_ratio):
    n, length, dim = 3, 49, 5
    x = torch.randn(n, length, dim)
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(1))
    x_masked, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, mask_ratio, noise)

    len_keep = int(length * (1 - mask_ratio))
    assert x_masked.shape == (n, len_keep, dim)
    assert mask.shape == (n, length) and ids_restore.shape == (n, length)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [float(length - len_keep)] * n

    for i in range(n):
        order = np.argsort(noise[i].numpy(), kind="stable")  # independent shuffle
        kept, removed = order[:len_keep], order[len_keep:]
        # kept tokens are those with the smallest noise, in increasing noise order
        assert torch.equal(x_masked[i], x[i, torch.from_numpy(kept)])
        assert (mask[i, torch.from_numpy(kept)] == 0).all()
        assert (mask[i, torch.from_numpy(removed)] == 1).all()
        # gathering the shuffled sequence with ids_restore gives back the original
        shuffled = x[i, torch.from_numpy(order)]
        assert torch.equal(shuffled[ids_restore[i]], x[i])


def test_random_masking_rejects_bad_input():
    x = torch.randn(2, 16, 4)
    with pytest.raises(ValueError):
        MaskedAutoencoderViT.random_masking(x, 1.0)
    with pytest.raises(ValueError):
        MaskedAutoencoderViT.random_masking(x, 0.5, noise=torch.rand(2, 15))


def test_masking_deterministic_given_noise():
    model = _tiny().eval()
    imgs = torch.randn(2, 3, 64, 64)
    noise = masking_noise([11, 12], model.num_patches)
    _, _, mask_a = model(imgs, 0.75, noise)
    _, _, mask_b = model(torch.randn(2, 3, 64, 64), 0.75, noise.clone())
    assert torch.equal(mask_a, mask_b)
    # without noise the global RNG decides, so masks differ between calls
    torch.manual_seed(0)
    masks = {tuple(model(imgs, 0.75)[2].flatten().tolist()) for _ in range(4)}
    assert len(masks) > 1


def test_masking_noise_depends_only_on_seed():
    a = masking_noise([3, 5, 7], 196)
    b = masking_noise([100, 7, 5, 3], 196)
    assert a.shape == (3, 196) and a.dtype == torch.float32
    assert torch.equal(a[0], b[3]) and torch.equal(a[1], b[2]) and torch.equal(a[2], b[1])
    assert not torch.equal(a[0], a[1])
    assert ((a >= 0) & (a < 1)).all()
    c = masking_noise(torch.tensor([5, 3]), 196, device="cpu")
    assert torch.equal(c[0], a[1]) and torch.equal(c[1], a[0])
    # independent of global RNG state
    torch.manual_seed(123)
    assert torch.equal(masking_noise([3], 196)[0], a[0])


# ---------------------------------------------------------------------- patches
def test_patchify_roundtrip_and_layout():
    model = _tiny()
    p = model.patch_size
    imgs = torch.randn(2, 3, 64, 64)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, p * p * 3)
    assert torch.equal(model.unpatchify(patches), imgs)

    # known tensor: each pixel's value encodes its (n, c, y, x) coordinates
    n_, c_, y_, x_ = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(64), torch.arange(64), indexing="ij")
    known = (((n_ * 3 + c_) * 64 + y_) * 64 + x_).double()
    pk = model.patchify(known)
    w_grid = 64 // p
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, c, i, j, a, b = (int(rng.integers(0, m)) for m in (2, 3, w_grid, w_grid, p, p))
        assert pk[n, i * w_grid + j, (a * p + b) * 3 + c] == known[n, c, i * p + a, j * p + b]
    with pytest.raises(ValueError):
        model.patchify(torch.randn(1, 3, 64, 48))


# ---------------------------------------------------------------------- loss
def test_loss_ignores_visible_patches():
    model = _tiny()
    imgs = torch.randn(2, 3, 64, 64)
    pred = torch.randn(2, 16, 16 * 16 * 3)
    mask = torch.zeros(2, 16)
    mask[0, [1, 5, 9]] = 1
    mask[1, [0, 2]] = 1
    base = model.forward_loss(imgs, pred, mask)

    pred_vis = pred.clone()
    pred_vis[0, 0] += 10.0
    pred_vis[1, 15] -= 3.0
    assert torch.equal(model.forward_loss(imgs, pred_vis, mask), base)

    pred_masked = pred.clone()
    pred_masked[0, 5] += 1.0
    assert not torch.allclose(model.forward_loss(imgs, pred_masked, mask), base)

    # direct reference: mean over masked patches of per-patch MSE
    target = model.patchify(imgs)
    per_patch = ((pred - target) ** 2).mean(-1)
    ref = per_patch[mask.bool()].mean()
    assert torch.allclose(base, ref, rtol=1e-6)


def test_norm_pix_loss_matches_reference():
    model = _tiny(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64).float()
    pred = torch.randn(2, 16, 768)
    mask = (torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    loss = model.forward_loss(imgs, pred, mask)

    im = imgs.numpy().astype(np.float64)
    pr = pred.numpy().astype(np.float64)
    total, count = 0.0, 0
    for n in range(2):
        for i in range(4):
            for j in range(4):
                if mask[n, i * 4 + j] == 0:
                    continue
                patch = im[n, :, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16]  # (c, a, b)
                t = patch.transpose(1, 2, 0).reshape(-1)  # (a, b, c) order
                t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
                total += np.mean((pr[n, i * 4 + j] - t) ** 2)
                count += 1
    assert abs(loss.item() - total / count) < 1e-4 * max(1.0, total / count)
    # the normalized target differs from the raw one
    assert abs(_tiny().forward_loss(imgs, pred, mask).item() - loss.item()) > 1e-3


# ---------------------------------------------------------------------- sin-cos
def _reference_sincos(dim, grid):
    quarter = dim // 4
    table = np.zeros((grid * grid, dim))
    for h in range(grid):
        for w in range(grid):
            row = h * grid + w
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                table[row, k] = math.sin(w * omega)
                table[row, quarter + k] = math.cos(w * omega)
                table[row, 2 * quarter + k] = math.sin(h * omega)
                table[row, 3 * quarter + k] = math.cos(h * omega)
    return table


def test_pos_embed_is_fixed_sincos():
    model = _tiny()
    for param, dim in ((model.pos_embed, 192), (model.decoder_pos_embed, 128)):
        assert param.shape == (1, 17, dim)
        assert not param.requires_grad
        got = param[0].double().numpy()
        assert np.all(got[0] == 0)
        np.testing.assert_allclose(got[1:], _reference_sincos(dim, 4), atol=1e-6)


def test_init_matches_mae():
    model = _tiny()
    assert model.blocks[0].norm1.eps == 1e-6
    assert torch.equal(model.blocks[1].norm2.weight, torch.ones(192))
    assert torch.equal(model.decoder_blocks[0].attn.qkv.bias, torch.zeros(384))
    # xavier uniform bound for the patch projection viewed as (D, 3*p*p)
    bound = math.sqrt(6.0 / (192 + 3 * 256))
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.01 < model.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.03


# ---------------------------------------------------------------------- checkpoint layout
def _official_mae_layout(embed_dim, depth, dec_dim, dec_depth, patch, img=224, chans=3):
    """(key, shape) of the official MAE release's state dict, from its known structure."""
    num = (img // patch) ** 2 + 1
    layout = {
        "cls_token": (1, 1, embed_dim),
        "pos_embed": (1, num, embed_dim),
        "patch_embed.proj.weight": (embed_dim, chans, patch, patch),
        "patch_embed.proj.bias": (embed_dim,),
        "norm.weight": (embed_dim,),
        "norm.bias": (embed_dim,),
        "mask_token": (1, 1, dec_dim),
        "decoder_pos_embed": (1, num, dec_dim),
        "decoder_embed.weight": (dec_dim, embed_dim),
        "decoder_embed.bias": (dec_dim,),
        "decoder_norm.weight": (dec_dim,),
        "decoder_norm.bias": (dec_dim,),
        "decoder_pred.weight": (patch * patch * chans, dec_dim),
        "decoder_pred.bias": (patch * patch * chans,),
    }
    for prefix, d, n in (("blocks", embed_dim, depth), ("decoder_blocks", dec_dim, dec_depth)):
        for i in range(n):
            b = f"{prefix}.{i}."
            layout.update(
                {
                    b + "norm1.weight": (d,),
                    b + "norm1.bias": (d,),
                    b + "attn.qkv.weight": (3 * d, d),
                    b + "attn.qkv.bias": (3 * d,),
                    b + "attn.proj.weight": (d, d),
                    b + "attn.proj.bias": (d,),
                    b + "norm2.weight": (d,),
                    b + "norm2.bias": (d,),
                    b + "mlp.fc1.weight": (4 * d, d),
                    b + "mlp.fc1.bias": (4 * d,),
                    b + "mlp.fc2.weight": (d, 4 * d),
                    b + "mlp.fc2.bias": (d,),
                }
            )
    return layout


def test_base_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = mae_vit_base_patch16()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _official_mae_layout(768, 12, 512, 8, 16)
    assert len(expected) == 12 * 12 + 8 * 12 + 14
    assert set(got) == set(expected)
    assert got == expected
    assert got["decoder_pred.weight"] == (768, 512) and got["blocks.11.attn.qkv.weight"] == (2304, 768)


@pytest.mark.parametrize(
    "factory,args",
    [(mae_vit_large_patch16, (1024, 24, 512, 8, 16)), (mae_vit_huge_patch14, (1280, 32, 512, 8, 14))],
)
def test_large_huge_layout(factory, args):
    with torch.device("meta"):
        model = factory()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _official_mae_layout(*args)


def test_factories_registry_and_overrides():
    assert set(MAE_MODELS) == {
        "mae_vit_tiny_patch16",
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
    }
    model = MAE_MODELS["mae_vit_tiny_patch16"](img_size=32, norm_pix_loss=True)
    assert model.norm_pix_loss and model.num_patches == 4 and model.pos_embed.shape == (1, 5, 192)
    assert len(model.blocks) == 4 and len(model.decoder_blocks) == 2
    assert model.blocks[0].attn.num_heads == 3 and model.decoder_blocks[0].attn.num_heads == 4


def test_official_checkpoint_form_loads_strict(tmp_path):
    src = _tiny()
    path = os.path.join(tmp_path, "mae.pth")
    torch.save({"model": src.state_dict()}, path)
    torch.manual_seed(99)
    dst = mae_vit_tiny_patch16(img_size=64)
    assert not torch.equal(dst.cls_token, src.cls_token)
    result = dst.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    imgs = torch.randn(2, 3, 64, 64)
    noise = masking_noise([0, 1], 16)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(imgs, 0.75, noise)[1], dst(imgs, 0.75, noise)[1])


# ---------------------------------------------------------------------- timm compatibility
def test_encoder_state_dict_matches_timm_vit_base():
    import timm

    with torch.device("meta"):
        model = mae_vit_base_patch16()
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="")
    enc = model.encoder_state_dict()
    assert not any(k.startswith(("decoder", "mask_token")) for k in enc)
    assert all(not v.requires_grad for v in enc.values())
    timm_sd = vit.state_dict()
    assert len(enc) == 12 * 12 + 6
    for k, v in enc.items():
        assert k in timm_sd, k
        assert tuple(timm_sd[k].shape) == tuple(v.shape), k
    assert set(timm_sd) == set(enc)


def test_encoder_equals_timm_forward_features():
    """The encoder with nothing masked computes exactly timm's ViT forward_features."""
    import timm

    model = _tiny().eval()
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="", depth=4, img_size=64
    ).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    identity_order = torch.arange(16, dtype=torch.float32).expand(2, 16)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.0, identity_order)
        ref = vit.forward_features(imgs)
    assert latent.shape == (2, 17, 192) and mask.sum() == 0
    torch.testing.assert_close(latent, ref, rtol=1e-5, atol=1e-5)


def test_attention_is_fused_sdpa(monkeypatch):
    from timm.layers import set_fused_attn, use_fused_attn

    was_on = use_fused_attn()
    set_fused_attn(False)  # timm would build non-fused attention by default now
    try:
        model = _tiny()
    finally:
        set_fused_attn(was_on)
    assert all(b.attn.fused_attn for b in list(model.blocks) + list(model.decoder_blocks))

    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    model(torch.randn(1, 3, 64, 64), 0.75)
    assert len(calls) == 4 + 2
    assert calls[0] == (1, 3, 1 + 4, 64) and calls[-1] == (1, 4, 17, 32)


# ---------------------------------------------------------------------- training
def _load_coco128_batch(root, n=8, size=64):
    import cv2

    files = sorted(glob.glob(os.path.join(root, "train2017", "*.jpg")))[:n]
    assert len(files) == n, f"expected {n} images in {root}/train2017"
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    out = []
    for f in files:
        img = cv2.imread(f, cv2.IMREAD_COLOR)
        assert img is not None, f
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        out.append(((img - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def test_loss_decreases_on_real_images(coco128_root):
    torch.set_num_threads(2)
    imgs = _load_coco128_batch(coco128_root)
    model = _tiny()
    noise = masking_noise(range(8), model.num_patches)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss, _, _ = model(imgs, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not model.pos_embed.requires_grad and model.pos_embed.grad is None


def test_bf16_autocast_forward_backward():
    model = _tiny(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(imgs, 0.75, masking_noise([1, 2], 16))
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
