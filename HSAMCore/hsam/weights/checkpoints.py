"""Reading foreign PyTorch checkpoints safely and telling their layouts apart.

Foreign ``.pth`` files are loaded only with ``torch.load(weights_only=True, map_location="cpu")``:
tensors and plain containers, never arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFileError

KIND_HSAM_OFFICIAL = "hsam-official"
KIND_SAM = "sam"
KIND_LITEMEDSAM = "litemedsam"
KIND_HSAM_MODEL = "hsam-model"  # our safetensors format


def load_torch_checkpoint(path: str | Path) -> dict:
    """A flat ``{key: tensor}`` dict from a ``.pth``; clear errors for missing/truncated/unsafe files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError/zip errors
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(
            f"cannot read checkpoint {path.name}: {text}. The file is truncated, damaged or not a PyTorch "
            "weights file (only plain tensors are accepted); download it again or check its SHA-256") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelFileError(f"{path.name} does not hold a state dict of named tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_kind(state: dict) -> str:
    """Which layout a state dict has: official H-SAM, SAM, LiteMedSAM (or raise)."""
    keys = set(state)
    if "w_a_000" in keys and any(k.startswith("mask_decoder2.") for k in keys):
        return KIND_HSAM_OFFICIAL
    if "image_encoder.patch_embed.seq.0.c.weight" in keys:
        return KIND_LITEMEDSAM
    if "image_encoder.patch_embed.proj.weight" in keys and "mask_decoder.mask_tokens.weight" in keys:
        return KIND_SAM
    sample = ", ".join(sorted(keys)[:4])
    raise ModelFileError(f"unrecognised checkpoint layout (first keys: {sample}); expected an official H-SAM "
                         "file (w_a_000…, mask_decoder2.*), a SAM checkpoint or LiteMedSAM's lite_medsam.pth")
