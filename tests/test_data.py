"""Tests of maedet.data on the real COCO-format test data and on generated toy data."""

import copy
import json
import os
import random
import subprocess
import sys
import types
import warnings

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from maedet.data import (
    CocoInstanceDataset,
    DatasetCatalog,
    ImageFolderDataset,
    InferenceSampler,
    InfiniteSampler,
    SeededDataset,
    build_detection_test_loader,
    build_detection_train_loader,
    build_mae_transform,
    build_pretrain_loader,
    generate_toy_dataset,
    lsj,
    read_image_rgb,
    resize_shortest_edge,
)
from maedet.data.coco import decode_masks
from maedet.data.transforms import masks_to_tight_boxes
from maedet.structures import PolygonMasks
from maedet.utils.errors import DatasetError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coco128_paths(root):
    return os.path.join(root, "annotations", "instances_train2017.json"), os.path.join(root, "train2017")


def plain(x):
    return x.as_subclass(torch.Tensor)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A tiny generated toy dataset (8 train / 2 val images of 96 px)."""
    out = str(tmp_path_factory.mktemp("toy"))
    generate_toy_dataset(out, num_train=8, num_val=2, image_size=96, seed=3)
    return out


@pytest.fixture
def toy_json(toy_dir):
    with open(os.path.join(toy_dir, "annotations", "instances_train.json")) as f:
        return json.load(f)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_lsj_output_size_and_boxes_are_tight_boxes_of_masks(coco128_root, mask_format):
    json_file, image_root = coco128_paths(coco128_root)
    size = 256
    ds = CocoInstanceDataset(json_file, image_root, transforms=lsj(size, 0.1, 2.0), mask_format=mask_format)
    seeded = SeededDataset(ds)
    total, cropped = 0, 0
    for i in range(0, 40, 4):
        for seed in (1, 4):  # jitter scales 0.63 and 1.16 (cropped)
            (image, target), _ = seeded[(i, seed)]
            assert isinstance(image, tv_tensors.Image)
            # detectron2's FixedSizeCrop(pad=False): cropped to size where larger, never padded
            h, w = image.shape[-2:]
            assert h <= size and w <= size and image.dtype == torch.uint8
            cropped += max(h, w) == size
            masks, boxes, labels = target["masks"], target["boxes"], target["labels"]
            n = labels.shape[0]
            assert len(masks) == n and boxes.shape == (n, 4)
            assert tuple(boxes.canvas_size) == (h, w)
            if mask_format == "polygon":
                # polygons clipped to the crop window; boxes are their extent (detectron2's recompute_boxes)
                assert isinstance(masks, PolygonMasks) and bool(masks.nonempty().all())
                assert torch.equal(plain(boxes), masks.bounding_boxes())
                for inst in masks.polygons:
                    for p in inst:
                        assert p[0::2].min() >= 0 and p[0::2].max() <= size and p[1::2].max() <= size
            elif n:
                assert bool(masks.flatten(1).any(1).all()), "empty instance masks must be dropped"
                assert torch.equal(plain(boxes), masks_to_tight_boxes(masks))
            if n:
                assert int(labels.min()) >= 1 and int(labels.max()) <= ds.num_classes
            total += n
    assert total > 0 and cropped > 0


def test_tight_boxes_convention():
    m = torch.zeros(3, 10, 12, dtype=torch.uint8)
    m[0, 2:5, 3:9] = 1
    m[1, 7, 11] = 1
    boxes = masks_to_tight_boxes(m)
    assert boxes.tolist() == [[3, 2, 9, 5], [11, 7, 12, 8], [0, 0, 0, 0]]


def test_lsj_flip_maps_box_x_to_width_minus_x():
    w = h = 64
    image = tv_tensors.Image(
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[0, 5:30, 10:20] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[10.0, 5, 20, 30]]), format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor([2]),
        "masks": tv_tensors.Mask(mask),
        "image_id": 7,
        "orig_size": (h, w),
    }
    seeded = SeededDataset([(image, target)])
    transform = lsj(w, min_scale=1.0, max_scale=1.0, hflip=True)
    seen = set()
    for seed in range(16):
        (img, tgt), _ = SeededDataset(_Mapped(seeded.dataset, transform))[(0, seed)]
        if torch.equal(plain(img), plain(image).flip(-1)):
            seen.add("flipped")
            assert plain(tgt["boxes"]).tolist() == [[w - 20, 5, w - 10, 30]]
            assert torch.equal(plain(tgt["masks"]), mask.flip(-1))
        else:
            assert torch.equal(plain(img), plain(image))
            seen.add("same")
            assert plain(tgt["boxes"]).tolist() == [[10, 5, 20, 30]]
        assert tgt["labels"].tolist() == [2] and tgt["image_id"] == 7
    assert seen == {"flipped", "same"}


def test_lsj_keeps_small_images_at_top_left_and_the_detector_pads_bottom_right():
    """detectron2's FixedSizeCrop(pad=False): a smaller image is not moved; the detector pads
    the batch bottom/right with 0 after normalization, as at test time."""
    from maedet.models.detectors.rcnn import GeneralizedRCNN

    image = tv_tensors.Image(torch.full((3, 40, 60), 200, dtype=torch.uint8))
    mask = torch.zeros(1, 40, 60, dtype=torch.uint8)
    mask[0, 5:30, 10:20] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[10.0, 5, 20, 30]]), format="XYXY", canvas_size=(40, 60)),
        "labels": torch.tensor([1]),
        "masks": tv_tensors.Mask(mask),
        "image_id": 1,
        "orig_size": (40, 60),
    }
    torch.manual_seed(0)
    out, t = lsj(64, 0.5, 0.5, hflip=False)(image, target)
    # scale 0.5 of the fit-in-64 size (64x43): 32x21, not padded
    assert out.shape == (3, 21, 32) and int((out[0] == 200).sum()) == 32 * 21
    assert t["masks"].shape == (1, 21, 32) and int(t["masks"].sum()) > 0
    assert torch.equal(plain(t["boxes"]), masks_to_tight_boxes(t["masks"]))
    # the object did not move: its box is the original one scaled (nearest-neighbour masks: +-1 px)
    scale = torch.tensor([32 / 60, 21 / 40, 32 / 60, 21 / 40])
    assert torch.allclose(plain(t["boxes"]), torch.tensor([[10.0, 5, 20, 30]]) * scale, atol=1.0)
    neck = types.SimpleNamespace(padding_constraints={"size_divisibility": 32, "square_size": 64})
    model = GeneralizedRCNN.__new__(GeneralizedRCNN)
    torch.nn.Module.__init__(model)
    model.backbone = neck
    model.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1), False)
    model.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1), False)
    batch, sizes = model.preprocess([plain(out)])
    assert batch.shape == (1, 3, 64, 64) and sizes == [(21, 32)]
    expected = (200 - model.pixel_mean) / model.pixel_std
    assert torch.allclose(batch[0, :, :21, :32], expected.expand(3, 21, 32))
    assert batch[0, :, 21:].abs().sum() == 0 and batch[0, :, :, 32:].abs().sum() == 0


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, target = self.items[i]
        return self.transform(image, target)


def test_test_transform_resizes_keeping_aspect(coco128_root):
    json_file, image_root = coco128_paths(coco128_root)
    ds = CocoInstanceDataset(json_file, image_root, filter_empty=False)
    image, target = ds[0]  # 480 x 640
    assert tuple(image.shape[-2:]) == (480, 640)
    out, t = resize_shortest_edge(short_edge_length=256, max_size=320)(image, target)
    assert tuple(out.shape) == (3, 240, 320)  # long side capped: scale 0.5
    assert torch.allclose(plain(t["boxes"]), plain(target["boxes"]) * 0.5, atol=1e-3)
    assert t["orig_size"] == (480, 640)
    for before, after in zip(target["masks"].polygons, t["masks"].polygons):  # polygons move with the image
        assert all(np.allclose(q, p * 0.5) for p, q in zip(before, after))
    out, _ = resize_shortest_edge(short_edge_length=1024, max_size=1024)(image, target)
    assert tuple(out.shape[-2:]) == (768, 1024)
    out, _ = resize_shortest_edge(short_edge_length=240, max_size=1000)(image, target)
    assert tuple(out.shape[-2:]) == (240, 320)  # short side reached


def test_mae_transform_output(coco128_root):
    img = tv_tensors.Image(
        torch.from_numpy(read_image_rgb(os.path.join(coco128_root, "train2017", "000000000009.jpg"))).permute(2, 0, 1)
    )
    torch.manual_seed(0)
    out = build_mae_transform(input_size=48)(img)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert -3.0 < float(out.mean()) < 3.0 and float(out.min()) < 0 < float(out.max())


# --------------------------------------------------------------------------- COCO loading


def test_crowd_annotations_never_become_targets(coco128_root):
    json_file, image_root = coco128_paths(coco128_root)
    with open(json_file) as f:
        raw = json.load(f)
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert len(crowd) == 10
    non_crowd = {}
    for a in raw["annotations"]:
        if not a["iscrowd"]:
            non_crowd[a["image_id"]] = non_crowd.get(a["image_id"], 0) + 1
    ds = CocoInstanceDataset(json_file, image_root, filter_empty=False)
    assert len(ds) == 128
    for i, iid in enumerate(ds.image_ids):
        assert ds.num_instances(i) == non_crowd.get(iid, 0)
    crowd_images = sorted({a["image_id"] for a in crowd})
    for iid in crowd_images:
        _, target = ds[ds.image_ids.index(iid)]
        assert target["labels"].shape[0] == non_crowd.get(iid, 0)
        assert len(target["masks"]) == target["boxes"].shape[0] == target["labels"].shape[0]
    # crowd regions stay available to the evaluator
    assert sum(a["iscrowd"] for a in ds.coco.anns.values()) == 10


def test_grayscale_image_loads_as_three_channels(coco128_root):
    path = os.path.join(coco128_root, "train2017", "000000000086.jpg")
    assert cv2.imread(path, cv2.IMREAD_UNCHANGED).ndim == 2  # the file really is grayscale
    arr = read_image_rgb(path)
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8
    json_file, image_root = coco128_paths(coco128_root)
    ds = CocoInstanceDataset(json_file, image_root)
    image, target = ds[ds.image_ids.index(86)]
    assert image.shape[0] == 3 and len(target["masks"]) == len(target["labels"]) > 0


def test_images_without_annotations_skipped_in_training_kept_in_eval(coco128_root):
    json_file, image_root = coco128_paths(coco128_root)
    train = CocoInstanceDataset(json_file, image_root, filter_empty=True)
    test = CocoInstanceDataset(json_file, image_root, filter_empty=False)
    assert len(train) == 126 and len(test) == 128
    for iid in (250, 508):
        assert iid not in train.image_ids and iid in test.image_ids
    image, target = test[test.image_ids.index(250)]
    h, w = image.shape[-2:]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, h, w) and target["image_id"] == 250


def test_category_mapping_is_contiguous(coco128_root):
    json_file, image_root = coco128_paths(coco128_root)
    ds = CocoInstanceDataset(json_file, image_root)
    assert ds.num_classes == 80 and ds.cat_ids == sorted(ds.cat_ids) and ds.cat_ids[-1] == 90
    assert ds.cat_id_to_label[1] == 1 and ds.cat_id_to_label[90] == 80 and ds.label_to_cat_id[80] == 90
    assert ds.class_names[0] == "person" and ds.class_names[-1] == "toothbrush"
    info = ds.get_image_info(0)
    assert os.path.isfile(info["file_path"]) and info["id"] == ds.image_ids[0]


def test_fruits_nuts_custom_dataset(fruits_nuts_root):
    json_file = os.path.join(fruits_nuts_root, "trainval.json")
    ds = CocoInstanceDataset(json_file, os.path.join(fruits_nuts_root, "images"), dataset_name="fruits_nuts")
    assert len(ds) == 18 and ds.image_ids[0] == 0
    assert ds.num_classes == 3 and ds.class_names == ["date", "fig", "hazelnut"]
    image, target = ds[0]
    assert target["image_id"] == 0 and tuple(image.shape) == (3, 600, 800)
    n = target["labels"].shape[0]
    assert n > 0 and isinstance(target["masks"], PolygonMasks) and len(target["masks"]) == n
    assert bool(target["masks"].to_bitmasks(600, 800).flatten(1).any(1).all())
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    # loadRes (used by COCOeval) works although the json has no "info"
    res = ds.coco.loadRes([{"image_id": 0, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}])
    assert len(res.anns) == 1


def decode_uncompressed_rle(segm):
    """Reference decoder: runs alternate 0/1 starting with 0, column-major (Fortran) order."""
    h, w = segm["size"]
    values = np.arange(len(segm["counts"])) % 2
    flat = np.repeat(values, segm["counts"]).astype(np.uint8)
    assert flat.size == h * w
    return flat.reshape(w, h).T


def test_uncompressed_rle_decodes_to_annotation_area(coco128_root, tmp_path):
    json_file, image_root = coco128_paths(coco128_root)
    with open(json_file) as f:
        raw = json.load(f)
    crowd = [a for a in raw["annotations"] if a["iscrowd"] and isinstance(a["segmentation"]["counts"], list)]
    assert len(crowd) == 10
    ann = dict(crowd[0], iscrowd=0)  # make it a target
    img = next(i for i in raw["images"] if i["id"] == ann["image_id"])
    data = {"images": [img], "annotations": [ann], "categories": raw["categories"]}
    ds = CocoInstanceDataset(write_json(tmp_path / "rle.json", data), image_root)
    _, target = ds[0]
    assert target["masks"].shape == (1, img["height"], img["width"])
    expected = decode_uncompressed_rle(ann["segmentation"])
    assert np.array_equal(target["masks"][0].numpy(), expected)
    x, y, w, h = ann["bbox"]
    assert torch.allclose(
        masks_to_tight_boxes(target["masks"])[0], torch.tensor([x, y, x + w, y + h], dtype=torch.float32), atol=1.0
    )
    # COCO's crowd "area" was computed before rasterization: it matches only roughly
    full = CocoInstanceDataset(json_file, image_root, filter_empty=False)
    for a in crowd:
        area = int(decode_masks([full.coco.annToRLE(full.coco.anns[a["id"]])], 1, 1).sum())
        assert area == int(decode_uncompressed_rle(a["segmentation"]).sum())
        assert 0.6 * a["area"] <= area <= 1.01 * a["area"]


def test_compressed_rle_and_polygons_on_toy(toy_dir):
    ds = CocoInstanceDataset(
        os.path.join(toy_dir, "annotations", "instances_train.json"), os.path.join(toy_dir, "train")
    )
    for i in range(len(ds)):
        image, target = ds[i]
        anns = ds.coco.imgToAnns[target["image_id"]]
        assert [int(m.sum()) for m in target["masks"]] == [int(a["area"]) for a in anns]


# --------------------------------------------------------------------------- samplers


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_infinite_sampler_independent_of_world_size_and_resume():
    size, global_batch = 10, 6
    one = take(InfiniteSampler(size, seed=5), 5 * global_batch)
    # every epoch is a permutation of the dataset
    for e in range(3):
        assert sorted(i for i, _ in one[e * size : (e + 1) * size]) == list(range(size))
    assert [i for i, _ in one[:size]] != list(range(size))
    ranks = [take(InfiniteSampler(size, seed=5, rank=r, world_size=2), 5 * global_batch // 2) for r in range(2)]
    per_rank = global_batch // 2
    for b in range(5):
        union = ranks[0][b * per_rank : (b + 1) * per_rank] + ranks[1][b * per_rank : (b + 1) * per_rank]
        assert sorted(union) == sorted(one[b * global_batch : (b + 1) * global_batch])
    # equal global positions -> equal (index, seed)
    assert ranks[1][2] == one[1 + 2 * 2]
    # resume
    for k in (0, 7, 13):
        assert take(InfiniteSampler(size, seed=5, start=k), 12) == one[k : k + 12]
    resumed = take(InfiniteSampler(size, seed=5, rank=1, world_size=3, start=9), 4)
    assert resumed == [one[9 + 1 + 3 * j] for j in range(4)]
    seeds = [s for _, s in one]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert take(InfiniteSampler(size, seed=6), 6) != one[:6]
    assert [i for i, _ in take(InfiniteSampler(size, shuffle=False), 12)] == list(range(10)) + [0, 1]


def test_inference_sampler_shards():
    for size, ws in ((10, 3), (2, 4), (7, 1)):
        shards = [list(InferenceSampler(size, r, ws)) for r in range(ws)]
        assert sum(shards, []) == list(range(size))
        lens = [len(s) for s in shards]
        assert max(lens) - min(lens) <= 1 and lens == [len(InferenceSampler(size, r, ws)) for r in range(ws)]


class _RandomDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return (i, torch.rand(3), random.random(), float(np.random.rand()))


def test_seeded_dataset_reproducible_and_keeps_caller_rng():
    ds = SeededDataset(_RandomDraws())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    a, sa = ds[(1, 42)]
    b, _ = ds[(1, 42)]
    c, _ = ds[(1, 43)]
    assert sa == 42 and a[0] == 1
    assert torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
    assert not torch.equal(a[1], c[1]) and a[2] != c[2] and a[3] != c[3]
    after = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    assert torch.equal(after[0], torch.rand(1)) and after[1] == random.random() and after[2] == np.random.rand()


def test_seeded_mae_augmentation_reproducible(coco128_root):
    ds = SeededDataset(ImageFolderDataset(os.path.join(coco128_root, "train2017"), transform=build_mae_transform(32)))
    x1, _ = ds[(3, 7)]
    x2, _ = ds[(3, 7)]
    x3, _ = ds[(3, 8)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_pretrain_loader_same_batches_for_any_workers_and_ranks(coco128_root):
    ds = ImageFolderDataset(os.path.join(coco128_root, "train2017"), transform=build_mae_transform(32))
    single = build_pretrain_loader(ds, batch_size=4, num_workers=0, seed=1)
    it = iter(single)
    b0, b1 = next(it), next(it)
    assert b0[0].shape == (4, 3, 32, 32) and b0[0].dtype == torch.float32 and b0[1].dtype == torch.int64
    workers = iter(build_pretrain_loader(ds, batch_size=4, num_workers=2, seed=1, persistent_workers=False))
    w0, w1 = next(workers), next(workers)
    assert torch.equal(b0[0], w0[0]) and torch.equal(b1[1], w1[1]) and torch.equal(b1[0], w1[0])
    halves = [next(iter(build_pretrain_loader(ds, batch_size=2, seed=1, rank=r, world_size=2))) for r in range(2)]
    got = {int(s): x for h in halves for x, s in zip(h[0], h[1])}
    want = {int(s): x for x, s in zip(b0[0], b0[1])}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    resumed = next(iter(build_pretrain_loader(ds, batch_size=4, seed=1, start=4)))
    assert torch.equal(resumed[0], b1[0]) and torch.equal(resumed[1], b1[1])


def test_detection_loaders(toy_dir):
    json_file = os.path.join(toy_dir, "annotations", "instances_train.json")
    ds = CocoInstanceDataset(json_file, os.path.join(toy_dir, "train"), transforms=lsj(64))
    images, targets, seeds = next(iter(build_detection_train_loader(ds, batch_size=3, seed=0)))
    assert len(images) == len(targets) == 3 and seeds.shape == (3,) and seeds.dtype == torch.int64
    for img, t in zip(images, targets):
        assert type(img) is torch.Tensor and max(img.shape[-2:]) <= 64 and img.dtype == torch.uint8
        assert type(t["boxes"]) is torch.Tensor and t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
        assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
        assert t["masks"].shape == (t["labels"].shape[0], *img.shape[-2:])
    again = next(iter(build_detection_train_loader(ds, batch_size=3, seed=0)))
    assert all(torch.equal(a, b) for a, b in zip(images, again[0]))
    test_ds = CocoInstanceDataset(
        json_file, os.path.join(toy_dir, "train"), transforms=resize_shortest_edge(48, 48), filter_empty=False
    )
    seen = []
    for r in range(3):
        for imgs, tgts in build_detection_test_loader(test_ds, batch_size=2, rank=r, world_size=3):
            assert all(i.shape[-2:] == (48, 48) for i in imgs)
            seen += [t["image_id"] for t in tgts]
    assert seen == test_ds.image_ids


# --------------------------------------------------------------------------- catalog


def test_catalog_builtins_and_register(monkeypatch, tmp_path, toy_dir, coco128_root):
    monkeypatch.setenv("MAEDET_DATASETS", toy_dir.rsplit(os.sep, 1)[0])
    monkeypatch.setenv("MAEDET_TEST_DATA", os.path.dirname(coco128_root))
    names = DatasetCatalog.list()
    for n in (
        "coco_2017_train",
        "coco_2017_val",
        "coco_mini_train",
        "coco_mini_val",
        "coco128",
        "fruits_nuts",
        "toy_train",
        "toy_val",
    ):
        assert n in names
    assert DatasetCatalog.get("coco128") == coco128_paths(coco128_root)
    monkeypatch.setenv("MAEDET_DATASETS", str(tmp_path))
    with pytest.raises(DatasetError, match="annotation file not found: .*instances_train2017.json.*coco_2017_train"):
        DatasetCatalog.get("coco_2017_train")
    monkeypatch.setenv("MAEDET_DATASETS", os.path.dirname(toy_dir))
    os.symlink(toy_dir, os.path.join(tmp_path, "toy"))
    monkeypatch.setenv("MAEDET_DATASETS", str(tmp_path))
    json_file, image_root = DatasetCatalog.get("toy_val")
    assert json_file == os.path.join(str(tmp_path), "toy", "annotations", "instances_val.json")
    assert len(CocoInstanceDataset(json_file, image_root)) == 2
    DatasetCatalog.register("my_toy_test", json_file, image_root)
    try:
        assert DatasetCatalog.get("my_toy_test") == (json_file, image_root)
        DatasetCatalog.register("my_toy_test", json_file, image_root)  # same paths: fine
        with pytest.raises(DatasetError, match="already registered"):
            DatasetCatalog.register("my_toy_test", json_file + "x", image_root)
    finally:
        DatasetCatalog.remove("my_toy_test")
    with pytest.raises(DatasetError, match=r"unknown dataset name 'nope'.*coco128.*fruits_nuts"):
        DatasetCatalog.get("nope")


def test_catalog_default_test_data_root(monkeypatch):
    monkeypatch.delenv("MAEDET_TEST_DATA", raising=False)
    from maedet.data.catalog import test_data_root

    assert os.path.realpath(test_data_root()) == os.path.realpath(os.path.join(REPO_ROOT, "..", "shared", "data"))


# --------------------------------------------------------------------------- bad inputs


def test_missing_annotation_file(tmp_path, toy_dir):
    path = str(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match=f"annotation file not found: {path}"):
        CocoInstanceDataset(path, os.path.join(toy_dir, "train"))


def test_image_listed_but_absent(tmp_path, toy_dir, toy_json):
    toy_json["images"][1]["file_name"] = "absent.jpg"
    jf = write_json(tmp_path / "a.json", toy_json)
    with pytest.raises(DatasetError) as e:
        CocoInstanceDataset(jf, os.path.join(toy_dir, "train"))
    assert os.path.join(toy_dir, "train", "absent.jpg") in str(e.value) and "1 of" in str(e.value)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: d["annotations"][2].update(category_id=999), r"annotation id 3 has category_id 999"),
        (
            lambda d: d["annotations"][1].update(segmentation=[[1.0, 2.0, 3.0, 4.0]]),
            r"annotation id 2 .*degenerate polygon",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[5.0, 5.0, 0.0, 10.0]),
            r"annotation id 1 .*non-positive width or height",
        ),
        (lambda d: d["images"][1].update(id=d["images"][0]["id"]), r"duplicate image id 1"),
        (lambda d: d.pop("images"), r"missing key 'images'"),
        (lambda d: d.pop("categories"), r"missing key 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=12345), r"annotation id 1 refers to image_id 12345"),
        (lambda d: d["annotations"][1].update(id=1), r"duplicate annotation id 1"),
    ],
)
def test_invalid_json_content(tmp_path, toy_dir, toy_json, mutate, pattern):
    mutate(toy_json)
    jf = write_json(tmp_path / "bad.json", toy_json)
    with pytest.raises(DatasetError, match=pattern) as e:
        CocoInstanceDataset(jf, os.path.join(toy_dir, "train"))
    assert jf in str(e.value)


def test_non_strict_drops_invalid_annotations(tmp_path, toy_dir, toy_json):
    n = len(toy_json["annotations"])
    toy_json["annotations"][0]["bbox"] = [1.0, 1.0, 0.0, 0.0]
    jf = write_json(tmp_path / "lax.json", toy_json)
    with pytest.warns(RuntimeWarning, match="dropped 1 invalid annotation"):
        ds = CocoInstanceDataset(jf, os.path.join(toy_dir, "train"), strict=False)
    assert len(ds.coco.anns) == n - 1


def test_not_json_file(tmp_path, toy_dir):
    bad = tmp_path / "notes.json"
    bad.write_text("this is not json {")
    with pytest.raises(DatasetError, match=f"not a valid JSON file: {bad}"):
        CocoInstanceDataset(str(bad), os.path.join(toy_dir, "train"))


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(DatasetError, match=f"image folder not found: {tmp_path / 'nope'}"):
        ImageFolderDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match=r"no images \(jpg/jpeg/png/webp/bmp\) found under .*empty"):
        ImageFolderDataset(str(tmp_path / "empty"))


def _png_bytes():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def test_bad_image_files_raise_with_path(tmp_path, coco128_root):
    jpeg = open(os.path.join(coco128_root, "train2017", "000000000009.jpg"), "rb").read()
    png = _png_bytes()
    cases = {
        "truncated.jpg": (jpeg[: len(jpeg) - 300], "truncated JPEG"),
        "no_eoi.jpg": (jpeg[: jpeg.rindex(b"\xff\xd9")], "truncated JPEG"),
        "truncated.png": (png[: len(png) // 2], "truncated PNG"),
        "zero.jpg": (b"", "empty file"),
        "text.jpg": (b"hello, I am not an image\n" * 10, "not a decodable image"),
    }
    for name, (data, why) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DatasetError, match="corrupt image") as e:
            read_image_rgb(str(p))
        assert str(p) in str(e.value) and why in str(e.value)
    # the complete files are fine
    (tmp_path / "ok.png").write_bytes(png)
    assert read_image_rgb(str(tmp_path / "ok.png")).shape == (40, 50, 3)
    with pytest.raises(DatasetError, match=f"image not found: {tmp_path / 'gone.jpg'}"):
        read_image_rgb(str(tmp_path / "gone.jpg"))


def test_skip_mode_counts_bad_images_and_fail_mode_raises(tmp_path, coco128_root):
    src = os.path.join(coco128_root, "train2017")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("000000000009.jpg", "000000000025.jpg", "000000000030.jpg"):
        (folder / name).write_bytes(open(os.path.join(src, name), "rb").read())
    bad = folder / "000000000010_bad.JPG"  # sorts second; upper-case extension is found too
    bad.write_bytes(open(os.path.join(src, "000000000009.jpg"), "rb").read()[:2000])
    ds = ImageFolderDataset(str(folder), on_bad_image="skip")
    assert len(ds) == 4 and ds.paths[1] == str(bad)
    with pytest.warns(RuntimeWarning, match="000000000010_bad.JPG"):
        out = [ds[i] for i in range(4)]
    assert ds.num_skipped == 1
    assert torch.equal(out[1], out[2])  # replaced by the next image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per path
        ds[1]
    assert ds.num_skipped == 2

    # counted across DataLoader worker processes too
    fresh = ImageFolderDataset(str(folder), on_bad_image="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(torch.utils.data.DataLoader(fresh, batch_size=None, num_workers=1))
    assert len(got) == 4 and fresh.num_skipped == 1

    strict = ImageFolderDataset(str(folder), on_bad_image="fail")
    with pytest.raises(DatasetError, match="000000000010_bad.JPG"):
        strict[1]
    # the error surfaces in the main process with the path, also from a worker
    it = iter(torch.utils.data.DataLoader(strict, batch_size=None, sampler=[1], num_workers=1))
    with pytest.raises(DatasetError) as e:
        next(it)
    assert str(bad) in str(e.value)
    assert list(it) == []  # drain, so the worker shuts down at once


def test_image_folder_from_coco_json(coco128_root):
    json_file, image_root = coco128_paths(coco128_root)
    ds = ImageFolderDataset(coco_json=json_file, image_root=image_root)
    assert len(ds) == 128
    img = ds[0]
    assert img.dtype == torch.uint8 and img.shape[0] == 3


# --------------------------------------------------------------------------- toy dataset


def test_toy_generation_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pa = generate_toy_dataset(a, num_train=6, num_val=2, image_size=80, seed=11)
    generate_toy_dataset(b, num_train=6, num_val=2, image_size=80, seed=11)
    for split in ("train", "val"):
        rel = os.path.relpath(pa[split][0], a)
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read()
        for name in sorted(os.listdir(os.path.join(a, split))):
            assert open(os.path.join(a, split, name), "rb").read() == open(os.path.join(b, split, name), "rb").read()
    c = str(tmp_path / "c")
    generate_toy_dataset(c, num_train=6, num_val=2, image_size=80, seed=12)
    assert (
        open(os.path.join(a, "annotations", "instances_train.json")).read()
        != open(os.path.join(c, "annotations", "instances_train.json")).read()
    )


def test_toy_masks_non_empty_and_disjoint(toy_dir):
    ds = CocoInstanceDataset(
        os.path.join(toy_dir, "annotations", "instances_train.json"), os.path.join(toy_dir, "train")
    )
    assert len(ds) == 8 and ds.class_names == ["circle", "triangle", "square"]
    labels = set()
    for i in range(len(ds)):
        image, target = ds[i]
        assert tuple(image.shape) == (3, 96, 96)
        masks = target["masks"]
        assert masks.shape[0] >= 1 and bool(masks.flatten(1).sum(1).min() > 0)
        assert int(masks.sum(0).max()) == 1  # visible regions do not overlap
        assert torch.equal(plain(target["boxes"]), masks_to_tight_boxes(masks))
        labels |= set(target["labels"].tolist())
    assert labels == {1, 2, 3}


def test_prepare_toy_script(tmp_path):
    out = str(tmp_path / "toy")
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "datasets", "prepare_toy.py"),
        "--output",
        out,
        "--num-train",
        "3",
        "--num-val",
        "1",
        "--size",
        "64",
        "--seed",
        "0",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    with open(os.path.join(out, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    assert len(data["images"]) == 3 and len(os.listdir(os.path.join(out, "val"))) == 1
    assert copy.deepcopy(data["categories"])[0]["name"] == "circle"


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_config_mask_format_reaches_the_training_set(fruits_nuts_root, mask_format):
    from maedet.builders import load_detection_config
    from maedet.builders.data import build_detection_dataset

    cfg = load_detection_config(
        os.path.join(REPO_ROOT, "configs", "quickstart", "mask_rcnn_vit_tiny_fruits_nuts.yaml"),
        [f"data.train.mask_format={mask_format}", "data.check_images=false"],
        splits=("train",),
    )
    _, target = build_detection_dataset(cfg.data, "train", train=True)[0]
    masks = target["masks"]
    if mask_format == "polygon":
        assert isinstance(masks, PolygonMasks) and len(masks) == len(target["labels"]) > 0
    else:
        assert isinstance(masks, tv_tensors.Mask) and masks.shape[0] == len(target["labels"]) > 0
