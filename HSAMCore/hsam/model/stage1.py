"""Stage 1: SAM's mask decoder with one token per class (prompt-free).

Parameter names are those of ``segment_anything``'s ``MaskDecoder``, so a SAM or LiteMedSAM mask decoder
loads directly; the transformer blocks run in H-SAM's order (see ``two_way``); the forward pass also
returns what stage 2 needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .two_way import MaskedTwoWayTransformer


@dataclass
class Stage1Output:
    """logits (B, K, 4g, 4g); upscaled U₁ (B, c₁, 4g, 4g); tokens T₁ (B, 1+K, C) (IoU token first);
    image features F₁ (B, g·g, C); iou (B, K); affinity A = T₁[:, 1:] · F₁ᵀ (B, K, g·g)."""

    logits: torch.Tensor
    upscaled: torch.Tensor
    tokens: torch.Tensor
    features: torch.Tensor
    iou: torch.Tensor

    @property
    def affinity(self) -> torch.Tensor:
        return self.tokens[:, 1:] @ self.features.transpose(1, 2)


class Stage1Decoder(nn.Module):
    """SAM ``MaskDecoder`` pieces with ``num_classes`` mask tokens (background included)."""

    def __init__(self, num_classes: int, transformer_dim: int = 256, transformer_depth: int = 2,
                 num_heads: int = 8, mlp_dim: int = 2048, upscale_channels: tuple[int, int] = (64, 32),
                 mlp_depth: int = 3, iou_head_depth: int = 3) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.mask_decoder import MLP

        c1, c2 = upscale_channels
        self.num_classes = num_classes
        self.transformer = MaskedTwoWayTransformer(transformer_depth, transformer_dim, num_heads, mlp_dim,
                                                   cross_downsample=2)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(num_classes, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, c1, kernel_size=2, stride=2), LayerNorm2d(c1), nn.GELU(),
            nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, c2, mlp_depth) for _ in range(num_classes))
        self.iou_prediction_head = MLP(transformer_dim, transformer_dim, num_classes, iou_head_depth)

    @property
    def upscaled_channels(self) -> int:
        return self.output_upscaling[3].out_channels

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor) -> Stage1Output:
        """image: E + dense prompt (B, C, g, g); image_pe: (1, C, g, g)."""
        b, c, h, w = image.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
        hs, features = self.transformer(image, image_pe, tokens)
        upscaled = self.output_upscaling(features.transpose(1, 2).reshape(b, c, h, w))
        class_tokens = hs[:, 1:1 + self.num_classes]
        hyper = torch.stack([mlp(class_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        bu, cu, hu, wu = upscaled.shape
        logits = (hyper @ upscaled.reshape(bu, cu, hu * wu)).reshape(b, -1, hu, wu)
        return Stage1Output(logits=logits, upscaled=upscaled, tokens=hs, features=features,
                            iou=self.iou_prediction_head(hs[:, 0]))
