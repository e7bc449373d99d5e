"""COCO evaluation (bbox + segm with the official pycocotools metrics) and running a model over a dataset."""

from .coco import (  # noqa: F401
    COCO_METRIC_NAMES,
    COCOEvaluator,
    evaluate_predictions_on_coco,
    evaluate_results_file,
    instances_to_coco_json,
    load_coco_gt,
    print_coco_table,
)
from .inference import inference_on_dataset  # noqa: F401

__all__ = [
    "COCO_METRIC_NAMES",
    "COCOEvaluator",
    "evaluate_predictions_on_coco",
    "evaluate_results_file",
    "inference_on_dataset",
    "instances_to_coco_json",
    "load_coco_gt",
    "print_coco_table",
]
