"""Inference: the Predictor (images in, instances out), drawing and saving predicted instances."""

from .predictor import Predictor  # noqa: F401
from .visualize import PALETTE, color_for, draw_instances, save_visualization  # noqa: F401

__all__ = ["PALETTE", "color_for", "draw_instances", "save_visualization", "Predictor"]
