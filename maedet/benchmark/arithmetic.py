"""How a run's time compares with its arithmetic: FLOPs, the machine's GEMM rate, and
the time spent inside matrix products and convolutions.

Used by ``tools/benchmark.py --task reference --flops`` (tools/benchmark_detectron2.py):
:func:`matmul_flops` counts the FLOPs of every product and convolution of a run,
:func:`gemm_rate` times this machine's best large product, and :func:`product_time`
splits a profiled run between the products and everything else.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict

import torch

__all__ = ["PRODUCT_OPS", "matmul_flops", "gemm_rate", "product_time"]


def matmul_flops(fn: Callable[[], Any]) -> float:
    """FLOPs (2 per multiply-add) of the matrix products and convolutions that ``fn()``
    runs on this thread, forward and backward: torch's ``FlopCounterMode``, which
    counts ``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions and their backward,
    plus the in-place ``baddbmm_`` (maedet's CPU attention), which it leaves out.
    Element-wise work (softmax, norms, activations, copies) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    def baddbmm_(self_shape, a_shape, b_shape, *args, **kwargs) -> int:  # (b, n, k) @ (b, k, m)
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_}) as counter:
        fn()
    return float(counter.get_total_flops())


# Operators whose own (self) time is matrix-product or convolution arithmetic: what
# matmul_flops counts. Composite wrappers (linear, matmul, conv2d, ...) spend no time
# of their own; listing them keeps a wrapper's bookkeeping out of "the rest".
PRODUCT_OPS = frozenset(
    f"aten::{name}"
    for group in (
        ("mm", "addmm", "addmm_", "_addmm_activation", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_"),
        ("matmul", "linear", "einsum", "mkldnn_linear"),
        ("conv1d", "conv2d", "conv3d", "conv_transpose2d", "convolution", "_convolution", "convolution_backward"),
        ("mkldnn_convolution", "_slow_conv2d_forward", "_slow_conv2d_backward", "slow_conv_transpose2d"),
        ("slow_conv_dilated2d", "_nnpack_spatial_convolution"),
    )
    for name in group
)


def product_time(fn: Callable[[], Any]) -> Dict[str, float]:
    """Wall time of ``fn()`` under torch's CPU profiler, and the part spent inside
    matrix products and convolutions (:data:`PRODUCT_OPS`, self time of every call
    on the calling thread, which runs the forward and the CPU backward). The rest
    is everything else: element-wise work, softmax, norms, copies and the page
    faults of their fresh outputs, RoIAlign, NMS, the optimizer, Python.

    Returns ``{"profiled_s", "products_s", "rest_s"}``.
    """
    from torch.profiler import ProfilerActivity, profile

    tid = None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.events()
    if events:  # the thread that ran fn: the one that recorded the most events
        counts: Dict[int, int] = {}
        for ev in events:
            counts[ev.thread] = counts.get(ev.thread, 0) + 1
        tid = max(counts, key=counts.get)
    products = sum(ev.self_cpu_time_total for ev in events if ev.name in PRODUCT_OPS and ev.thread == tid) / 1e6
    return {"profiled_s": wall, "products_s": products, "rest_s": wall - products}


def gemm_rate(repeats: int = 5) -> float:
    """FLOP/s of this machine's best large fp32 matrix product: a ViT-B MLP layer at
    1024 x 1024 input, (4096 x 768) @ (768 x 3072), best of ``repeats`` after one warm-up."""
    a, b = torch.randn(4096, 768), torch.randn(768, 3072)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 768 * 3072 / best
