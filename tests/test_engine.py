"""Engine pieces: lr schedules, parameter groups, atomic checkpoints, metric logs."""

import json
import math
import os

import pytest
import torch
from torch import nn

from maedet.checkpoint.checkpointer import Checkpointer
from maedet.checkpoint.io import atomic_save, load_checkpoint_file
from maedet.engine.events import MetricsWriter
from maedet.engine.optim import build_optimizer, param_groups
from maedet.engine.schedule import LRSchedule
from maedet.utils.errors import CheckpointError


def test_cosine_schedule_matches_mae_formula():
    total, warm = 200, 20
    s = LRSchedule("cosine", total, warm, warmup_factor=0.0, min_lr_ratio=0.1)
    for it in range(total):
        if it < warm:
            expected = it / warm
        else:
            expected = 0.1 + (1 - 0.1) * 0.5 * (1 + math.cos(math.pi * (it - warm) / (total - warm)))
        assert s(it) == pytest.approx(expected, abs=1e-9), it


def test_multistep_schedule_matches_vitdet():
    s = LRSchedule("multistep", 1000, 250, warmup_factor=0.001, steps=[800, 900], gamma=0.1)
    assert s(0) == pytest.approx(0.001)
    assert s(125) == pytest.approx(0.001 * 0.5 + 0.5)
    assert s(250) == s(799) == 1.0
    assert s(800) == pytest.approx(0.1) and s(899) == pytest.approx(0.1)
    assert s(900) == pytest.approx(0.01) and s(999) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        LRSchedule("multistep", 100, 0, steps=[100])


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_param_groups_weight_decay_exclusions():
    # the MAE release's rule (1-D parameters and biases) plus an exempt name
    groups = param_groups(_Toy(), weight_decay=0.05, no_decay_1d=True, no_weight_decay=["pos_embed"])
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd == {"pos_embed": 0.0, "lin.weight": 0.05, "lin.bias": 0.0, "norm.weight": 0.0, "norm.bias": 0.0}


def test_layer_decay_scales_and_optimizer_lr():
    depth, decay, lr = 3, 0.5, 1e-3

    def layer_id(name):
        return 0 if name == "pos_embed" else depth + 1

    groups = param_groups(_Toy(), 0.1, layer_decay=decay, num_layers=depth, layer_id_fn=layer_id)
    opt = build_optimizer(groups, "adamw", lr=lr)
    for g in opt.param_groups:
        expected = decay ** (depth + 1) if "pos_embed" in g["names"] else 1.0
        assert g["lr_scale"] == pytest.approx(expected)
        assert g["lr"] == pytest.approx(lr * expected)


def test_fused_adamw_on_cpu_by_default_and_equal_to_foreach():
    torch.manual_seed(0)
    models = [_Toy(), _Toy()]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].lin.weight.detach().clone()
    auto = build_optimizer(param_groups(models[0], 0.1), "adamw", lr=1e-2, device=torch.device("cpu"))
    off = build_optimizer(param_groups(models[1], 0.1), "adamw", lr=1e-2, fused="off", device=torch.device("cpu"))
    assert auto.defaults["fused"] and not off.defaults["fused"]
    x = torch.randn(4, 8)
    for _ in range(3):
        for m, opt in zip(models, (auto, off)):
            m.pos_embed.sum().add(m.norm(m.lin(x)).pow(3).mean()).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0].lin.weight, start)  # the steps did move the weights


def test_amp_modes(monkeypatch):
    import maedet.utils.amp as amp
    from maedet.utils.errors import ConfigError

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp.resolve_amp("auto", cpu) == "off" and amp.amp_dtype("auto", cpu) is None
    assert amp.amp_dtype("bf16", cpu) is torch.bfloat16 and amp.amp_dtype("off", cpu) is None
    with pytest.raises(ConfigError, match="train.amp='fp32'"):
        amp.resolve_amp("fp32", cpu)
    # GPU rules, with the capability query replaced (no GPU needed)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    for supported, expect in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(amp, "_cuda_bf16_supported", lambda d, s=supported: s)
        assert amp.resolve_amp("auto", gpu) == expect
        assert amp.resolve_amp("fp16", gpu) == "fp16"
    with pytest.raises(ConfigError, match="V100 has no bf16"):
        amp.resolve_amp("bf16", gpu)


def test_cpu_bf16_without_native_support_warns_once(monkeypatch, caplog):
    import maedet.utils.amp as amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(amp, "_warned_cpu_bf16", False)
    monkeypatch.setattr(amp, "_cpu_bf16_native", lambda: True)
    with caplog.at_level("WARNING", logger="maedet"):
        assert amp.resolve_amp("bf16", cpu, key="test.amp") == "bf16"
    assert not caplog.records  # native bf16: nothing to say
    monkeypatch.setattr(amp, "_cpu_bf16_native", lambda: False)
    with caplog.at_level("WARNING", logger="maedet"):
        for _ in range(3):
            assert amp.resolve_amp("bf16", cpu, key="test.amp") == "bf16"
        assert amp.resolve_amp("off", cpu) == "off" and amp.resolve_amp("auto", cpu) == "off"
    msgs = [r.getMessage() for r in caplog.records]
    assert (
        len(msgs) == 1
        and msgs[0].startswith("test.amp=bf16 on a CPU without native bf16")
        and "test.amp=off" in msgs[0]
    )


def test_atomic_save_failure_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pth")
    atomic_save({"a": torch.ones(3)}, path)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointError, match="No space left"):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["a"], torch.ones(3))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint_file(str(empty))
    good = str(tmp_path / "good.pth")
    torch.save({"w": torch.randn(100, 100)}, good)
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        load_checkpoint_file(str(trunc))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint_file(str(junk))


class Custom:
    pass


def test_unsafe_pickle_is_refused_with_advice(tmp_path):
    path = str(tmp_path / "obj.pth")
    torch.save({"obj": Custom()}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint_file(path)


def test_checkpointer_pointer_and_pruning(tmp_path):
    ck = Checkpointer(str(tmp_path), max_to_keep=2)
    assert ck.load_last() is None
    for it in (10, 20, 30):
        ck.save(f"model_{it:07d}.pth", {"model": {}, "iter": it})
    assert ck.last_checkpoint_name() == "model_0000030.pth"
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model_")) == [
        "model_0000020.pth",
        "model_0000030.pth",
    ]
    assert ck.load_last()["iter"] == 30


def test_metrics_writer_truncates_on_resume(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for it in range(10):
        w.write(it, {"loss": float(it)})
    with open(w.path, "a") as f:
        f.write('{"iter": 10, "loss"')  # a line cut short by a kill
    w.close()
    w2 = MetricsWriter(str(tmp_path), start_iter=6, tensorboard=False)
    w2.write(6, {"loss": 60.0})
    recs = [json.loads(line) for line in open(w2.path)]
    assert [r["iter"] for r in recs] == [0, 1, 2, 3, 4, 5, 6]
    assert recs[-1]["loss"] == 60.0


def test_describe_trainable_names_frozen_parts_and_block_ranges():
    from torch import nn

    from maedet.builders.trainer import describe_trainable

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
            self.stem = nn.Linear(2, 2)
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(6))
            self.head = nn.Linear(2, 3)

    net = Net()
    assert describe_trainable(net) == "parameters: 59 trainable of 59 (100.0%)"
    for m in (net.stem, net.blocks[0], net.blocks[1], net.blocks[2], net.blocks[4]):
        m.requires_grad_(False)
    net.pos_embed.requires_grad_(False)
    assert describe_trainable(net) == ("parameters: 21 trainable of 59 (35.6%); frozen: pos_embed, stem, blocks 0-2, 4")
