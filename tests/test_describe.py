"""``tools/convert_checkpoint.py --inspect``: what each checkpoint format is, read off its
tensors and what it stores; and wrong files given to the weight loaders described in their errors.

Official layouts are written from the reference key tables of tests/test_convert.py (MAE's
``models_mae.py``, detectron2's ViTDet), with broadcast tensors so that a ViT-B file costs
a few kilobytes.
"""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from maedet.builders.model import build_detection_model, load_detection_weights
from maedet.checkpoint.describe import describe_checkpoint
from maedet.checkpoint.pretrained import load_pretrained_backbone
from maedet.data.toy import generate_toy_dataset
from maedet.utils.errors import CheckpointError
from tests.conftest import REPO_ROOT, require_golden
from tests.reliability.conftest import PRETRAIN_YAML
from tests.test_convert import VITDET, ref_d2_vitdet, ref_mae_decoder, ref_vit_encoder, tiny_det_config

TOOL = os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py")


def tensors(shapes):
    """Zero tensors of the given shapes that share one element of storage."""
    one = torch.zeros(1)
    return {k: one.expand(*s) for k, s in shapes.items()}


def numel(shapes):
    return sum(torch.Size(s).numel() for s in shapes.values())


def inspect_tool(path):
    proc = subprocess.run([sys.executable, TOOL, "--inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


VIT_B = ref_vit_encoder(768, 12, 16, 14, 3072)


def test_official_mae_release_layouts(tmp_path):
    # mae_pretrain_vit_base.pth: {"model": encoder}; mae_visualize_vit_base.pth adds the decoder
    torch.save({"model": tensors(VIT_B)}, tmp_path / "mae_pretrain_vit_base.pth")
    torch.save({"model": tensors({**VIT_B, **ref_mae_decoder(768, 16, 14)})}, tmp_path / "mae_visualize_vit_base.pth")
    enc = inspect_tool(tmp_path / "mae_pretrain_vit_base.pth")
    assert "official MAE release, encoder only" in enc and "ViT-B/16 (12 heads)" in enc
    assert f"{numel(VIT_B) / 1e6:.1f} M (encoder)" in enc
    assert "image size     224 (position table 14x14 + class token)" in enc
    assert "norm_pix_loss  not stored in the file" in enc
    assert "model.backbone.pretrained=" in enc and "--from mae --to timm" in enc
    full = describe_checkpoint(str(tmp_path / "mae_visualize_vit_base.pth"))
    assert full.kind == "mae-full" and full.title == "official MAE release with its decoder (encoder + decoder)"
    assert full.fields["decoder"] == "width 512, depth 8"
    assert full.fields["parameters"] == f"{numel(VIT_B) / 1e6:.1f} M (encoder)"  # the decoder is not counted

    # main_pretrain.py's checkpoint-N.pth: model + optimizer + epoch + args (norm_pix_loss stored)
    args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, mask_ratio=0.75)
    optimizer = {"state": {}, "param_groups": []}
    ckpt = {
        "model": tensors({**VIT_B, **ref_mae_decoder(768, 16, 14)}),
        "optimizer": optimizer,
        "epoch": 799,
        "args": args,
    }
    torch.save(ckpt, tmp_path / "checkpoint-799.pth")
    train = describe_checkpoint(str(tmp_path / "checkpoint-799.pth"))
    assert train.kind == "mae-train" and train.convert_from == "mae"
    assert (train.fields["norm_pix_loss"], train.fields["mask ratio"], train.fields["epoch"]) == ("true", "0.75", "799")


def test_timm_and_huge_patch14(tmp_path):
    from safetensors.torch import save_file

    huge = ref_vit_encoder(1280, 32, 14, 16, 5120)
    save_file(
        {k: v.contiguous() for k, v in tensors(ref_vit_encoder(192, 12, 16, 14, 768)).items()},
        tmp_path / "t.safetensors",
    )
    info = describe_checkpoint(str(tmp_path / "t.safetensors"))
    assert (info.kind, info.fields["model"], info.convert_from) == ("timm", "ViT-Ti/16 (3 heads)", "timm")
    info = describe_checkpoint({"model": tensors(huge)}, "mae_pretrain_vit_huge.pth")
    assert info.fields["model"] == "ViT-H/14 (16 heads)" and info.fields["image size"].startswith(
        "224 (position table 16x16"
    )


def test_maedet_pretraining_outputs(tmp_path):
    """Through the tools: the encoder and the training checkpoint of a real (tiny) pretraining run."""
    paths = generate_toy_dataset(str(tmp_path / "toy"), num_train=4, num_val=1, image_size=64, seed=0)
    cfg = tmp_path / "mae.yaml"
    cfg.write_text(PRETRAIN_YAML.format(out=tmp_path / "mae", root=paths["train"][1]))
    proc = subprocess.run(
        [sys.executable, "tools/pretrain.py", "--config", str(cfg), "solver.max_iter=3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    enc = describe_checkpoint(str(tmp_path / "mae" / "encoder_final.pth"))
    assert enc.kind == "maedet-encoder" and enc.fields["model"] == "ViT/16, width 64, depth 2 (2 heads)"
    assert (enc.fields["norm_pix_loss"], enc.fields["mask ratio"], enc.fields["iteration"]) == ("true", "0.75", "3")
    out = inspect_tool(tmp_path / "mae" / "model_0000003.pth")
    assert "maedet MAE pretraining checkpoint (encoder + decoder + optimizer)" in out
    assert "decoder         width 32, depth 1" in out and "norm_pix_loss   true" in out
    assert "--from maedet-pretrain --to mae" in out and "optimizer state included" in out


def test_detectron2_checkpoints():
    for size, (C, depth, heads, glob) in VITDET.items():
        ref = ref_d2_vitdet(C, depth, heads, glob)
        info = describe_checkpoint({"model": tensors(ref), "iteration": 184375}, "model_final.pth")
        assert info.kind == "d2-vitdet" and info.fields["heads"] == "Mask R-CNN"
        assert info.fields["classes"] == "80 (names not stored in the file)" and info.fields["iteration"] == "184375"
        vit = {k[len("backbone.net.") :]: v for k, v in ref.items() if k.startswith("backbone.net.")}
        assert info.fields["parameters"] == f"{numel(ref) / 1e6:.1f} M (whole detector; ViT {numel(vit) / 1e6:.1f} M)"
        epochs = "75ep" if size == "vit_huge" else "100ep"
        assert f"--config configs/coco/mask_rcnn_vit_{size[4]}_{epochs}.yaml" in info.uses[-1]
    cascade = describe_checkpoint(require_golden("vitdet_train_tiny", "model_cascade_d2.pth"))
    assert (
        cascade.fields["heads"] == "Cascade Mask R-CNN, 3 stages"
        and cascade.fields["model"] == "ViT/16, width 192, depth 4"
    )


def test_maedet_detection_checkpoints_and_wrong_files_in_loaders(tmp_path):
    cfg = tiny_det_config()
    model = build_detection_model(cfg.model, 3, load_pretrained=False)
    meta = {"format": "maedet-vitdet", "num_classes": 3, "class_names": ["a", "b", "c"], "iter": 7}
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / "model_final.pth")
    info = describe_checkpoint(str(tmp_path / "model_final.pth"))
    assert info.kind == "maedet-det" and info.fields["classes"] == "3: a, b, c" and info.fields["iteration"] == "7"
    assert info.fields["heads"] == "Mask R-CNN" and info.fields["model"] == "ViT/16, width 192, depth 4"

    # an encoder given as detection weights: the error says what the file is and where it goes
    torch.save({"model": tensors(VIT_B)}, tmp_path / "mae_pretrain_vit_base.pth")
    with pytest.raises(CheckpointError) as e:
        load_detection_weights(model, str(tmp_path / "mae_pretrain_vit_base.pth"))
    assert "official MAE release, encoder only, ViT-B/16" in str(e.value) and "model.backbone.pretrained=" in str(
        e.value
    )
    # a ViT-B encoder given to the tiny backbone: its size named
    with pytest.raises(CheckpointError, match=r"the file is: official MAE release, encoder only, ViT-B/16"):
        load_pretrained_backbone(model.backbone.net, str(tmp_path / "mae_pretrain_vit_base.pth"))
    # a detectron2 file as detection weights: the conversion command
    ref = ref_d2_vitdet(768, 12, 12, (2, 5, 8, 11))
    torch.save({"model": tensors(ref)}, tmp_path / "d2.pth")
    with pytest.raises(
        CheckpointError, match=r"detectron2 ViTDet detector, ViT-B/16 .*--from d2-vitdet --to maedet-det"
    ):
        load_detection_weights(model, str(tmp_path / "d2.pth"))
