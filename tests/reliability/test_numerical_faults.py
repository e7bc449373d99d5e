"""Numerical faults in the training loop (in-process Trainer, tiny model).

- a NaN/inf loss with ``nonfinite=stop`` stops training with a message naming the
  iteration and the loss term;
- with ``nonfinite=skip`` the step is dropped (weights and optimizer state untouched
  by it), counted, and the data position still advances;
- fp16 gradient overflow is handled by the GradScaler (CPU): the step is skipped,
  the scale halves, the weights stay finite and unchanged.
"""

import json
import math
import os

import pytest
import torch
from torch import nn

from maedet.engine.schedule import LRSchedule
from maedet.engine.trainer import HookBase, Trainer
from maedet.utils.errors import TrainingError


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _loader_fn(batch=8):
    """Batches are a function of their position: ``(iteration, x)``."""

    def loader_fn(start):
        it = start // batch
        while True:
            g = torch.Generator().manual_seed(it)
            yield it, torch.rand(batch, 8, generator=g) - 0.5
            it += 1

    return loader_fn


class _Record(HookBase):
    """Weights and optimizer state after every step."""

    def __init__(self):
        self.params = {}

    def before_train(self, trainer):
        self.params[trainer.iter] = [p.detach().clone() for p in trainer.model.parameters()]

    def after_step(self, trainer):
        self.params[trainer.iter] = [p.detach().clone() for p in trainer.model.parameters()]


def _changed(rec, it):
    """Did step ``it`` (0-based) change the weights?"""
    return any(not torch.equal(a, b) for a, b in zip(rec.params[it], rec.params[it + 1]))


def _trainer(tmp_path, loss_fn, nonfinite="stop", amp="off", clip=0.0, max_iter=6, accum=1, hooks=()):
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Trainer(
        model,
        opt,
        _loader_fn(),
        loss_fn,
        LRSchedule("constant", max_iter),
        lr=1e-2,
        max_iter=max_iter,
        samples_per_iter=8 * accum,
        output_dir=str(tmp_path),
        device=torch.device("cpu"),
        amp=amp,
        accum_steps=accum,
        clip_grad_norm=clip,
        checkpoint_period=2,
        log_period=1,
        nonfinite=nonfinite,
        hooks=hooks,
    )


def _loss_with_fault(bad_iter, value, term="loss_b"):
    def loss_fn(model, batch, device):
        it, x = batch
        out = model(x)
        losses = {"loss_a": out.float().pow(2).mean(), "loss_b": out.float().mean().abs()}
        if it == bad_iter:
            losses[term] = losses[term] * value  # nan or inf, still part of the graph
        return losses

    return loss_fn


def _metrics(tmp_path):
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("value,text", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_nonfinite_stop_names_iteration_and_term(tmp_path, value, text):
    trainer = _trainer(tmp_path, _loss_with_fault(3, value))
    with pytest.raises(TrainingError) as e:
        trainer.train()
    msg = str(e.value)
    assert f"non-finite loss at iteration 3: loss_b={text}" in msg and "train.nonfinite=skip" in msg
    assert "loss_a" not in msg
    # the checkpoint of iteration 2 is the newest one, and intact
    assert open(tmp_path / "last_checkpoint").read().strip() == "model_0000002.pth"
    state = torch.load(tmp_path / "model_0000002.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_stop_through_the_tool_is_one_error_line(tmp_path, toy, capsys):
    """A diverging run (absurd lr) through tools/pretrain.py: one error line, exit 2."""
    from .conftest import error_lines, run_tool_inprocess, write_pretrain_config

    cfg = write_pretrain_config(tmp_path / "c.yaml", tmp_path / "out", toy["train_images"])
    r = run_tool_inprocess(
        "pretrain",
        [
            "--config",
            cfg,
            "solver.lr=1.0e+30",
            "solver.warmup_iters=0",
            "model.norm_pix_loss=false",
            "train.checkpoint_period=100",
        ],
        capsys,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "non-finite loss at iteration" in errors[0] and "loss_mae=" in errors[0], r.stderr
    assert not os.path.exists(tmp_path / "out" / "encoder_final.pth")


def test_nonfinite_skip_drops_the_step_and_counts_it(tmp_path):
    rec = _Record()
    trainer = _trainer(tmp_path, _loss_with_fault(3, float("nan")), nonfinite="skip", hooks=[rec])
    trainer.train()
    assert trainer.iter == 6 and trainer.skipped_steps == 1
    assert not _changed(rec, 3)  # weights untouched by the bad step
    assert all(_changed(rec, i) for i in (0, 1, 2, 4, 5))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # Adam's step counter did not advance for the dropped step
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {5}
    m = _metrics(tmp_path)
    assert [r["iter"] for r in m] == list(range(6))
    assert [r["skipped_steps"] for r in m] == [0, 0, 0, 1, 1, 1]
    assert m[3]["loss_b"] == "nan" and m[3]["loss"] == "nan"  # the skipped step shows what it saw
    assert all(isinstance(r["loss"], float) for i, r in enumerate(m) if i != 3)
    # the data position advanced past the bad batch
    assert trainer.samples_seen == 6 * 8
    final = torch.load(tmp_path / "model_0000006.pth", weights_only=True)
    assert final["skipped_steps"] == 1


def test_nonfinite_skip_with_accumulation(tmp_path):
    """Bad micro-batch in the second half of an accumulated step: the whole step is dropped."""
    rec = _Record()

    def loss_fn(model, batch, device):
        it, x = batch
        out = model(x)
        loss = out.float().pow(2).mean()
        if it == 5:  # iteration 2, second micro-batch
            loss = loss * float("inf")
        return {"loss_a": loss}

    trainer = _trainer(tmp_path, loss_fn, nonfinite="skip", accum=2, max_iter=4, hooks=[rec])
    trainer.train()
    assert trainer.skipped_steps == 1 and not _changed(rec, 2)
    assert all(_changed(rec, i) for i in (0, 1, 3))
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fp16_overflow_is_skipped_by_the_grad_scaler(tmp_path, clip):
    """Huge (inf) gradients at iteration 3 under fp16 autocast on CPU."""
    bad_iter = 3

    def loss_fn(model, batch, device):
        it, x = batch
        out = model(x)
        assert out.dtype == torch.float16  # autocast is on
        if it == bad_iter:
            out.register_hook(lambda g: g * float("inf"))  # an fp16 overflow in backward
        return {"loss": out.float().mean()}

    scales = []

    class _Scale(HookBase):
        def before_train(self, trainer):
            scales.append(trainer.amp.scaler.get_scale())

        def after_step(self, trainer):
            scales.append(trainer.amp.scaler.get_scale())

    rec = _Record()
    trainer = _trainer(tmp_path, loss_fn, amp="fp16", clip=clip, hooks=[rec, _Scale()])
    assert trainer.amp.scaler.is_enabled()
    trainer.train()
    assert not _changed(rec, bad_iter)
    assert all(_changed(rec, i) for i in range(6) if i != bad_iter)
    assert scales[bad_iter + 1] == scales[bad_iter] / 2  # backoff
    assert all(scales[i + 1] == scales[i] for i in range(6) if i != bad_iter)
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    for s in trainer.optimizer.state_dict()["state"].values():
        assert torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all()
    # the loss itself was finite: not a nonfinite-policy event
    assert trainer.skipped_steps == 0
    # the reduced scale is part of the checkpoint, so a resume keeps it
    state = torch.load(tmp_path / "model_0000006.pth", weights_only=True)
    assert state["scaler"]["scale"] == scales[-1]
    assert math.isfinite(scales[-1]) and scales[-1] > 0
