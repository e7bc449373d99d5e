"""Detectors and their parts; importing this package registers them."""

from . import cascade, rcnn, roi_heads, rpn  # noqa: F401
from .mask_ops import iter_pasted_masks, paste_masks_in_image  # noqa: F401
from .rcnn import GeneralizedRCNN  # noqa: F401
