"""Checkpoint conversion: MAE / maedet / timm encoders and detectron2 ViTDet <-> maedet Mask R-CNN.

The reference layouts below are DATA written from the reference sources
(facebookresearch/mae ``models_mae.py``, timm ``vision_transformer.py``,
detectron2 ``modeling/backbone/vit.py``, ``proposal_generator/rpn.py``,
``roi_heads/box_head.py``, ``fast_rcnn.py``, ``mask_head.py`` and
``configs/common/models/mask_rcnn_vitdet.py``), not from the converter.
Large models (ViT-B/L/H) are only ever built on the ``meta`` device.
"""

import argparse
import importlib.util
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from maedet.builders import (
    build_detection_model,
    build_mae_model,
    detection_layout,
    load_detection_config,
    load_pretrain_config,
)
from maedet.checkpoint.convert import ConversionOptions, convert_checkpoint
from maedet.checkpoint.formats.detectron2 import d2_key_to_maedet, d2_to_maedet_det, maedet_det_to_d2, maedet_key_to_d2
from maedet.checkpoint.formats.mae import resize_patch_embed
from maedet.checkpoint.formats.maedet import COCO_CATEGORIES
from maedet.checkpoint.pretrained import load_pretrained_backbone
from maedet.checkpoint.report import Report
from maedet.engine.launch import run_tool
from maedet.models.backbones.vit import ViT
from maedet.utils.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")
MAE_CONFIGS = {
    "mae_vit_tiny_patch16": "configs/quickstart/mae_tiny.yaml",
    "mae_vit_base_patch16": "configs/mae/mae_vit_base_patch16.yaml",
    "mae_vit_large_patch16": "configs/mae/mae_vit_large_patch16.yaml",
    "mae_vit_huge_patch14": "configs/mae/mae_vit_huge_patch14.yaml",
}
DET_CONFIGS = {
    "vit_base": "configs/coco/mask_rcnn_vit_b_100ep.yaml",
    "vit_large": "configs/coco/mask_rcnn_vit_l_100ep.yaml",
    "vit_huge": "configs/coco/mask_rcnn_vit_h_75ep.yaml",
}


def mae_model(name, **overrides):
    """The MAE of a shipped config (model sizes live in the configs only)."""
    cfg = load_pretrain_config(os.path.join(REPO, MAE_CONFIGS[name]), [f"model.{k}={v}" for k, v in overrides.items()])
    return build_mae_model(cfg.model)


def det_config(name, overrides=()):
    return load_detection_config(os.path.join(REPO, name), list(overrides), splits=())


def encoder_arch(config):
    """The encoder architecture a config describes (what --config checks against)."""
    m = load_pretrain_config(os.path.join(REPO, config)).model
    return {
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "patch_size": m.patch_size,
        "mlp_ratio": m.mlp_ratio,
        "num_heads": m.num_heads,
        "name": f"--config {config}",
    }


# =========================================================================== reference layouts (DATA)


def ref_vit_encoder(C, depth, patch, grid, hidden):
    """MAE ``models_mae.py`` encoder == timm ``VisionTransformer(num_classes=0)`` keys and shapes."""
    d = {
        "cls_token": (1, 1, C),
        "pos_embed": (1, 1 + grid * grid, C),
        "patch_embed.proj.weight": (C, 3, patch, patch),
        "patch_embed.proj.bias": (C,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        d.update(
            {
                b + "norm1.weight": (C,),
                b + "norm1.bias": (C,),
                b + "attn.qkv.weight": (3 * C, C),
                b + "attn.qkv.bias": (3 * C,),
                b + "attn.proj.weight": (C, C),
                b + "attn.proj.bias": (C,),
                b + "norm2.weight": (C,),
                b + "norm2.bias": (C,),
                b + "mlp.fc1.weight": (hidden, C),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (C, hidden),
                b + "mlp.fc2.bias": (C,),
            }
        )
    d["norm.weight"] = (C,)
    d["norm.bias"] = (C,)
    return d


def ref_mae_decoder(C, patch, grid, D=512, depth=8):
    """MAE ``models_mae.py`` decoder (512 wide, 8 blocks, as in the released models)."""
    d = {
        "mask_token": (1, 1, D),
        "decoder_pos_embed": (1, 1 + grid * grid, D),
        "decoder_embed.weight": (D, C),
        "decoder_embed.bias": (D,),
        "decoder_norm.weight": (D,),
        "decoder_norm.bias": (D,),
        "decoder_pred.weight": (patch * patch * 3, D),
        "decoder_pred.bias": (patch * patch * 3,),
    }
    for i in range(depth):
        b = f"decoder_blocks.{i}."
        d.update(
            {
                b + "norm1.weight": (D,),
                b + "norm1.bias": (D,),
                b + "attn.qkv.weight": (3 * D, D),
                b + "attn.qkv.bias": (3 * D,),
                b + "attn.proj.weight": (D, D),
                b + "attn.proj.bias": (D,),
                b + "norm2.weight": (D,),
                b + "norm2.bias": (D,),
                b + "mlp.fc1.weight": (4 * D, D),
                b + "mlp.fc1.bias": (4 * D,),
                b + "mlp.fc2.weight": (D, 4 * D),
                b + "mlp.fc2.bias": (D,),
            }
        )
    return d


# name -> (maedet MAE factory, timm model, C, depth, patch, grid, mlp hidden)
ENCODERS = {
    "vit_base_patch16": ("mae_vit_base_patch16", "vit_base_patch16_224", 768, 12, 16, 14, 3072),
    "vit_large_patch16": ("mae_vit_large_patch16", "vit_large_patch16_224", 1024, 24, 16, 14, 4096),
    "vit_huge_patch14": ("mae_vit_huge_patch14", "vit_huge_patch14_224", 1280, 32, 14, 16, 5120),
}


def ref_d2_vitdet(C, depth, heads, global_blocks, K=80, img=1024, patch=16, window=14, pretrain=224, out=256):
    """detectron2 ViTDet Mask R-CNN (``mask_rcnn_vitdet.py``): GeneralizedRCNN state-dict keys and shapes."""
    d = {
        "backbone.net.pos_embed": (1, (pretrain // patch) ** 2 + 1, C),
        "backbone.net.patch_embed.proj.weight": (C, 3, patch, patch),
        "backbone.net.patch_embed.proj.bias": (C,),
    }
    hd = C // heads
    for i in range(depth):
        b = f"backbone.net.blocks.{i}."
        L = 2 * (img // patch) - 1 if i in global_blocks else 2 * window - 1
        d.update(
            {
                b + "norm1.weight": (C,),
                b + "norm1.bias": (C,),
                b + "attn.qkv.weight": (3 * C, C),
                b + "attn.qkv.bias": (3 * C,),
                b + "attn.rel_pos_h": (L, hd),
                b + "attn.rel_pos_w": (L, hd),
                b + "attn.proj.weight": (C, C),
                b + "attn.proj.bias": (C,),
                b + "norm2.weight": (C,),
                b + "norm2.bias": (C,),
                b + "mlp.fc1.weight": (4 * C, C),
                b + "mlp.fc1.bias": (4 * C,),
                b + "mlp.fc2.weight": (C, 4 * C),
                b + "mlp.fc2.bias": (C,),
            }
        )

    def conv_ln(name, cout, cin, k):  # detectron2 Conv2d(bias=False, norm=LN)
        d[name + ".weight"] = (cout, cin, k, k)
        d[name + ".norm.weight"] = (cout,)
        d[name + ".norm.bias"] = (cout,)

    # SimpleFeaturePyramid, scale factors (4, 2, 1, 0.5), norm "LN"
    d["backbone.simfp_2.0.weight"] = (C, C // 2, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    d["backbone.simfp_2.0.bias"] = (C // 2,)
    d["backbone.simfp_2.1.weight"] = (C // 2,)  # LayerNorm
    d["backbone.simfp_2.1.bias"] = (C // 2,)
    d["backbone.simfp_2.3.weight"] = (C // 2, C // 4, 2, 2)
    d["backbone.simfp_2.3.bias"] = (C // 4,)
    conv_ln("backbone.simfp_2.4", out, C // 4, 1)
    conv_ln("backbone.simfp_2.5", out, out, 3)
    d["backbone.simfp_3.0.weight"] = (C, C // 2, 2, 2)
    d["backbone.simfp_3.0.bias"] = (C // 2,)
    conv_ln("backbone.simfp_3.1", out, C // 2, 1)
    conv_ln("backbone.simfp_3.2", out, out, 3)
    conv_ln("backbone.simfp_4.0", out, C, 1)
    conv_ln("backbone.simfp_4.1", out, out, 3)
    conv_ln("backbone.simfp_5.1", out, C, 1)  # simfp_5.0 is the max-pool
    conv_ln("backbone.simfp_5.2", out, out, 3)
    # StandardRPNHead(conv_dims=[-1, -1]), 3 anchors per location
    for k in range(2):
        d[f"proposal_generator.rpn_head.conv.conv{k}.weight"] = (out, out, 3, 3)
        d[f"proposal_generator.rpn_head.conv.conv{k}.bias"] = (out,)
    d["proposal_generator.rpn_head.objectness_logits.weight"] = (3, out, 1, 1)
    d["proposal_generator.rpn_head.objectness_logits.bias"] = (3,)
    d["proposal_generator.rpn_head.anchor_deltas.weight"] = (12, out, 1, 1)
    d["proposal_generator.rpn_head.anchor_deltas.bias"] = (12,)
    # FastRCNNConvFCHead: 4 conv (LN) + 1 fc 1024 on 7x7 RoIs
    for k in range(1, 5):
        conv_ln(f"roi_heads.box_head.conv{k}", 256, out if k == 1 else 256, 3)
    d["roi_heads.box_head.fc1.weight"] = (1024, 256 * 7 * 7)
    d["roi_heads.box_head.fc1.bias"] = (1024,)
    # FastRCNNOutputLayers: K + 1 scores (background last), K x 4 class-specific deltas
    d["roi_heads.box_predictor.cls_score.weight"] = (K + 1, 1024)
    d["roi_heads.box_predictor.cls_score.bias"] = (K + 1,)
    d["roi_heads.box_predictor.bbox_pred.weight"] = (4 * K, 1024)
    d["roi_heads.box_predictor.bbox_pred.bias"] = (4 * K,)
    # MaskRCNNConvUpsampleHead: 4 conv (LN), deconv, 1x1 predictor with K channels
    for k in range(1, 5):
        conv_ln(f"roi_heads.mask_head.mask_fcn{k}", 256, out if k == 1 else 256, 3)
    d["roi_heads.mask_head.deconv.weight"] = (256, 256, 2, 2)
    d["roi_heads.mask_head.deconv.bias"] = (256,)
    d["roi_heads.mask_head.predictor.weight"] = (K, 256, 1, 1)
    d["roi_heads.mask_head.predictor.bias"] = (K,)
    return d


VITDET = {  # size -> (C, depth, heads, global blocks), detectron2 projects/ViTDet/configs/COCO
    "vit_base": (768, 12, 12, (2, 5, 8, 11)),
    "vit_large": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_huge": (1280, 32, 16, (7, 15, 23, 31)),
}

# The key map of docs/VITDET_DIFFERENCES.md (ViTDet box head: 4 convs).
DOC_KEY_MAP = [
    ("backbone.net.blocks.3.attn.rel_pos_h", "backbone.net.blocks.3.attn.rel_pos_h"),
    ("backbone.simfp_2.4.norm.weight", "backbone.simfp_2.4.norm.weight"),
    ("proposal_generator.rpn_head.conv.conv0.weight", "rpn.head.conv.0.0.weight"),
    ("proposal_generator.rpn_head.conv.conv1.bias", "rpn.head.conv.1.0.bias"),
    ("proposal_generator.rpn_head.objectness_logits.weight", "rpn.head.cls_logits.weight"),
    ("proposal_generator.rpn_head.anchor_deltas.bias", "rpn.head.bbox_pred.bias"),
    ("roi_heads.box_head.conv1.weight", "roi_heads.box_head.0.0.weight"),
    ("roi_heads.box_head.conv4.norm.bias", "roi_heads.box_head.3.1.bias"),
    ("roi_heads.box_head.fc1.weight", "roi_heads.box_head.5.weight"),
    ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.weight"),
    ("roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.bias"),
    ("roi_heads.mask_head.mask_fcn1.weight", "roi_heads.mask_head.0.0.weight"),
    ("roi_heads.mask_head.mask_fcn4.norm.weight", "roi_heads.mask_head.3.1.weight"),
    ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_predictor.conv5_mask.weight"),
    ("roi_heads.mask_head.predictor.bias", "roi_heads.mask_predictor.mask_fcn_logits.bias"),
]


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def meta_state(layout):
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


def report(action="test"):
    return Report("<meta>", action)


# =========================================================================== fixtures


@pytest.fixture(scope="module")
def tiny_mae():
    torch.manual_seed(0)
    mae = mae_model("mae_vit_tiny_patch16", img_size=224).eval()
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return mae


# A small ViTDet Mask R-CNN: ViT-tiny, 64-channel pyramid and heads, 3 classes.
TINY_DET = [
    "model.backbone.embed_dim=192",
    "model.backbone.depth=4",
    "model.backbone.num_heads=3",
    "model.backbone.global_blocks=[1,3]",
    "model.backbone.img_size=128",
    "model.neck.out_channels=64",
    "model.neck.square_pad=128",
    "model.roi_heads.box_head_conv_dims=[64,64,64,64]",
    "model.roi_heads.box_head_fc_dims=[128]",
    "model.roi_heads.mask_head_conv_dims=[64,64,64,64]",
]


def tiny_det_config():
    return det_config(DET_CONFIGS["vit_base"], TINY_DET)


def build_tiny_det():
    return build_detection_model(tiny_det_config().model, 3)


def tiny_layout():
    return detection_layout(tiny_det_config().model, 3)


@pytest.fixture(scope="module")
def tiny_det():
    """The small model (3 classes) with random weights everywhere, incl. the unused background rows."""
    torch.manual_seed(1)
    model = build_tiny_det()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


# =========================================================================== key maps vs reference layouts


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_encoder_layouts_match_reference(arch):
    mae_name, timm_name, C, depth, patch, grid, hidden = ENCODERS[arch]
    ref = ref_vit_encoder(C, depth, patch, grid, hidden)
    with torch.device("meta"):
        mae = mae_model(mae_name)
        tm = timm.create_model(timm_name, pretrained=False, num_classes=0)
    assert shapes(mae.encoder_state_dict()) == ref
    assert shapes(tm.state_dict()) == ref
    assert shapes({k: v for k, v in mae.state_dict().items() if k not in ref}) == ref_mae_decoder(C, patch, grid)

    # full MAE checkpoint (with decoder) -> encoder-only MAE file and timm file
    opts = ConversionOptions(expected=encoder_arch(MAE_CONFIGS[mae_name]))
    res = convert_checkpoint({"model": mae.state_dict()}, "mae", "mae", options=opts)
    assert shapes(res.checkpoint["model"]) == ref
    assert set(res.report.dropped) == set(ref_mae_decoder(C, patch, grid))
    assert len(res.report.loaded) == len(ref) and not res.report.missing and not res.report.unexpected

    # timm state with a classifier (the .mae tags have none; fine-tuned ones do) -> head dropped
    with torch.device("meta"):
        tm_head = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    res = convert_checkpoint(tm_head.state_dict(), "timm", "timm", options=opts)
    assert shapes(res.checkpoint) == ref
    assert set(res.report.dropped) == {"head.weight", "head.bias"}


@pytest.mark.parametrize("size", sorted(VITDET))
def test_detectron2_key_map_matches_reference(size):
    C, depth, heads, global_blocks = VITDET[size]
    ref = ref_d2_vitdet(C, depth, heads, global_blocks)
    cfg = det_config(DET_CONFIGS[size])
    ours = detection_layout(cfg.model, 80)  # the architecture comes from the config, built on `meta`

    rep = report()
    d2, background = maedet_det_to_d2(ours, rep, layout=ours)
    assert shapes(d2) == ref  # same keys, same shapes
    assert not rep.missing and not rep.unexpected and len(rep.loaded) == len(ours)
    assert shapes(background) == {
        "roi_heads.box_predictor.bbox_pred.weight": (4, 1024),
        "roi_heads.box_predictor.bbox_pred.bias": (4,),
        "roi_heads.mask_predictor.mask_fcn_logits.weight": (1, 256, 1, 1),
        "roi_heads.mask_predictor.mask_fcn_logits.bias": (1,),
    }
    b = cfg.model.backbone
    assert (b.embed_dim, b.depth, b.num_heads, b.img_size, b.window_size) == (C, depth, heads, 1024, 14)
    assert tuple(b.global_blocks) == global_blocks

    rep = report()
    back = d2_to_maedet_det(meta_state(ref), rep, ours)
    assert shapes(back) == shapes(ours)
    assert not rep.missing and not rep.unexpected

    # a config of another size does not fit: the first mismatching key is named
    other = "vit_large" if size != "vit_large" else "vit_base"
    with pytest.raises(CheckpointError, match="backbone.net"):
        d2_to_maedet_det(meta_state(ref), report(), detection_layout(det_config(DET_CONFIGS[other]).model, 80))


@pytest.mark.parametrize("d2_key, maedet_key", DOC_KEY_MAP)
def test_documented_key_map(d2_key, maedet_key):
    assert d2_key_to_maedet(d2_key, num_box_convs=4) == maedet_key
    assert maedet_key_to_d2(maedet_key, num_box_convs=4, num_rpn_convs=2) == d2_key


def test_key_map_single_rpn_conv():
    assert maedet_key_to_d2("rpn.head.conv.0.0.weight", 4, num_rpn_convs=1) == "proposal_generator.rpn_head.conv.weight"
    assert d2_key_to_maedet("proposal_generator.rpn_head.conv.weight", 4) == "rpn.head.conv.0.0.weight"
    assert maedet_key_to_d2("roi_heads.box_head.6.weight", 4) is None  # a ReLU slot, never a parameter


# =========================================================================== round trips (exact)


def test_encoder_round_trip_is_exact(tmp_path, tiny_mae):
    enc = tiny_mae.encoder_state_dict()
    torch.save(
        {"model": enc, "meta": {"format": "maedet-mae-encoder", "num_heads": 3, "embed_dim": 192}},
        tmp_path / "encoder_final.pth",
    )
    r1 = convert_checkpoint(str(tmp_path / "encoder_final.pth"), "mae", "timm", str(tmp_path / "timm.pth"))
    # heads are not in the weights: a timm file gets them back from the config of the architecture
    r2 = convert_checkpoint(
        str(tmp_path / "timm.pth"),
        "timm",
        "mae",
        str(tmp_path / "mae.pth"),
        options=ConversionOptions(expected=encoder_arch(MAE_CONFIGS["mae_vit_tiny_patch16"])),
    )
    assert not r1.report.changed and not r2.report.changed
    timm_sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    back = torch.load(tmp_path / "mae.pth", weights_only=True)
    for sd in (timm_sd, back["model"]):
        assert set(sd) == set(enc)
        for k in enc:
            assert torch.equal(sd[k], enc[k]), k
    assert back["meta"]["num_heads"] == 3 and back["meta"]["patch_size"] == 16

    # timm's hub format
    convert_checkpoint(str(tmp_path / "mae.pth"), "mae", "timm", str(tmp_path / "model.safetensors"))
    res = convert_checkpoint(str(tmp_path / "model.safetensors"), "timm", "mae")
    assert all(torch.equal(res.checkpoint["model"][k], enc[k]) for k in enc) and len(res.checkpoint["model"]) == len(
        enc
    )

    # maedet pretraining checkpoint (decoder + optimizer state) -> encoder only
    opt = torch.optim.AdamW(tiny_mae.parameters())
    torch.save({"model": tiny_mae.state_dict(), "optimizer": opt.state_dict(), "iter": 7}, tmp_path / "ckpt.pth")
    res = convert_checkpoint(str(tmp_path / "ckpt.pth"), "maedet-pretrain", "mae")
    assert set(res.checkpoint["model"]) == set(enc)
    assert all(torch.equal(res.checkpoint["model"][k], enc[k]) for k in enc)
    assert "mask_token" in res.report.dropped


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_detection_round_trip_is_exact(tmp_path, tiny_det, ext):
    sd = tiny_det.state_dict()
    meta = {
        "format": "maedet-vitdet",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "label_to_cat_id": {1: 1, 2: 5, 3: 9},
    }
    torch.save({"model": sd, "meta": meta}, tmp_path / "model_final.pth")
    d2_path = str(tmp_path / ("d2" + ext))
    r1 = convert_checkpoint(str(tmp_path / "model_final.pth"), "maedet-det", "d2-vitdet", d2_path)
    assert not r1.report.missing and not r1.report.unexpected
    layout = ConversionOptions(layout=tiny_layout())
    if ext == ".pkl":
        with open(d2_path, "rb") as f:
            raw = pickle.load(f)
        assert isinstance(raw["model"]["roi_heads.box_head.fc1.weight"], np.ndarray)
    r2 = convert_checkpoint(d2_path, "d2-vitdet", "maedet-det", str(tmp_path / "back.pth"), options=layout)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back["model"]) == set(sd)
    for k in sd:
        assert torch.equal(back["model"][k], sd[k]), k
    assert back["meta"]["class_names"] == meta["class_names"]
    assert back["meta"]["label_to_cat_id"] == meta["label_to_cat_id"]
    assert back["meta"]["num_classes"] == 3
    assert len(r2.report.loaded) == len(sd)
    # the converted file loads strictly into the model (what train_net / infer do)
    from maedet.builders import load_detection_weights

    load_detection_weights(build_tiny_det(), str(tmp_path / "back.pth"))


def test_detectron2_heads_give_the_same_predictions(tiny_det):
    """Run detectron2's head formulas on converted weights: same class probabilities,
    class boxes and class masks as maedet's torchvision heads (background moved)."""
    sd = tiny_det.state_dict()
    d2, _ = maedet_det_to_d2(sd, report())
    K = 3
    torch.manual_seed(2)
    x = torch.randn(6, 128)
    rh = tiny_det.roi_heads
    with torch.no_grad():
        logits, deltas = rh.box_predictor(x)
        d2_logits = F.linear(
            x, d2["roi_heads.box_predictor.cls_score.weight"], d2["roi_heads.box_predictor.cls_score.bias"]
        )
        d2_deltas = F.linear(
            x, d2["roi_heads.box_predictor.bbox_pred.weight"], d2["roi_heads.box_predictor.bbox_pred.bias"]
        )
        # detectron2: probs[:, :K] are the K classes, the last column background
        assert torch.allclose(F.softmax(d2_logits, -1)[:, :K], F.softmax(logits, -1)[:, 1:], atol=1e-6)
        assert torch.allclose(F.softmax(d2_logits, -1)[:, K], F.softmax(logits, -1)[:, 0], atol=1e-6)
        # class k (0-based in detectron2) deltas are columns 4k..4k+3 there, 4(k+1).. here
        assert torch.allclose(d2_deltas.view(6, K, 4), deltas.view(6, K + 1, 4)[:, 1:], atol=1e-6)

        feats = torch.randn(2, 64, 14, 14)
        masks = rh.mask_predictor(rh.mask_head(feats))
        h = feats
        for i in range(1, 5):  # detectron2 MaskRCNNConvUpsampleHead.layers
            h = F.conv2d(h, d2[f"roi_heads.mask_head.mask_fcn{i}.weight"], padding=1)
            h = F.layer_norm(
                h.permute(0, 2, 3, 1),
                (64,),
                d2[f"roi_heads.mask_head.mask_fcn{i}.norm.weight"],
                d2[f"roi_heads.mask_head.mask_fcn{i}.norm.bias"],
                eps=1e-6,
            ).permute(0, 3, 1, 2)
            h = F.relu(h)
        h = F.relu(
            F.conv_transpose2d(
                h, d2["roi_heads.mask_head.deconv.weight"], d2["roi_heads.mask_head.deconv.bias"], stride=2
            )
        )
        d2_masks = F.conv2d(h, d2["roi_heads.mask_head.predictor.weight"], d2["roi_heads.mask_head.predictor.bias"])
        assert torch.allclose(d2_masks, masks[:, 1:], atol=1e-5)

        # RPN: relu(conv0) -> relu(conv1) -> objectness / anchor deltas
        p = torch.randn(1, 64, 8, 8)
        obj, dl = tiny_det.rpn.head([p])
        t = F.relu(
            F.conv2d(
                p,
                d2["proposal_generator.rpn_head.conv.conv0.weight"],
                d2["proposal_generator.rpn_head.conv.conv0.bias"],
                padding=1,
            )
        )
        t = F.relu(
            F.conv2d(
                t,
                d2["proposal_generator.rpn_head.conv.conv1.weight"],
                d2["proposal_generator.rpn_head.conv.conv1.bias"],
                padding=1,
            )
        )
        assert torch.allclose(
            F.conv2d(
                t,
                d2["proposal_generator.rpn_head.objectness_logits.weight"],
                d2["proposal_generator.rpn_head.objectness_logits.bias"],
            ),
            obj[0],
            atol=1e-5,
        )
        assert torch.allclose(
            F.conv2d(
                t,
                d2["proposal_generator.rpn_head.anchor_deltas.weight"],
                d2["proposal_generator.rpn_head.anchor_deltas.bias"],
            ),
            dl[0],
            atol=1e-5,
        )


# =========================================================================== same features as timm


def test_timm_model_gives_the_same_features(tmp_path, tiny_mae):
    torch.save({"model": tiny_mae.state_dict()}, tmp_path / "ckpt.pth")
    convert_checkpoint(str(tmp_path / "ckpt.pth"), "maedet-pretrain", "timm", str(tmp_path / "timm.pth"))
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=4).eval()
    tm.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    torch.manual_seed(3)
    imgs = torch.randn(2, 3, 224, 224)
    L = tiny_mae.num_patches
    with torch.no_grad():
        ours, _, _ = tiny_mae.forward_encoder(imgs, 0.0, noise=torch.arange(L, dtype=torch.float32).expand(2, L))
        theirs = tm.forward_features(imgs)
    assert ours.shape == theirs.shape == (2, 1 + L, 192)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)

    # MAE encoder -> detection ViT (global attention, no rel-pos) vs timm's blocks on the
    # patch tokens (ViTDet drops the class token and the final norm).
    torch.save({"model": tiny_mae.encoder_state_dict()}, tmp_path / "enc.pth")
    vit = ViT(img_size=224, embed_dim=192, depth=4, num_heads=3, global_blocks=range(4), use_rel_pos=False).eval()
    load_pretrained_backbone(vit, str(tmp_path / "enc.pth"))
    with torch.no_grad():
        det = vit(imgs)["last_feat"]  # (B, C, 14, 14)
        x = tm.patch_embed(imgs) + tm.pos_embed[:, 1:]
        for blk in tm.blocks:
            x = blk(x)
    assert torch.allclose(det.flatten(2).transpose(1, 2), x, atol=1e-5, rtol=1e-4)


# =========================================================================== ViT-H/14 -> /16


def test_huge_patch14_to_16(tmp_path):
    C = 1280
    with torch.device("meta"):
        mae = mae_model("mae_vit_huge_patch14")
    state = dict(mae.encoder_state_dict())
    torch.manual_seed(4)
    state["patch_embed.proj.weight"] = torch.randn(C, 3, 14, 14) * 0.02  # real tensors where values matter
    state["patch_embed.proj.bias"] = torch.randn(C)
    state["pos_embed"] = torch.randn(1, 257, C)
    opts = ConversionOptions(patch_size=16, expected=encoder_arch(MAE_CONFIGS["mae_vit_huge_patch14"]))
    res = convert_checkpoint({"model": state}, "mae", "mae", options=opts)
    ref = ref_vit_encoder(C, 32, 16, 16, 5120)  # grid kept: 16 x 16 patches of 16 px (256 px images)
    assert shapes(res.checkpoint["model"]) == ref
    assert "patch_embed.proj.weight" in res.report.changed and "pos_embed" not in res.report.changed
    assert torch.equal(res.checkpoint["model"]["pos_embed"], state["pos_embed"])
    assert res.checkpoint["meta"]["img_size"] == 256

    p16 = res.checkpoint["model"]

    # /16 encoder -> timm at 224 px: the 16 x 16 grid becomes 14 x 14 (no kernel change)
    res2 = convert_checkpoint({"model": p16}, "mae", "timm", options=ConversionOptions(img_size=224))
    assert shapes(res2.checkpoint) == ref_vit_encoder(C, 32, 16, 14, 5120)
    assert torch.equal(res2.checkpoint["pos_embed"][:, :1], state["pos_embed"][:, :1])  # class-token slot kept
    assert torch.equal(res2.checkpoint["patch_embed.proj.weight"], p16["patch_embed.proj.weight"])

    # Property of the pseudo-inverse resize: the /16 kernel on the (bicubic, antialiased)
    # upsampled patch gives the /14 kernel's response on the original patch.
    w14, w16 = state["patch_embed.proj.weight"], p16["patch_embed.proj.weight"]
    patches = torch.randn(8, 3, 14, 14)
    up = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    old = torch.einsum("oikl,nikl->no", w14, patches)
    new = torch.einsum("oikl,nikl->no", w16, up)
    assert torch.allclose(new, old, atol=1e-5 * old.abs().max().item() + 1e-6)
    w14 = w14[:16]
    # plain bicubic kernel resize keeps the response to a flat patch approximately
    wb = resize_patch_embed(w14, 16, "bicubic")
    assert wb.shape == (16, 3, 16, 16)
    flat_old = w14.sum(dim=(1, 2, 3))
    flat_new = wb.sum(dim=(1, 2, 3))
    assert (flat_new - flat_old).abs().max() < 0.1 * flat_old.abs().max()


# =========================================================================== .pkl and unsafe files


def test_model_zoo_pkl_loads_weights_only_and_converts(tmp_path, tiny_det):
    sd = tiny_det.state_dict()
    d2, _ = maedet_det_to_d2(sd, report())
    zoo = {"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "Detectron2 Model Zoo"}
    zoo["model"]["pixel_mean"] = np.array([123.675, 116.28, 103.53], dtype=np.float32).reshape(3, 1, 1)
    zoo["model"]["pixel_std"] = np.array([58.395, 57.12, 57.375], dtype=np.float32).reshape(3, 1, 1)
    for protocol in (2, 4):  # detectron2 model-zoo files: protocol 2 (bytes via _codecs.encode) or newer
        with open(tmp_path / f"model_final_p{protocol}.pkl", "wb") as f:
            pickle.dump(zoo, f, protocol=protocol)
        res = convert_checkpoint(
            str(tmp_path / f"model_final_p{protocol}.pkl"),
            "d2-vitdet",
            "maedet-det",
            options=ConversionOptions(layout=tiny_layout(), class_names=["x", "y", "z"]),
        )
        assert len(res.checkpoint["model"]) == len(sd)
    out = res.checkpoint["model"]
    assert set(res.report.dropped) == {"pixel_mean", "pixel_std"}
    assert set(out) == set(sd)
    for k in sd:
        if k in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
            assert torch.equal(out[k][4:], sd[k][4:]) and not out[k][:4].any()  # unused background rows: zeros
        elif k.startswith("roi_heads.mask_predictor.mask_fcn_logits"):
            assert torch.equal(out[k][1:], sd[k][1:]) and not out[k][:1].any()
        else:
            assert torch.equal(out[k], sd[k]), k
    assert res.checkpoint["meta"]["class_names"] == ["x", "y", "z"]
    assert res.checkpoint["meta"]["label_to_cat_id"] == {1: 1, 2: 2, 3: 3}

    # class-agnostic detectron2 heads are repeated per class
    agn = dict(zoo["model"])
    agn["roi_heads.box_predictor.bbox_pred.weight"] = agn["roi_heads.box_predictor.bbox_pred.weight"][:4]
    agn["roi_heads.box_predictor.bbox_pred.bias"] = agn["roi_heads.box_predictor.bbox_pred.bias"][:4]
    res = convert_checkpoint({"model": agn}, "d2-vitdet", "maedet-det", options=ConversionOptions(layout=tiny_layout()))
    w = res.checkpoint["model"]["roi_heads.box_predictor.bbox_pred.weight"]
    assert w.shape == (16, 128) and all(torch.equal(w[4 * i : 4 * i + 4], w[:4]) for i in range(4))


def test_object_pickles_are_refused_with_advice(tmp_path, tiny_det):
    d2, _ = maedet_det_to_d2(tiny_det.state_dict(), report())
    obj = {"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "someone", "cfg": argparse.Namespace(a=1)}
    with open(tmp_path / "obj.pkl", "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"obj\.pkl.*argparse\.Namespace.*--trust"):
        convert_checkpoint(str(tmp_path / "obj.pkl"), "d2-vitdet", "maedet-det")
    res = convert_checkpoint(
        str(tmp_path / "obj.pkl"),
        "d2-vitdet",
        "maedet-det",
        trust=True,
        options=ConversionOptions(layout=tiny_layout()),
    )
    assert len(res.checkpoint["model"]) == len(d2)

    # (argparse.Namespace is allowed in .pth files: MAE's training checkpoints store their args so)
    torch.save({"model": d2, "cfg": pathlib.PurePosixPath("a")}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match=r"obj\.pth.*--trust"):
        convert_checkpoint(str(tmp_path / "obj.pth"), "d2-vitdet", "maedet-det")
    assert convert_checkpoint(
        str(tmp_path / "obj.pth"),
        "d2-vitdet",
        "maedet-det",
        trust=True,
        options=ConversionOptions(layout=tiny_layout()),
    ).report.loaded


def test_coco_class_table():
    assert len(COCO_CATEGORIES) == 80
    ids = [c for c, _ in COCO_CATEGORIES]
    assert ids == sorted(ids) and ids[0] == 1 and ids[-1] == 90 and len(set(ids)) == 80


# =========================================================================== errors and CLI


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_in_process(capsys, argv):
    tool = _load_tool()
    with pytest.raises(SystemExit) as e:
        run_tool(lambda: tool.main(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_success(tmp_path, tiny_mae):
    torch.save({"model": tiny_mae.encoder_state_dict()}, tmp_path / "enc.pth")
    ok = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--from",
            "mae",
            "--to",
            "timm",
            str(tmp_path / "enc.pth"),
            str(tmp_path / "t.pth"),
            "--img-size",
            "320",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "| loaded     |    54 |" in ok.stdout and "changed pos_embed" in ok.stdout
    assert torch.load(tmp_path / "t.pth", weights_only=True)["pos_embed"].shape == (1, 401, 192)


def test_cli_wrong_model_size(tmp_path, tiny_mae, capsys):
    torch.save({"model": tiny_mae.encoder_state_dict()}, tmp_path / "enc.pth")
    code, out, err = _run_in_process(
        capsys,
        [
            "--from",
            "mae",
            "--to",
            "timm",
            str(tmp_path / "enc.pth"),
            str(tmp_path / "b.pth"),
            "--config",
            os.path.join(REPO, "configs/mae/mae_vit_base_patch16.yaml"),
        ],
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert str(tmp_path / "enc.pth") in lines[0] and "'cls_token'" in lines[0] and "vit_base" in lines[0]
    assert not (tmp_path / "b.pth").exists()


def tiny_config_file(tmp_path):
    """The tiny detector's architecture as a config file (what --config takes)."""
    lines = ["_base_: " + os.path.join(REPO, DET_CONFIGS["vit_base"])]
    path = tmp_path / "tiny_det.yaml"
    path.write_text("\n".join(lines) + "\n")
    cfg = det_config(str(path), TINY_DET)
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(cfg))
    return str(path)


def test_cli_errors_name_file_and_key(tmp_path, tiny_det, tiny_mae, capsys):
    d2, _ = maedet_det_to_d2(tiny_det.state_dict(), report())
    config = ["--config", tiny_config_file(tmp_path)]
    bad = dict(d2)
    bad["roi_heads.box_head.fc1.weight"] = torch.zeros(128, 100)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    code, out, err = _run_in_process(
        capsys,
        ["--from", "d2-vitdet", "--to", "maedet-det", str(tmp_path / "bad.pth"), str(tmp_path / "o.pth"), *config],
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert str(tmp_path / "bad.pth") in err and "'roi_heads.box_head.fc1.weight'" in err
    assert not (tmp_path / "o.pth").exists()

    # a missing key
    missing = {k: v for k, v in d2.items() if k != "roi_heads.mask_head.deconv.weight"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    code, _, err = _run_in_process(
        capsys,
        ["--from", "d2-vitdet", "--to", "maedet-det", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"), *config],
    )
    assert code == 2 and "'roi_heads.mask_head.deconv.weight'" in err and str(tmp_path / "missing.pth") in err
    assert not (tmp_path / "o.pth").exists()

    # a block with a wrong shape in an encoder (consistency with the inferred architecture)
    enc = dict(tiny_mae.encoder_state_dict())
    enc["blocks.2.mlp.fc1.weight"] = torch.zeros(100, 192)
    torch.save({"model": enc}, tmp_path / "enc_bad.pth")
    code, _, err = _run_in_process(
        capsys, ["--from", "mae", "--to", "timm", str(tmp_path / "enc_bad.pth"), str(tmp_path / "o.pth")]
    )
    assert code == 2 and "'blocks.2.mlp.fc1.weight'" in err and str(tmp_path / "enc_bad.pth") in err

    # wrong format / unsupported pair
    torch.save({"model": tiny_det.state_dict()}, tmp_path / "det.pth")
    code, _, err = _run_in_process(
        capsys,
        ["--from", "d2-vitdet", "--to", "maedet-det", str(tmp_path / "det.pth"), str(tmp_path / "o.pth"), *config],
    )
    assert code == 2 and "--from maedet-det" in err
    code, _, err = _run_in_process(
        capsys, ["--from", "timm", "--to", "d2-vitdet", str(tmp_path / "det.pth"), str(tmp_path / "o.pth")]
    )
    assert code == 2 and "not supported" in err
    assert not (tmp_path / "o.pth").exists()

    # success in-process: report table on stdout
    code, out, _ = _run_in_process(
        capsys, ["--from", "maedet-det", "--to", "d2-vitdet", str(tmp_path / "det.pth"), str(tmp_path / "d2.pkl")]
    )
    assert code == 0 and "| loaded     |" in out and "background row moved" in out
    assert (tmp_path / "d2.pkl").exists()
