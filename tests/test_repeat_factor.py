"""Repeat-factor sampling (LVIS recipe): detectron2's factors, and a stream that is seeded,
independent of the number of processes, resumable, and repeats each image by its factor."""

import itertools
import math
import os
from collections import Counter, defaultdict

import pytest
import torch

from maedet.builders.data import build_train_loader_fn
from maedet.data.coco import CocoInstanceDataset
from maedet.data.repeat_factor import RepeatFactorSampler, repeat_factors_from_category_frequency
from maedet.data.samplers import position_seed
from maedet.data.toy import generate_toy_dataset


def detectron2_repeat_factors(dataset_dicts, repeat_thresh):
    """detectron2's ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency``, as it is written."""
    category_freq = defaultdict(int)
    for dataset_dict in dataset_dicts:
        cat_ids = {ann["category_id"] for ann in dataset_dict["annotations"]}
        for cat_id in cat_ids:
            category_freq[cat_id] += 1
    num_images = len(dataset_dicts)
    for k, v in category_freq.items():
        category_freq[k] = v / num_images
    category_rep = {cat_id: max(1.0, math.sqrt(repeat_thresh / cat_freq)) for cat_id, cat_freq in category_freq.items()}
    rep_factors = []
    for dataset_dict in dataset_dicts:
        cat_ids = {ann["category_id"] for ann in dataset_dict["annotations"]}
        rep_factors.append(max({category_rep[cat_id] for cat_id in cat_ids}, default=1.0))
    return torch.tensor(rep_factors, dtype=torch.float32)


def test_factors_hand_computed_and_equal_to_detectron2():
    # 10 images: category 1 in all, 2 in one (f = 0.1), 3 in two (f = 0.2), one image without any
    cats = [{1}] * 6 + [{1, 2}, {1, 3}, {1, 3}, set()]
    got = repeat_factors_from_category_frequency(cats, repeat_thresh=0.4)
    expected = [1.0] * 6 + [2.0, math.sqrt(2), math.sqrt(2), 1.0]  # sqrt(0.4 / 0.1), sqrt(0.4 / 0.2)
    torch.testing.assert_close(got, torch.tensor(expected))
    g = torch.Generator().manual_seed(0)
    dicts = [
        {"annotations": [{"category_id": int(c)} for c in torch.randint(1, 40, (int(n),), generator=g)]}
        for n in torch.randint(0, 6, (300,), generator=g)
    ]
    for thresh in (0.001, 0.05, 0.3):
        ours = repeat_factors_from_category_frequency(
            [[a["category_id"] for a in d["annotations"]] for d in dicts], thresh
        )
        torch.testing.assert_close(ours, detectron2_repeat_factors(dicts, thresh), rtol=0, atol=0)
    with pytest.raises(ValueError, match="repeat_thresh"):
        repeat_factors_from_category_frequency(cats, 0.0)


FACTORS = torch.tensor([1.0, 2.5, 0.3, 1.0, 3.0, 1.7])


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_repeats_images_by_their_factors():
    s = RepeatFactorSampler(FACTORS, seed=3)
    totals = Counter()
    for e in range(400):
        counts = Counter(s.epoch_indices(e).tolist())
        for i, r in enumerate(FACTORS.tolist()):
            assert counts.get(i, 0) in (math.floor(r), math.ceil(r))  # stochastic rounding
        totals.update(counts)
    for i, r in enumerate(FACTORS.tolist()):
        assert abs(totals[i] / 400 - r) < 0.1, (i, totals[i] / 400, r)
    assert not torch.equal(s.epoch_indices(0), s.epoch_indices(1))  # a new order every epoch
    assert torch.equal(s.epoch_indices(5), RepeatFactorSampler(FACTORS, seed=3).epoch_indices(5))  # seeded


def test_stream_is_the_same_for_any_world_size_and_resumes_exactly():
    one = _take(RepeatFactorSampler(FACTORS, seed=1), 120)  # crosses several epochs of ~9.5 images
    assert [seed for _, seed in one] == [position_seed(1, p) for p in range(120)]
    for world in (2, 3):
        parts = [
            _take(RepeatFactorSampler(FACTORS, seed=1, rank=r, world_size=world), 120 // world) for r in range(world)
        ]
        merged = [parts[p % world][p // world] for p in range(120)]
        assert merged == one
    for start in (0, 7, 37, 100):
        assert _take(RepeatFactorSampler(FACTORS, seed=1, start=start), 20) == one[start : start + 20]
    with pytest.raises(ValueError, match="empty"):
        RepeatFactorSampler(torch.zeros(3))


def test_config_sampler_draws_rare_categories_more_often(tmp_path):
    """Through the builder, on the toy set with one category made rare: its images come back more often."""
    import json

    from omegaconf import OmegaConf

    paths = generate_toy_dataset(str(tmp_path / "toy"), num_train=12, num_val=1, image_size=32, seed=0)
    json_file, images = paths["train"]
    with open(json_file) as f:
        data = json.load(f)
    rare_image = data["images"][0]["id"]
    for a in data["annotations"]:  # category 3 only on the first image
        if a["category_id"] == 3 and a["image_id"] != rare_image:
            a["category_id"] = 1
    data["annotations"].append(dict(data["annotations"][0], id=10_000, image_id=rare_image, category_id=3))
    rare_json = os.path.join(tmp_path, "rare.json")
    with open(rare_json, "w") as f:
        json.dump(data, f)
    ds = CocoInstanceDataset(rare_json, images)
    rare = [i for i in range(len(ds)) if 3 in ds.image_categories(i)]
    assert len(rare) == 1
    train = OmegaConf.create({"num_workers": 0, "seed": 0, "pin_memory": False, "persistent_workers": False})
    sampler = {"name": "repeat_factor", "repeat_thresh": 0.5}  # f = 1/12: factor sqrt(6) = 2.45
    loader = build_train_loader_fn(ds, "detection", 2, train, torch.device("cpu"), sampler=sampler)(0)
    stream = list(itertools.islice(iter(loader.sampler), 600))
    share = Counter(i for i, _ in stream)[rare[0]] / len(stream)
    n = len(ds)
    factors = repeat_factors_from_category_frequency([ds.image_categories(i) for i in range(n)], 0.5)
    assert abs(share - float(factors[rare[0]] / factors.sum())) < 0.03
    assert share > 1.5 / n  # about 2.4 times its share under the plain sampler
    plain = build_train_loader_fn(ds, "detection", 2, train, torch.device("cpu"))(0)
    assert Counter(i for i, _ in itertools.islice(iter(plain.sampler), 12 * 50))[rare[0]] == 50
