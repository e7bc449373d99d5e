"""PolygonMasks: polygons moved with the image, clipped by a crop, rasterized per RoI."""

import numpy as np
import pytest
import torch

from maedet.structures import PolygonMasks, polygons_to_bitmask, rasterize_polygons_within_box


def _iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return (a & b).sum() / max((a | b).sum(), 1)


# an L-shaped instance of two polygons and a triangle, in a 40 x 60 image
L_SHAPE = [[5.0, 5, 25, 5, 25, 12, 5, 12], [5.0, 12, 12, 12, 12, 35, 5, 35]]
TRIANGLE = [[30.0, 4, 55, 4, 30, 30]]


def test_flip_and_resize_move_polygons_with_the_raster():
    m = PolygonMasks([L_SHAPE, TRIANGLE])
    full = m.to_bitmasks(40, 60)
    flipped = m.hflip(60).to_bitmasks(40, 60)
    for a, b in zip(flipped, full):
        assert _iou(a, b.flip(-1)) >= 0.97
    assert m.hflip(60).polygons[0][0][0] == 55.0  # x -> W - x
    up = m.resize(40, 60, 80, 90)  # x * 1.5, y * 2
    np.testing.assert_array_equal(up.polygons[1][0], np.array(TRIANGLE[0]) * np.tile([1.5, 2.0], 3))
    assert m.polygons[0][0][0] == 5.0  # the original is unchanged


def test_crop_clips_to_the_window_and_can_split_or_empty_an_instance():
    u_shape = [[0.0, 0, 30, 0, 30, 20, 20, 20, 20, 5, 10, 5, 10, 20, 0, 20]]
    m = PolygonMasks([u_shape, TRIANGLE])
    c = m.crop(0, 10, 40, 20)  # the window cuts the U's base off: two legs remain
    assert len(c.polygons[0]) == 2
    assert torch.equal(c.nonempty(), torch.tensor([True, True]))
    np.testing.assert_allclose(c.bounding_boxes()[0].numpy(), [0, 0, 30, 10])
    raster = m.to_bitmasks(40, 60)[0, 10:30, 0:40]
    assert _iou(c.to_bitmasks(20, 40)[0], raster) >= 0.97
    gone = m.crop(0, 0, 4, 4)  # a window the triangle does not reach
    assert torch.equal(gone.nonempty(), torch.tensor([True, False]))
    assert bool(torch.isinf(gone.bounding_boxes()[1, :2]).all())  # an empty instance has an empty box
    kept = gone[gone.nonempty()]
    assert len(kept) == 1 and np.array_equal(kept.polygons[0][0], gone.polygons[0][0])


def test_rasterize_within_box_is_detectron2s_formula():
    """Shift by the box corner, scale by M / side with float32 sides, pycocotools raster."""
    poly = [np.array(TRIANGLE[0])]
    box = np.array([30.0, 4.0, 55.0, 30.0], dtype=np.float32)
    out = rasterize_polygons_within_box(poly, box, 28)
    ref = poly[0].copy()
    ref[0::2] = (ref[0::2] - box[0]) * np.float32(28 / np.float32(25.0))
    ref[1::2] = (ref[1::2] - box[1]) * np.float32(28 / np.float32(26.0))
    assert np.array_equal(out, polygons_to_bitmask([ref], 28, 28))
    assert 0.4 < out.mean() < 0.6  # a right triangle fills half its box
    assert poly[0][0] == 30.0  # not modified in place


def test_crop_and_resize_targets_per_roi():
    m = PolygonMasks([L_SHAPE, [[10.0, 10, 30, 10, 30, 30, 10, 30]]])
    boxes = torch.tensor([[10.0, 10, 30, 30], [0, 0, 40, 40], [10, 10, 20, 20]])
    t = m.crop_and_resize(boxes, torch.tensor([1, 1, 0]), 14)
    assert t.shape == (3, 14, 14) and t.dtype == torch.float32
    assert bool((t[0] == 1).all())  # the square's own box
    assert abs(float(t[1].mean()) - 0.25) < 0.05  # the square fills a quarter of the big box
    assert float(t[2].mean()) < 0.5  # the L's corner seen through another box
    assert m.crop_and_resize(boxes[:0], torch.tensor([], dtype=torch.long), 14).shape == (0, 14, 14)


def test_bad_polygons_are_refused():
    with pytest.raises(ValueError, match="even number >= 6"):
        PolygonMasks([[[0.0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="list"):
        PolygonMasks("not a list")
