"""Cascade Mask R-CNN: the cascade rules against a literal reference on fixed inputs, the
detectron2 checkpoint layout both ways, and a cascade model through the Predictor."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maedet.builders import build_detection_model, build_predictor, detection_layout, load_detection_config
from maedet.checkpoint.convert import ConversionOptions, convert_checkpoint
from maedet.checkpoint.formats.detectron2 import maedet_det_to_d2
from maedet.checkpoint.report import Report
from maedet.models.detectors import cascade as cascade_module
from maedet.models.detectors.cascade import CascadeRoIHeads
from maedet.models.layers import ShapeSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)

SHAPE = {f"p{i}": ShapeSpec(16, 2**i) for i in range(2, 7)}
STAGE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


def small_heads(**kw):
    torch.manual_seed(0)
    args = dict(
        box_head_conv_dims=(8, 8),
        box_head_fc_dims=(32,),
        mask_head_conv_dims=(8,),
        batch_size_per_image=64,
        score_thresh=0.0,
        detections_per_img=50,
    )
    args.update(kw)
    heads = CascadeRoIHeads(SHAPE, 3, **args)
    with torch.no_grad():  # non-degenerate predictors (detectron2's init gives near-zero deltas)
        for p in heads.box_predictor:
            p.bbox_pred.weight.normal_(0, 0.05)
            p.cls_score.weight.normal_(0, 0.5)
    return heads


def features(size=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(1, 16, size // 2**i, size // 2**i, generator=g) for i in range(2, 7)}


def literal_decode(deltas, boxes, weights):
    """detectron2's Box2BoxTransform.apply_deltas, written out (class-agnostic: 4 deltas per box)."""
    wx, wy, ww, wh = weights
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=math.log(1000.0 / 16))
    dh = torch.clamp(deltas[:, 3] / wh, max=math.log(1000.0 / 16))
    pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, torch.exp(dw) * w, torch.exp(dh) * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)


def test_inference_averages_stage_scores_and_keeps_the_last_stage_boxes():
    heads = small_heads().eval()
    feats = features()
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(40, 2, generator=g) * 90
    proposals = torch.cat([xy, xy + 8 + torch.rand(40, 2, generator=g) * 30], 1)
    size = (128, 128)
    with torch.no_grad():
        # literal reference of detectron2's CascadeROIHeads._forward_box at test time
        boxes, probs = proposals, []
        for k in range(3):
            if k > 0:
                boxes = torch.stack(
                    [
                        boxes[:, 0].clamp(0, 128),
                        boxes[:, 1].clamp(0, 128),
                        boxes[:, 2].clamp(0, 128),
                        boxes[:, 3].clamp(0, 128),
                    ],
                    1,
                )
            x = heads.box_head[k](heads.box_pooler(feats, [boxes]))
            logits, deltas = heads.box_predictor[k](x)
            assert deltas.shape == (40, 4)  # class-agnostic regression
            probs.append(F.softmax(logits, -1))
            boxes = literal_decode(deltas, boxes, STAGE_WEIGHTS[k])
        scores = (probs[0] + probs[1] + probs[2]) / 3
        out = heads(feats, [proposals], [size])[0]
    # the best detection is the best (box, class) of the averaged scores, with the last stage's box
    fg = scores[:, 1:]
    best = int(fg.max(1).values.argmax())
    label = int(fg[best].argmax()) + 1
    assert int(out["labels"][0]) == label
    assert float(out["scores"][0]) == pytest.approx(float(fg[best, label - 1]), abs=1e-6)
    ref_box = torch.stack(
        [
            boxes[best, 0].clamp(0, 128),
            boxes[best, 1].clamp(0, 128),
            boxes[best, 2].clamp(0, 128),
            boxes[best, 3].clamp(0, 128),
        ]
    )
    torch.testing.assert_close(out["boxes"][0], ref_box, rtol=1e-5, atol=1e-4)
    # every kept score is an averaged probability (not any single stage's)
    for _b, s, lab in zip(out["boxes"], out["scores"], out["labels"]):
        hits = (scores[:, int(lab)] - s).abs() < 1e-6
        assert hits.any()
    single = [(p[:, 1:] - float(out["scores"][0])).abs().min() for p in probs]
    assert min(single) > 1e-6
    assert out["mask_probs"].shape == (len(out["boxes"]), 1, 28, 28)


def test_stages_match_at_their_own_iou_thresholds():
    heads = small_heads()
    gt = torch.tensor([[20.0, 20.0, 80.0, 80.0]])
    # boxes of IoU 0.55, 0.65 and 0.75 with the ground truth (shifted right)
    shifts = [60 * (1 - v) / (1 + v) for v in (0.55, 0.65, 0.75)]
    boxes = torch.tensor([[20 + s, 20.0, 80 + s, 80.0] for s in shifts])
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    for stage, expected in enumerate(([2, 2, 2], [0, 2, 2], [0, 0, 2])):
        labels, gts = heads._match([boxes], targets, stage)
        assert labels[0].tolist() == expected, stage
        assert torch.equal(gts[0], gt.expand(3, 4))
    assert [m.high_threshold for m in heads.stage_matchers] == [0.5, 0.6, 0.7]
    assert [t.weights for t in heads.box_transforms] == list(STAGE_WEIGHTS)


def test_gradient_into_the_features_is_scaled_by_one_over_the_stages(monkeypatch):
    heads = small_heads(mask_on=False).train()
    gt = [{"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])}]
    proposals = [torch.tensor([[22.0, 28.0, 88.0, 97.0], [5.0, 5.0, 40.0, 50.0], [60.0, 10.0, 120.0, 70.0]])]

    def feature_grad():
        feats = {k: v.clone().requires_grad_(True) for k, v in features().items()}
        torch.manual_seed(3)
        losses = heads(feats, proposals, [(128, 128)], gt)
        assert set(losses) == {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)}
        sum(losses.values()).backward()
        return torch.cat([feats[k].grad.flatten() for k in ("p2", "p3", "p4", "p5")])  # the pooled levels

    scaled = feature_grad()
    monkeypatch.setattr(cascade_module, "scale_gradient", lambda x, s: x)
    plain = feature_grad()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(scaled, plain / 3)


def test_training_stages_use_refined_boxes_and_the_mask_head_stage_zero():
    heads = small_heads().train()
    gt = [
        {
            "boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]),
            "labels": torch.tensor([3]),
            "masks": torch.zeros(1, 128, 128, dtype=torch.uint8),
        }
    ]
    gt[0]["masks"][0, 30:100, 20:90] = 1
    seen = []
    real = heads._run_stage

    def spy(feats, boxes, stage):
        seen.append((stage, [b.detach().clone() for b in boxes]))
        return real(feats, boxes, stage)

    heads._run_stage = spy
    torch.manual_seed(0)
    losses = heads(features(), [torch.tensor([[25.0, 25.0, 85.0, 95.0]])], [(128, 128)], gt)
    assert "loss_mask" in losses and torch.isfinite(sum(losses.values()))
    assert [s for s, _ in seen] == [0, 1, 2]
    # stage 0 sees the proposal plus the appended ground truth; later stages its refinement
    assert len(seen[0][1][0]) == 2 and any(torch.equal(b, gt[0]["boxes"][0]) for b in seen[0][1][0])
    assert len(seen[1][1][0]) == 2 and not torch.equal(seen[1][1][0], seen[0][1][0])


# ------------------------------------------------------------------ detectron2 layout
def ref_d2_cascade_heads(K=80, out=256, conv=256, fc=1024):
    """detectron2 CascadeROIHeads (ViTDet cascade configs): 3 x (4conv1fc LN head, predictor with
    K + 1 scores and 4 class-agnostic deltas)."""
    d = {}
    for s in range(3):
        for k in range(1, 5):
            d[f"roi_heads.box_head.{s}.conv{k}.weight"] = (conv, out if k == 1 else conv, 3, 3)
            d[f"roi_heads.box_head.{s}.conv{k}.norm.weight"] = (conv,)
            d[f"roi_heads.box_head.{s}.conv{k}.norm.bias"] = (conv,)
        d[f"roi_heads.box_head.{s}.fc1.weight"] = (fc, conv * 49)
        d[f"roi_heads.box_head.{s}.fc1.bias"] = (fc,)
        d[f"roi_heads.box_predictor.{s}.cls_score.weight"] = (K + 1, fc)
        d[f"roi_heads.box_predictor.{s}.cls_score.bias"] = (K + 1,)
        d[f"roi_heads.box_predictor.{s}.bbox_pred.weight"] = (4, fc)
        d[f"roi_heads.box_predictor.{s}.bbox_pred.bias"] = (4,)
    return d


def test_detectron2_cascade_layout_and_exact_round_trip(tmp_path):
    cfg = load_detection_config(os.path.join(REPO, "configs/coco/cascade_mask_rcnn_vit_b_100ep.yaml"), splits=())
    layout = detection_layout(cfg.model, 80)
    rep = Report("<meta>", "test")
    d2, background = maedet_det_to_d2(layout, rep, layout=layout)
    heads = {
        k: tuple(v.shape) for k, v in d2.items() if k.startswith(("roi_heads.box_head", "roi_heads.box_predictor"))
    }
    assert heads == ref_d2_cascade_heads()
    assert not rep.missing and not rep.unexpected
    assert set(background) == {
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
    }  # agnostic deltas: no rows
    # a small cascade model with random weights: to detectron2 and back, exactly, then loads strictly
    small = [
        "model.backbone.embed_dim=64",
        "model.backbone.depth=2",
        "model.backbone.num_heads=2",
        "model.backbone.global_blocks=[1]",
        "model.backbone.img_size=128",
        "model.neck.out_channels=16",
        "model.neck.square_pad=128",
        "model.roi_heads.box_head_conv_dims=[16]",
        "model.roi_heads.box_head_fc_dims=[32]",
        "model.roi_heads.mask_head_conv_dims=[16]",
    ]
    scfg = load_detection_config(
        os.path.join(REPO, "configs/coco/cascade_mask_rcnn_vit_b_100ep.yaml"), small, splits=()
    )
    torch.manual_seed(0)
    model = build_detection_model(scfg.model, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    sd = model.state_dict()
    torch.save({"model": sd, "meta": {"num_classes": 3}}, tmp_path / "cascade.pth")
    convert_checkpoint(str(tmp_path / "cascade.pth"), "maedet-det", "d2-vitdet", str(tmp_path / "d2.pkl"))
    opts = ConversionOptions(layout=detection_layout(scfg.model, 3))
    back = convert_checkpoint(str(tmp_path / "d2.pkl"), "d2-vitdet", "maedet-det", options=opts).checkpoint["model"]
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    build_detection_model(scfg.model, 3).load_state_dict(back, strict=True)


def test_predictor_runs_a_cascade_model(tmp_path):
    cfg_path = tmp_path / "cascade.yaml"
    cfg_path.write_text(
        f"_base_: {os.path.join(REPO, 'configs/quickstart/cascade_mask_rcnn_vit_tiny.yaml')}\n"
        "model: {roi_heads: {score_thresh: 0.0, detections_per_img: 20}}\n"
    )
    cfg = load_detection_config(str(cfg_path), splits=())
    torch.manual_seed(0)
    model = build_detection_model(cfg.model, 3, load_pretrained=False)
    weights = str(tmp_path / "model_final.pth")
    torch.save({"model": model.state_dict(), "meta": {"num_classes": 3, "class_names": ["a", "b", "c"]}}, weights)
    predictor = build_predictor(str(cfg_path), weights)
    img = (np.random.default_rng(0).random((150, 230, 3)) * 255).astype(np.uint8)
    out = predictor(img)
    n = len(out["scores"])
    assert n > 0 and out["masks"].shape == (n, 150, 230) and set(out["class_names"]) <= {"a", "b", "c"}
    assert (out["boxes"][:, 2] <= 230).all() and (out["boxes"][:, 3] <= 150).all()


def test_refined_boxes_are_clipped_to_the_image_between_stages():
    """Stage 0 regresses every box one width to the right, over the edge of the 128 x 128 image: the next
    stage sees the boxes clipped to the image (those left empty dropped), as detectron2 does."""
    heads = small_heads().train()
    with torch.no_grad():
        p0 = heads.box_predictor[0].bbox_pred
        p0.weight.zero_()
        p0.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]).repeat(p0.bias.numel() // 4))  # dx = 10 / 10
    gt = [{"boxes": torch.tensor([[60.0, 30.0, 100.0, 100.0]]), "labels": torch.tensor([1])}]
    gt[0]["masks"] = torch.zeros(1, 128, 128, dtype=torch.uint8)
    gt[0]["masks"][0, 30:100, 60:100] = 1
    seen = []
    real = heads._run_stage

    def spy(feats, boxes, stage):
        seen.append((stage, torch.cat([b.detach() for b in boxes])))
        return real(feats, boxes, stage)

    heads._run_stage = spy
    heads(features(), [torch.tensor([[70.0, 25.0, 110.0, 95.0]])], [(128, 128)], gt)
    stage1 = seen[1][1]
    assert len(stage1) > 0 and float(stage1[:, 2].max()) == 128.0  # clipped at the right edge
    assert bool((stage1 >= 0).all()) and bool((stage1 <= 128).all())
