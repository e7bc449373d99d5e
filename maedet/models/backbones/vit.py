"""Plain ViT backbone for detection (ViTDet), following detectron2's ``modeling/backbone/vit.py``.

Parameter names match detectron2's ViTDet backbone (``patch_embed.proj``,
``pos_embed``, ``blocks.{i}.attn.rel_pos_h`` ...), so a detectron2 ViTDet
checkpoint converts by stripping the key prefix ``backbone.net.``, and the
encoder of an MAE or timm checkpoint loads by name (:meth:`ViT.filter_pretrained`).

The tokens stay a (B, H, W, C) grid through all blocks. Most blocks attend
inside non-overlapping windows (the grid is zero-padded to a multiple of the
window); a few blocks attend globally. Every attention adds detectron2's
decomposed relative-position bias. The arithmetic lives in :mod:`maedet.kernels`
(the reference and its fast paths, one switch).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

from maedet.kernels.attention import rel_pos_attention
from maedet.kernels.window_layout import partition_heads, unpartition_heads
from maedet.models.layers import ShapeSpec
from maedet.models.pos_embed import fit_pos_embed, resize_pos_embed_grid
from maedet.utils.errors import CheckpointError
from maedet.utils.registry import BACKBONES

from .base import Backbone

__all__ = ["ViT", "Block", "Attention", "get_abs_pos"]

# ``blocks.{i}.`` of a ViT state dict (this backbone's, MAE's, timm's); the one definition.
BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


# --------------------------------------------------------------------------- modules


class Attention(nn.Module):
    """Multi-head self-attention on a token grid with decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
    ):
        """
        Args:
            dim: channels C of the (B, H, W, C) input.
            num_heads: attention heads; ``head_dim = C // num_heads``.
            qkv_bias: bias in the qkv projection.
            use_rel_pos: add the decomposed relative-position bias.
            rel_pos_zero_init: zero-initialize ``rel_pos_h`` / ``rel_pos_w``
                (otherwise truncated normal, std 0.02).
            input_size: (H, W) grid the rel-pos tables are sized for; tables
                have shapes (2H - 1, head_dim) and (2W - 1, head_dim). Required
                with ``use_rel_pos``.
        """
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                trunc_normal_(self.rel_pos_h, std=0.02)
                trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C) tokens.
            window_size: attend within non-overlapping windows of this side; 0: globally.
        Returns:
            (B, H, W, C).

        Windows are formed after the qkv projection: detectron2 pads the tokens to whole
        windows before it, and a zero token's q, k, v are the projection's bias, so the
        padding is filled with the bias (the same numbers, without projecting the padding).
        """
        B, H, W, _ = x.shape
        qkv = self.qkv(x)
        # (3, B * windows, heads, tokens of a window, head_dim)
        qkv = partition_heads(qkv, self.num_heads, window_size, self.qkv.bias if window_size else None)
        q_size = (window_size, window_size) if window_size else (H, W)
        rel_h = self.rel_pos_h if self.use_rel_pos else None
        rel_w = self.rel_pos_w if self.use_rel_pos else None
        x = rel_pos_attention(qkv, rel_h, rel_w, q_size, self.scale)
        x = unpartition_heads(x, (H, W), window_size)
        return self.proj(x)


class Block(nn.Module):
    """Transformer block with window or global attention on a (B, H, W, C) grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ):
        """
        Args:
            dim: channels C.
            num_heads: attention heads.
            mlp_ratio: MLP hidden size / C.
            qkv_bias: bias in the qkv projection.
            drop_path: stochastic-depth rate of this block.
            norm_layer: normalization constructor, called with C.
            act_layer: MLP activation.
            use_rel_pos: decomposed relative-position bias.
            rel_pos_zero_init: zero-init the rel-pos tables.
            window_size: window side in tokens; 0 = global attention.
            input_size: (H, W) token grid of a global block (sizes its rel-pos
                tables); window blocks use (window_size, window_size).
        """
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        x = self.attn(x, self.window_size)  # window partition, attention, unpartition
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def get_abs_pos(pos_embed: torch.Tensor, has_cls_token: bool, hw: Tuple[int, int]) -> torch.Tensor:
    """Absolute position embeddings for a (H, W) grid, resized bicubically if needed.

    Args:
        pos_embed: (1, [1 +] N, C) pretraining-shape table (N a square number).
        has_cls_token: whether ``pos_embed`` starts with a class-token slot (dropped).
        hw: target grid (H, W).
    Returns:
        (1, H, W, C); ``pos_embed`` itself, reshaped, when the grid already matches.
    """
    return resize_pos_embed_grid(pos_embed, hw, num_prefix_tokens=1 if has_cls_token else 0, mode="bicubic")


@BACKBONES.register("vit")
class ViT(Backbone):
    """Plain ViT backbone of ViTDet: one stride-``patch_size`` feature map, no final norm."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[..., nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = True,
        window_size: int = 14,
        global_blocks: Sequence[int] = (2, 5, 8, 11),
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        act_checkpoint: bool = False,
        freeze: bool = False,
        freeze_blocks: int = 0,
        out_feature: str = "last_feat",
    ):
        """
        Args:
            embed_dim: token channels C.
            depth: number of blocks.
            num_heads: attention heads per block.
            img_size: input side the model is built for; sizes the rel-pos tables
                of the global blocks ((2 * img_size / patch_size - 1, head_dim)).
                Other input sizes work (tables are interpolated).
            patch_size: patch side; inputs need H, W divisible by it.
            in_chans: input channels.
            mlp_ratio: MLP hidden size / C.
            qkv_bias: bias in the qkv projections.
            drop_path_rate: stochastic depth, linearly increasing from 0 to this.
            norm_layer: block normalization constructor.
            act_layer: MLP activation.
            use_abs_pos: add absolute position embeddings.
            use_rel_pos: decomposed relative-position bias in every block.
            rel_pos_zero_init: zero-init the rel-pos tables.
            window_size: window side in tokens for window blocks.
            global_blocks: indexes of the blocks that attend globally; the others
                attend within windows (ViT-B: 2, 5, 8, 11).
            pretrain_img_size: image side of pretraining; ``pos_embed`` keeps the
                pretraining shape (1, [1 +] (pretrain_img_size / patch_size)^2, C)
                and is resized to the actual grid in every forward.
            pretrain_use_cls_token: ``pos_embed`` has a class-token slot (unused
                here, kept so MAE / detectron2 checkpoints load unchanged).
            act_checkpoint: recompute each block in backward (training only).
            freeze: freeze patch_embed, pos_embed and all blocks; the module then
                stays in eval mode even after ``.train()`` (drop path off).
            freeze_blocks: freeze patch_embed, pos_embed and the first K blocks
                (kept in eval mode). Ignored when ``freeze`` is set.
            out_feature: name of the output feature.
        """
        super().__init__()
        if not 0 <= freeze_blocks <= depth:
            raise ValueError(f"freeze_blocks must be in [0, depth={depth}], got {freeze_blocks}")
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_blocks {list(global_blocks)}: indexes {bad} outside 0..{depth - 1}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.use_act_checkpoint = act_checkpoint

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
        )

        if use_abs_pos:
            num_patches = (pretrain_img_size // patch_size) * (pretrain_img_size // patch_size)
            num_positions = (num_patches + 1) if pretrain_use_cls_token else num_patches
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        global_set = {int(i) for i in global_blocks}
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    use_rel_pos=use_rel_pos,
                    rel_pos_zero_init=rel_pos_zero_init,
                    window_size=0 if i in global_set else window_size,
                    input_size=(img_size // patch_size, img_size // patch_size),
                )
            )
        self.out_feature = out_feature

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

        self.freeze = bool(freeze)
        self.freeze_blocks = depth if self.freeze else int(freeze_blocks)
        self._freeze_stages()

    # ------------------------------------------------------------ Backbone API
    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {self.out_feature: ShapeSpec(channels=self.embed_dim, stride=self.patch_size)}

    @property
    def num_layers(self) -> int:
        return self.depth

    def layer_id(self, name: str) -> int:
        """ViTDet / BEiT layer index: ``patch_embed.*``, ``pos_embed``, ``cls_token`` -> 0,
        ``blocks.{i}.*`` -> i + 1, anything else -> ``depth + 1``. ``torch.compile``'s
        ``_orig_mod.`` component is ignored."""
        name = name.replace("_orig_mod.", "")
        if name.startswith(("patch_embed.", "pos_embed", "cls_token")):
            return 0
        m = BLOCK_RE.match(name)
        if m:
            return int(m.group(1)) + 1
        return self.depth + 1

    def filter_pretrained(self, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Fit an MAE / timm / maedet encoder (or a ViTDet backbone) to this ViT.

        ``cls_token``, the final ``norm`` / ``fc_norm``, ``head`` and the MAE decoder
        have no place here and are left out; ``pos_embed`` keeps its class-token
        slot and its grid is resized (bicubic) to this model's; rel-pos tables of
        another length are interpolated linearly (as detectron2 does at run
        time). Every other tensor must have this model's shape.

        Raises:
            CheckpointError: a shape that does not fit or blocks beyond ``depth``
                (the message names the key); the caller adds the file.
        """
        own = self.state_dict()
        depth_in = 1 + max((int(m.group(1)) for m in map(BLOCK_RE.match, state) if m), default=-1)
        out: Dict[str, torch.Tensor] = {}
        for k, v in state.items():
            m = BLOCK_RE.match(k)
            if m and int(m.group(1)) >= self.depth:
                raise CheckpointError(
                    f"key '{k}' is beyond the model's depth (checkpoint has {depth_in} blocks, "
                    f"the model {self.depth}; wrong model size?)"
                )
            if k not in own:
                continue
            target = own[k]
            if k == "pos_embed":
                out[k] = fit_pos_embed(v, target)
            elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.dim() == 2 and v.shape[1] == target.shape[1]:
                out[k] = v.to(target.dtype) if v.shape[0] == target.shape[0] else _resize_rel_pos(v, target.shape[0])
            elif tuple(v.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"key '{k}' has shape {tuple(v.shape)}, the model expects "
                    f"{tuple(target.shape)} (different model size?)"
                )
            else:
                out[k] = v.to(target.dtype)
        for k in own:  # everything but the rel-pos tables must come from the checkpoint
            if k not in out and not k.endswith(("rel_pos_h", "rel_pos_w")):
                raise CheckpointError(
                    f"lacks model key '{k}' (checkpoint has {depth_in} blocks, the model "
                    f"{self.depth}; wrong model size or architecture?)"
                )
        return out

    # ---------------------------------------------------------------- modules
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _frozen_modules(self):
        if self.freeze_blocks <= 0:
            return []
        return [self.patch_embed] + list(self.blocks[: self.freeze_blocks])

    def _freeze_stages(self) -> None:
        if self.freeze_blocks <= 0:
            return
        if self.pos_embed is not None:
            self.pos_embed.requires_grad_(False)
        for m in self._frozen_modules():
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ViT:
        """Set train/eval mode; frozen parts always stay in eval mode."""
        super().train(mode)
        if self.freeze:
            super().train(False)
        else:
            for m in self._frozen_modules():
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, in_chans, H, W) normalized images, H and W divisible by ``patch_size``.
        Returns:
            {out_feature: (B, embed_dim, H / patch_size, W / patch_size)}.
        """
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"ViT input size {H}x{W} is not divisible by the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (B, h, w, C), a permuted view of the NCHW convolution output
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        # The residual stream stays contiguous: left permuted, every LayerNorm copies its
        # input forward and backward, and each residual add runs strided. Same values.
        x = x.contiguous()
        for blk in self.blocks:
            if (
                self.use_act_checkpoint
                and self.training
                and torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in blk.parameters()))
            ):
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return {self.out_feature: x.permute(0, 3, 1, 2)}


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a (L, head_dim) rel-pos table to ``length`` rows."""
    out = F.interpolate(table.float().t()[None], size=length, mode="linear")
    return out[0].t().to(table.dtype)
