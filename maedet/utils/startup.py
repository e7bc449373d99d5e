"""Process settings that the command-line tools apply before torch is imported.

This module must not import torch: what it sets is read by torch's CPU allocator on
its first allocation, which happens while torch is being imported.

Huge pages for large CPU tensors. By default every CPU tensor of more than a few MB
is a fresh ``mmap`` whose 4 KB pages are each faulted in, and zeroed by the kernel, on
first touch, then unmapped again when the tensor is freed; a ViT-B training step takes
over a million such faults. With ``THP_MEM_ALLOC_ENABLE=1`` torch aligns
allocations of 2 MB and more to 2 MB and advises the kernel to back them with
transparent huge pages: one fault per 2 MB instead of 512. Nothing changes where the kernel's
transparent huge pages are disabled (``/sys/kernel/mm/transparent_hugepage/enabled``
set to ``never``), and a value the user has set (``THP_MEM_ALLOC_ENABLE=0`` to opt out)
is kept.
"""

from __future__ import annotations

import os

__all__ = ["HUGE_PAGES_ENV", "prepare_process"]

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def prepare_process() -> None:
    """Apply the tools' process settings; call it before the first ``import torch``.

    Called after torch was imported, it changes nothing in this process (torch has
    read its allocator settings by then); processes started later (DataLoader
    workers, ``--num-gpus`` workers) still inherit the setting.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
