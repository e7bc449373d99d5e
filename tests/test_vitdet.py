"""ViTDet backbone, simple feature pyramid, Mask R-CNN assembly and pretrained loading.

Tiny models on CPU; every check compares against an independent computation.
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F

from maedet import kernels
from maedet.checkpoint.pretrained import load_pretrained_backbone
from maedet.checkpoint.report import Report
from maedet.kernels.window_layout import partition_heads, unpartition_heads, window_partition, window_unpartition
from maedet.models.backbones.vit import Attention, Block, ViT, get_abs_pos
from maedet.models.detectors.poolers import MultiLevelRoIAlign
from maedet.models.detectors.rcnn import GeneralizedRCNN
from maedet.models.detectors.roi_heads import StandardRoIHeads
from maedet.models.detectors.rpn import RPN, box_regression_loss
from maedet.models.necks.simple_fpn import SimpleFeaturePyramid
from maedet.models.pos_embed import resize_pos_embed_grid
from maedet.utils.errors import CheckpointError

torch.set_num_threads(2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_VIT = dict(
    img_size=128,
    patch_size=16,
    embed_dim=32,
    depth=3,
    num_heads=2,
    window_size=4,
    global_blocks=(1,),
    pretrain_img_size=64,
)


def tiny_vit(**kw):
    args = dict(TINY_VIT)
    args.update(kw)
    return ViT(**args)


def tiny_mask_rcnn(vit_overrides=None, num_classes=3):
    """A small ViTDet Mask R-CNN assembled from its parts (the detector takes modules)."""
    neck = SimpleFeaturePyramid(tiny_vit(**(vit_overrides or {})), out_channels=32, square_pad=128)
    shape = neck.output_shape()
    rpn = RPN(
        shape,
        pre_nms_topk_train=200,
        post_nms_topk_train=64,
        pre_nms_topk_test=200,
        post_nms_topk_test=64,
        batch_size_per_image=64,
    )
    heads = StandardRoIHeads(
        shape,
        num_classes,
        box_head_conv_dims=(16, 16),
        box_head_fc_dims=(32,),
        mask_head_conv_dims=(16, 16),
        batch_size_per_image=32,
    )
    return GeneralizedRCNN(backbone=neck, proposal_generator=rpn, roi_heads=heads)


def toy_batch():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 128, 128, generator=g) * 255, torch.rand(3, 128, 128, generator=g) * 255]
    m1 = torch.zeros(1, 128, 128, dtype=torch.uint8)
    m1[0, 10:50, 20:70] = 1
    m2 = torch.zeros(2, 128, 128, dtype=torch.uint8)
    m2[0, 30:90, 10:40] = 1
    m2[1, 60:120, 50:90] = 1
    targets = [
        dict(boxes=torch.tensor([[20.0, 10, 70, 50]]), labels=torch.tensor([1]), masks=m1),
        dict(boxes=torch.tensor([[10.0, 30, 40, 90], [50, 60, 90, 120]]), labels=torch.tensor([2, 3]), masks=m2),
    ]
    return imgs, targets


# --------------------------------------------------------------------------- ViT pieces


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 13, 5)
    windows, pad_hw = window_partition(x, 4)
    assert pad_hw == (12, 16)
    assert windows.shape == (2 * 3 * 4, 4, 4, 5)
    # Window (row 1, col 0) of image 0 is x[0, 4:8, 0:4]; window 0 of image 1 follows 12 windows.
    torch.testing.assert_close(windows[4], x[0, 4:8, 0:4])
    torch.testing.assert_close(windows[12], x[1, 0:4, 0:4])
    # The last window of image 0 holds x[0, 8:10, 12:13] and zero padding.
    last = windows[11]
    torch.testing.assert_close(last[:2, :1], x[0, 8:10, 12:13])
    assert last[2:].abs().sum() == 0 and last[:, 1:].abs().sum() == 0
    torch.testing.assert_close(window_unpartition(windows, 4, pad_hw, (10, 13)), x)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("window", [0, 4, 5])  # 0: the whole grid; 4: padding on both axes
def test_partition_heads_and_back_match_partition_and_permute(window, fast):
    """Both kernels (one-copy layouts and the reference) = F.pad with the bias +
    window_partition + reshape/permute written here; grads by gradcheck."""
    torch.manual_seed(0)
    heads, hd, H, W = 2, 3, 7, 10
    qkv = torch.randn(2, H, W, 3 * heads * hd, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3 * heads * hd, dtype=torch.float64, requires_grad=True)
    with kernels.fast(fast):
        got = partition_heads(qkv, heads, window, bias if window else None)
    if window:
        padded = qkv + 0
        pad_h, pad_w = (-H) % window, (-W) % window
        padded = torch.cat([padded, bias.expand(2, H, pad_w, -1)], 2)
        padded = torch.cat([padded, bias.expand(2, pad_h, W + pad_w, -1)], 1)
        windows, pad_hw = window_partition(padded, window)
        assert pad_hw == (H + pad_h, W + pad_w)
    else:
        windows = qkv
    n = windows.shape[1] * windows.shape[2]
    ref = windows.reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    assert got.shape == ref.shape and (got.is_contiguous() or not fast)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    out = torch.randn(got.shape[1:], dtype=torch.float64, requires_grad=True)
    with kernels.fast(fast):
        back = unpartition_heads(out, (H, W), window)
    flat = out.permute(0, 2, 1, 3).reshape(out.shape[0], *((window, window) if window else (H, W)), -1)
    ref_back = window_unpartition(flat, window, pad_hw, (H, W)) if window else flat
    torch.testing.assert_close(back, ref_back, rtol=0, atol=0)
    args = (qkv, bias) if window else (qkv,)
    with kernels.fast(fast):
        assert torch.autograd.gradcheck(lambda *a: partition_heads(a[0], heads, window, a[1] if window else None), args)
        assert torch.autograd.gradcheck(lambda o: unpartition_heads(o, (H, W), window), (out,))


def test_window_covering_whole_grid_equals_global_attention():
    torch.manual_seed(0)
    glob = Block(32, 2, use_rel_pos=True, rel_pos_zero_init=False, window_size=0, input_size=(6, 6))
    win = Block(32, 2, use_rel_pos=True, rel_pos_zero_init=False, window_size=6)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 6, 6, 32)
    torch.testing.assert_close(win(x), glob(x))
    # A smaller window is not global attention (the check above is not vacuous).
    small = Block(32, 2, use_rel_pos=True, rel_pos_zero_init=False, window_size=3)
    sd = glob.state_dict()
    sd["attn.rel_pos_h"] = sd["attn.rel_pos_h"][3:-3]
    sd["attn.rel_pos_w"] = sd["attn.rel_pos_w"][3:-3]
    small.load_state_dict(sd)
    assert not torch.allclose(small(x), glob(x), atol=1e-4)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_window_block_same_as_padding_before_the_projections(qkv_bias):
    """Projecting only the real tokens (padding gets the qkv bias) gives detectron2's
    numbers: pad after norm1, project every token, attend, unpad; values and grads."""
    torch.manual_seed(0)
    blk = Block(32, 2, qkv_bias=qkv_bias, use_rel_pos=True, rel_pos_zero_init=False, window_size=4)
    with torch.no_grad():
        if qkv_bias:
            blk.attn.qkv.bias.normal_()
        blk.attn.proj.bias.normal_()

    def reference(x):
        y = blk.norm1(x)
        windows, pad_hw = window_partition(y, 4)
        y = window_unpartition(blk.attn(windows), 4, pad_hw, (x.shape[1], x.shape[2]))
        x = x + y
        return x + blk.mlp(blk.norm2(x))

    x = torch.randn(2, 7, 10, 32)
    g = torch.randn(2, 7, 10, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = blk(x1)
    (got * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in blk.named_parameters()}
    blk.zero_grad()
    ref = reference(x2)
    (ref * g).sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for n, p in blk.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_pos_embed_resize_identity_and_other_sizes():
    vit = tiny_vit()
    pe = vit.pos_embed  # (1, 1 + 4*4, C) for pretrain_img_size 64
    assert pe.shape == (1, 17, 32)
    same = get_abs_pos(pe, True, (4, 4))
    torch.testing.assert_close(same, pe[:, 1:].reshape(1, 4, 4, 32), rtol=0, atol=0)
    other = get_abs_pos(pe, True, (6, 5))
    assert other.shape == (1, 6, 5, 32)
    ref = F.interpolate(pe[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(6, 5), mode="bicubic")
    torch.testing.assert_close(other, ref.permute(0, 2, 3, 1))
    # Non-square input, grid not a multiple of the window.
    out = vit(torch.randn(1, 3, 96, 80))["last_feat"]
    assert out.shape == (1, 32, 6, 5)
    with pytest.raises(ValueError, match="divisible"):
        vit(torch.randn(1, 3, 90, 80))


def _reference_rel_pos_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """detectron2's Attention.forward written out literally (B*heads layout)."""
    B, H, W, _ = x.shape
    nh = attn.num_heads
    qkv = attn.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * nh, H * W, -1).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)

    def rel(size, table):
        L = 2 * size - 1
        if table.shape[0] != L:
            table = F.interpolate(table.t()[None], size=L, mode="linear")[0].t()
        idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
        return table[idx]

    Rh, Rw = rel(H, attn.rel_pos_h), rel(W, attn.rel_pos_w)
    r_q = q.reshape(B * nh, H, W, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    scores = (scores.view(-1, H, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, H * W, H * W)
    out = (scores.softmax(dim=-1) @ v).view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return attn.proj(out)


@pytest.mark.parametrize("tiling", ["one tile", "query chunks", "head groups"])
@pytest.mark.parametrize("grid", [(4, 4), (6, 5)])  # (6, 5): rel-pos tables interpolated
def test_attention_kernels_agree_forward_and_backward(grid, tiling, monkeypatch):
    """The fast CPU kernel (with and without autograd) and the reference kernel equal
    detectron2's Attention.forward written out here, values and gradients."""
    import maedet.kernels.attention as attention

    n = grid[0] * grid[1]
    tile = {
        "one tile": 4 * 2 * 3 * n * n,  # batch 2 x 3 heads in one tile
        "query chunks": 7 * n,  # 7 queries of one head per tile, the last chunk shorter
        "head groups": 4 * 4 * n * n,  # 4 whole heads per tile, the last group shorter
    }[tiling]
    monkeypatch.setattr(attention, "_CPU_TILE_ELEMENTS", tile)
    tiles = attention._tiles(2 * 3, n, n)
    assert len(tiles) == {"one tile": 1, "query chunks": 6 * -(-n // 7), "head groups": 2}[tiling]
    torch.manual_seed(0)
    attn = Attention(24, 3, use_rel_pos=True, rel_pos_zero_init=False, input_size=(4, 4)).double()
    x0 = torch.randn(2, *grid, 24, dtype=torch.float64)
    results = {}
    for impl in ("fast", "reference kernels", "written out"):
        attn.zero_grad()
        x = x0.clone().requires_grad_(True)
        with kernels.fast(impl == "fast"):
            y = _reference_rel_pos_attention(attn, x) if impl == "written out" else attn(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in attn.parameters()]
        results[impl] = (y.detach(), grads)
        if impl == "fast":  # inference: the forward without autograd
            with torch.no_grad():
                results["fast, no grad"] = (attn(x0), grads)
    ref_y, ref_g = results["written out"]
    for impl in ("fast", "fast, no grad", "reference kernels"):
        y, g = results[impl]
        torch.testing.assert_close(y, ref_y, rtol=1e-9, atol=1e-10, msg=f"{impl} forward")
        for a, b in zip(g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"{impl} backward")
    # The rel-pos tables matter (the comparison is not vacuous).
    assert results["fast"][1][-2].abs().sum() > 0


def test_vit_kernels_and_act_checkpoint_agree():
    torch.manual_seed(0)
    ref = tiny_vit(rel_pos_zero_init=False).double()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    outs = []
    for fast, kw in ((False, {}), (True, {}), (True, dict(act_checkpoint=True))):
        m = tiny_vit(**kw).double()
        m.load_state_dict(ref.state_dict())
        m.train()
        with kernels.fast(fast):
            y = m(x)["last_feat"]
            y.pow(2).sum().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    for y, g in outs[1:]:
        torch.testing.assert_close(y, outs[0][0])
        for a, b in zip(g, outs[0][1]):
            torch.testing.assert_close(a, b)


def test_vit_blocks_get_a_contiguous_residual_stream():
    """The patch embedding's NHWC output is a permuted view; left so, every LayerNorm
    copies it and every residual add runs strided (docs/BENCHMARKS.md)."""
    vit = tiny_vit(drop_path_rate=0.1).train()
    seen = []
    for blk in vit.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    out = vit(torch.randn(1, 3, 128, 128))["last_feat"]
    assert seen == [True] * len(vit.blocks)
    assert out.shape == (1, 32, 8, 8)


def test_vit_names_and_shapes_follow_detectron2():
    vit = tiny_vit()
    sd = vit.state_dict()
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 16, 16)
    assert sd["blocks.0.attn.rel_pos_h"].shape == (2 * 4 - 1, 16)  # window block: window 4
    assert sd["blocks.1.attn.rel_pos_w"].shape == (2 * 8 - 1, 16)  # global block: 128 / 16 = 8
    assert sd["blocks.1.attn.rel_pos_h"].abs().sum() == 0  # zero init
    for name in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.bias"):
        assert f"blocks.2.{name}" in sd
    assert not any(k.startswith(("norm.", "fc_norm", "cls_token")) for k in sd)
    assert vit.blocks[0].window_size == 4 and vit.blocks[1].window_size == 0
    # the shipped recipes: 4 global blocks, the last one last (model sizes live in the configs only)
    from maedet.builders import load_detection_config

    for name, depth in (("b_100ep", 12), ("l_100ep", 24), ("h_75ep", 32)):
        b = load_detection_config(
            os.path.join(REPO, f"configs/coco/mask_rcnn_vit_{name}.yaml"), splits=()
        ).model.backbone
        assert b.depth == depth and len(b.global_blocks) == 4 and b.global_blocks[-1] == depth - 1, name
    b = load_detection_config(os.path.join(REPO, "configs/coco/mask_rcnn_vit_b_100ep.yaml"), splits=()).model.backbone
    assert list(b.global_blocks) == [2, 5, 8, 11]


# --------------------------------------------------------------------------- pyramid


def test_pyramid_strides_channels_non_square():
    fpn = SimpleFeaturePyramid(tiny_vit(), out_channels=256)
    out = fpn(torch.randn(1, 3, 128, 192))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    expected = {"p2": (32, 48), "p3": (16, 24), "p4": (8, 12), "p5": (4, 6), "p6": (2, 3)}
    for k, hw in expected.items():
        assert out[k].shape == (1, 256, *hw), k
    assert fpn.out_channels == 256 and fpn.size_divisibility == 64
    names = set(dict(fpn.named_parameters()))
    # detectron2 layout: scale 4 stage = deconv, LN, GELU, deconv, conv1x1+LN, conv3x3+LN.
    for k in (
        "simfp_2.0.weight",
        "simfp_2.1.weight",
        "simfp_2.3.weight",
        "simfp_2.4.weight",
        "simfp_2.4.norm.weight",
        "simfp_2.5.norm.bias",
        "simfp_3.0.weight",
        "simfp_3.1.weight",
        "simfp_4.0.weight",
        "simfp_4.1.norm.weight",
        "simfp_5.1.weight",
        "simfp_5.2.norm.bias",
        "net.blocks.0.attn.qkv.weight",
    ):
        assert k in names, k
    assert "simfp_2.4.bias" not in names  # conv before LN has no bias
    with pytest.raises(ValueError, match="divisible by 64"):
        fpn(torch.randn(1, 3, 128, 160))


def test_detector_pads_to_the_square_like_detectron2():
    """The batch is padded bottom/right to square_pad (0 after normalization) before the
    backbone: every pyramid level covers the whole square, as in detectron2."""
    torch.manual_seed(0)
    model = tiny_mask_rcnn(vit_overrides=dict(rel_pos_zero_init=False)).eval()
    x = torch.rand(3, 96, 120) * 255
    batch, sizes = model.preprocess([x])
    assert batch.shape == (1, 3, 128, 128) and sizes == [(96, 120)]
    torch.testing.assert_close(batch[0, :, :96, :120], (x - model.pixel_mean) / model.pixel_std)
    assert batch[0, :, 96:].abs().sum() == 0 and batch[0, :, :, 120:].abs().sum() == 0
    out = model.backbone(batch)
    for k, stride in (("p2", 4), ("p4", 16), ("p6", 64)):
        assert out[k].shape[-2:] == (128 // stride, 128 // stride)
    # Padding changes the result (window layout / pos-embed grid): not a no-op.
    plain = model.backbone.net(batch[:, :, :96, :128])["last_feat"]
    assert not torch.allclose(model.backbone.net(batch)["last_feat"][..., :6, :], plain, atol=1e-4)


# --------------------------------------------------------------------------- Mask R-CNN


def test_mask_rcnn_recipe_components():
    model = tiny_mask_rcnn()
    assert isinstance(model.backbone.net, ViT)
    assert isinstance(model.rpn, RPN) and isinstance(model.roi_heads, StandardRoIHeads)
    assert len(model.rpn.head.conv) == 2  # two 3x3 convs
    assert model.rpn.post_nms_topk == {True: 64, False: 64}
    assert model.rpn.anchor_generator.sizes == (32.0, 64.0, 128.0, 256.0, 512.0)
    assert model.rpn.anchor_generator.strides == (4, 8, 16, 32, 64) and model.rpn.anchor_generator.offset == 0.0
    pool = model.roi_heads.box_pooler
    assert isinstance(pool, MultiLevelRoIAlign) and pool.aligned and pool.sampling_ratio == 0
    assert pool.in_features == ["p2", "p3", "p4", "p5"] and pool.output_size == 7
    assert model.roi_heads.mask_pooler.output_size == 14
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.backbone.padding_constraints == {"size_divisibility": 64, "square_size": 128}
    # Box losses are L1 (detectron2 smooth_l1_beta = 0).
    assert model.rpn.smooth_l1_beta == 0 and model.roi_heads.smooth_l1_beta == 0


def test_box_regression_loss_is_l1_at_beta_zero():
    pred, target = torch.tensor([[0.0, 0.05, -0.02, 1.0]]), torch.zeros(1, 4)
    torch.testing.assert_close(box_regression_loss(pred, target, 0.0), torch.tensor(1.07))
    # torchvision's beta 1/9 is quadratic below 1/9: a different value.
    assert box_regression_loss(pred, target, 1 / 9) < 1.07 - 1e-3


def test_aligned_roi_pool_matches_roi_align():
    from torchvision.ops import roi_align

    pool = MultiLevelRoIAlign(["p2", "p3"], (4, 8), 7)
    feats = {"p2": torch.randn(1, 4, 32, 32), "p3": torch.randn(1, 4, 16, 16)}
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 120, 120]])]  # small -> p2, large -> p3
    out = pool(feats, boxes)
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    torch.testing.assert_close(out[0:1], roi_align(feats["p2"], rois[0:1], 7, 0.25, 0, aligned=True))
    torch.testing.assert_close(out[1:2], roi_align(feats["p3"], rois[1:2], 7, 0.125, 0, aligned=True))


def test_roi_features_go_channels_last_on_cpu_with_the_same_head_outputs():
    """Pooled RoI batches are channels-last on CPU in training too (faster box-head convs);
    feature maps stay NCHW in training. The box head (convs + LayerNorm2d + fc) gives the
    same outputs and gradients in either layout."""
    from maedet.models.detectors.roi_heads import build_box_head

    pool = MultiLevelRoIAlign(["p2", "p3"], (4, 8), 7)
    feats = {"p2": torch.randn(1, 8, 32, 32), "p3": torch.randn(1, 8, 16, 16)}
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 120, 120], [4, 8, 60, 40]])]
    for training in (True, False):
        pool.train(training)
        out = pool(feats, boxes)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    pyramid = SimpleFeaturePyramid(tiny_vit(), out_channels=8).train()
    assert all(f.is_contiguous() for f in pyramid(torch.randn(1, 3, 64, 64)).values())

    torch.manual_seed(0)
    head = build_box_head(8, 7, [8, 8], [16], "LN").double()
    x0 = torch.randn(5, 8, 7, 7, dtype=torch.float64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x0.clone().requires_grad_()
        y = head(x.contiguous(memory_format=layout))
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad, [p.grad.clone() for p in head.parameters()]))
        head.zero_grad()
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mask_rcnn_train_losses_backward_and_eval():
    torch.manual_seed(0)
    model = tiny_mask_rcnn(vit_overrides=dict(drop_path_rate=0.1))
    imgs, targets = toy_batch()
    model.train()
    losses = model(imgs, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    for k, v in losses.items():
        assert torch.isfinite(v) and v.dim() == 0, k
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert model.backbone.net.blocks[1].attn.rel_pos_h.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model([imgs[0], imgs[1][:, :, :96]])
    assert len(out) == 2
    for o, (h, w) in zip(out, [(128, 128), (128, 96)]):
        # masks come as RoI probabilities; paste_masks_in_image maps them into any image
        assert set(o) == {"boxes", "labels", "scores", "mask_probs"}
        n = o["boxes"].shape[0]
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == (n,) and o["scores"].shape == (n,)
        assert o["mask_probs"].shape == (n, 1, 28, 28)
        assert n == 0 or (float(o["boxes"][:, 2].max()) <= w and float(o["boxes"][:, 3].max()) <= h)
        if n:
            assert o["labels"].min() >= 1 and o["labels"].max() <= 3


def test_frozen_encoder_sgd_step():
    torch.manual_seed(0)
    model = tiny_mask_rcnn(vit_overrides=dict(freeze=True, drop_path_rate=0.5))
    vit = model.backbone.net
    assert all(not p.requires_grad for p in vit.parameters())
    model.train()
    assert not vit.training and not any(m.training for m in vit.modules())
    assert model.backbone.simfp_4.training and model.roi_heads.training
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(vit(x)["last_feat"], vit(x)["last_feat"])  # drop path off
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    imgs, targets = toy_batch()
    sum(model(imgs, targets).values()).backward()
    opt.step()
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n.startswith("backbone.net."):
            assert torch.equal(p, before[n]), n
    changed = {n.split(".")[0] + "." + n.split(".")[1] for n, p in after.items() if not torch.equal(p, before[n])}
    assert {
        "backbone.simfp_2",
        "backbone.simfp_5",
        "rpn.head",
        "roi_heads.box_head",
        "roi_heads.mask_head",
        "roi_heads.box_predictor",
    } <= changed


def test_freeze_blocks_freezes_exactly_first_k():
    vit = tiny_vit(freeze_blocks=2, drop_path_rate=0.1)
    frozen = {n for n, p in vit.named_parameters() if not p.requires_grad}
    expected = {
        n for n, _ in vit.named_parameters() if n.startswith(("patch_embed.", "pos_embed", "blocks.0.", "blocks.1."))
    }
    assert frozen == expected
    vit.train()
    assert vit.training and not vit.patch_embed.training
    assert [b.training for b in vit.blocks] == [False, False, True]
    vit.eval()
    assert not any(m.training for m in vit.modules())
    with pytest.raises(ValueError):
        tiny_vit(freeze_blocks=4)


def test_layer_ids_for_lr_decay():
    """The backbone's own rule, through the neck and the detector (detectron2's get_vit_lr_decay_rate)."""
    model = tiny_mask_rcnn()  # depth 3
    assert model.layer_id("backbone.net.patch_embed.proj.weight") == 0
    assert model.layer_id("backbone.net.pos_embed") == 0
    assert model.layer_id("backbone.net.blocks.0.norm1.weight") == 1
    assert model.layer_id("backbone.net.blocks.2.attn.rel_pos_h") == 3
    assert model.layer_id("backbone.simfp_2.0.weight") == 4
    assert model.layer_id("roi_heads.box_head.0.0.weight") == 4
    assert model.layer_id("rpn.head.conv.0.0.weight") == 4
    assert model.backbone.net.layer_id("blocks.2.attn.qkv.weight") == 3
    # torch.compile(model.backbone.net) renames parameters to backbone.net._orig_mod.*
    assert model.layer_id("backbone.net._orig_mod.blocks.1.attn.qkv.weight") == 2
    assert model.layer_id("backbone.net._orig_mod.pos_embed") == 0
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    for n, i in ids.items():
        m = re.match(r"backbone\.net\.blocks\.(\d+)\.", n)
        if m:
            assert i == int(m.group(1)) + 1
        elif n.startswith("backbone.net."):
            assert i == 0
        else:
            assert i == 4


# --------------------------------------------------------------------------- pretrained loading


def mae_state(embed=32, depth=3, grid=4, heads_dim=None, decoder=True):
    """Random tensors with the official MAE names (encoder + decoder)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        "cls_token": r(1, 1, embed),
        "pos_embed": r(1, 1 + grid * grid, embed),
        "patch_embed.proj.weight": r(embed, 3, 16, 16),
        "patch_embed.proj.bias": r(embed),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": r(embed),
                p + "norm1.bias": r(embed),
                p + "attn.qkv.weight": r(3 * embed, embed),
                p + "attn.qkv.bias": r(3 * embed),
                p + "attn.proj.weight": r(embed, embed),
                p + "attn.proj.bias": r(embed),
                p + "norm2.weight": r(embed),
                p + "norm2.bias": r(embed),
                p + "mlp.fc1.weight": r(4 * embed, embed),
                p + "mlp.fc1.bias": r(4 * embed),
                p + "mlp.fc2.weight": r(embed, 4 * embed),
                p + "mlp.fc2.bias": r(embed),
            }
        )
    sd["norm.weight"] = r(embed)
    sd["norm.bias"] = r(embed)
    if decoder:
        sd.update(
            {
                "mask_token": r(1, 1, 16),
                "decoder_embed.weight": r(16, embed),
                "decoder_pos_embed": r(1, 17, 16),
                "decoder_blocks.0.attn.qkv.weight": r(48, 16),
                "decoder_norm.weight": r(16),
                "decoder_pred.weight": r(768, 16),
            }
        )
    return sd


def test_load_mae_encoder_resizes_pos_embed_and_reports(tmp_path, caplog):
    vit = tiny_vit(pretrain_img_size=96)  # model pos grid 6x6, checkpoint grid 4x4
    sd = mae_state()
    path = str(tmp_path / "mae.pth")
    torch.save({"model": sd, "epoch": 3}, path)
    with caplog.at_level("INFO"):
        report = load_pretrained_backbone(vit, path)
    assert isinstance(report, Report)
    msd = vit.state_dict()
    for k, v in sd.items():
        if k.startswith(("blocks.", "patch_embed.")):
            torch.testing.assert_close(msd[k], v, rtol=0, atol=0)
            assert k in report.loaded_keys
    expected_pe = torch.cat(
        [sd["pos_embed"][:, :1], resize_pos_embed_grid(sd["pos_embed"], 6, 1).reshape(1, 36, -1)], 1
    )
    torch.testing.assert_close(msd["pos_embed"], expected_pe)
    assert report.changed["pos_embed"].startswith("(1, 17, 32) -> (1, 37, 32)")
    assert sorted(report.missing) == sorted(k for k in msd if "rel_pos" in k)  # newly initialized
    assert {"cls_token", "norm.weight", "mask_token", "decoder_embed.weight"} <= set(report.dropped)
    assert not report.unexpected
    # One concise table, rel-pos keys grouped by pattern.
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("maedet"))
    assert "blocks.*.attn.rel_pos_h (x3)" in text and path in text
    # The loaded weights are used: the forward output changes deterministically.
    fresh = tiny_vit(pretrain_img_size=96)
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(fresh(x)["last_feat"], vit(x)["last_feat"])


def test_load_timm_names_and_plain_dict():
    vit = tiny_vit()
    sd = mae_state(decoder=False)
    sd["fc_norm.weight"] = torch.ones(32)
    sd["head.weight"] = torch.zeros(10, 32)
    report = load_pretrained_backbone(vit, sd)
    assert {"fc_norm.weight", "head.weight", "cls_token"} <= set(report.dropped)
    torch.testing.assert_close(vit.pos_embed.detach(), sd["pos_embed"])  # same grid: no resize
    assert "pos_embed" not in report.changed


def test_load_encoder_of_the_mae_model():
    from maedet.models.mae import MaskedAutoencoderViT

    enc = MaskedAutoencoderViT(
        embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4
    )
    state = enc.encoder_state_dict()
    vit = ViT(img_size=64, embed_dim=192, depth=4, num_heads=3, window_size=2, global_blocks=(1, 3))
    report = load_pretrained_backbone(vit, state)
    torch.testing.assert_close(vit.blocks[3].mlp.fc2.weight.detach(), state["blocks.3.mlp.fc2.weight"])
    assert all("rel_pos" in k for k in report.missing)


def test_checkpoint_errors(tmp_path):
    vit = tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    # Other model size: first mismatching key (checkpoint order) and the file are named.
    path = str(tmp_path / "wide.pth")
    torch.save({"model": mae_state(embed=48)}, path)
    with pytest.raises(CheckpointError, match=r"wide\.pth.*'pos_embed'"):
        load_pretrained_backbone(vit, path)
    sd = mae_state()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(96, 16)
    path = str(tmp_path / "bad_qkv.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"bad_qkv\.pth.*blocks\.1\.attn\.qkv\.weight"):
        load_pretrained_backbone(vit, path)
    # Deeper checkpoint than the model, and shallower.
    path = str(tmp_path / "deep.pth")
    torch.save(mae_state(depth=5), path)
    with pytest.raises(CheckpointError, match=r"deep\.pth.*blocks\.3\."):
        load_pretrained_backbone(vit, path)
    path = str(tmp_path / "shallow.pth")
    torch.save(mae_state(depth=2), path)
    with pytest.raises(CheckpointError, match=r"shallow\.pth.*blocks\.2\."):
        load_pretrained_backbone(vit, path)
    # Random bytes; truncated file; a checkpoint without ViT keys.
    path = str(tmp_path / "random.pth")
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"random\.pth"):
        load_pretrained_backbone(vit, path)
    good = str(tmp_path / "good.pth")
    torch.save({"model": mae_state()}, good)
    data = open(good, "rb").read()
    path = str(tmp_path / "truncated.pth")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth"):
        load_pretrained_backbone(vit, path)
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"conv1.weight": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth.*no recognizable ViT keys"):
        load_pretrained_backbone(vit, path)
    # No failed load modified the model (all checks run before loading).
    for k, v in vit.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_anchors_are_detectron2s_fractional_float32_anchors_under_bf16():
    """detectron2's DefaultAnchorGenerator: fractional cell anchors (area size^2, h = ratio * w),
    offset 0, (H, W, A) order; float32 whatever the autocast dtype of the features."""
    from maedet.models.detectors.anchors import DefaultAnchorGenerator

    gen = DefaultAnchorGenerator((32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
    sizes = [256, 128, 64, 32, 16]
    ref = gen([torch.zeros(1, 8, s, s) for s in sizes])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gen([torch.zeros(1, 8, s, s, dtype=torch.bfloat16) for s in sizes])
    w = (32**2 / 0.5) ** 0.5  # 45.2548..., not rounded
    cell = torch.tensor([[-w / 2, -w / 4, w / 2, w / 4], [-16.0, -16, 16, 16], [-w / 4, -w / 2, w / 4, w / 2]])
    torch.testing.assert_close(ref[0][:3], cell)
    # anchor (y=1, x=2, a=1) of p2: the cell shifted by (8, 4) pixels
    torch.testing.assert_close(ref[0][(1 * 256 + 2) * 3 + 1], cell[1] + torch.tensor([8.0, 4, 8, 4]))
    for a, b in zip(ref, low):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    assert ref[0][:, 2].max() > 1000  # far corners: where bfloat16 would round by pixels
