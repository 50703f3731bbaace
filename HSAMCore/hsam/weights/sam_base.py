"""An untrained H-SAM built from Meta's SAM checkpoint: where the authors' training starts.

SAM's image encoder (resized to the input size, see :func:`hsam.model.encoders.resize_sam_encoder_state`) with fresh
LoRA adapters (A kaiming-uniform, B zero: the encoder initially computes SAM's function), SAM's prompt encoder,
and stage 1 from SAM's mask decoder (two-way transformer, IoU token, output upscaling); the class-specific parts
(class tokens, hyper-MLPs, IoU head) and stage 2 start fresh. The description says ``"heads_trained": false``:
train (``hsam train --base sam-vit-b``) before segmenting.
"""

from __future__ import annotations

from pathlib import Path

from ..data.labels import LabelSet
from ..errors import ModelFileError
from .checkpoints import KIND_SAM, detect_kind, load_torch_checkpoint

_FRESH = ("stage1.mask_tokens.", "stage1.output_hypernetworks_mlps.", "stage1.iou_prediction_head.", "stage2.")
_SAM_CLASS_SPECIFIC = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                       "mask_decoder.iou_prediction_head.")


def build_sam_base(sam_checkpoint: str | Path | dict, labels: LabelSet, image_size: int = 512, lora_rank: int = 5,
                   variant: str = "vit_b", seed: int = 2345, name: str = "sam-vit-b-base",
                   architecture: dict | None = None):
    """(model in eval mode, description) of an untrained H-SAM for ``labels`` on SAM's pretrained parts.

    ``sam_checkpoint``: Meta's ``sam_vit_b_01ec64.pth`` (a path or a loaded state dict); ``architecture``
    replaces the SAM-ViT architecture (tests). Fresh parts are initialised under ``seed``."""
    import torch

    from ..description import sam_vit_architecture
    from ..model import build_from_description
    from ..model.encoders import resize_sam_encoder_state
    from .official import load_strict, synapse_description

    sam_state = sam_checkpoint if isinstance(sam_checkpoint, dict) else load_torch_checkpoint(sam_checkpoint)
    if detect_kind(sam_state) != KIND_SAM:
        raise ModelFileError("not a SAM checkpoint (image_encoder.* + mask_decoder.*): give Meta's "
                             "sam_vit_b_01ec64.pth (`hsam models fetch sam-vit-b`)")
    provenance = {"source": "SAM checkpoint (Meta AI) + fresh LoRA, class heads and stage 2",
                  "sam_checkpoint": str(sam_checkpoint) if not isinstance(sam_checkpoint, dict) else "<in memory>",
                  "heads_trained": False}
    description = synapse_description(name, image_size, lora_rank, variant, labels, provenance)
    description = description.with_changes(
        title=f"untrained H-SAM on SAM {variant} for {labels.name}",
        architecture=architecture or sam_vit_architecture(variant, image_size=image_size, lora_rank=lora_rank),
        licence="SAM encoder and decoder: Apache-2.0 (Meta AI)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_from_description(description)
    state = {}
    for key, value in sam_state.items():
        if key.startswith(("image_encoder.", "prompt_encoder.")):
            state[key] = value
        elif key.startswith(_SAM_CLASS_SPECIFIC):
            continue
        elif key.startswith("mask_decoder."):
            state["stage1." + key[len("mask_decoder."):]] = value
    fresh = model.state_dict()
    state = resize_sam_encoder_state(state, model.image_encoder)
    kept = {k: v for k, v in state.items() if k in fresh}
    unexpected = sorted(set(state) - set(fresh))
    if unexpected:
        raise ModelFileError(f"the SAM checkpoint has {len(unexpected)} tensors this {variant} H-SAM does not "
                             f"(e.g. {unexpected[0]}): another SAM variant?")
    lacking = [k for k in fresh if k not in kept and ".lora_" not in k and not k.startswith(_FRESH)]
    if lacking:
        raise ModelFileError(f"the SAM checkpoint lacks {len(lacking)} pretrained tensors (e.g. {lacking[0]})")
    load_strict(model, {**fresh, **kept}, "SAM")
    return model.eval(), description
