"""COCO evaluation: results conversion, rescaling to original size, COCOeval scoring."""
from .coco import (  # noqa: F401
    COCO_METRIC_NAMES,
    COCOEvaluator,
    evaluate_predictions_on_coco,
    evaluate_results_file,
    instances_to_coco_json,
    load_coco_gt,
    print_coco_table,
    rescale_instances,
)

__all__ = [
    "COCO_METRIC_NAMES",
    "COCOEvaluator",
    "evaluate_predictions_on_coco",
    "evaluate_results_file",
    "instances_to_coco_json",
    "load_coco_gt",
    "print_coco_table",
    "rescale_instances",
]
