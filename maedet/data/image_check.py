"""Checking every image of a dataset before training starts, fast and cached.

A corrupt, truncated or mis-sized image would otherwise surface when a data
worker first samples it, possibly hours in (or, in the test set, only at the
final evaluation). :func:`check_images` reads each file once, without decoding
the pixels: the stream must be complete (:func:`maedet.data.images.check_complete`)
and its header must give a size; with the EXIF orientation applied, that size
must be the one the annotation file records. Files are checked by a pool of
threads (I/O bound) with a progress bar, and each result is cached under
``$MAEDET_CACHE`` (default ``~/.cache/maedet``) keyed by the file's path, size
and modification time, so a second run over the same data pays nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from tqdm import tqdm

from maedet.data.images import check_complete
from maedet.utils.errors import DatasetError
from maedet.utils.fileio import atomic_write_text

__all__ = ["check_image", "check_images", "cache_dir"]

logger = logging.getLogger("maedet")

# EXIF orientations 5..8 rotate by 90 degrees: the displayed width is the stored height.
_TRANSPOSED = {5, 6, 7, 8}


def cache_dir() -> str:
    return os.environ.get("MAEDET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "maedet"))


def check_image(path: str, expected_hw: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """Why ``path`` cannot be used (one line), or None when it is fine.

    Args:
        path: the image file.
        expected_hw: (height, width) the annotation file records, as displayed
            (EXIF orientation applied); None skips the size check.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "image not found"
    except OSError as e:
        return f"cannot read image ({e.strerror or e})"
    if not data:
        return "corrupt image (empty file, 0 bytes)"
    try:
        check_complete(data, path)
    except DatasetError as e:
        return "corrupt image (" + str(e).split(f"{path} (", 1)[-1]
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - PIL raises many types on garbage
        return "corrupt image (not a decodable image file)"
    if orientation in _TRANSPOSED:
        w, h = h, w
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        return (
            f"image size mismatch: {w}x{h} (width x height, EXIF orientation applied) but the "
            f"annotation file says {expected_hw[1]}x{expected_hw[0]}"
        )
    return None


def _cache_file(root: str) -> str:
    key = hashlib.sha1(os.path.abspath(root).encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir(), "image_checks", f"{key}.json")


def check_images(
    paths: Sequence[str],
    expected_hw: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
    what: str = "images",
    num_threads: int = 8,
    cache_root: Optional[str] = None,
) -> Dict[str, str]:
    """Check many images; returns ``{path: problem}`` for the bad ones.

    Args:
        paths: image files.
        expected_hw: per path, the recorded (height, width) or None.
        what: how the set is named in the progress bar and log.
        num_threads: reader threads.
        cache_root: the folder whose results are cached together (default: the
            common folder of ``paths``); None disables nothing, it only names the cache.
    """
    if not paths:
        return {}
    expected_hw = list(expected_hw) if expected_hw is not None else [None] * len(paths)
    root = cache_root or os.path.commonpath([os.path.abspath(p) for p in paths])
    cache_path = _cache_file(root)
    try:
        with open(cache_path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}

    def key(path: str, hw) -> Optional[str]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{hw}"

    keys = [key(p, hw) for p, hw in zip(paths, expected_hw)]
    todo = [i for i, k in enumerate(keys) if k is None or k not in cache]
    results: Dict[int, Optional[str]] = {i: cache[k] for i, k in enumerate(keys) if k is not None and k in cache}
    if todo:
        bar = tqdm(
            total=len(todo),
            desc=f"checking {what}",
            unit="img",
            leave=False,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            for i, problem in zip(todo, pool.map(lambda j: check_image(paths[j], expected_hw[j]), todo)):
                results[i] = problem
                bar.update(1)
        bar.close()
        for i in todo:
            if keys[i] is not None:
                cache[keys[i]] = results[i]
        try:
            atomic_write_text(cache_path, json.dumps(cache))
        except OSError as e:  # a read-only home: the check still ran
            logger.warning(f"cannot write the image-check cache {cache_path}: {e.strerror or e}")
    logger.info(f"checked {len(paths)} {what} ({len(paths) - len(todo)} from the cache {cache_path})")
    return {paths[i]: p for i, p in sorted(results.items()) if p}


def report_bad_images(bad: Dict[str, str], total: int, what: str, policy: str, key: str) -> List[str]:
    """Apply the bad-image policy: ``fail`` raises one error naming every bad file (up to 5
    in the line, with the count); ``skip`` logs a counted warning. Returns the bad paths."""
    if not bad:
        return []
    items = list(bad.items())
    listed = "; ".join(f"{p}: {why}" for p, why in items[:5]) + (
        f"; and {len(items) - 5} more" if len(items) > 5 else ""
    )
    if policy == "fail":
        raise DatasetError(
            f"{len(items)} of {total} {what} cannot be used: {listed} ({key}=skip leaves them out instead)"
        )
    logger.warning(f"skipping {len(items)} of {total} {what} that cannot be used ({key}=skip): {listed}")
    return [p for p, _ in items]
