"""A faster inference forward for the attention of SAM's ViT blocks (same parameters, same function).

SAM's ``image_encoder.Attention`` materialises the full attention matrix, adds the decomposed relative-position
bias to it in a separate pass, applies softmax in another pass and multiplies by V; its windowed blocks pad
the token grid (32×32 → 42×42 at 512 px) *before* the qkv projection and crop *after* the output projection,
so 42 % of those two linears' work is spent on padding. ``FastViTAttention`` computes the same function:

* qkv and proj run on the real tokens only; the padded tokens' q, k, v are the qkv bias (what SAM computes
  for its zero padding), so windows see exactly SAM's keys and values;
* the attention core is one of

  ``mask``       ``torch.nn.functional.scaled_dot_product_attention`` with the decomposed bias
                 ``rel_h[q, k_row] + rel_w[q, k_col]`` (from the *unscaled* query, as SAM) as an additive
                 float mask (B, heads, N, N);
  ``augmented``  the bias folded into the dot product so no N×N tensor is built outside the fused kernel:
                 ``q' = [q·scale, rel_h(q), rel_w(q)]``, ``k' = [k, onehot(k_row), onehot(k_col)]`` give
                 ``q'·k' = q·k·scale + rel_h[q, k_row] + rel_w[q, k_col]`` (widened with zeros to a multiple of
                 8); V is zero-padded to the same width (fused kernels want equal head sizes) and the padding
                 dropped from the output;
  ``explicit``   SAM's order of operations, with the bias added in place.

Exact in real arithmetic; in float32 the results differ from SAM's by rounding only (≈1e-6 relative).

Measured (ViT-B/512 encoder, batch 1, fp32, 1 thread of a shared AMD EPYC, torch 2.14, min of 4 interleaved
runs): SAM 2.90 s/slice; augmented everywhere 2.38 (the default); mask everywhere 2.42; augmented global +
explicit windows 2.39. Per global block (12 heads, 1024 tokens) the cores take 69 (augmented), 80 (mask)
and 87 ms (explicit); per windowed block (9 windows of 196 tokens) ~20–24 ms each. ``hsam bench`` with
2 threads: the whole fp32 pipeline 1.24–1.28 s/slice with this module vs 1.42–1.55 s with SAM's attention.

``use_fast_attention(encoder)`` swaps it into every block of a ``segment_anything`` ``ImageEncoderViT`` (in
place; parameters are shared and keep their names, so state dicts are unchanged; the block's own window
partition is switched off because the new module windows internally). Inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CORES = ("mask", "augmented", "explicit")
MODES = CORES + ("original",)


def relative_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(L, c) table → (size, size, c) with [i, j] = table[i − j + size − 1] (SAM's ``get_rel_pos`` for equal
    query and key sizes; a table of another length L is first resized linearly to 2·size − 1, as SAM does)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        resized = F.interpolate(rel_pos.t().unsqueeze(0).float(), size=length, mode="linear")
        rel_pos = resized[0].t().to(rel_pos.dtype)
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + (size - 1)]


def decomposed_rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                             hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, heads, H·W, c) (unscaled) → rel_h (B, heads, H, W, H), rel_w (B, heads, H, W, W):
    rel_h[..., y, x, ky] = q(y, x) · R_h[y − ky] and rel_w[..., y, x, kx] = q(y, x) · R_w[x − kx]."""
    h, w = hw
    b, heads, _, c = q.shape
    grid = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid, relative_table(rel_pos_h, h).to(q.dtype))
    rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid, relative_table(rel_pos_w, w).to(q.dtype))
    return rel_h, rel_w


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   rel_pos: tuple[torch.Tensor, torch.Tensor] | None, hw: tuple[int, int],
                   core: str = "augmented") -> torch.Tensor:
    """softmax(q·kᵀ·scale + decomposed rel-pos bias) · v for q, k, v (B, heads, N = H·W, c) → (B, heads, N, c).
    ``rel_pos`` = (rel_pos_h, rel_pos_w) or None (no bias)."""
    if rel_pos is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    h, w = hw
    b, heads, n, c = q.shape
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos[0], rel_pos[1], hw)
    if core == "mask":
        bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(b, heads, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    if core == "explicit":
        attn = (q * scale) @ k.transpose(-2, -1)
        grid = attn.view(b, heads, h, w, h, w)
        grid.add_(rel_h.unsqueeze(-1)).add_(rel_w.unsqueeze(-2))
        return attn.softmax(dim=-1) @ v
    if core != "augmented":
        raise ValueError(f"unknown attention core {core!r} ({'|'.join(CORES)})")
    extra = -(-(c + h + w) // 8) * 8 - c  # widen to a multiple of 8: what fused GPU kernels accept
    zeros = q.new_zeros(b, heads, n, extra - h - w)
    q_aug = torch.cat([q * scale, rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w), zeros], dim=-1)
    index = torch.arange(n, device=q.device)
    onehot = torch.cat([F.one_hot(index // w, h), F.one_hot(index % w, w)], dim=-1).to(k.dtype)  # (N, H+W)
    k_aug = torch.cat([k, onehot.expand(b, heads, n, h + w), zeros], dim=-1)
    out = F.scaled_dot_product_attention(q_aug, k_aug, F.pad(v, (0, extra)), scale=1.0)
    return out[..., :c]


class FastViTAttention(nn.Module):
    """Drop-in replacement of SAM's ViT ``Attention`` *including its block's window partition*:
    x (B, H, W, C) (unpadded) → (B, H, W, C). Holds the original module's ``qkv``, ``proj``, ``rel_pos_h``,
    ``rel_pos_w`` (the same objects)."""

    def __init__(self, attention: nn.Module, window_size: int = 0, core: str = "augmented") -> None:
        super().__init__()
        if core not in CORES:
            raise ValueError(f"unknown attention core {core!r} ({'|'.join(CORES)})")
        self.num_heads = int(attention.num_heads)
        self.scale = float(attention.scale)
        self.qkv = attention.qkv
        self.proj = attention.proj
        self.use_rel_pos = bool(attention.use_rel_pos)
        if self.use_rel_pos:
            self.rel_pos_h = attention.rel_pos_h
            self.rel_pos_w = attention.rel_pos_w
        self.window_size = int(window_size)
        self.core = core
        # The module this one replaces, kept unregistered (no duplicate state-dict keys) so it can be restored.
        self.__dict__["original"] = attention

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window_size={self.window_size}, core={self.core}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, dim = x.shape
        qkv = self.qkv(x)  # (B, H, W, 3C), real tokens only
        ws = self.window_size
        if ws:
            hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
            if (hp, wp) != (h, w):
                # SAM pads the normed tokens with zeros before qkv: a padded token's q, k, v are qkv(0)
                # (the bias for a plain linear; computed, so any qkv module works: LoRA, bf16, split).
                fill = self.qkv(x.new_zeros(1, dim)).to(qkv.dtype)[0]
                padded = fill.expand(b, hp, wp, qkv.shape[-1]).clone()
                padded[:, :h, :w] = qkv
                qkv = padded
            nh, nw = hp // ws, wp // ws
            qkv = qkv.view(b, nh, ws, nw, ws, -1).transpose(2, 3)  # (B, nh, nw, ws, ws, 3C)
            groups, gh, gw = b * nh * nw, ws, ws
        else:
            groups, gh, gw = b, h, w
        q, k, v = qkv.reshape(groups, gh * gw, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else None
        out = attention_core(q, k, v, self.scale, rel_pos, (gh, gw), self.core)  # (groups, heads, N, c)
        out = out.transpose(1, 2).reshape(groups, gh, gw, dim)
        if ws:
            out = out.view(b, nh, nw, ws, ws, dim).transpose(2, 3).reshape(b, nh * ws, nw * ws, dim)
            out = out[:, :h, :w]
        return self.proj(out)


def use_fast_attention(encoder: nn.Module, global_core: str = "augmented", window_core: str = "augmented") -> int:
    """Swap ``FastViTAttention`` into the blocks of a SAM ``ImageEncoderViT`` (in place).

    ``global_core`` is used in global-attention blocks, ``window_core`` in windowed ones; each is ``mask``,
    ``augmented``, ``explicit`` or ``original`` (restore SAM's module). Returns how many blocks run the fast
    module. Encoders without SAM-style blocks (e.g. TinyViT) are left alone (returns 0).
    """
    for core in (global_core, window_core):
        if core not in MODES:
            raise ValueError(f"unknown attention mode {core!r} ({'|'.join(MODES)})")
    count = 0
    for block in getattr(encoder, "blocks", ()):
        attn = getattr(block, "attn", None)
        if isinstance(attn, FastViTAttention):  # swapped before: start again from SAM's module
            fast, attn = attn, attn.original
            attn.qkv, attn.proj = fast.qkv, fast.proj  # e.g. LoRA merged after the swap
            block.attn, block.window_size = attn, fast.window_size
        if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "use_rel_pos") \
                or not hasattr(block, "window_size"):
            continue
        window = int(block.window_size)
        core = window_core if window else global_core
        if core == "original":
            continue
        block.attn = FastViTAttention(attn, window, core)
        block.window_size = 0  # the fast module partitions windows itself
        count += 1
    return count
