"""ViT encoders with the official MAE release's names (which are timm's ``VisionTransformer`` names).

Read: an official MAE checkpoint (with or without its decoder), maedet's
``encoder_final.pth``, a maedet pretraining checkpoint. Write:
``{"model": encoder state, "meta": {...}}``. :func:`convert_vit_encoder` is the
encoder-to-encoder mapping shared with the timm format: it drops what an encoder
has no place for (decoder, ``mask_token``, classifier), resizes ``pos_embed`` to
another patch grid (class-token slot kept) and the patch kernel to another patch
size (FlexiViT's pseudo-inverse), and checks every tensor against the layout of
timm's ``VisionTransformer`` built on the ``meta`` device.
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from maedet.checkpoint.report import Report, group_keys, meta_of, shape_of, unwrap_state_dict
from maedet.models.backbones.vit import BLOCK_RE
from maedet.models.pos_embed import count_prefix_tokens, fit_pos_embed
from maedet.utils.errors import CheckpointError, ConfigError

__all__ = [
    "PATCH_RESIZE_METHODS",
    "resize_patch_embed",
    "vit_encoder_layout",
    "convert_vit_encoder",
    "read_encoder",
    "encoder_checkpoint",
]

PATCH_RESIZE_METHODS = ("pi", "bicubic")
# Keys of MAE / timm checkpoints that an encoder output has no place for.
_DROP_RE = re.compile(r"^(mask_token|decoder_.*|head\..*|head_dist\..*|fc_norm\..*|dist_token|reg_token)$")
_DET_PREFIXES = ("backbone.", "roi_heads.", "rpn.", "proposal_generator.")


def resize_patch_embed(weight: torch.Tensor, patch_size: int, method: str = "pi") -> torch.Tensor:
    """Resize a (C, in_chans, p, p) patch-embedding kernel to (C, in_chans, P, P).

    Methods:
        ``"pi"`` (default): FlexiViT's pseudo-inverse resize (Beyer et al. 2023),
            via ``timm.layers.resample_patch_embed``: with ``B`` the (P^2 x p^2)
            matrix of bicubic (antialiased) resizing of a p x p patch to P x P,
            the new kernel is ``w B^+``. For upsampling (P > p, e.g. 14 -> 16)
            ``B^+ B = I``, so the new kernel applied to the bicubically
            upsampled patch gives exactly the old kernel's response on the
            original patch.
        ``"bicubic"``: the kernel is resized like an image (bicubic) and scaled by
            p^2 / P^2, which keeps the response to flat patches approximately.
    """
    if method not in PATCH_RESIZE_METHODS:
        raise ConfigError(f"unknown patch resize method {method!r}; use one of {PATCH_RESIZE_METHODS}")
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D patch kernel, got shape {tuple(weight.shape)}")
    old_h, old_w = int(weight.shape[-2]), int(weight.shape[-1])
    if (old_h, old_w) == (patch_size, patch_size):
        return weight
    if method == "pi":
        from timm.layers import resample_patch_embed

        return resample_patch_embed(weight, [patch_size, patch_size], interpolation="bicubic", antialias=True)
    out = F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False)
    return (out * (old_h * old_w / float(patch_size * patch_size))).to(weight.dtype)


@functools.lru_cache(maxsize=16)
def _layout(
    embed_dim: int, depth: int, patch_size: int, img_size: int, in_chans: int, mlp_hidden: int, qkv_bias: bool
) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=1,
            mlp_ratio=mlp_hidden / embed_dim,
            qkv_bias=qkv_bias,
        )
    return tuple((k, shape_of(v)) for k, v in model.state_dict().items())


def vit_encoder_layout(
    embed_dim: int,
    depth: int,
    patch_size: int,
    img_size: int,
    in_chans: int = 3,
    mlp_hidden: Optional[int] = None,
    qkv_bias: bool = True,
) -> OrderedDict[str, Tuple[int, ...]]:
    """Key -> shape of a timm ``VisionTransformer(num_classes=0, global_pool="token")``
    (= the encoder names of the MAE release), read from the module built on ``meta``."""
    return OrderedDict(
        _layout(
            int(embed_dim),
            int(depth),
            int(patch_size),
            int(img_size),
            int(in_chans),
            int(mlp_hidden or 4 * embed_dim),
            bool(qkv_bias),
        )
    )


def read_encoder(obj: Any, source: str, fmt: str) -> OrderedDict[str, torch.Tensor]:
    """The encoder-named tensors of an MAE / timm / maedet pretraining checkpoint object."""
    state = unwrap_state_dict(obj, source)
    det = [k for k in state if k.startswith(_DET_PREFIXES)]
    if det:
        raise CheckpointError(
            f"checkpoint {source} looks like a detection checkpoint (key '{det[0]}'), not a "
            f"'{fmt}' encoder; use --from maedet-det or --from d2-vitdet"
        )
    return state


def convert_vit_encoder(
    state: Mapping[str, torch.Tensor],
    report: Report,
    *,
    expected: Optional[Mapping[str, Any]] = None,
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    patch_resize: str = "pi",
    allow_missing: bool = False,
) -> Tuple[OrderedDict[str, torch.Tensor], Dict[str, Any]]:
    """Map an MAE / maedet / timm encoder state onto the MAE-timm encoder layout.

    Args:
        state: tensors with MAE / timm names (no wrapper, no ``module.``).
        report: filled with what was loaded, dropped, changed.
        expected: the architecture to check against (``embed_dim``, ``depth``,
            ``patch_size``, ``mlp_ratio`` and a ``name`` for messages, e.g. from a
            config); None: read off the checkpoint, whose tensors are then checked
            for consistency with it.
        img_size: image side of the output's position table; None keeps the grid.
        patch_size: output patch size; None keeps the input's.
        patch_resize: kernel resize method, see :func:`resize_patch_embed`.
        allow_missing: write the output even when keys are missing.
    Returns:
        (encoder state, info with ``embed_dim``, ``depth``, ``patch_size``, ``img_size``).
    Raises:
        CheckpointError: shape mismatch, blocks beyond the depth, missing keys
            (messages name the file and the key).
    """
    source = report.source
    kept: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        if _DROP_RE.match(k):
            report.dropped.append(k)
        else:
            kept[k] = v
    w = kept.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        got = "no such key" if w is None else f"shape {shape_of(w)}"
        raise CheckpointError(
            f"checkpoint {source}: key 'patch_embed.proj.weight' ({got}); expected "
            "(C, in_chans, p, p) (not a ViT encoder?)"
        )
    embed_dim, in_chans, p_src = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for m in map(BLOCK_RE.match, kept) if m), default=-1)
    fc1 = kept.get("blocks.0.mlp.fc1.weight")
    mlp_hidden = int(fc1.shape[0]) if fc1 is not None and fc1.dim() == 2 else 4 * embed_dim
    qkv_bias = "blocks.0.attn.qkv.bias" in kept or depth == 0
    grid_src = None
    pos = kept.get("pos_embed")
    if pos is not None:
        if pos.dim() != 3:
            raise CheckpointError(
                f"checkpoint {source}: key 'pos_embed' has shape {shape_of(pos)}, expected (1, [1 +] N, C)"
            )
        grid_src = math.isqrt(int(pos.shape[1]) - count_prefix_tokens(int(pos.shape[1])))

    if expected:
        exp_dim, exp_depth = int(expected["embed_dim"]), int(expected["depth"])
        exp_hidden = int(exp_dim * float(expected.get("mlp_ratio", 4.0)))
        exp_patch = int(expected.get("patch_size") or p_src)
        qkv_bias = True
        what = str(expected.get("name", "the expected architecture"))
    else:
        exp_dim, exp_depth, exp_hidden, exp_patch = embed_dim, depth, mlp_hidden, p_src
        what = (
            f"the architecture read off the checkpoint (embed_dim {embed_dim}, depth {depth}, "
            f"patch {p_src}, mlp {mlp_hidden})"
        )
    if exp_depth <= 0:
        raise CheckpointError(f"checkpoint {source} has no 'blocks.N.*' keys (not a ViT encoder?)")
    src_layout = vit_encoder_layout(
        exp_dim, exp_depth, exp_patch, (grid_src or 14) * exp_patch, in_chans, exp_hidden, qkv_bias
    )
    for k, v in kept.items():
        exp = src_layout.get(k)
        if exp is None:
            m = BLOCK_RE.match(k)
            if m and int(m.group(1)) >= exp_depth:
                raise CheckpointError(
                    f"checkpoint {source}: key '{k}' is beyond the depth of {what} ({exp_depth} "
                    f"blocks; the checkpoint has {depth}; wrong model size?)"
                )
            report.unexpected.append(k)
            continue
        ok = (v.dim() == 3 and v.shape[0] == 1 and v.shape[2] == exp[2]) if k == "pos_embed" else shape_of(v) == exp
        if not ok:
            exp_txt = f"(1, [1 +] N, {exp[2]})" if k == "pos_embed" else str(exp)
            raise CheckpointError(
                f"checkpoint {source}: key '{k}' has shape {shape_of(v)}, {what} expects {exp_txt} (wrong model size?)"
            )

    p_dst = int(patch_size or exp_patch)
    if img_size:
        if img_size % p_dst:
            raise ConfigError(f"--img-size {img_size} is not a multiple of the patch size {p_dst}")
        grid_dst = img_size // p_dst
    elif grid_src is not None:
        grid_dst = grid_src
    else:
        grid_dst = 224 // p_dst
        report.notes.append(f"no pos_embed in the checkpoint; layout for img_size {grid_dst * p_dst}")
    dst_layout = vit_encoder_layout(exp_dim, exp_depth, p_dst, grid_dst * p_dst, in_chans, exp_hidden, qkv_bias)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, exp in dst_layout.items():
        if k not in kept:
            report.missing.append(k)
            continue
        v = kept[k]
        if k == "patch_embed.proj.weight" and shape_of(v) != exp:
            nv = resize_patch_embed(v, p_dst, patch_resize)
            how = (
                "pseudo-inverse (FlexiViT) resize"
                if patch_resize == "pi"
                else "bicubic kernel resize, scaled by p^2/P^2"
            )
            report.changed[k] = f"{shape_of(v)} -> {shape_of(nv)} ({how})"
            v = nv
        elif k == "pos_embed" and shape_of(v) != exp:
            nv = fit_pos_embed(v, torch.zeros(exp, dtype=v.dtype))
            slot = (
                "class-token slot kept" if count_prefix_tokens(int(v.shape[1])) == 1 else "zero class-token slot added"
            )
            report.changed[k] = (
                f"{shape_of(v)} -> {shape_of(nv)} (grid {grid_src}x{grid_src} -> "
                f"{grid_dst}x{grid_dst}, bicubic, {slot})"
            )
            v = nv
        out[k] = v
        report.loaded.append((k, k))
    if report.missing and not allow_missing:
        raise_missing(report)
    return out, {"embed_dim": exp_dim, "depth": exp_depth, "patch_size": p_dst, "img_size": grid_dst * p_dst}


def raise_missing(report: Report) -> None:
    groups = ", ".join(p + (f" (x{n})" if n > 1 else "") for p, n in group_keys(report.missing).items())
    raise CheckpointError(
        f"checkpoint {report.source} lacks key '{report.missing[0]}' ({len(report.missing)} "
        f"missing in all: {groups}); pass --allow-missing to write the output without them"
    )


def encoder_checkpoint(
    state: Mapping[str, torch.Tensor], info: Mapping[str, Any], src_obj: Any, num_heads: Optional[int], **extra: Any
) -> Dict[str, Any]:
    """An MAE-format file ``{"model": encoder, "meta": {...}}`` (what ``tools/pretrain.py`` writes)."""
    meta = {"format": "maedet-mae-encoder", **{k: int(v) for k, v in info.items()}, **extra}
    src_meta = meta_of(src_obj)
    heads = num_heads or src_meta.get("num_heads")
    if heads:
        meta["num_heads"] = int(heads)
    # how the encoder was pretrained, when the source says (maedet meta, MAE's training args)
    args = src_obj.get("args") if isinstance(src_obj, Mapping) else None
    for key in ("norm_pix_loss", "mask_ratio"):
        value = src_meta.get(key, getattr(args, key, None))
        if value is not None:
            meta[key] = value
    return {"model": dict(state), "meta": meta}
