"""Named COCO-format datasets: ``name -> (json_file, image_root)``.

Built-in names resolve their paths when they are looked up, from environment
variables read at that moment:

- ``$MAEDET_DATASETS`` (default ``./datasets``, relative to the working directory):
  ``coco_2017_train``, ``coco_2017_val`` (standard COCO layout) and ``toy_train``,
  ``toy_val`` (written by ``datasets/prepare_toy.py``);
- ``$MAEDET_TEST_DATA`` (default ``../shared/data`` next to the repository root):
  ``coco_mini_train``, ``coco_mini_val``, ``coco128``, ``fruits_nuts``;
- both: ``fruits_nuts_train`` and ``fruits_nuts_heldout``, disjoint photos of
  ``fruits_nuts`` (jsons written by ``datasets/split_coco.py`` under
  ``$MAEDET_DATASETS/fruits_nuts_split``, images from ``$MAEDET_TEST_DATA``).

Register your own data with ``DatasetCatalog.register(name, json_file, image_root)``.
"""

import os
from typing import Callable, Dict, List, Tuple, Union

from maedet.utils.errors import DatasetError

__all__ = ["DatasetCatalog", "datasets_root", "test_data_root"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def datasets_root() -> str:
    """Folder of the standard datasets: ``$MAEDET_DATASETS`` or ``./datasets``."""
    return os.environ.get("MAEDET_DATASETS", "datasets")


def test_data_root() -> str:
    """Folder of the shared test data: ``$MAEDET_TEST_DATA`` or ``<repo>/../shared/data``."""
    return os.environ.get("MAEDET_TEST_DATA", os.path.join(_REPO_ROOT, "..", "shared", "data"))


def _under_datasets(json_rel: str, images_rel: str) -> Callable[[], Tuple[str, str]]:
    return lambda: (os.path.join(datasets_root(), json_rel), os.path.join(datasets_root(), images_rel))


def _under_test_data(json_rel: str, images_rel: str) -> Callable[[], Tuple[str, str]]:
    return lambda: (os.path.join(test_data_root(), json_rel), os.path.join(test_data_root(), images_rel))


def _split_of_test_data(json_rel: str, images_rel: str) -> Callable[[], Tuple[str, str]]:
    return lambda: (os.path.join(datasets_root(), json_rel), os.path.join(test_data_root(), images_rel))


_BUILTINS: Dict[str, Callable[[], Tuple[str, str]]] = {
    "coco_2017_train": _under_datasets("coco/annotations/instances_train2017.json", "coco/train2017"),
    "coco_2017_val": _under_datasets("coco/annotations/instances_val2017.json", "coco/val2017"),
    "toy_train": _under_datasets("toy/annotations/instances_train.json", "toy/train"),
    "toy_val": _under_datasets("toy/annotations/instances_val.json", "toy/val"),
    "coco_mini_train": _under_test_data("coco_mini/annotations/instances_train2017.json", "coco_mini/train2017"),
    "coco_mini_val": _under_test_data("coco_mini/annotations/instances_val2017.json", "coco_mini/val2017"),
    "coco128": _under_test_data("coco128/annotations/instances_train2017.json", "coco128/train2017"),
    "fruits_nuts": _under_test_data("fruits_nuts/trainval.json", "fruits_nuts/images"),
    "fruits_nuts_train": _split_of_test_data("fruits_nuts_split/annotations/train.json", "fruits_nuts/images"),
    "fruits_nuts_heldout": _split_of_test_data("fruits_nuts_split/annotations/heldout.json", "fruits_nuts/images"),
}

# Built-in sets that a script writes: named in the error when their files are missing.
_MADE_BY = {
    "toy_train": "python datasets/prepare_toy.py",
    "toy_val": "python datasets/prepare_toy.py",
    "fruits_nuts_train": "python datasets/split_coco.py",
    "fruits_nuts_heldout": "python datasets/split_coco.py",
}


class _DatasetCatalog:
    """Registry of named COCO-format instance-segmentation datasets.

    Entries are either fixed paths (from :meth:`register`) or built-in resolvers
    that read environment variables at lookup time.
    """

    def __init__(self, builtins: Dict[str, Callable[[], Tuple[str, str]]]):
        self._entries: Dict[str, Union[Tuple[str, str], Callable[[], Tuple[str, str]]]] = dict(builtins)

    def register(self, name: str, json_file: str, image_root: str) -> None:
        """Add a dataset.

        Args:
            name: the name used in configs (``data.train.name``) and :meth:`get`.
            json_file: COCO instances json.
            image_root: folder that ``images[*].file_name`` are relative to.

        Raises:
            DatasetError: ``name`` is already registered with different paths.
        """
        if not isinstance(name, str) or not name:
            raise DatasetError(f"dataset name must be a non-empty string, got {name!r}")
        entry = (str(json_file), str(image_root))
        old = self._entries.get(name)
        if old is not None and old != entry:
            raise DatasetError(
                f"dataset {name!r} is already registered; remove it first (DatasetCatalog.remove) or use another name"
            )
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Forget a dataset (built-in or registered); unknown names are ignored."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Tuple[str, str]:
        """Resolve a dataset name.

        Returns:
            ``(json_file, image_root)``.

        Raises:
            DatasetError: unknown name (the message lists the known names), or the
                annotation file / image folder does not exist.
        """
        if name not in self._entries:
            raise DatasetError(f"unknown dataset name {name!r}; known datasets: {', '.join(self.list())}")
        entry = self._entries[name]
        json_file, image_root = entry() if callable(entry) else entry
        if not os.path.isfile(json_file):
            hint = f"; write it with: {_MADE_BY[name]}" if name in _MADE_BY and callable(entry) else ""
            raise DatasetError(f"annotation file not found: {json_file} (dataset {name}){hint}")
        if not os.path.isdir(image_root):
            raise DatasetError(f"image folder not found: {image_root} (dataset {name})")
        return json_file, image_root

    def list(self) -> List[str]:
        """Sorted names of all datasets (built-in and registered)."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


DatasetCatalog = _DatasetCatalog(_BUILTINS)
