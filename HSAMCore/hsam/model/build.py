"""Build an H-SAM network from a model description's architecture dict."""

from __future__ import annotations

from torch import nn

from ..description import ModelDescription
from .encoders import build_sam_vit, build_tinyvit
from .hsam import HSAM
from .stage1 import Stage1Decoder
from .stage2 import Stage2Decoder


def embedding_grid(architecture: dict) -> int:
    """Side g of the encoder's (C, g, g) embedding."""
    size = int(architecture["image_size"])
    if architecture["backbone"] == "litemedsam":
        return size // 4
    return size // int(architecture["encoder"]["patch_size"])


def build_hsam(architecture: dict, num_classes: int, fusion: str = "mean") -> HSAM:
    """A freshly initialised H-SAM (weights are loaded separately)."""
    from segment_anything.modeling import PromptEncoder

    size = int(architecture["image_size"])
    dec = architecture["decoder"]
    backbone = architecture["backbone"]
    if backbone == "sam_vit":
        encoder: nn.Module = build_sam_vit(size, architecture["encoder"], int(architecture.get("lora_rank", 0)))
        if int(architecture["encoder"]["out_chans"]) != int(dec["transformer_dim"]):
            raise ValueError("encoder out_chans must equal the decoder's transformer_dim")
    elif backbone == "litemedsam":
        if size != 256:
            raise ValueError("the LiteMedSAM backbone takes 256-px inputs")
        encoder = build_tinyvit()
    else:
        raise ValueError(f"unknown backbone {backbone!r}")
    grid = embedding_grid(architecture)
    dim = int(dec["transformer_dim"])
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                   mask_in_chans=16)
    common = dict(transformer_dim=dim, transformer_depth=int(dec["transformer_depth"]),
                  num_heads=int(dec["num_heads"]), mlp_dim=int(dec["mlp_dim"]),
                  upscale_channels=tuple(dec["upscale_channels"]))
    stage1 = Stage1Decoder(num_classes, mlp_depth=int(dec["stage1_mlp_depth"]),
                           iou_head_depth=int(dec["iou_head_depth"]), **common)
    pixel_upscale = size // (4 * grid)
    stage2 = Stage2Decoder(num_classes, pixel_decoder_channels=tuple(dec["pixel_decoder_channels"]),
                           stage1_channels=stage1.upscaled_channels, pixel_upscale=pixel_upscale,
                           mlp_depth=int(dec["stage2_mlp_depth"]), **common)
    return HSAM(encoder, prompt_encoder, stage1, stage2, image_size=size, fusion=fusion)


def build_from_description(description: ModelDescription) -> HSAM:
    return build_hsam(description.architecture, description.num_classes, description.fusion)
