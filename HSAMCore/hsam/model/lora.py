"""LoRA on the q and v parts of a ViT block's fused qkv projection (H-SAM / SAMed style).

``y = W_qkv x + b + [B_q A_q x ; 0 ; B_v A_v x]`` — rank r, no bias, no scaling; A starts
kaiming-uniform(a=√5), B at zero, so a fresh adapter leaves the base model unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAQKV(nn.Linear):
    """A fused qkv ``nn.Linear(dim, 3·dim)`` with trainable low-rank updates of q and v.

    Parameters keep the base names (``weight``, ``bias``) so SAM checkpoints load unchanged;
    the adapters are ``lora_q_a`` (r, dim), ``lora_q_b`` (dim, r), ``lora_v_a``, ``lora_v_b``.
    """

    def __init__(self, dim: int, rank: int, bias: bool = True) -> None:
        super().__init__(dim, 3 * dim, bias=bias)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.dim = dim
        self.rank = rank
        self.lora_q_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_q_b = nn.Parameter(torch.zeros(dim, rank))
        self.lora_v_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_v_b = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.lora_q_a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_v_a, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """The adapters as a (3·dim, dim) update of ``weight`` (zero rows for k)."""
        zeros = torch.zeros(self.dim, self.dim, dtype=self.weight.dtype, device=self.weight.device)
        return torch.cat([self.lora_q_b @ self.lora_q_a, zeros, self.lora_v_b @ self.lora_v_a], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) → (..., 3·dim)."""
        out = F.linear(x, self.weight, self.bias)
        q_update = F.linear(F.linear(x, self.lora_q_a), self.lora_q_b)
        v_update = F.linear(F.linear(x, self.lora_v_a), self.lora_v_b)
        d = self.dim
        return torch.cat([out[..., :d] + q_update, out[..., d:2 * d], out[..., 2 * d:] + v_update], dim=-1)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (for inference)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear


def add_lora(encoder: nn.Module, rank: int) -> None:
    """Replace the ``attn.qkv`` linear of every block of a SAM ``ImageEncoderViT`` by a ``LoRAQKV``
    with the same base weights (in place)."""
    for block in encoder.blocks:
        base = block.attn.qkv
        lora = LoRAQKV(base.in_features, rank, bias=base.bias is not None).to(base.weight.device, base.weight.dtype)
        with torch.no_grad():
            lora.weight.copy_(base.weight)
            if base.bias is not None:
                lora.bias.copy_(base.bias)
        block.attn.qkv = lora


def merge_lora(module: nn.Module) -> int:
    """Fold every ``LoRAQKV`` under ``module`` into a plain linear (in place). Returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoRAQKV):
            setattr(module, name, child.merged())
            count += 1
        else:
            count += merge_lora(child)
    return count
