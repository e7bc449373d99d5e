"""Config loading: _base_ inheritance, overrides, schema validation, errors naming key and file."""

import os

import pytest

from maedet.config import DetectionConfig, PretrainConfig, load_config, save_config
from maedet.utils.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    sizes = "img_size: 32, patch_size: 16, decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2"
    _write(tmp_path / "a.yaml", f"model: {{depth: 3, embed_dim: 96, {sizes}}}\ntrain: {{batch_size: 5}}\n")
    _write(tmp_path / "b.yaml", "model: {num_heads: 2}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = _write(sub / "c.yaml", "_base_: [../a.yaml, ../b.yaml]\nmodel: {depth: 4}\n")
    cfg = load_config(child, ["train.batch_size=7", "solver.betas=[0.5,0.6]"], PretrainConfig)
    assert cfg.model.depth == 4  # child wins over base
    assert cfg.model.embed_dim == 96 and cfg.model.num_heads == 2  # both bases merged
    assert cfg.train.batch_size == 7  # override wins over files
    assert list(cfg.solver.betas) == [0.5, 0.6]
    assert cfg.model.mask_ratio == PretrainConfig().model.mask_ratio  # schema default (sizes have none)


def test_yaml_on_off_words_stay_strings_for_string_keys(tmp_path):
    # YAML 1.1 reads off/on/yes/no as booleans; train.amp: off must mean the mode "off"
    path = _write(tmp_path / "c.yaml", "train: {amp: off, pin_memory: no}\n")
    cfg = load_config(path, [], PretrainConfig)
    assert cfg.train.amp == "off" and cfg.train.pin_memory is False
    cfg = load_config(path, ["train.amp=off", "train.persistent_workers=off", "solver.fused=on"], PretrainConfig)
    assert cfg.train.amp == "off" and cfg.train.persistent_workers is False and cfg.solver.fused == "on"
    cfg = load_config(path, ["train.pin_memory=true", "train.amp=bf16"], PretrainConfig)
    assert cfg.train.pin_memory is True and cfg.train.amp == "bf16"


def test_unknown_key_names_key_and_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "model: {depthh: 3}\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child, [], PretrainConfig)
    assert "model.depthh" in str(e.value) and base in str(e.value)


def test_wrong_type_names_key(tmp_path):
    path = _write(tmp_path / "c.yaml", "train: {batch_size: many}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [], PretrainConfig)
    assert "train.batch_size" in str(e.value) and path in str(e.value)


def test_bad_override(tmp_path):
    path = _write(tmp_path / "c.yaml", "{}\n")
    with pytest.raises(ConfigError, match="solver.lrr"):
        load_config(path, ["solver.lrr=1"], DetectionConfig)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["solver.lr"], DetectionConfig)


def test_missing_base_and_cycle(tmp_path):
    path = _write(tmp_path / "c.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(path, [], PretrainConfig)
    _write(tmp_path / "x.yaml", "_base_: y.yaml\n")
    _write(tmp_path / "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "x.yaml"), [], PretrainConfig)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "none.yaml"), [], PretrainConfig)
    path = _write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path, [], PretrainConfig)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs/coco/mask_rcnn_vit_l_100ep.yaml"), ["train.amp=off"], DetectionConfig)
    out = str(tmp_path / "resolved.yaml")
    save_config(cfg, out)
    again = load_config(out, [], DetectionConfig)
    assert again == cfg


@pytest.mark.parametrize(
    "name,schema",
    [
        ("mae/mae_vit_base_patch16.yaml", PretrainConfig),
        ("mae/mae_vit_large_patch16.yaml", PretrainConfig),
        ("mae/mae_vit_huge_patch14.yaml", PretrainConfig),
        ("coco/mask_rcnn_vit_b_100ep.yaml", DetectionConfig),
        ("coco/mask_rcnn_vit_h_75ep_frozen.yaml", DetectionConfig),
    ],
)
def test_shipped_configs_hold_the_recipes(name, schema):
    cfg = load_config(os.path.join(REPO, "configs", name), [], schema)
    if schema is PretrainConfig:
        assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss
        assert (cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads) == (512, 8, 16)
        assert list(cfg.solver.betas) == [0.9, 0.95] and cfg.solver.weight_decay == 0.05
        assert cfg.solver.base_lr == 1.5e-4 and cfg.solver.base_batch_size == 256
        assert cfg.solver.epochs == 800 and cfg.solver.warmup_epochs == 40
        assert (cfg.data.min_scale, cfg.data.max_scale) == (0.2, 1.0)
    else:
        assert cfg.train.total_batch_size == 64 and cfg.solver.lr == 1e-4 and cfg.solver.weight_decay == 0.1
        assert cfg.solver.warmup_iters == 250 and cfg.data.train.pipeline.image_size == 1024


@pytest.mark.parametrize("kind", ["pretrain", "detection"])
def test_total_batch_size_means_the_global_batch_in_both_trainers(kind, monkeypatch):
    import maedet.builders.trainer as trainer_builder
    from maedet.builders import load_detection_config, load_pretrain_config

    def load(overrides):
        if kind == "pretrain":
            return load_pretrain_config(os.path.join(REPO, "configs", "quickstart", "mae_tiny.yaml"), overrides)
        path = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_vit_tiny.yaml")
        return load_detection_config(path, overrides, splits=())

    for world, accum, expect in ((1, 1, 16), (2, 1, 8), (4, 2, 2), (8, 2, 1)):
        monkeypatch.setattr(trainer_builder.du, "get_world_size", lambda w=world: w)
        cfg = load(["train.total_batch_size=16", f"train.accum_steps={accum}", "train.batch_size=5"])
        assert trainer_builder.per_process_batch(cfg.train) == expect
        # total_batch_size=0: train.batch_size per process, whatever the world size
        cfg = load(["train.total_batch_size=0", f"train.accum_steps={accum}", "train.batch_size=5"])
        assert trainer_builder.per_process_batch(cfg.train) == 5
    monkeypatch.setattr(trainer_builder.du, "get_world_size", lambda: 3)
    cfg = load(["train.total_batch_size=16", "train.accum_steps=1"])
    with pytest.raises(ConfigError, match=r"train.total_batch_size=16 is not divisible by 3 processes x 1"):
        trainer_builder.per_process_batch(cfg.train)


def _detection_configs():
    root = os.path.join(REPO, "configs")
    for sub in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            path = os.path.join(root, sub, name)
            with open(path) as f:
                text = f.read()
            if name.endswith(".yaml") and "mask_rcnn" in name:
                yield os.path.relpath(path, root)
            else:
                assert "neck" not in text or name == "cascade_roi_heads.yaml", f"{path} not checked"


@pytest.mark.parametrize("name", list(_detection_configs()))
def test_shipped_detection_configs_pad_to_their_training_crop_and_test_at_it(name, caplog):
    """ViTDet's geometry in every shipped config: the square the batches are padded to is
    the LSJ crop, and the test resize's longer side is that square (no warning either)."""
    from omegaconf import OmegaConf

    from maedet.builders import load_detection_config
    from maedet.builders.config import check_input_geometry

    cfg = load_detection_config(os.path.join(REPO, "configs", name), [], splits=())
    square = cfg.model.neck.square_pad
    assert square == cfg.data.train.pipeline.image_size == cfg.data.test.pipeline.max_size
    with caplog.at_level("WARNING", logger="maedet"):
        check_input_geometry(OmegaConf.to_container(cfg), train=True)
    assert not [r for r in caplog.records if "square_pad" in r.getMessage()]


def _toy_config(overrides):
    from maedet.builders import load_detection_config

    files = ["data.train.json=t.json", "data.train.images=imgs", "data.test.json=v.json", "data.test.images=imgs"]
    path = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_vit_tiny.yaml")
    return load_detection_config(path, files + overrides)


def test_square_pad_other_than_the_training_crop_is_refused_naming_both_keys():
    # the fruits_nuts recipe as it was: 320-px LSJ crops padded to 448 (held-out AP / 4)
    with pytest.raises(ConfigError) as e:
        _toy_config(["model.neck.square_pad=256"])
    msg = str(e.value)
    assert "model.neck.square_pad=256" in msg and "data.train.pipeline.image_size=192" in msg
    assert "top-left corner" in msg
    with pytest.raises(ConfigError, match=r"square_pad=128 differs from data.train.pipeline.image_size=192"):
        _toy_config(["model.neck.square_pad=128", "data.test.pipeline.max_size=128"])
    # matched: loads
    cfg = _toy_config(["model.neck.square_pad=256", "data.train.pipeline.image_size=256"])
    assert cfg.model.neck.square_pad == 256


def test_test_resize_other_than_the_square_warns_naming_both_keys(caplog):
    with caplog.at_level("WARNING", logger="maedet"):
        _toy_config(["data.test.pipeline.max_size=256"])
    (record,) = [r for r in caplog.records if "square_pad" in r.getMessage()]
    assert "data.test.pipeline.max_size=256" in record.getMessage()
    assert "model.neck.square_pad=192" in record.getMessage()
