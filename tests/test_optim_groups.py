"""Each recipe's optimizer treats every parameter as its reference does (weight decay, lr decay),
and the RPN losses are normalized as detectron2 normalizes them.

References, written as rules here (not taken from the code under test):
- detectron2 ViTDet B/L: ``get_default_optimizer_params(weight_decay_norm=0.0)`` with
  ``overrides={"pos_embed": {"weight_decay": 0.0}}``: no decay for the parameters of torch.nn
  normalization layers (the ViT's LayerNorms) and for ``pos_embed``; everything else decays
  (biases, rel-pos tables, the pyramid's and heads' channels-first LayerNorms).
- detectron2 ViTDet H: ``overrides={}``, ``weight_decay_norm=None``: everything decays.
- MAE release (``optim_factory.add_weight_decay``): no decay for 1-D parameters and biases.
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F

from maedet.builders import build_detection_model, build_mae_model, load_detection_config, load_pretrain_config
from maedet.builders.solver import build_solver_optimizer
from maedet.models.detectors.rpn import RPN
from maedet.models.layers import ShapeSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _groups(config: str, kind: str = "detection"):
    path = os.path.join(REPO, config)
    if kind == "mae":
        cfg = load_pretrain_config(path)
        model = build_mae_model(cfg.model)
    else:
        cfg = load_detection_config(path, splits=())
        model = build_detection_model(cfg.model, 80, load_pretrained=False)
    opt = build_solver_optimizer(cfg.solver, model, 1e-4, torch.device("cpu"))
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    return model, cfg, wd, scale


def test_vitdet_b_weight_decay_and_layer_decay_equal_detectron2():
    model, cfg, wd, scale = _groups("configs/coco/mask_rcnn_vit_b_100ep.yaml")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(wd) == trainable
    exempt = re.compile(r"^backbone\.net\.(pos_embed|blocks\.\d+\.norm[12]\.(weight|bias))$")
    for name in trainable:
        assert wd[name] == (0.0 if exempt.match(name) else 0.1), name
    assert sum(v == 0.0 for v in wd.values()) == 1 + 12 * 2 * 2  # pos_embed + 2 LayerNorms x 2 tensors x 12 blocks
    # decayed although they are 1-D or "no-decay" elsewhere: as detectron2's recipe
    for name in (
        "backbone.net.blocks.3.attn.qkv.bias",
        "backbone.net.blocks.2.attn.rel_pos_h",
        "backbone.simfp_2.1.weight",
        "backbone.simfp_3.1.norm.bias",
        "roi_heads.box_head.0.1.weight",
        "roi_heads.box_predictor.cls_score.bias",
    ):
        assert wd[name] == 0.1, name
    # layer-wise lr decay 0.7 over 12 blocks (detectron2's get_vit_lr_decay_rate)
    assert scale["backbone.net.patch_embed.proj.weight"] == pytest.approx(0.7**13)
    assert scale["backbone.net.blocks.0.mlp.fc1.weight"] == pytest.approx(0.7**12)
    assert scale["backbone.net.blocks.11.attn.proj.bias"] == pytest.approx(0.7)
    assert scale["backbone.simfp_5.2.weight"] == 1.0 and scale["rpn.head.conv.0.0.weight"] == 1.0


def test_vitdet_h_decays_every_parameter():
    with torch.device("meta"):
        model, cfg, wd, scale = _groups("configs/coco/mask_rcnn_vit_h_75ep.yaml")
    assert len(wd) == sum(1 for p in model.parameters() if p.requires_grad) > 500
    assert set(wd.values()) == {0.1}
    assert scale["backbone.net.blocks.31.norm1.weight"] == pytest.approx(0.9)
    assert scale["backbone.net.pos_embed"] == pytest.approx(0.9**33)


def test_cascade_recipe_has_the_same_groups():
    _, _, wd_cascade, _ = _groups("configs/coco/cascade_mask_rcnn_vit_b_100ep.yaml")
    _, _, wd_mask, _ = _groups("configs/coco/mask_rcnn_vit_b_100ep.yaml")
    backbone = {n: v for n, v in wd_mask.items() if n.startswith("backbone.")}
    assert {n: v for n, v in wd_cascade.items() if n.startswith("backbone.")} == backbone
    assert wd_cascade["roi_heads.box_head.2.0.0.weight"] == 0.1


def test_mae_groups_equal_the_official_rule():
    with torch.device("meta"):
        model, cfg, wd, _ = _groups("configs/mae/mae_vit_base_patch16.yaml", kind="mae")
    params = dict(model.named_parameters())
    assert "pos_embed" not in wd and "decoder_pos_embed" not in wd  # fixed sin-cos tables: frozen
    for name, p in params.items():
        if p.requires_grad:
            official = 0.0 if (p.ndim == 1 or name.endswith(".bias")) else 0.05
            assert wd[name] == official, name
    assert wd["cls_token"] == 0.05 and wd["mask_token"] == 0.05  # 3-D: they decay in the MAE release


def test_rpn_losses_are_normalized_by_256_times_images():
    """detectron2 divides both RPN losses by batch_size_per_image x images, even when fewer
    anchors can be sampled (a small image), not by the number sampled."""
    shape = {f"p{i}": ShapeSpec(8, 2**i) for i in range(4, 7)}
    rpn = RPN(shape, in_features=("p4", "p5", "p6"), anchor_sizes=(16, 32, 64)).train()
    feats = {f"p{i}": torch.randn(2, 8, 64 // 2**i, 64 // 2**i) for i in range(4, 7)}  # 63 anchors
    gt = [torch.tensor([[2.0, 3, 40, 30]]), torch.zeros(0, 4)]
    torch.manual_seed(0)
    _, _, losses = rpn(feats, [(64, 64), (64, 64)], gt)
    # recompute with the same sampling
    levels = [feats[f] for f in rpn.in_features]
    anchors = torch.cat(rpn.anchor_generator(levels))
    obj, dl = rpn.head(levels)
    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1) for o in obj], 1)
    deltas = torch.cat(
        [d.view(2, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4) for d in dl], 1
    )
    torch.manual_seed(0)
    labels, matched = rpn.label_anchors(anchors, gt)
    labels = torch.stack(labels)
    sampled = labels >= 0
    assert int(sampled.sum()) < 2 * 256  # fewer anchors than the 256 per image the normalizer counts
    bce = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled], reduction="sum")
    torch.testing.assert_close(losses["loss_rpn_cls"], bce / (256 * 2))
    pos = labels == 1
    target = torch.stack([rpn.box_transform.get_deltas(anchors, m) for m in matched])
    l1 = (deltas[pos] - target[pos]).abs().sum()
    torch.testing.assert_close(losses["loss_rpn_loc"], l1 / (256 * 2))
    assert pos.sum() > 0 and not torch.isclose(losses["loss_rpn_cls"], bce / sampled.sum())
