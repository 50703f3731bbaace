"""The two-way transformer of both H-SAM stages (SAM's parameter layout, H-SAM's computation order).

H-SAM's blocks run token→image cross-attention first, then token self-attention, the MLP and
image→token cross-attention (SAM runs self-attention first). In stage 2 each cross-attention's
post-softmax weights are multiplied element-wise by the stage-1 prior (no renormalisation).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _attention_module():
    from segment_anything.modeling.transformer import Attention
    return Attention


class MaskedAttention(_attention_module()):
    """SAM's ``Attention`` whose attention weights are multiplied by an optional prior."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                prior: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, Nq, C), k/v (B, Nk, C), prior (B, Nq, Nk) or None → (B, Nq, C)."""
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
        if prior is not None:
            attn = attn * prior.unsqueeze(1).to(attn.dtype)
        return self.out_proj(self._recombine_heads(attn @ v))


def _self_attention(attn: nn.Module, queries: torch.Tensor, query_pe: torch.Tensor, skip_pe: bool) -> torch.Tensor:
    """Token self-attention of a two-way block; the first block of a stack has no positional encoding
    and no residual (as in SAM)."""
    if skip_pe:
        return attn(queries, queries, queries)
    q = queries + query_pe
    return queries + attn(q, q, queries)


class MaskedTwoWayBlock(nn.Module):
    """A two-way attention block with SAM's parameter names and H-SAM's order — token→image
    cross-attention first, then token self-attention, MLP, image→token cross-attention (SAM runs
    self-attention first) — whose cross-attentions are multiplied by the prior."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool,
                 cross_downsample: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        from segment_anything.modeling.common import MLPBlock

        self.self_attn = MaskedAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = MaskedAttention(dim, num_heads, downsample_rate=cross_downsample)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = MaskedAttention(dim, num_heads, downsample_rate=cross_downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
                prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, K, C), keys (B, N, C), prior (B, K, N) or None."""
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.dropout(self.cross_attn_token_to_image(q, k, keys, prior)))
        queries = self.norm1(_self_attention(self.self_attn, queries, query_pe, self.skip_first_layer_pe))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(
            k, q, queries, None if prior is None else prior.transpose(1, 2)))
        return queries, keys


class MaskedTwoWayTransformer(nn.Module):
    """A stack of two-way blocks + a final ordinary token→image attention at half width.

    Stage 1: cross-attentions at half width (``cross_downsample=2``, as SAM), no prior.
    Stage 2: full-width cross-attentions (``cross_downsample=1``), the prior, dropout 0.2 (training).
    """

    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 cross_downsample: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MaskedTwoWayBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0),
                              cross_downsample=cross_downsample, dropout=dropout)
            for i in range(depth))
        self.final_attn_token_to_image = MaskedAttention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C, g, g), image_pe (1, C, g, g), tokens (B, K, C), prior (B, K, g·g) or None
        → tokens (B, K, C), image features (B, g·g, C)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, prior)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
