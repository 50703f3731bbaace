"""Stage 2: learnable mask cross-attention guided by the stage-1 prior, and the hierarchical pixel decoder.

In every token→image cross-attention the post-softmax attention (B, h, K, N) is multiplied element-wise
by the prior P (B, K, N) (softmax over classes of the stage-1 logits at the embedding grid), in every
image→token one by Pᵀ, without renormalisation (see ``two_way``). The image input is F₂ = 2·(E + no_mask_embed): the
published "class-balanced mask-guided self-attention" gates F by a softmax over a channel of size 1,
i.e. by 1, so that branch is not computed here (its published weights are ignored on load).
"""

from __future__ import annotations

import torch
from torch import nn

from .two_way import MaskedTwoWayTransformer


def pixel_decoder(in_channels: int, channels: tuple[int, int], upscale: int) -> nn.Sequential:
    """[U₂, U₁] (B, in, h, w) → U (B, c₂, h·upscale, w·upscale): two (transposed) convolutions, each
    followed by LayerNorm2d and GELU. ``upscale`` 4 = two stride-2 transposed convs (SAM ViT: 128 → 512);
    1 = two 3×3 convs (LiteMedSAM, whose stage-1 maps are already at the 256-px input resolution)."""
    from segment_anything.modeling.common import LayerNorm2d

    c1, c2 = channels
    if upscale == 4:
        first = nn.ConvTranspose2d(in_channels, c1, kernel_size=2, stride=2)
        second = nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2)
    elif upscale == 1:
        first = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        second = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
    else:
        raise ValueError(f"pixel decoder upscale must be 1 or 4, got {upscale}")
    return nn.Sequential(first, LayerNorm2d(c1), nn.GELU(), second, LayerNorm2d(c2), nn.GELU())


class Stage2Decoder(nn.Module):
    """Prior-masked two-way transformer with K fresh class tokens (no IoU token), its own upscaling,
    and the hierarchical pixel decoder fed with [U₂, U₁]; per-class 5-layer hyper-MLPs."""

    def __init__(self, num_classes: int, transformer_dim: int = 256, transformer_depth: int = 2,
                 num_heads: int = 8, mlp_dim: int = 2048, upscale_channels: tuple[int, int] = (64, 32),
                 pixel_decoder_channels: tuple[int, int] = (32, 16), stage1_channels: int = 32,
                 pixel_upscale: int = 4, mlp_depth: int = 5, dropout: float = 0.2) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.mask_decoder import MLP

        c1, c2 = upscale_channels
        self.num_classes = num_classes
        self.transformer = MaskedTwoWayTransformer(transformer_depth, transformer_dim, num_heads, mlp_dim,
                                                   cross_downsample=1, dropout=dropout)
        self.mask_tokens = nn.Embedding(num_classes, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, c1, kernel_size=2, stride=2), LayerNorm2d(c1), nn.GELU(),
            nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2), nn.GELU())
        self.pixel_decoder = pixel_decoder(c2 + stage1_channels, tuple(pixel_decoder_channels), pixel_upscale)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, pixel_decoder_channels[1], mlp_depth) for _ in range(num_classes))

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, prior: torch.Tensor,
                stage1_upscaled: torch.Tensor) -> torch.Tensor:
        """image F₂ (B, C, g, g), prior (B, K, g·g), stage1_upscaled U₁ (B, c₁, 4g, 4g)
        → stage-2 logits (B, K, 4g·u, 4g·u) with u the pixel decoder's upscale."""
        b, c, h, w = image.shape
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        hs, features = self.transformer(image, image_pe, tokens, prior)
        upscaled = self.output_upscaling(features.transpose(1, 2).reshape(b, c, h, w))
        pixels = self.pixel_decoder(torch.cat([upscaled, stage1_upscaled], dim=1))
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        bp, cp, hp, wp = pixels.shape
        return (hyper @ pixels.reshape(bp, cp, hp * wp)).reshape(b, -1, hp, wp)
