"""Build H-SAM from Meta's SAM checkpoint plus an official H-SAM file (``220_epoch_299.pth`` layout).

The official file holds the LoRA adapters (``w_a_###`` = A (r, dim), ``w_b_###`` = B (dim, r); index 2i is the
q-adapter of encoder block i, 2i+1 its v-adapter), the prompt encoder (``prompt_encoder.*`` and a duplicate
``prompt_encoder2.*``), stage 1 (``mask_decoder.*``) and stage 2 (``mask_decoder2.*``), but no encoder: that
comes from SAM, resized to the input size. Published parameters that compute nothing are accepted and
ignored (reported): the dead "mask-guided self-attention" branch of stage 2, its unused LayerNorms, and the
unused IoU head of stage 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..data.labels import SYNAPSE_ORGANS, LabelSet
from ..description import IntensitySpec, ModelDescription, sam_vit_architecture
from ..errors import ModelFileError
from .checkpoints import KIND_HSAM_OFFICIAL, KIND_SAM, detect_kind, load_torch_checkpoint

log = logging.getLogger(__name__)

# Official stage-2 keys that feed nothing our forward pass computes.
_STAGE2_DEAD_PREFIXES = ("mask_decoder2.med_sel.", "mask_decoder2.self_attn.", "mask_decoder2.self_attn2.",
                         "mask_decoder2.norm1.", "mask_decoder2.norm2.", "mask_decoder2.mlp.",
                         "mask_decoder2.iou_prediction_head.")
_STAGE2_RENAMES = (("mask_decoder2.transformer2.", "stage2.transformer."),
                   ("mask_decoder2.mask_tokens.", "stage2.mask_tokens."),
                   ("mask_decoder2.output_upscaling.", "stage2.output_upscaling."),
                   ("mask_decoder2.skip_connect.", "stage2.pixel_decoder."),
                   ("mask_decoder2.output_hypernetworks_mlps2.", "stage2.output_hypernetworks_mlps."))
_UNUSED_ATTENTION_NORMS = (".norm1.", ".norm2.", ".norm3.")
SAM_POINT_EMBEDDINGS = 4  # SAM's PromptEncoder: 2 point labels + 2 box corners


@dataclass
class ImportReport:
    """What an import took, and what it accepted but ignored (counts in tensors and parameters)."""

    ignored_keys: list[str] = field(default_factory=list)
    ignored_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"ignored {len(self.ignored_keys)} published tensors ({self.ignored_parameters:,} parameters) "
                "that compute nothing in H-SAM's forward pass")
        return "; ".join([text, *self.notes])


def synapse_description(name: str = "hsam-synapse-10pct", image_size: int = 512, lora_rank: int = 5,
                        variant: str = "vit_b", labels: LabelSet = SYNAPSE_ORGANS, provenance: dict | None = None
                        ) -> ModelDescription:
    """The description of the authors' Synapse models (CT window [−125, 275] HU, 8 organs)."""
    from ..data.synapse import SYNAPSE_ORIENTATION

    return ModelDescription(
        name=name, title="H-SAM, Synapse multi-organ CT (official weights)",
        architecture=sam_vit_architecture(variant, image_size=image_size, lora_rank=lora_rank),
        labels=labels, intensity=IntensitySpec("window", -125.0, 275.0, "CT"), orientation=SYNAPSE_ORIENTATION,
        fusion="mean", provenance=provenance or {},
        licence="H-SAM weights: MIT (Cheng et al., CVPR 2024); SAM encoder: Apache-2.0 (Meta AI)")


def convert_official(sam_state: dict, hsam_state: dict, encoder_depth: int) -> tuple[dict, ImportReport]:
    """Our state dict (before encoder resizing) from SAM's and the official H-SAM file's tensors."""
    report = ImportReport()
    out = {k: v for k, v in sam_state.items() if k.startswith("image_encoder.")}
    for i in range(encoder_depth):
        prefix = f"image_encoder.blocks.{i}.attn.qkv."
        for part, index in (("q", 2 * i), ("v", 2 * i + 1)):
            try:
                out[prefix + f"lora_{part}_a"] = hsam_state[f"w_a_{index:03d}"]
                out[prefix + f"lora_{part}_b"] = hsam_state[f"w_b_{index:03d}"]
            except KeyError as exc:
                raise ModelFileError(f"the H-SAM file lacks LoRA tensor {exc.args[0]} for encoder block {i}: "
                                     "it was trained for another encoder depth") from exc
    extra_lora = [k for k in hsam_state if k.startswith(("w_a_", "w_b_")) and int(k[4:]) >= 2 * encoder_depth]
    if extra_lora:
        raise ModelFileError(f"the H-SAM file has LoRA tensors for more than {encoder_depth} encoder blocks "
                             f"({extra_lora[0]}…): it was trained for a deeper encoder (ViT-L/H?)")
    for key, value in hsam_state.items():
        if key.startswith(("w_a_", "w_b_")):
            continue
        if key.startswith("prompt_encoder.point_embeddings.") and int(key.split(".")[2]) >= SAM_POINT_EMBEDDINGS:
            report.ignored_keys.append(key)  # H-SAM's extra point embeddings; no point prompts here
        elif key.startswith("prompt_encoder."):
            out[key] = value
        elif key.startswith("prompt_encoder2."):
            twin = hsam_state.get("prompt_encoder." + key[len("prompt_encoder2."):])
            if twin is None or not bool((twin == value).all()):
                report.notes.append(f"{key} differs from its prompt_encoder twin; the shared one is used")
            report.ignored_keys.append(key)
        elif key.startswith("mask_decoder."):
            out["stage1." + key[len("mask_decoder."):]] = value
        elif key.startswith(_STAGE2_DEAD_PREFIXES):
            report.ignored_keys.append(key)
        elif key.startswith("mask_decoder2.transformer2.") and any(n in key for n in _UNUSED_ATTENTION_NORMS) \
                and ".cross_attn_" in key:
            report.ignored_keys.append(key)
        else:
            for old, new in _STAGE2_RENAMES:
                if key.startswith(old):
                    out[new + key[len(old):]] = value
                    break
            else:
                raise ModelFileError(f"unexpected tensor {key!r} in the H-SAM file: not the official layout")
    report.ignored_parameters = sum(int(hsam_state[k].numel()) for k in report.ignored_keys)
    return out, report


def load_official(sam_checkpoint: str | Path | dict, hsam_checkpoint: str | Path | dict, image_size: int = 512,
                  variant: str = "vit_b", labels: LabelSet = SYNAPSE_ORGANS, name: str = "hsam-synapse-10pct"):
    """SAM checkpoint + official H-SAM file → (model in eval mode, description, ImportReport).

    Either argument may be a path or an already loaded state dict (tests build them in memory).
    """
    from ..model import build_from_description
    from ..model.encoders import resize_sam_encoder_state

    sam_state = sam_checkpoint if isinstance(sam_checkpoint, dict) else load_torch_checkpoint(sam_checkpoint)
    hsam_state = hsam_checkpoint if isinstance(hsam_checkpoint, dict) else load_torch_checkpoint(hsam_checkpoint)
    if detect_kind(sam_state) != KIND_SAM:
        raise ModelFileError("the SAM checkpoint argument is not a SAM checkpoint (image_encoder + mask_decoder)")
    if detect_kind(hsam_state) != KIND_HSAM_OFFICIAL:
        raise ModelFileError("the H-SAM checkpoint argument is not an official H-SAM file (w_a_###, mask_decoder2.*)")
    lora_rank = int(hsam_state["w_a_000"].shape[0])
    num_classes = int(hsam_state["mask_decoder.mask_tokens.weight"].shape[0])
    if num_classes != labels.num_classes:
        raise ModelFileError(f"the H-SAM file has {num_classes} class tokens but the label set {labels.name!r} "
                             f"needs {labels.num_classes} (classes + background)")
    provenance = {
        "source": "official H-SAM checkpoint + SAM encoder",
        "sam_checkpoint": str(sam_checkpoint) if not isinstance(sam_checkpoint, dict) else "<in memory>",
        "hsam_checkpoint": str(hsam_checkpoint) if not isinstance(hsam_checkpoint, dict) else "<in memory>",
    }
    description = synapse_description(name, image_size, lora_rank, variant, labels, provenance)
    import torch

    with torch.device("meta"):  # only the encoder's shapes are needed, to resize the SAM weights to
        template = build_from_description(description)
    state, report = convert_official(sam_state, hsam_state, len(template.image_encoder.blocks))
    state = resize_sam_encoder_state(state, template.image_encoder)
    del template, sam_state, hsam_state
    model = build_with_weights(description, state, "official H-SAM")
    log.info("loaded official H-SAM weights: %s", report.summary())
    description = description.with_changes(provenance={**provenance, "import_report": report.summary()})
    return model.eval(), description, report


TENSOR_ALIGNMENT = 64  # bytes, as torch's CPU allocator aligns


def build_with_weights(description, state: dict, what: str):
    """The model ``description`` describes, holding the tensors of ``state`` themselves (no second copy).

    Built on the meta device and the state's tensors assigned (cast to each parameter's dtype where they
    differ), so loading never holds the weights twice nor spends time on random initialisation: loading a
    ViT-B/512 model file peaked at +923 MB before and +546 MB after (importing the model code 164 MB, the
    weights 376 MB; ``Testing/benchmarks/memory_profile.py``, with the file read of ``read_model_file``). Architectures that cannot be built on the meta device (TinyViT
    computes values at construction) are built normally and the state is copied in. The same readable
    errors as :func:`load_strict`. ``state`` ends up holding the model's own tensors."""
    import torch

    from ..model import build_from_description

    try:
        with torch.device("meta"):
            model = build_from_description(description)
    except (RuntimeError, NotImplementedError):
        model = build_from_description(description)
        load_strict(model, state, what)
        return model
    own = model.state_dict()
    check_keys(own, state, what)
    owned = {}
    for key in list(state):  # one tensor at a time, so a copy made here never coexists with all the originals
        owned[key] = _own_tensor(state.pop(key), own[key].dtype)
    model.load_state_dict(owned, strict=True, assign=True)
    state.update(owned)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # tensors the state dict does not carry (none in our architectures): build normally instead
        model = build_from_description(description)
        load_strict(model, state, what)
    return model


def _own_tensor(value, dtype):
    """``value`` as a parameter may hold it: ``dtype``, contiguous and aligned like a fresh allocation (the
    kernels, hence the results, are then exactly those of a normally loaded model; safetensors' ``load_file``
    returns tensors at arbitrary byte offsets), and not a view that keeps a larger storage alive."""
    import torch

    if value.dtype != dtype:
        value = value.to(dtype)
    if not value.is_contiguous() or value.untyped_storage().nbytes() > value.nbytes \
            or value.data_ptr() % TENSOR_ALIGNMENT:
        value = value.clone(memory_format=torch.contiguous_format)
    return value


def check_keys(own: dict, state: dict, what: str) -> None:
    """ModelFileError unless ``state`` has exactly the keys and shapes of the model's ``own`` state dict."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} of another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        raise ModelFileError(f"{what} weights do not fit this architecture: {'; '.join(parts)}")


def load_strict(model, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable message on missing / unexpected / mis-shaped keys."""
    check_keys(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)
