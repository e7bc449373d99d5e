"""Masked autoencoder with a plain ViT encoder (He et al. 2021, "Masked Autoencoders
Are Scalable Vision Learners").

The encoder sees only the visible patches (plus a class token); a light decoder
receives the encoded visible tokens and a shared learned mask token for every
removed patch, and regresses the pixels of all patches. The loss is the mean
squared error over the removed patches only.

Parameter and buffer names equal those of the official MAE release
(``models_mae.py``), so its checkpoints (``{"model": state_dict}``) load with
``strict=True`` and no key mapping, and the encoder part
(:meth:`MaskedAutoencoderViT.encoder_state_dict`) uses the names of timm's
``VisionTransformer``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .pos_embed import get_2d_sincos_pos_embed

__all__ = ["MaskedAutoencoderViT", "masking_noise"]

# Top-level names of the encoder's parameters/buffers (shared with timm's VisionTransformer).
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")


def masking_noise(
    seeds: Union[Sequence[int], torch.Tensor],
    num_patches: int,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Per-sample uniform noise for :meth:`MaskedAutoencoderViT.random_masking`.

    Row ``n`` is drawn from a CPU ``torch.Generator`` seeded with ``seeds[n]``, so
    the mask of a sample depends only on its own seed (for example a hash of
    the sample index and the epoch), not on the other samples of the batch, on
    the batch size, on the device or on the process (rank) that draws it. The
    noise is drawn on the CPU and then moved to ``device``, which keeps it
    identical across devices.

    Args:
        seeds: N integer seeds, one per sample (a sequence of ints or a 1-D
            integer tensor).
        num_patches: L, the number of patches per image.
        device: device of the returned tensor (default CPU).
    Returns:
        (N, L) float32 tensor of values in [0, 1).
    """
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.reshape(-1).tolist()
    rows = []
    for seed in seeds:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        rows.append(torch.rand(num_patches, generator=gen, device="cpu"))
    if rows:
        noise = torch.stack(rows, dim=0)
    else:
        noise = torch.empty(0, num_patches)
    return noise.to(device) if device is not None else noise


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a Vision Transformer encoder and decoder.

    Sizes have no defaults: they come from the config (``configs/mae/*.yaml``).

    Args:
        embed_dim: D, encoder token width.
        depth: number of encoder blocks.
        num_heads: encoder attention heads.
        decoder_embed_dim: Dd, decoder token width.
        decoder_depth: number of decoder blocks.
        decoder_num_heads: decoder attention heads.
        img_size: input image side S in pixels (square images, S % patch_size == 0).
        patch_size: patch side p in pixels; the grid is (S/p) x (S/p), L = (S/p)^2 patches.
        in_chans: C, image channels.
        mlp_ratio: MLP hidden width / token width, for encoder and decoder.
        norm_layer: normalization constructor, called with the width; default
            ``partial(nn.LayerNorm, eps=1e-6)``.
        norm_pix_loss: if True, the regression target of each patch is normalized
            by that patch's own pixel mean and (unbiased) variance.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        decoder_embed_dim: int,
        decoder_depth: int,
        decoder_num_heads: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # ---------------- encoder ----------------
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table, stored as a frozen parameter (as in the MAE release).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # ---------------- decoder ----------------
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        # timm decides per Attention module, at construction, whether to call
        # F.scaled_dot_product_attention (from TIMM_FUSED_ATTN / export settings);
        # always use the fused kernel here.
        for blk in list(self.blocks) + list(self.decoder_blocks):
            blk.attn.fused_attn = True

        self.initialize_weights()

    @property
    def patch_size(self) -> int:
        """p, the patch side in pixels."""
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        """L, the number of patches of an input image."""
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        """MAE initialization: fixed sin-cos position tables, xavier-uniform patch
        projection (as a 2-D matrix) and Linear layers, N(0, 0.02) class and mask
        tokens, zero biases, unit LayerNorm weights."""
        grid = self.patch_embed.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(pos.unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(dec_pos.unsqueeze(0))

        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Cut images into flattened patches.

        Args:
            imgs: (N, C, H, W) with H == W, H % p == 0.
        Returns:
            (N, L, p*p*C): patch ``i*w + j`` (row i, column j of the h x w grid)
            holds pixel (c, i*p + a, j*p + b) at index ``(a*p + b)*C + c``.
        """
        p = self.patch_size
        n, c, hh, ww = imgs.shape
        if hh != ww or hh % p != 0:
            raise ValueError(f"patchify expects square images with side divisible by {p}, got {hh}x{ww}")
        h = w = hh // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`.

        Args:
            x: (N, L, p*p*C) with L a square number.
        Returns:
            (N, C, H, W) images, H = W = sqrt(L) * p.
        """
        p = self.patch_size
        n, length, dim = x.shape
        h = w = int(round(length**0.5))
        if h * w != length:
            raise ValueError(f"unpatchify expects a square number of patches, got {length}")
        c = dim // (p * p)
        if c * p * p != dim:
            raise ValueError(f"patch width {dim} is not a multiple of p*p = {p * p}")
        x = x.reshape(n, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h * p, w * p)

    # ------------------------------------------------------------------ masking
    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting per-patch noise.

        The patches with the ``len_keep = int(L * (1 - mask_ratio))`` smallest
        noise values are kept, in increasing order of noise.

        Args:
            x: (N, L, D) patch tokens.
            mask_ratio: fraction of patches to remove, in [0, 1).
            noise: optional (N, L) noise (e.g. from :func:`masking_noise`);
                uniform noise from the global RNG when None.
        Returns:
            x_masked: (N, len_keep, D) the kept tokens.
            mask: (N, L) in the original patch order, 0 = kept, 1 = removed.
            ids_restore: (N, L) long; gathering the shuffled sequence (kept
                tokens first, then the removed ones) with it restores the
                original order.
        """
        n, length, dim = x.shape
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        else:
            if noise.shape != (n, length):
                raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
            noise = noise.to(x.device)

        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        Args:
            imgs: (N, C, S, S) normalized images.
            mask_ratio: fraction of patches removed.
            noise: optional (N, L) masking noise, see :meth:`random_masking`.
        Returns:
            latent: (N, 1 + len_keep, D), class token first.
            mask: (N, L), 0 = kept, 1 = removed.
            ids_restore: (N, L).
        """
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype)
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decode all patches from the encoded visible ones.

        Args:
            latent: (N, 1 + len_keep, D) encoder output, class token first.
            ids_restore: (N, L) from :meth:`random_masking`.
        Returns:
            (N, L, p*p*C) predicted pixels of every patch, class token removed.
        """
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        num_masked = length + 1 - x.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(n, num_masked, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)  # cls token back

        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared pixel error over the removed patches.

        Args:
            imgs: (N, C, S, S) the input images.
            pred: (N, L, p*p*C) predicted patches.
            mask: (N, L), 0 = kept, 1 = removed.
        Returns:
            scalar float32 loss: ``sum_l(mse_l * mask_l) / sum_l(mask_l)`` where
            ``mse_l`` is the mean over the pixels of patch l.
        """
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in the MAE release
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L), mean loss per patch
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode and score a batch.

        Args:
            imgs: (N, C, S, S) normalized images.
            mask_ratio: fraction of patches removed.
            noise: optional (N, L) masking noise (see :func:`masking_noise`).
        Returns:
            loss: scalar; pred: (N, L, p*p*C); mask: (N, L), 1 = removed.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def encoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder's tensors only (``cls_token``, ``pos_embed``, ``patch_embed.*``,
        ``blocks.*``, ``norm.*``), detached, under the names used by the MAE
        release and by timm's ``VisionTransformer``. This is what pretraining
        writes as its output checkpoint. The tensors share storage with the model.
        """
        return {k: v.detach() for k, v in self.state_dict().items() if k.split(".", 1)[0] in _ENCODER_PREFIXES}
