"""The assembled H-SAM: encoder → prompt-free prompt → stage 1 → prior → stage 2 → fusion."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .stage1 import Stage1Decoder, Stage1Output
from .stage2 import Stage2Decoder


@dataclass
class HSAMOutput:
    """stage1 logits (B, K, 4g, 4g); stage2 logits (B, K, S, S); stage1 details for training."""

    stage1_logits: torch.Tensor
    stage2_logits: torch.Tensor
    stage1: Stage1Output


def prior_from_stage1(stage1_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """P: stage-1 logits (B, K, h, w) → bilinear to the embedding grid → softmax over K → (B, K, g·g)."""
    small = F.interpolate(stage1_logits, size=grid, mode="bilinear", align_corners=False)
    return torch.softmax(small, dim=1).flatten(2)


class HSAM(nn.Module):
    """Prompt-free two-stage H-SAM on a SAM-style image encoder.

    Input images (B, 3, S, S) in [0, 1]; ``num_classes`` K counts background.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, stage1: Stage1Decoder,
                 stage2: Stage2Decoder, image_size: int, fusion: str = "mean") -> None:
        super().__init__()
        if fusion not in ("mean", "stage2"):
            raise ValueError(f"unknown fusion {fusion!r}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.stage1 = stage1
        self.stage2 = stage2
        self.image_size = image_size
        self.fusion = fusion

    @property
    def num_classes(self) -> int:
        return self.stage1.num_classes

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → image embeddings E (B, C, g, g)."""
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor) -> HSAMOutput:
        """E (B, C, g, g) → both stages' logits."""
        grid = tuple(embeddings.shape[-2:])
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(embeddings.dtype)
        image_pe = self.prompt_encoder.get_dense_pe().to(embeddings.dtype)
        features = embeddings + dense
        s1 = self.stage1(features, image_pe)
        prior = prior_from_stage1(s1.logits, grid)
        s2 = self.stage2(2 * features, image_pe, prior, s1.upscaled)
        return HSAMOutput(stage1_logits=s1.logits, stage2_logits=s2, stage1=s1)

    def forward(self, images: torch.Tensor) -> HSAMOutput:
        return self.decode(self.encode(images))

    def fused_logits(self, out: HSAMOutput) -> torch.Tensor:
        """The decision logits (B, K, S, S): mean of upsampled stage 1 and stage 2 ("stage 3" of the
        authors' code), or stage 2 alone."""
        if self.fusion == "stage2":
            return out.stage2_logits
        s1 = F.interpolate(out.stage1_logits, size=out.stage2_logits.shape[-2:], mode="bilinear",
                           align_corners=False)
        return (s1 + out.stage2_logits) / 2

    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → class probabilities (B, K, S, S)."""
        return torch.softmax(self.fused_logits(self(images)), dim=1)
