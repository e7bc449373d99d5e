"""Images in, instances out: a trained detector behind a small call interface.

:class:`Predictor` wraps a built detector (``maedet.builders.build_predictor``
builds one from a config and a checkpoint) and turns images (files, numpy
arrays, tensors, or lists of them) into per-image numpy results in the
**original image's** pixel coordinates::

    from maedet.builders import build_predictor
    predictor = build_predictor("configs/quickstart/mask_rcnn_vit_tiny.yaml",
                                "output/quickstart/det/model_final.pth", score_thresh=0.5)
    out = predictor("photo.jpg")
    out["boxes"], out["scores"], out["class_names"], out["masks"]

Each image goes the way of an evaluation image: decoded with its EXIF
orientation applied, resized by the config's test pipeline (detectron2's
``ResizeShortestEdge`` on the uint8 pixels), through the model, the detections
above ``score_thresh`` kept, and only then their masks pasted into the original
image a few at a time, so memory follows the number of kept instances, not the
photo's size times 100.

Thread safety: one :class:`Predictor` (and its model) may be shared by several
threads calling it at the same time. A call keeps all its state in local
variables; ``torch.inference_mode`` and ``torch.autocast`` are thread-local
context managers; the model is only read (the Predictor puts it in eval mode
once, at construction). Results do not depend on which thread runs a call.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from maedet.data.images import read_image_rgb
from maedet.models.detectors.mask_ops import encode_rle, iter_pasted_masks
from maedet.utils.amp import amp_dtype, autocast
from maedet.utils.errors import ConfigError

__all__ = ["Predictor", "resolve_device"]

ImageInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Raises:
        ConfigError: CUDA is asked for but not available, or the name is unknown.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r} (expected cpu, cuda, cuda:N or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is available (use cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r} (expected cpu, cuda, cuda:N or auto)")
    return dev


class Predictor:
    """Run a detector on images; numpy instances in original image coordinates.

    Args:
        model: a detector following :class:`maedet.models.detectors.GeneralizedRCNN`'s
            contract: ``model(images, output_sizes=sizes)`` with (3, h, w) 0..255 RGB
            images returns per image ``boxes`` (N, 4) in the ``output_sizes`` frame,
            ``scores``, ``labels`` (1..K) and optionally ``mask_probs`` (N, 1, M, M).
        transform: the test-time resize, uint8 (3, H, W) -> uint8 (3, h, w)
            (e.g. the ``resize_shortest_edge`` pipeline); None: images as given.
        class_names: names of labels ``1..K`` (index ``label - 1``); else the labels as text.
        label_to_cat_id: contiguous label -> dataset category id (identity when absent).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
        amp: ``"off"``, ``"auto"``, ``"bf16"`` or ``"fp16"`` (see :mod:`maedet.utils.amp`):
            autocast dtype of the forward pass; boxes, NMS and masks stay float32.
        score_thresh: keep instances with ``score >= score_thresh`` (None: all the model returns).
        mask_threshold: mask probability at which a pixel is foreground.

    See :meth:`__call__` for inputs and outputs, the module docstring for thread safety.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        class_names: Optional[Sequence[str]] = None,
        label_to_cat_id: Optional[Mapping[int, int]] = None,
        device: Union[str, torch.device] = "cpu",
        amp: str = "off",
        score_thresh: Optional[float] = None,
        mask_threshold: float = 0.5,
    ):
        if score_thresh is not None and not 0.0 <= float(score_thresh) <= 1.0:
            raise ConfigError(f"score threshold {score_thresh} is outside [0, 1]")
        self.device = resolve_device(device)
        self.amp_dtype = amp_dtype(amp, self.device, key="amp")
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.score_thresh = None if score_thresh is None else float(score_thresh)
        self.mask_threshold = float(mask_threshold)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        num_classes = getattr(model, "num_classes", None) or (len(class_names) if class_names else None)
        self.num_classes = num_classes
        if label_to_cat_id:
            self.label_to_cat_id = {int(k): int(v) for k, v in dict(label_to_cat_id).items()}
        else:
            self.label_to_cat_id = {i: i for i in range(1, int(num_classes or 0) + 1)}

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _to_uint8(image: ImageInput, input_format: str) -> torch.Tensor:
        """One input -> uint8 (3, H, W) RGB tensor on the CPU (floats in [0, 1] are scaled and rounded)."""
        if isinstance(image, (str, os.PathLike)):
            return torch.from_numpy(read_image_rgb(os.fspath(image))).permute(2, 0, 1).contiguous()
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"a numpy image must be (H, W, 3), got shape {image.shape}")
            if not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
                raise ValueError(f"a numpy image must be uint8 (or float in [0, 1]), got dtype {image.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"a tensor image must be (3, H, W), got shape {tuple(image.shape)}")
            if not (image.dtype == torch.uint8 or image.is_floating_point()):
                raise ValueError(f"a tensor image must be uint8 or float in [0, 1], got dtype {image.dtype}")
            t = image.detach().cpu()
        else:
            raise TypeError(
                f"unsupported image input of type {type(image).__name__} "
                "(expected a path, an (H, W, 3) numpy array or a (3, H, W) tensor)"
            )
        if t.is_floating_point():
            t = (t.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
        if input_format == "BGR":
            t = t.flip(0)
        return t.contiguous()

    # ----------------------------------------------------------------- outputs
    def _convert(self, out: Mapping[str, torch.Tensor], size, return_rle: bool) -> Dict[str, Any]:
        h, w = size
        boxes = out["boxes"].detach().float().cpu()
        scores = out["scores"].detach().float().cpu()
        labels = out["labels"].detach().cpu().to(torch.int64)
        probs = out.get("mask_probs")
        if self.score_thresh is not None:  # filter first: only kept instances are pasted
            keep = scores >= self.score_thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            probs = probs[keep.to(probs.device)] if probs is not None else None
        n = int(scores.shape[0])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels_np = labels.numpy()
        result: Dict[str, Any] = {
            "boxes": boxes.numpy().astype(np.float32).reshape(n, 4),
            "scores": scores.numpy().astype(np.float32).reshape(n),
            "labels": labels_np.reshape(n),
            "class_ids": np.array([self.label_to_cat_id.get(int(lb), int(lb)) for lb in labels_np], dtype=np.int64),
            "class_names": [self._name(int(lb)) for lb in labels_np],
            "image_size": (int(h), int(w)),
        }
        if probs is not None:
            chunks = iter_pasted_masks(probs.detach().float().cpu(), boxes, (h, w), self.mask_threshold)
            if return_rle:
                result["masks_rle"] = [r for c in chunks for r in encode_rle(c)]
            else:
                result["masks"] = torch.cat(list(chunks)).numpy() if n else np.zeros((0, h, w), dtype=bool)
        return result

    def _name(self, label: int) -> str:
        if self.class_names is not None and 1 <= label <= len(self.class_names):
            return self.class_names[label - 1]
        return str(label)

    # -------------------------------------------------------------------- call
    def __call__(
        self,
        inputs: Union[ImageInput, Sequence[ImageInput]],
        input_format: str = "RGB",
        return_rle: bool = False,
    ) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        """Predict instances.

        Args:
            inputs: one image or a list/tuple of images (run as one batch). An
                image is a file path (decoded as RGB with its EXIF orientation;
                ``input_format`` does not apply), an ``(H, W, 3)`` numpy array (uint8,
                or float in [0, 1]), or a ``(3, H, W)`` tensor (uint8, or float in [0, 1]).
            input_format: ``"RGB"`` or ``"BGR"``: channel order of array and tensor inputs.
            return_rle: give masks as COCO RLE (``masks_rle``) instead of bool arrays.

        Returns:
            For one image a dict, for a list a list of dicts, each with
            ``boxes`` float32 (N, 4) ``x1, y1, x2, y2`` in the original image's
            pixels, ``scores`` float32 (N,), ``labels`` int64 (N,) contiguous
            ``1..K``, ``class_ids`` int64 (N,) dataset category ids,
            ``class_names`` list of N str, ``image_size`` ``(H, W)``, and when the
            model predicts masks either ``masks`` bool (N, H, W) or, with
            ``return_rle``, ``masks_rle``: N COCO RLE dicts (``{"size": [H, W], "counts": str}``).

        Raises:
            DatasetError: an image file cannot be read (the message names it).
        """
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            return []
        images = [self._to_uint8(x, input_format) for x in items]
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]
        if self.transform is not None:
            images = [self.transform(t) for t in images]
        with torch.inference_mode():
            batch = [t.to(self.device, non_blocking=True) for t in images]
            with autocast(self.device, self.amp_dtype):
                outputs = self.model(batch, output_sizes=sizes)
            results = [self._convert(o, s, return_rle) for o, s in zip(outputs, sizes)]
        return results[0] if single else results

    def __repr__(self) -> str:
        return (
            f"Predictor(device={self.device}, amp={self.amp_dtype}, num_classes={self.num_classes}, "
            f"score_thresh={self.score_thresh})"
        )
