"""COCO instance evaluation (bbox and segm) with the official ``pycocotools`` metrics.

The flow mirrors detectron2's ``COCOEvaluator``:

1. :meth:`COCOEvaluator.process` takes the detector's per-image outputs in the
   original image's frame, pastes the RoI masks into the image a few at a time
   (:func:`maedet.models.detectors.mask_ops.iter_pasted_masks`) and converts
   everything to COCO results records (:func:`instances_to_coco_json`) right
   away, so only small JSON-able records are kept in memory.
2. :meth:`COCOEvaluator.evaluate` gathers the records of all ranks on rank 0,
   writes ``coco_instances_results.json`` (atomically) and scores it with
   ``COCOeval`` (``evaluate`` / ``accumulate`` / ``summarize``), restricted to the
   images that were processed.

All metrics are reported in **percent** (``COCOeval.stats * 100``), like
detectron2; a metric that COCOeval cannot compute (``-1``, e.g. ``APs`` when the
evaluated images hold no small objects) is reported as ``nan``. The numbers are
exactly those of a direct ``COCOeval`` call on the ground-truth json and the
written results file (for ``segm`` the ``bbox`` field of each record is dropped
first, as detectron2 does, so that small/medium/large use the mask area).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maedet.models.detectors.mask_ops import encode_rle, iter_pasted_masks
from maedet.utils.arrays import ArrayLike, instance_arrays
from maedet.utils.distributed import gather_object, get_rank
from maedet.utils.errors import DatasetError
from maedet.utils.fileio import atomic_write

__all__ = [
    "COCO_METRIC_NAMES",
    "instances_to_coco_json",
    "load_coco_gt",
    "evaluate_predictions_on_coco",
    "evaluate_results_file",
    "print_coco_table",
    "COCOEvaluator",
]

logger = logging.getLogger(__name__)

#: Names of the twelve numbers of ``COCOeval.stats``, in order.
COCO_METRIC_NAMES: Tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

_TASKS = ("bbox", "segm")

Size = Tuple[int, int]


def _binarize_masks(masks: ArrayLike, threshold: float) -> np.ndarray:
    """(N,1,H,W) or (N,H,W) probabilities / bool / 0-1 ints -> (N,H,W) bool numpy."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach()
        if masks.dtype.is_floating_point:
            masks = masks > threshold
        else:
            masks = masks != 0
        masks = masks.cpu().numpy()
    else:
        masks = np.asarray(masks)
        masks = masks > threshold if np.issubdtype(masks.dtype, np.floating) else masks != 0
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be (N,1,H,W) or (N,H,W), got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N,1,H,W) or (N,H,W), got shape {tuple(masks.shape)}")
    return masks


def instances_to_coco_json(
    image_id: int,
    boxes_xyxy: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    masks: Optional[ArrayLike] = None,
    *,
    label_to_cat_id: Mapping[int, int],
    mask_threshold: float = 0.5,
    rles: Optional[List[Dict[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """Convert the instances of one image to COCO results records.

    Args:
        image_id: COCO ``image_id`` of the image.
        boxes_xyxy: (N, 4) boxes ``x1, y1, x2, y2`` in original image pixels.
        scores: (N,) confidence scores.
        labels: (N,) contiguous labels ``1..K`` (torchvision convention).
        masks: optional (N, 1, H, W) or (N, H, W) masks in original image size:
            float probabilities (binarized with ``> mask_threshold``) or bool / 0-1.
        label_to_cat_id: contiguous label -> COCO ``category_id``.
        mask_threshold: probability above which a mask pixel is foreground.
        rles: instead of ``masks``, the instances' compressed RLEs.

    Returns:
        One dict per instance with ``image_id``, ``category_id``, ``bbox``
        (``[x, y, w, h]`` floats), ``score`` and, when masks are given,
        ``segmentation`` (compressed RLE whose ``counts`` is a ``str``).

    Raises:
        DatasetError: a label has no entry in ``label_to_cat_id``.
    """
    boxes, scores_np, labels_np = instance_arrays(boxes_xyxy, scores, labels, where=f"image {image_id}: ")
    n = boxes.shape[0]
    if masks is not None:
        masks_np = _binarize_masks(masks, mask_threshold)
        if masks_np.shape[0] != n:
            raise ValueError(f"image {image_id}: {n} boxes but {masks_np.shape[0]} masks")
        rles = encode_rle(torch.from_numpy(masks_np))
    if rles is not None and len(rles) != n:
        raise ValueError(f"image {image_id}: {n} boxes but {len(rles)} masks")

    xywh = boxes.copy()
    xywh[:, 2] -= xywh[:, 0]
    xywh[:, 3] -= xywh[:, 1]
    xywh_list = xywh.tolist()
    results = []
    for i in range(n):
        label = int(labels_np[i])
        if label not in label_to_cat_id:
            raise DatasetError(
                f"predicted label {label} has no COCO category id in label_to_cat_id "
                f"(known labels: {min(label_to_cat_id)}..{max(label_to_cat_id)}); "
                "does the model's num_classes match the dataset?"
            )
        rec = {
            "image_id": int(image_id),
            "category_id": int(label_to_cat_id[label]),
            "bbox": xywh_list[i],
            "score": float(scores_np[i]),
        }
        if rles is not None:
            rec["segmentation"] = rles[i]
        results.append(rec)
    return results


def load_coco_gt(coco_gt: Union[str, COCO]) -> COCO:
    """A pycocotools ``COCO`` object from itself or from a json path (quietly)."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = os.fspath(coco_gt)
    if not os.path.isfile(path):
        raise DatasetError(f"ground-truth annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot parse ground-truth annotation file {path}: {e}") from e
    except (KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"{path} is not a COCO instances annotation file ({type(e).__name__}: {e})") from e


def _stats_to_metrics(stats: Iterable[float]) -> Dict[str, float]:
    return {name: float(v * 100.0) if v >= 0 else float("nan") for name, v in zip(COCO_METRIC_NAMES, stats)}


def evaluate_predictions_on_coco(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    img_ids: Optional[Sequence[int]] = None,
) -> Tuple[Dict[str, float], Optional[COCOeval]]:
    """Score COCO results records with ``COCOeval`` for one ``iou_type``.

    Args:
        coco_gt: ground truth.
        results: COCO results records (not modified; a deep copy is loaded).
        iou_type: ``"bbox"`` or ``"segm"``. For ``"segm"`` the ``bbox`` field of
            each record is dropped so that the area ranges use the mask area.
        img_ids: restrict the evaluation to these images (``params.imgIds``);
            ``None`` evaluates every image of ``coco_gt``.

    Returns:
        ``(metrics, coco_eval)``: the twelve named metrics in percent (``nan``
        where COCOeval gives -1), and the ``COCOeval`` object after
        ``summarize`` (``None`` when there were no results or ``img_ids`` is
        empty: all metrics 0).
    """
    if iou_type not in _TASKS:
        raise ValueError(f"iou_type must be one of {_TASKS}, got {iou_type!r}")
    if len(results) == 0 or (img_ids is not None and len(img_ids) == 0):
        # loadRes cannot take an empty list, and COCOeval reads imgIds=[] as "all images".
        logger.warning("No predictions to evaluate for %s: reporting 0 for every metric.", iou_type)
        return dict.fromkeys(COCO_METRIC_NAMES, 0.0), None
    results = copy.deepcopy(list(results))
    if iou_type == "segm":
        for r in results:
            if "segmentation" not in r:
                raise DatasetError(
                    f"segm evaluation needs a 'segmentation' in every result; "
                    f"image {r.get('image_id')} has a result without one"
                )
            r.pop("bbox", None)
    unknown = {int(r["image_id"]) for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise DatasetError(f"{len(unknown)} result image ids are not in the ground truth, e.g. {sorted(unknown)[:5]}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval (%s):\n%s", iou_type, buf.getvalue())
    return _stats_to_metrics(coco_eval.stats), coco_eval


def evaluate_results_file(
    gt_json: Union[str, COCO],
    results_json: str,
    tasks: Sequence[str] = _TASKS,
    img_ids: Optional[Sequence[int]] = None,
) -> Dict[str, Dict[str, float]]:
    """Score an existing COCO results file.

    Args:
        gt_json: ground-truth annotation json path (or a ``COCO`` object).
        results_json: path of a COCO results file (list of records).
        tasks: subset of ``("bbox", "segm")``.
        img_ids: restrict to these image ids; ``None`` uses every ground-truth image.

    Returns:
        ``{task: {metric: value in percent}}``, see :func:`evaluate_predictions_on_coco`.
    """
    coco_gt = load_coco_gt(gt_json)
    if not os.path.isfile(results_json):
        raise DatasetError(f"results file not found: {results_json}")
    try:
        with open(results_json) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot parse results file {results_json}: {e}") from e
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise DatasetError(f"results file {results_json} must hold a JSON list of objects")
    out = {}
    for task in _check_tasks(tasks):
        try:
            out[task] = evaluate_predictions_on_coco(coco_gt, results, task, img_ids)[0]
        except DatasetError as e:
            raise DatasetError(f"{results_json}: {e}") from e
        except KeyError as e:
            raise DatasetError(f"{results_json}: a result lacks the key {e}") from e
    return out


def _check_tasks(tasks: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in _TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {_TASKS}, got {tasks}")
    return tasks


def print_coco_table(results: Mapping[str, Mapping[str, float]], floatfmt: str = ".3f") -> str:
    """Render ``{task: {metric: value}}`` as an aligned table, one column per task.

    Rows are the twelve standard metrics (see :data:`COCO_METRIC_NAMES`); a
    metric missing from a task is shown as ``-``. Returns the table text (the
    caller decides whether to print or log it).
    """
    tasks = list(results.keys())
    header = ["metric"] + tasks
    rows = []
    for name in COCO_METRIC_NAMES:
        row = [name]
        for t in tasks:
            v = results[t].get(name)
            if v is None:
                row.append("-")
            elif isinstance(v, float) and math.isnan(v):
                row.append("nan")
            else:
                row.append(format(float(v), floatfmt))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([fmt(header), sep] + [fmt(r) for r in rows])


class COCOEvaluator:
    """Accumulate Mask R-CNN outputs over a dataset and score them with COCOeval.

    Usage::

        evaluator = COCOEvaluator(ann_file, dataset.label_to_cat_id, output_dir=out)
        evaluator.reset()
        for images, targets in loader:
            sizes = [t["orig_size"] for t in targets]
            outputs = model(images, output_sizes=sizes)
            evaluator.process([t["image_id"] for t in targets], outputs, orig_sizes=sizes)
        results = evaluator.evaluate()   # {"bbox": {...}, "segm": {...}} on rank 0, {} elsewhere

    Metrics are in **percent** (COCOeval's fractions times 100, like
    detectron2); ``nan`` where COCOeval reports -1 (no ground truth in that
    area range); all 0 when there are no predictions at all.

    In distributed evaluation every rank processes its share of the images;
    :meth:`evaluate` gathers all records on rank 0. An image processed more
    than once (e.g. padding of a distributed sampler) counts once: its first
    occurrence is kept.
    """

    def __init__(
        self,
        coco_gt: Union[str, COCO],
        label_to_cat_id: Mapping[int, int],
        tasks: Sequence[str] = _TASKS,
        output_dir: Optional[str] = None,
        mask_threshold: float = 0.5,
    ):
        """
        Args:
            coco_gt: ground truth, a pycocotools ``COCO`` object or the path of
                a COCO instances json.
            label_to_cat_id: contiguous model label (1..K) -> COCO category id.
            tasks: subset of ``("bbox", "segm")`` to evaluate.
            output_dir: if given, rank 0 writes ``coco_instances_results.json``
                there (atomically) during :meth:`evaluate`.
            mask_threshold: probability above which a mask pixel is foreground.
        """
        self._coco_gt = load_coco_gt(coco_gt)
        self._gt_name = coco_gt if isinstance(coco_gt, str) else "the ground truth"
        self._label_to_cat_id = {int(k): int(v) for k, v in label_to_cat_id.items()}
        gt_cats = set(self._coco_gt.getCatIds())
        missing = sorted(set(self._label_to_cat_id.values()) - gt_cats)
        if missing:
            raise DatasetError(f"label_to_cat_id maps to category ids {missing[:5]} that are not in {self._gt_name}")
        self._tasks = _check_tasks(tasks)
        self._output_dir = output_dir
        self._mask_threshold = float(mask_threshold)
        self._gt_img_ids = set(self._coco_gt.getImgIds())
        self.coco_evals: Dict[str, COCOeval] = {}
        self.reset()

    @property
    def tasks(self) -> Tuple[str, ...]:
        return self._tasks

    def reset(self) -> None:
        """Forget everything processed so far (call before each evaluation)."""
        self._predictions: Dict[int, List[Dict[str, Any]]] = {}
        self.coco_evals = {}

    def process(
        self,
        image_ids: Sequence[int],
        outputs: Sequence[Mapping[str, Any]],
        orig_sizes: Optional[Sequence[Size]] = None,
    ) -> None:
        """Record the detector's outputs for a batch of images.

        Args:
            image_ids: COCO image id of each image (ints or 0-d tensors).
            outputs: per image, in the original image's pixels: ``boxes`` (N, 4)
                XYXY, ``scores`` (N,), ``labels`` (N,) in 1..K and, for ``segm``,
                either ``mask_probs`` (N, 1, M, M) RoI mask probabilities (pasted
                here into the image, a few at a time) or ``masks`` (N, H, W)
                full-size masks (probabilities or bool).
            orig_sizes: per image ``(h, w)`` of the original image; ``None``
                takes it from the ground truth's ``height`` / ``width``.
        """
        if len(image_ids) != len(outputs):
            raise ValueError(f"{len(image_ids)} image ids but {len(outputs)} outputs")
        for i, (image_id, output) in enumerate(zip(image_ids, outputs)):
            image_id = int(image_id)
            if image_id not in self._gt_img_ids:
                raise DatasetError(f"image id {image_id} is not in {self._gt_name}")
            masks, rles = None, None
            if "segm" in self._tasks:
                if output.get("mask_probs") is not None:
                    if orig_sizes is not None:
                        size = tuple(int(v) for v in orig_sizes[i])
                    else:
                        info = self._coco_gt.imgs[image_id]
                        size = (info["height"], info["width"])
                    boxes = torch.as_tensor(output["boxes"])
                    rles = [
                        r
                        for chunk in iter_pasted_masks(
                            torch.as_tensor(output["mask_probs"]), boxes, size, self._mask_threshold
                        )
                        for r in encode_rle(chunk)
                    ]
                elif output.get("masks") is not None:
                    masks = output["masks"]
                else:
                    raise ValueError(
                        f"task 'segm' needs 'mask_probs' or 'masks' in the outputs (image {image_id} has neither)"
                    )
            records = instances_to_coco_json(
                image_id,
                output["boxes"],
                output["scores"],
                output["labels"],
                masks,
                label_to_cat_id=self._label_to_cat_id,
                mask_threshold=self._mask_threshold,
                rles=rles,
            )
            # The first occurrence wins (a padded distributed sampler repeats images).
            self._predictions.setdefault(image_id, records)

    def _gather(self) -> Optional[Dict[int, List[Dict[str, Any]]]]:
        parts = gather_object(list(self._predictions.items()), dst=0)
        if get_rank() != 0:
            return None
        merged: Dict[int, List[Dict[str, Any]]] = {}
        for part in parts:
            for image_id, records in part:
                merged.setdefault(int(image_id), records)
        return merged

    def evaluate(self, img_ids: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, float]]:
        """Gather, write and score the predictions.

        Args:
            img_ids: images to evaluate; ``None`` (default) uses every image
                passed to :meth:`process` on any rank, so that evaluating a
                subset of the dataset only counts the ground truth of that subset.

        Returns:
            On rank 0 ``{task: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
            "AR10", "AR100", "ARs", "ARm", "ARl"}}`` in percent; ``{}`` on other
            ranks. The ``COCOeval`` objects stay in :attr:`coco_evals`.
        """
        merged = self._gather()
        if merged is None:
            return {}
        eval_ids = sorted(merged) if img_ids is None else sorted(int(i) for i in img_ids)
        results = [r for image_id in sorted(merged) for r in merged[image_id]]
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            data = json.dumps(results).encode("utf-8")
            atomic_write(path, lambda f: f.write(data))
            logger.info("Wrote %d COCO results to %s", len(results), path)
        if not eval_ids:
            logger.warning("COCOEvaluator.evaluate: no images were processed.")
        out: Dict[str, Dict[str, float]] = {}
        self.coco_evals = {}
        for task in self._tasks:
            metrics, coco_eval = evaluate_predictions_on_coco(self._coco_gt, results, task, eval_ids)
            out[task] = metrics
            if coco_eval is not None:
                self.coco_evals[task] = coco_eval
        logger.info("COCO evaluation on %d images (percent):\n%s", len(eval_ids), print_coco_table(out))
        return out
