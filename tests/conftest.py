"""Shared fixtures: where the real test data lives, and small helpers."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def test_data_root() -> str:
    """The real COCO-format test data: ``$MAEDET_TEST_DATA`` or ``../shared/data``."""
    return os.environ.get("MAEDET_TEST_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))


def data_path(*parts: str) -> str:
    return os.path.join(test_data_root(), *parts)


def require_data(*parts: str) -> str:
    """Path under the test data root, or skip the test with the reason."""
    p = data_path(*parts)
    if not os.path.exists(p):
        if os.environ.get("MAEDET_REQUIRE_DATA") == "1":
            pytest.fail(f"test data not found: {p} (MAEDET_REQUIRE_DATA=1)")
        pytest.skip(f"test data not found: {p} (set MAEDET_TEST_DATA to the shared data folder)")
    return p


def golden_root() -> str:
    """Reference outputs of detectron2: ``$MAEDET_TEST_GOLDEN`` or the ``golden`` folder next to the test data."""
    return os.environ.get("MAEDET_TEST_GOLDEN", os.path.join(test_data_root(), "..", "golden"))


def require_golden(*parts: str) -> str:
    """Path under the golden folder, or skip the test with the reason (a failure under CI)."""
    p = os.path.join(golden_root(), *parts)
    if not os.path.exists(p):
        if os.environ.get("MAEDET_REQUIRE_DATA") == "1":
            pytest.fail(f"golden reference outputs not found: {p} (MAEDET_REQUIRE_DATA=1)")
        pytest.skip(f"golden reference outputs not found: {p} (set MAEDET_TEST_GOLDEN)")
    return p


@pytest.fixture
def coco128_root():
    return require_data("coco128")


@pytest.fixture
def coco_mini_root():
    return require_data("coco_mini")


@pytest.fixture
def fruits_nuts_root():
    return require_data("fruits_nuts")
