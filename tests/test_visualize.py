"""Drawing instances: pixels change only where masks, boxes and labels are."""

import os

import cv2
import numpy as np
import pytest
import torch

from maedet.inference import PALETTE, draw_instances, save_visualization
from maedet.utils.errors import MaedetError

H, W = 60, 80


def _gray():
    return np.full((H, W, 3), 128, dtype=np.uint8)


def _instances():
    boxes = torch.tensor([[5.0, 5.0, 30.0, 25.0], [40.0, 30.0, 75.0, 55.0], [10.0, 40.0, 20.0, 50.0]])
    scores = torch.tensor([0.9, 0.6, 0.1])
    labels = torch.tensor([1, 2, 1])
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 8:20, 8:25] = True
    masks[1, 35:50, 45:70] = True
    masks[1, 36, 46] = False  # a hole
    masks[2, 42:48, 12:18] = True
    return boxes, scores, labels, masks


def test_palette_has_no_gray():
    for c in PALETTE:
        assert max(abs(v - 128) for v in c) >= 2


def test_masks_only_change_pixels_exactly_under_masks():
    img = _gray()
    boxes, scores, labels, masks = _instances()
    out = draw_instances(
        img, boxes, scores, labels, ["cat", "dog"], masks=masks, alpha=0.5, draw_boxes=False, draw_labels=False
    )
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (img == 128).all()  # input untouched
    changed = (out != img).any(axis=2)
    np.testing.assert_array_equal(changed, masks.any(dim=0).numpy())
    # float (N,1,H,W) probabilities are thresholded the same way
    probs = masks.float()[:, None] * 0.8
    out2 = draw_instances(
        img, boxes, scores, labels, ["cat", "dog"], masks=probs, alpha=0.5, draw_boxes=False, draw_labels=False
    )
    np.testing.assert_array_equal(out2, out)


def test_score_thresh_skips_low_scores():
    img = _gray()
    boxes, scores, labels, masks = _instances()
    out = draw_instances(
        img, boxes, scores, labels, ["cat", "dog"], masks=masks, score_thresh=0.5, draw_boxes=False, draw_labels=False
    )
    changed = (out != img).any(axis=2)
    np.testing.assert_array_equal(changed, (masks[0] | masks[1]).numpy())


def test_boxes_change_outline_pixels_only():
    img = _gray()
    boxes, scores, labels, _ = _instances()
    out = draw_instances(img, boxes[:1], scores[:1], labels[:1], ["cat", "dog"], draw_labels=False)
    changed = (out != img).any(axis=2)
    x1, y1, x2, y2 = 5, 5, 30, 25
    assert changed[y1, x1 : x2 + 1].all() and changed[y2, x1 : x2 + 1].all()
    assert changed[y1 : y2 + 1, x1].all() and changed[y1 : y2 + 1, x2].all()
    assert not changed[y1 + 2 : y2 - 1, x1 + 2 : x2 - 1].any()  # interior untouched
    outside = np.ones_like(changed)
    outside[y1 - 1 : y2 + 2, x1 - 1 : x2 + 2] = False
    assert not changed[outside].any()


def test_labels_draw_a_tag_near_the_box():
    img = np.full((200, 300, 3), 128, dtype=np.uint8)
    out = draw_instances(
        img, np.array([[50.0, 80.0, 150.0, 160.0]]), np.array([0.87]), np.array([2]), ["cat", "dog"], draw_boxes=False
    )
    changed = (out != img).any(axis=2)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 50
    assert ys.max() < 80 and xs.min() >= 50  # tag sits above the box, starting at its left edge
    # a box at the top edge puts the tag inside the box
    out = draw_instances(
        img, np.array([[50.0, 0.0, 150.0, 60.0]]), np.array([0.5]), np.array([1]), {1: "cat"}, draw_boxes=False
    )
    ys, _ = np.nonzero((out != img).any(axis=2))
    assert ys.min() >= 0 and ys.max() < 60


def test_save_visualization_round_trip(tmp_path):
    img = _gray()
    boxes, scores, labels, masks = _instances()
    out = draw_instances(img, boxes, scores, labels, ["cat", "dog"], masks=masks)
    path = str(tmp_path / "sub" / "vis.png")
    save_visualization(path, out)
    assert os.path.isfile(path)
    assert list(os.listdir(tmp_path / "sub")) == ["vis.png"]
    back = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert back.shape == out.shape
    np.testing.assert_array_equal(back, out)
    with pytest.raises(MaedetError, match="extension"):
        save_visualization(str(tmp_path / "noext"), out)


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        draw_instances(np.zeros((4, 4, 3), dtype=np.float32), np.zeros((0, 4)), np.zeros(0), np.zeros(0), [])
