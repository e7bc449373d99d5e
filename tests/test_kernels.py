"""The kernel layer: one switch, and each fast path against its reference (outputs and gradients).

Attention and the window layouts are checked in tests/test_vitdet.py (against detectron2's
formulas written out there); here: the switch, the channel LayerNorm, the fused 1 x 1
convolutions and the threaded RoIAlign.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maedet import kernels
from maedet.kernels.conv import conv_layout, pointwise_convs
from maedet.kernels.layer_norm import channel_layer_norm_reference
from maedet.kernels.roi_align import roi_align as kernel_roi_align
from maedet.models.layers import LayerNorm2d


def test_one_switch_context_and_environment():
    assert kernels.fast_enabled()  # the default
    with kernels.fast(False):
        assert not kernels.fast_enabled()
        x = torch.randn(1, 4, 3, 3)
        assert conv_layout(x, training=False).is_contiguous()  # reference: NCHW
    assert kernels.fast_enabled()
    assert conv_layout(x, training=False).is_contiguous(memory_format=torch.channels_last)
    code = "from maedet import kernels; print(kernels.fast_enabled())"
    for value, expected in (("reference", "False"), ("fast", "True")):
        env = dict(os.environ, MAEDET_KERNELS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, MAEDET_KERNELS="quick"), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "MAEDET_KERNELS='quick'" in bad.stderr


def _reference(x, w, b, eps=1e-6):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_layer_norm_values_and_gradients(channels_last, fast):
    torch.manual_seed(0)
    ln = LayerNorm2d(32)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 32, 9, 11) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = torch.randn(2, 32, 9, 11)
    with kernels.fast(fast):
        y1 = ln(x1)
        (y1 * g).sum().backward()
    w, b = ln.weight.detach().clone().requires_grad_(True), ln.bias.detach().clone().requires_grad_(True)
    y2 = _reference(x2, w, b)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ln.weight.grad, w.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ln.bias.grad, b.grad, atol=1e-4, rtol=1e-5)
    # the layout of the input is kept (the next convolution runs in it, forward and backward)
    assert y1.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert x1.grad.shape == x.shape
    # inference on channels-last maps (the F.layer_norm branch of the fast path)
    with torch.no_grad(), kernels.fast(fast):
        torch.testing.assert_close(ln(x), y2.detach(), atol=2e-5, rtol=1e-5)


def test_fast_layer_norm_equals_detectron2_formula_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 5, 4, dtype=torch.float64)
    ln = LayerNorm2d(7).double()
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    y = ln(x)
    fast_grads = torch.autograd.grad((y * g).sum(), [x, ln.weight, ln.bias])
    ref = channel_layer_norm_reference(x, w, b, 1e-6)
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, w, b])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64_any_layout(channels_last):
    torch.manual_seed(0)
    ln = LayerNorm2d(6).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: LayerNorm2d.forward(ln, x), (x, ln.weight, ln.bias))


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_input_is_normalized_in_float32(channels_last):
    torch.manual_seed(0)
    ln = LayerNorm2d(16)
    x = (torch.randn(2, 16, 5, 5) * 4).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _reference(x.float(), ln.weight, ln.bias), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["nchw", "nchw batch 2", "channels_last"])
def test_pointwise_convs_equal_the_convolutions(layout):
    """The fused product against the reference kernel (the convolutions one by one)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(16, 3, 1), nn.Conv2d(16, 12, 1), nn.Conv2d(16, 5, 1, bias=False)]
    for c in convs:
        nn.init.normal_(c.weight)
    x0 = torch.randn(2 if "2" in layout else 1, 16, 7, 9, dtype=torch.float64)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    grads = []
    for fused in (False, True):
        for c in convs:
            c.double().zero_grad()
        x = x0.clone().requires_grad_(True)
        with kernels.fast(fused):
            outs = pointwise_convs(x, convs)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs).backward()
        grads.append((outs, x.grad, [p.grad for c in convs for p in c.parameters()]))
    (ref, ref_dx, ref_dp), (got, dx, dp) = grads
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(dx, ref_dx)
    for a, b in zip(dp, ref_dp):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="1 x 1"):
        pointwise_convs(x0, [nn.Conv2d(16, 3, 3)])


@pytest.mark.parametrize("batch,channels,channels_last", [(1, 64, False), (2, 33, True)])
def test_threaded_roi_align_is_torchvision_bit_for_bit(batch, channels, channels_last):
    """Channel slices on two threads: forward and input gradient equal torchvision's exactly."""
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(batch, channels, 48, 48, generator=g)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    feat.requires_grad_()
    xy = torch.rand(400, 2, generator=g) * 150
    wh = 1 + 60 * torch.rand(400, 2, generator=g)
    rois = torch.cat([torch.randint(0, batch, (400, 1), generator=g).float(), xy, xy + wh], 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = kernel_roi_align(feat, rois, (7, 7), 0.25, 0, True)
    finally:
        torch.set_num_threads(threads)
    assert type(ours.grad_fn).__name__ == "_ThreadedRoIAlignBackward"  # the threaded path ran
    ref = roi_align(feat, rois, (7, 7), 0.25, 0, aligned=True)
    assert torch.equal(ours, ref)
    grad = torch.randn(ref.shape, generator=g)
    (g_ref,) = torch.autograd.grad(ref, feat, grad)
    torch.set_num_threads(2)
    try:
        (g_ours,) = torch.autograd.grad(ours, feat, grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(g_ours, g_ref)
    with kernels.fast(False):  # the reference is torchvision's
        assert "torchvision_roi_align" in type(kernel_roi_align(feat, rois, (7, 7), 0.25, 0, True).grad_fn).__name__
