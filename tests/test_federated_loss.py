"""Sigmoid cross-entropy and the federated loss (LVIS recipe) against detectron2's formulas,
written here as detectron2 writes them (background last), on the same logits and the same
RNG state: the same sampled classes, loss and gradients; and a training step of the heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from maedet.models.detectors.roi_heads import StandardRoIHeads, federated_loss_classes, sigmoid_cross_entropy
from maedet.models.layers import ShapeSpec


def d2_get_fed_loss_classes(gt_classes, num_fed_loss_classes, num_classes, weight):
    """detectron2 ``modeling/roi_heads/fast_rcnn.py``: ``get_fed_loss_classes``."""
    unique_gt_classes = torch.unique(gt_classes)
    prob = unique_gt_classes.new_ones(num_classes + 1).float()
    prob[-1] = 0
    if len(unique_gt_classes) < num_fed_loss_classes:
        prob[:num_classes] = weight.float().clone()
        prob[unique_gt_classes] = 0
        sampled_negative_classes = torch.multinomial(
            prob, num_fed_loss_classes - len(unique_gt_classes), replacement=False
        )
        fed_loss_classes = torch.cat([unique_gt_classes, sampled_negative_classes])
    else:
        fed_loss_classes = unique_gt_classes
    return fed_loss_classes


def d2_sigmoid_cross_entropy_loss(pred_class_logits, gt_classes, use_fed_loss, num_fed, weight):
    """detectron2 ``FastRCNNOutputLayers.sigmoid_cross_entropy_loss`` (background = class K, last)."""
    if pred_class_logits.numel() == 0:
        return pred_class_logits.new_zeros([1])[0]
    N = pred_class_logits.shape[0]
    K = pred_class_logits.shape[1] - 1
    target = pred_class_logits.new_zeros(N, K + 1)
    target[range(len(gt_classes)), gt_classes] = 1
    target = target[:, :K]
    cls_loss = F.binary_cross_entropy_with_logits(pred_class_logits[:, :-1], target, reduction="none")
    if use_fed_loss:
        fed_loss_classes = d2_get_fed_loss_classes(gt_classes, num_fed, K, weight)
        fed_loss_classes_mask = fed_loss_classes.new_zeros(K + 1)
        fed_loss_classes_mask[fed_loss_classes] = 1
        fed_loss_classes_mask = fed_loss_classes_mask[:K]
        w = fed_loss_classes_mask.view(1, K).expand(N, K).float()
    else:
        w = 1
    return torch.sum(cls_loss * w) / N


def _case(K=20, R=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, K + 1, generator=g, dtype=torch.float64)  # maedet: background first
    labels = torch.randint(0, K + 1, (R,), generator=g)
    labels[: R // 2] = 0  # many background RoIs, as after sampling
    image_counts = torch.randint(1, 500, (K,), generator=g)
    return logits, labels, image_counts


def _to_d2(logits, labels, K):
    return torch.cat([logits[:, 1:], logits[:, :1]], 1), torch.where(labels > 0, labels - 1, torch.full_like(labels, K))


@pytest.mark.parametrize("fed", [False, True])
@pytest.mark.parametrize("num_fed", [5, 16])  # fewer classes than present (no draw); draws
def test_loss_and_gradients_equal_detectron2(fed, num_fed):
    K = 20
    logits, labels, counts = _case(K)
    weight = counts.double() ** 0.5
    ours_in = logits.clone().requires_grad_(True)
    torch.manual_seed(123)
    ours = sigmoid_cross_entropy(ours_in, labels, weight if fed else None, num_fed)
    (g_ours,) = torch.autograd.grad(ours, ours_in)
    d2_logits, d2_labels = _to_d2(logits, labels, K)
    d2_in = d2_logits.clone().requires_grad_(True)
    torch.manual_seed(123)
    theirs = d2_sigmoid_cross_entropy_loss(d2_in, d2_labels, fed, num_fed, weight)
    (g_d2,) = torch.autograd.grad(theirs, d2_in)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g_ours[:, 1:], g_ours[:, :1]], 1).double(), g_d2, rtol=1e-12, atol=1e-12)
    if fed:  # the federated loss leaves the unsampled classes' logits without gradient
        # scored: max(num_fed, classes present) classes, background (present here) among them
        untouched = int((g_ours[:, 1:].abs().sum(0) == 0).sum())
        assert untouched == K - (max(num_fed, len(torch.unique(d2_labels))) - 1)


def test_more_fed_classes_than_the_dataset_has_scores_every_class():
    logits, labels, counts = _case(K=20)
    torch.manual_seed(0)
    every = sigmoid_cross_entropy(logits, labels, counts.double() ** 0.5, 50)
    torch.testing.assert_close(every, sigmoid_cross_entropy(logits, labels))


def test_sampled_classes_are_detectron2s_and_hold_every_present_class():
    K = 30
    _, _, counts = _case(K, seed=1)
    labels = torch.tensor([0, 3, 0, 7, 9, 3, 0, 0, 9])  # background and 3 classes: 8 negatives drawn
    weight = counts.float() ** 0.5
    for seed in range(5):
        torch.manual_seed(seed)
        ours = federated_loss_classes(labels, 12, K, weight)
        torch.manual_seed(seed)
        theirs = d2_get_fed_loss_classes(_to_d2(torch.zeros(len(labels), K + 1), labels, K)[1], 12, K, weight)
        assert torch.equal(ours, theirs)
        present = set((labels[labels > 0] - 1).tolist())
        assert present <= set(ours.tolist()) and len(ours) == 12


def test_heads_train_with_the_federated_loss_and_score_with_sigmoids():
    torch.manual_seed(0)
    shape = {f"p{i}": ShapeSpec(16, 2**i) for i in range(2, 6)}
    kw = dict(box_head_conv_dims=(16,), box_head_fc_dims=(32,), mask_head_conv_dims=(16,), batch_size_per_image=32)
    with pytest.raises(ValueError, match="use_sigmoid_ce"):
        StandardRoIHeads(shape, 5, use_fed_loss=True, **kw)
    heads = StandardRoIHeads(shape, 5, use_sigmoid_ce=True, use_fed_loss=True, fed_loss_num_classes=3, **kw)
    feats = {f"p{i}": torch.randn(1, 16, 64 // 2**i, 64 // 2**i) for i in range(2, 6)}
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([2]), "masks": torch.ones(1, 64, 64)}
    ]
    proposals = [torch.tensor([[5.0, 5.0, 29.0, 31.0], [40.0, 40.0, 60.0, 60.0]])]
    heads.train()
    with pytest.raises(RuntimeError, match="class image counts"):
        heads(feats, proposals, [(64, 64)], targets)
    heads.set_class_image_counts([10, 1, 5, 7, 2])
    losses = heads(feats, proposals, [(64, 64)], targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"} and math.isfinite(
        float(losses["loss_cls"].detach())
    )
    sum(losses.values()).backward()
    cls_w = heads.box_predictor.cls_score.weight.grad
    # 3 classes scored: background (sampled RoIs without a match), class 2 and 1 drawn
    assert int((cls_w.abs().sum(1)[1:] > 0).sum()) == 2 and float(cls_w[2].abs().sum()) > 0
    assert float(cls_w[0].abs().sum()) == 0  # the background logit is not used by the sigmoid loss
    heads.eval()
    logits = torch.randn(4, 6)
    torch.testing.assert_close(heads.class_probs(logits), logits.sigmoid())
