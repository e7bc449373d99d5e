"""The tools' process settings (maedet.utils.startup): huge pages for large CPU tensors,
set before torch reads them."""

import os
import subprocess
import sys

import pytest

from maedet.utils.startup import HUGE_PAGES_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE_PAGE = 2 * 1024 * 1024

# A fresh 16 MB CPU tensor, filled: its offset in a 4 KB page, and the kB of its mapping
# that the kernel backs with huge pages (/proc/self/smaps).
ALLOCATION_PROBE = """
from maedet.utils.startup import prepare_process
prepare_process()
import torch
t = torch.ones(1 << 22)
ptr, huge_kb, inside = t.data_ptr(), 0, False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo <= ptr < hi
    elif inside and head == "AnonHugePages:":
        huge_kb = int(line.split()[1])
print(ptr % 4096, huge_kb)
"""


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unknown"


# Runs a tool's ``--help`` and prints the value the setting had when torch was first imported.
IMPORT_ORDER_PROBE = """
import importlib.abc, os, runpy, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get({env!r}, "unset"))
        return None
sys.meta_path.insert(0, Watch())
sys.argv = [{tool!r}, "--help"]
try:
    runpy.run_path({tool!r}, run_name="__main__")
except SystemExit:
    pass
print("torch imported with", seen)
"""


def _python(code: str, env_extra=None, drop=()) -> str:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_prepare_process_puts_large_tensors_on_huge_pages():
    # torch honours the setting by page-aligning allocations of 2 MB and more and
    # advising the kernel (madvise(MADV_HUGEPAGE)) to back them with huge pages;
    # without it they sit 64 bytes into an mmap, on 4 KB pages.
    offset, huge_kb = map(int, _python(ALLOCATION_PROBE, drop=(HUGE_PAGES_ENV,)).split())
    assert offset == 0
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"the kernel's transparent huge pages are {_thp_mode()!r}: nothing to back them with")
    assert huge_kb >= HUGE_PAGE // 1024


def test_prepare_process_keeps_the_users_choice():
    offset, huge_kb = map(int, _python(ALLOCATION_PROBE, env_extra={HUGE_PAGES_ENV: "0"}).split())
    assert offset != 0
    if _thp_mode() == "madvise":  # with "always" the kernel uses huge pages unasked
        assert huge_kb == 0


@pytest.mark.parametrize("tool", ["train_net", "pretrain", "infer", "benchmark"])
def test_tools_apply_the_settings_before_torch_is_imported(tool):
    code = IMPORT_ORDER_PROBE.format(env=HUGE_PAGES_ENV, tool=os.path.join(REPO, "tools", f"{tool}.py"))
    assert _python(code, drop=(HUGE_PAGES_ENV,)) == "torch imported with ['1']"
