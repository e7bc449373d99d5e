"""Images in, instances out: a trained Mask R-CNN behind a small call interface.

:class:`Predictor` loads a detection config and checkpoint once and then turns
images (files, numpy arrays, tensors, or lists of them) into per-image numpy
results in the **original image's** pixel coordinates::

    predictor = Predictor("configs/quickstart/mask_rcnn_vit_tiny.yaml",
                          "output/quickstart/det/model_final.pth", score_thresh=0.5)
    out = predictor("photo.jpg")
    out["boxes"], out["scores"], out["class_names"], out["masks"]

Thread safety: one :class:`Predictor` (and its model) may be shared by several
threads calling it at the same time. A call keeps all its state in local
variables; ``torch.inference_mode`` and ``torch.autocast`` are thread-local
context managers; the model is only read (the Predictor puts it in eval mode
once, at construction). Results do not depend on which thread runs a call.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import nn

from maedet.data.images import read_image_rgb
from maedet.engine.amp import amp_dtype, autocast
from maedet.errors import CheckpointError, ConfigError

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


def _peek_checkpoint_meta(path: str) -> Dict[str, Any]:
    """``meta`` of a checkpoint and ``_num_classes_from_weights`` (from the box predictor's shape).

    Memory-maps the file when possible, so this does not read all the weights.
    """
    from maedet.checkpoint.io import load_checkpoint_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy format, .pkl, or a bad file: the full loader says what is wrong
        state = load_checkpoint_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint dictionary")
    meta = dict(state.get("meta") or {})
    weights = state.get("model", state)
    if isinstance(weights, dict):
        w = weights.get("roi_heads.box_predictor.cls_score.weight")
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            meta["_num_classes_from_weights"] = int(w.shape[0]) - 1
    return meta


class Predictor:
    """Run a Mask R-CNN on images and return numpy instances in original image coordinates.

    Args:
        config: path to a detection YAML (loaded with the
            :class:`~maedet.config.schema.DetectionConfig` schema, ``_base_`` and
            ``overrides`` applied) or an already loaded config.
        weights: detection checkpoint (``model_final.pth``, a training
            checkpoint or ``{"model": state_dict, "meta": {...}}``), loaded with
            :func:`maedet.engine.detection.load_detection_weights` (strict keys and shapes).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
        amp: ``"off"``, ``"auto"``, ``"bf16"`` or ``"fp16"`` (see
            :mod:`maedet.engine.amp`): autocast dtype of the forward pass.
            Outputs are float32 either way.
        score_thresh: keep instances with ``score >= score_thresh`` (None: keep
            what the model returns, i.e. ``model.box_score_thresh``). A value below
            the model's own threshold lowers that threshold too.
        class_names: names of labels ``1..K`` (index ``label - 1``); default: the
            checkpoint's ``meta["class_names"]``; else the labels as text.
        overrides: ``key=value`` config overrides when ``config`` is a path
            (e.g. ``["model.min_size=800"]``).

    The number of classes is the checkpoint's ``meta["num_classes"]``, else
    ``len(meta["class_names"])``, else ``len(class_names)``, else
    ``cfg.model.num_classes``, else read off the box predictor's weight shape.
    COCO category ids come from ``meta["label_to_cat_id"]`` (identity when absent).

    See :meth:`__call__` for inputs and outputs, the module docstring for thread safety.
    """

    def __init__(
        self,
        config: Any,
        weights: str,
        device: Union[str, torch.device] = "cpu",
        amp: str = "off",
        score_thresh: Optional[float] = None,
        class_names: Optional[Sequence[str]] = None,
        overrides: Optional[Sequence[str]] = None,
    ):
        from maedet.config import DetectionConfig, load_config
        from maedet.engine.detection import build_detection_model, load_detection_weights

        if isinstance(config, (str, os.PathLike)):
            cfg = load_config(os.fspath(config), list(overrides or []), DetectionConfig)
        else:
            if overrides:
                raise ConfigError("overrides are only applied when config is a path; edit the loaded config instead")
            cfg = config
        weights = os.fspath(weights)
        meta = _peek_checkpoint_meta(weights)
        meta_names = meta.get("class_names")
        num_classes = (
            meta.get("num_classes")
            or (len(meta_names) if meta_names else None)
            or (len(class_names) if class_names else None)
            or cfg.model.num_classes
            or meta.get("_num_classes_from_weights")
        )
        if not num_classes:
            raise CheckpointError(
                f"{weights}: cannot tell the number of classes (no meta.num_classes / class_names in the "
                "checkpoint and model.num_classes=0 in the config)"
            )
        num_classes = int(num_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class_names given, but the model has {num_classes} classes")
        dev = resolve_device(device)
        model = build_detection_model(cfg, num_classes)
        meta = {**meta, **load_detection_weights(model, weights)}
        meta.pop("_num_classes_from_weights", None)
        if score_thresh is not None and hasattr(model, "roi_heads"):
            # The model drops boxes below its own threshold before we see them.
            model.roi_heads.score_thresh = min(float(model.roi_heads.score_thresh), float(score_thresh))
        names = list(class_names) if class_names is not None else meta.get("class_names")
        self.cfg = cfg
        self.meta = meta
        self._setup(model, names, meta.get("label_to_cat_id"), dev, amp, score_thresh, num_classes)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        class_names: Optional[Sequence[str]] = None,
        label_to_cat_id: Optional[Mapping[int, int]] = None,
        device: Union[str, torch.device] = "cpu",
        amp: str = "off",
        score_thresh: Optional[float] = None,
    ) -> "Predictor":
        """A Predictor around an already built model (moved to ``device``, put in eval mode).

        ``model`` follows the torchvision detection convention: it takes a list of
        float ``(3, H, W)`` RGB tensors in [0, 1] and returns one dict per image
        with ``boxes`` (N, 4) xyxy, ``labels`` (1..K), ``scores`` and optionally
        ``masks`` (N, 1, H, W) probabilities, all in the input images' coordinates.
        """
        self = cls.__new__(cls)
        self.cfg = None
        self.meta = {}
        num_classes = len(class_names) if class_names is not None else None
        self._setup(model, class_names, label_to_cat_id, resolve_device(device), amp, score_thresh, num_classes)
        return self

    def _setup(self, model, class_names, label_to_cat_id, device, amp, score_thresh, num_classes) -> None:
        self.device = device
        self.amp_dtype = amp_dtype(amp, device, key="amp")
        self.model = model.to(device).eval()
        self.score_thresh = None if score_thresh is None else float(score_thresh)
        self.num_classes = num_classes
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        if label_to_cat_id:
            self.label_to_cat_id = {int(k): int(v) for k, v in dict(label_to_cat_id).items()}
        elif num_classes:
            self.label_to_cat_id = {i: i for i in range(1, int(num_classes) + 1)}
        else:
            self.label_to_cat_id = {}
        self.mask_threshold = 0.5

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _to_tensor(image: ImageInput, input_format: str) -> torch.Tensor:
        """One input -> float (3, H, W) RGB tensor in [0, 1] on the CPU."""
        if isinstance(image, (str, os.PathLike)):
            return torch.from_numpy(read_image_rgb(os.fspath(image))).permute(2, 0, 1).float().div_(255.0)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"a numpy image must be (H, W, 3), got shape {image.shape}")
            if image.dtype == np.uint8:
                t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
            elif np.issubdtype(image.dtype, np.floating):
                t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
            else:
                raise ValueError(f"a numpy image must be uint8 (or float in [0, 1]), got dtype {image.dtype}")
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"a tensor image must be (3, H, W), got shape {tuple(image.shape)}")
            if image.dtype == torch.uint8:
                t = image.float().div(255.0)
            elif image.is_floating_point():
                t = image.float()
            else:
                raise ValueError(f"a tensor image must be uint8 or float in [0, 1], got dtype {image.dtype}")
        else:
            raise TypeError(f"unsupported image input of type {type(image).__name__} "
                            "(expected a path, an (H, W, 3) numpy array or a (3, H, W) tensor)")
        if input_format == "BGR":
            t = t.flip(0)
        return t

    # ----------------------------------------------------------------- outputs
    def _convert(self, out: Mapping[str, torch.Tensor], size, return_rle: bool) -> Dict[str, Any]:
        h, w = size
        boxes = out["boxes"].detach().float().cpu()
        scores = out["scores"].detach().float().cpu()
        labels = out["labels"].detach().cpu().to(torch.int64)
        masks = out.get("masks")
        if self.score_thresh is not None:
            keep = scores >= self.score_thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            if masks is not None:
                masks = masks[keep.to(masks.device)]
        n = int(scores.shape[0])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels_np = labels.numpy()
        result: Dict[str, Any] = {
            "boxes": boxes.numpy().astype(np.float32).reshape(n, 4),
            "scores": scores.numpy().astype(np.float32).reshape(n),
            "labels": labels_np.reshape(n),
            "class_ids": np.array([self.label_to_cat_id.get(int(l), int(l)) for l in labels_np], dtype=np.int64),
            "class_names": [self._name(int(l)) for l in labels_np],
            "image_size": (int(h), int(w)),
        }
        if masks is not None:
            masks = masks.detach()
            if masks.ndim == 4:
                masks = masks[:, 0]
            masks = (masks.float() > self.mask_threshold) if masks.is_floating_point() else (masks != 0)
            masks = masks.cpu().numpy().reshape(n, h, w)
            if return_rle:
                rles = []
                for m in masks:
                    rle = mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]
                    rle["counts"] = rle["counts"].decode("utf-8")
                    rles.append(rle)
                result["masks_rle"] = rles
            else:
                result["masks"] = masks
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
                image is a file path (decoded as RGB; ``input_format`` does not
                apply), an ``(H, W, 3)`` numpy array (uint8, or float in [0, 1]),
                or a ``(3, H, W)`` tensor (uint8, or float in [0, 1]).
            input_format: ``"RGB"`` or ``"BGR"``: channel order of array and tensor inputs.
            return_rle: give masks as COCO RLE (``masks_rle``) instead of bool arrays.

        Returns:
            For one image a dict, for a list a list of dicts, each with
            ``boxes`` float32 (N, 4) ``x1, y1, x2, y2`` in the original image's
            pixels (clipped to it), ``scores`` float32 (N,), ``labels`` int64 (N,)
            contiguous ``1..K``, ``class_ids`` int64 (N,) COCO category ids,
            ``class_names`` list of N str, ``image_size`` ``(H, W)``, and when the
            model predicts masks either ``masks`` bool (N, H, W) (probability
            ``> 0.5``) or, with ``return_rle``, ``masks_rle``: N COCO RLE dicts
            (``{"size": [H, W], "counts": str}``).

        Raises:
            DatasetError: an image file cannot be read (the message names it).
        """
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            return []
        tensors = [self._to_tensor(x, input_format) for x in items]
        sizes = [tuple(int(s) for s in t.shape[-2:]) for t in tensors]
        with torch.inference_mode():
            batch = [t.to(self.device, non_blocking=True) for t in tensors]
            with autocast(self.device, self.amp_dtype):
                outputs = self.model(batch)
            results = [self._convert(o, s, return_rle) for o, s in zip(outputs, sizes)]
        return results[0] if single else results

    def __repr__(self) -> str:
        return (f"Predictor(device={self.device}, amp={self.amp_dtype}, num_classes={self.num_classes}, "
                f"score_thresh={self.score_thresh})")
