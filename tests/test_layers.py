"""LayerNorm2d: same values and gradients as torch's layer norm over channels, in any layout;
pointwise_convs: the same as the 1 x 1 convolutions it replaces."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maedet.models.layers import LayerNorm2d, pointwise_convs


def _reference(x, w, b, eps=1e-6):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_layer_norm_values_and_gradients(channels_last):
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
        outs = pointwise_convs(x, convs) if fused else [c(x) for c in convs]
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
