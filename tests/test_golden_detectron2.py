"""Same weights in, same detections out: maedet against detectron2's own ViTDet outputs.

``../shared/golden/vitdet_tiny`` holds a detectron2 ViTDet Mask R-CNN checkpoint, a
real photo and what detectron2 computed on it, stage by stage (its README says what
each key holds). The checkpoint is converted with ``tools/convert_checkpoint.py``
and every stage is compared: the test-time resize, the normalized input, the ViT
and pyramid features, the anchors, the RPN outputs and proposals, the box head,
the final detections in the original image and the pasted masks; then the same
through the user's path (the Predictor on the photo as a file and as an array),
and the post-processing under bf16 autocast.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import REPO_ROOT, require_golden
from PIL import Image

from maedet.builders import build_detection_model, build_predictor, load_detection_config, load_detection_weights
from maedet.builders.data import build_pipeline
from maedet.models.detectors.boxes import pairwise_iou
from maedet.models.detectors.mask_ops import paste_masks_in_image

CONFIG = os.path.join(REPO_ROOT, "tests", "configs", "vitdet_tiny_golden.yaml")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = require_golden("vitdet_tiny")
    out = torch.load(os.path.join(root, "outputs_d2.pt"), weights_only=True)
    weights = str(tmp_path_factory.mktemp("golden") / "vitdet_tiny_maedet.pth")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"),
            "--from",
            "d2-vitdet",
            "--to",
            "maedet-det",
            os.path.join(root, "model_d2.pth"),
            weights,
            "--config",
            CONFIG,
            "--class-names",
            "coco",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "| loaded     |   133 |" in r.stdout and "| missing    |     0 |" in r.stdout
    with open(os.path.join(root, "det_masks_rle.json")) as f:
        masks = np.stack([mask_util.decode(m) for m in json.load(f)["rle"]]).astype(bool)
    photo = np.array(Image.open(os.path.join(root, "input.png")).convert("RGB"))
    cfg = load_detection_config(CONFIG, splits=())
    model = build_detection_model(cfg.model, 80, load_pretrained=False)
    load_detection_weights(model, weights)
    return {
        "root": root,
        "out": out,
        "weights": weights,
        "masks": masks,
        "photo": photo,
        "cfg": cfg,
        "model": model.eval(),
    }


# Proposals that may differ from detectron2's: those tied (to 1e-7) with the 1000th
# one kept, whose order among themselves is float noise (README of the golden data).
MAX_TIED_PROPOSALS = 1


def match_one_to_one(boxes, classes, ref_boxes, ref_classes, min_iou):
    """Greedy one-to-one matching of same-class boxes, best IoU first: list of (ours, theirs)."""
    iou = pairwise_iou(boxes, ref_boxes)
    iou[classes[:, None] != ref_classes[None, :]] = -1
    pairs = []
    while True:
        v = iou.max()
        if v < min_iou:
            break
        i, j = divmod(int(iou.argmax()), iou.shape[1])
        pairs.append((i, j))
        iou[i, :] = -1
        iou[:, j] = -1
    return pairs


def test_every_stage_matches_detectron2_fp32(golden):
    o, model = golden["out"], golden["model"]
    # test-time resize: detectron2's ResizeShortestEdge(1024, 1024) with PIL on uint8
    photo = torch.from_numpy(golden["photo"]).permute(2, 0, 1).contiguous()
    resized = build_pipeline(golden["cfg"].data.test.pipeline, "data.test.pipeline")(photo)
    assert torch.equal(resized.permute(1, 2, 0), o["resized_image"])
    with torch.no_grad():
        batch, sizes = model.preprocess([resized])
        assert batch.shape[1:] == tuple(o["normalized_input_shape"]) and sizes == [(682, 1024)]
        lut = o["normalized_input_lut"]
        ref = torch.stack([lut[c][o["resized_image"][..., c].long()] for c in range(3)])
        assert torch.equal(batch[0, :, :682], ref) and not batch[0, :, 682:].any()  # padded bottom with 0
        # features
        feats = model.backbone(batch)
        assert (model.backbone.net(batch)["last_feat"] - o["vit_out"]).abs().max() < 1e-4
        for k in ("p4", "p5", "p6"):
            assert (feats[k] - o[k]).abs().max() < 1e-4, k
        assert (feats["p3"][:, :8] - o["p3_first_channels"]).abs().max() < 1e-4
        assert (feats["p2"][:, :2] - o["p2_first_channels"]).abs().max() < 1e-4
        # anchors over the padded square: fractional, offset 0, (H, W, A) order
        rpn = model.rpn
        levels = [feats[f] for f in rpn.in_features]
        anchors = rpn.anchor_generator(levels)
        assert [len(a) for a in anchors] == list(o["anchors_num_per_level"])
        for cell, a in zip(o["anchor_cell"], anchors):
            assert (a[: len(cell)] - cell).abs().max() < 1e-4
        for ref_a, a in zip(o["anchors_per_level"], anchors[2:]):
            assert (a - ref_a).abs().max() < 1e-4
        # RPN head
        objectness, deltas = rpn.head(levels)
        for lv in range(1, 5):
            assert (objectness[lv] - o["rpn_objectness"][lv]).abs().max() < 1e-4, lv
        for lv in range(2, 5):
            assert (deltas[lv] - o["rpn_deltas"][lv]).abs().max() < 1e-4, lv
        for lv, top in enumerate(o["rpn_topk_flat"]):  # p2, p3: the 1000 best anchors of each level
            flat = objectness[lv].permute(0, 2, 3, 1).reshape(-1)
            ours = set(flat.topk(1000).indices.tolist())
            theirs = set(top["index"].tolist())
            assert len(ours ^ theirs) <= 20, f"p{lv + 2}: {len(ours ^ theirs)} of 1000 top anchors differ"
        # proposals, as sets (the logits are nearly flat: ranks may swap). Only boxes
        # tied with the last one kept may differ: which of two boxes with the same logit
        # (to 1e-7) takes the 1000th place is float noise (features differ by ~5e-6).
        proposals, logits, _ = rpn(feats, sizes)
        iou = pairwise_iou(proposals[0], o["proposals"])
        assert proposals[0].shape == (1000, 4)
        ours_apart, theirs_apart = iou.max(1).values < 0.999, iou.max(0).values < 0.999
        assert int(ours_apart.sum()) == int(theirs_apart.sum()) <= MAX_TIED_PROPOSALS
        cut = o["proposal_logits"].min()
        assert (logits[0][ours_apart] - cut).abs().le(1e-5).all()
        assert (o["proposal_logits"][theirs_apart] - cut).abs().le(1e-5).all()
        # box head on detectron2's proposals (background moved from last to first)
        logits, box_deltas = model.roi_heads.box_predictor(
            model.roi_heads.box_head(model.roi_heads.box_pooler(feats, [o["proposals"]]))
        )
        ref_logits = torch.cat([o["box_scores"][:, -1:], o["box_scores"][:, :-1]], 1)
        assert (logits - ref_logits).abs().max() < 1e-4 and (box_deltas[:, 4:] - o["box_deltas"]).abs().max() < 1e-4
        # final detections in the original image
        det = model([resized], output_sizes=[(426, 640)])[0]
    assert det["boxes"].shape == (100, 4)
    pairs = match_one_to_one(det["boxes"], det["labels"] - 1, o["det_boxes"], o["det_classes"], 0.999)
    # a proposal tied at the cut (above) changes at most its own detection
    assert len(pairs) >= 100 - int(ours_apart.sum()), len(pairs)
    for i, j in pairs:
        assert abs(float(det["scores"][i]) - float(o["det_scores"][j])) < 1e-4
        assert (det["mask_probs"][i] - o["det_mask_probs_28"][j]).abs().max() < 1e-3
    # pasted masks (detectron2's paste_masks_in_image, threshold 0.5)
    masks = paste_masks_in_image(det["mask_probs"], det["boxes"], (426, 640)).numpy()
    for i, j in pairs:
        ref = golden["masks"][j]
        union = (masks[i] | ref).sum()
        assert union == 0 or (masks[i] & ref).sum() / union >= 0.99, (i, j)
    assert sum(m.any() for m in masks) > 50  # the comparison is not vacuous


def _assert_same_as_detectron2(out, o, masks_rle=None, ref_masks=None):
    boxes = torch.from_numpy(out["boxes"])
    labels = torch.from_numpy(out["labels"]) - 1
    pairs = match_one_to_one(boxes, labels, o["det_boxes"], o["det_classes"], 0.999)
    assert len(o["det_scores"]) == len(out["scores"]) == 100
    # 100 one-to-one, or 99 when the proposal tied at the 1000th place is another box
    # with the same logit (test_every_stage_matches_detectron2_fp32)
    assert len(pairs) >= 100 - MAX_TIED_PROPOSALS, len(pairs)
    for i, j in pairs:
        assert abs(float(out["scores"][i]) - float(o["det_scores"][j])) < 1e-4
        if ref_masks is not None:
            m = mask_util.decode(masks_rle[i]).astype(bool) if masks_rle is not None else out["masks"][i]
            union = (m | ref_masks[j]).sum()
            assert union == 0 or (m & ref_masks[j]).sum() / union >= 0.99


def test_predictor_on_the_photo_gives_detectron2s_detections(golden):
    """The user's path: converted checkpoint, Predictor, the photo as a file and as an array."""
    o = golden["out"]
    predictor = build_predictor(CONFIG, golden["weights"], device="cpu")
    assert predictor.class_names[0] == "person" and predictor.label_to_cat_id[80] == 90
    from_file = predictor(os.path.join(golden["root"], "input.png"), return_rle=True)
    assert from_file["image_size"] == (426, 640)
    _assert_same_as_detectron2(from_file, o, from_file["masks_rle"], golden["masks"])
    from_array = predictor(golden["photo"])
    _assert_same_as_detectron2(from_array, o, None, golden["masks"])


def test_bf16_autocast_decodes_and_pastes_in_float32(golden):
    """Under bf16 autocast the heads round, but decoding, clipping, NMS and pasting stay float32:
    the same head outputs give the same boxes as in fp32, and coordinates above 512 px are not
    on bfloat16's 4 px grid."""
    o, model = golden["out"], golden["model"]
    heads = model.roi_heads
    proposals = o["proposals"]
    deltas_bf16 = o["box_deltas"].to(torch.bfloat16)
    deltas = torch.cat([torch.zeros(1000, 4, dtype=torch.bfloat16), deltas_bf16], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = heads.box_transform.apply_deltas(deltas, proposals)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, heads.box_transform.apply_deltas(deltas.float(), proposals))
    far = decoded[:, 4:][decoded[:, 4:] > 512]
    assert far.numel() > 1000 and (far % 4 != 0).float().mean() > 0.9
    # the whole model under bf16: detections float32, far coordinates off the bf16 grid, and close to fp32
    resized = o["resized_image"].permute(2, 0, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        det = model([resized])[0]
    assert det["boxes"].dtype == torch.float32 and det["boxes"].shape[0] > 0
    far = det["boxes"][det["boxes"] > 512]
    assert far.numel() > 0 and (far % 4 != 0).any()
    with torch.no_grad():
        ref = model([resized])[0]
    iou = pairwise_iou(det["boxes"][:20], ref["boxes"])
    assert (iou.max(1).values > 0.9).float().mean() >= 0.8  # the heads' own rounding moves a few
    # pasting under bf16 autocast samples in float32: bf16 probabilities give the same masks
    # as the same values pasted outside autocast
    size = tuple(resized.shape[-2:])
    probs = det["mask_probs"].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pasted = paste_masks_in_image(probs, det["boxes"], size)
    assert torch.equal(pasted, paste_masks_in_image(probs.float(), det["boxes"], size))
    assert int(pasted.sum()) > 1000
