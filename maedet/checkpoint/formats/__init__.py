"""Checkpoint formats, one module each: MAE encoders, timm, detectron2 ViTDet, maedet detection."""
