"""The description every model file carries: what the network is and how to feed it.

No torch here. Nothing about a model is hard-coded elsewhere: the engine reads the input size,
intensity preprocessing, orientation and label set from this description.

JSON layout (``ModelDescription.to_json``)::

    {"format": "hsam-model", "format_version": 1, "name": ..., "title": ...,
     "architecture": {"backbone": "sam_vit" | "litemedsam", "image_size": 512, "encoder": {...},
                      "lora_rank": 5, "decoder": {...}},
     "fusion": "mean" | "stage2",
     "labels": {"name": ..., "classes": [{"value", "name", "color", "terminology"}, ...]},
     "intensity": {"kind": "window", "low": -125, "high": 275, "modality": "CT"},
     "orientation": {"slice": "S", "row": "P", "column": "L", "verified": false, "source": "..."},
     "provenance": {...}, "licence": "..."}
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from .data.labels import LabelSet

FORMAT_NAME = "hsam-model"
FORMAT_VERSION = 1

# SAM image encoders (Kirillov et al. 2023). Keys are ImageEncoderViT's constructor arguments.
SAM_VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": [7, 15, 23, 31]},
}
SAM_VIT_COMMON = {"patch_size": 16, "window_size": 14, "mlp_ratio": 4.0, "out_chans": 256}

# H-SAM decoders (both stages). transformer_dim must equal the encoder's out_chans.
DEFAULT_DECODER: dict[str, Any] = {
    "transformer_dim": 256, "transformer_depth": 2, "num_heads": 8, "mlp_dim": 2048,
    "upscale_channels": [64, 32], "pixel_decoder_channels": [32, 16],
    "stage1_mlp_depth": 3, "stage2_mlp_depth": 5, "iou_head_depth": 3,
}

AXIS_LETTERS = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}


class DescriptionError(ValueError):
    """A model description is malformed."""


@dataclass(frozen=True)
class IntensitySpec:
    """How raw voxel values become the network's [0, 1] input.

    ``window``: clip to [low, high] (e.g. CT HU), then (x - low) / (high - low).
    ``percentile``: per volume, clip to its [low, high] percentiles of non-background voxels, then scale.
    ``modality`` is what the model was trained on ("CT", "MR"); the engine warns on other ranges.
    """

    kind: str = "window"
    low: float = -125.0
    high: float = 275.0
    modality: str = "CT"

    def __post_init__(self) -> None:
        if self.kind not in ("window", "percentile"):
            raise DescriptionError(f"unknown intensity kind {self.kind!r} (window|percentile)")
        if not self.high > self.low:
            raise DescriptionError(f"intensity high ({self.high}) must exceed low ({self.low})")
        if self.kind == "percentile" and not (0 <= self.low < self.high <= 100):
            raise DescriptionError("percentiles must satisfy 0 <= low < high <= 100")

    def to_json(self) -> dict:
        return {"kind": self.kind, "low": self.low, "high": self.high, "modality": self.modality}

    @classmethod
    def from_json(cls, d: dict) -> "IntensitySpec":
        return cls(kind=d["kind"], low=float(d["low"]), high=float(d["high"]), modality=d.get("modality", "CT"))


@dataclass(frozen=True)
class OrientationSpec:
    """Orientation of the model's slice stack (slices, rows, columns): for each array axis, the patient
    direction (L/R/A/P/S/I) toward which its index increases. ``slice=S, row=P, column=L`` is a DICOM axial
    stack as SimpleITK reads it (i→L, j→P, k→S). ``verified`` says whether the training data's orientation
    was confirmed from a reliable source; ``source`` says where it comes from."""

    slice: str = "S"
    row: str = "P"
    column: str = "L"
    verified: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        letters = (self.slice, self.row, self.column)
        if any(a not in AXIS_LETTERS for a in letters):
            raise DescriptionError(f"orientation letters must be in LRAPSI, got {letters}")
        axes = {frozenset((a, AXIS_LETTERS[a])) for a in letters}
        if len(axes) != 3:
            raise DescriptionError(f"orientation {letters} names one patient axis twice")

    @property
    def code(self) -> str:
        """Slice, row, column letters, e.g. ``"SPL"``."""
        return self.slice + self.row + self.column

    def to_json(self) -> dict:
        return {"slice": self.slice, "row": self.row, "column": self.column,
                "verified": self.verified, "source": self.source}

    @classmethod
    def from_json(cls, d: dict) -> "OrientationSpec":
        return cls(slice=d["slice"], row=d["row"], column=d["column"], verified=bool(d.get("verified", False)),
                   source=str(d.get("source", "")))

    @classmethod
    def from_code(cls, code: str, source: str = "user override") -> "OrientationSpec":
        code = code.upper()
        if len(code) != 3:
            raise DescriptionError(f"orientation code must be 3 letters (slice,row,column), got {code!r}")
        return cls(slice=code[0], row=code[1], column=code[2], verified=False, source=source)


@dataclass(frozen=True)
class ModelDescription:
    """Everything about a model except its tensors."""

    name: str
    architecture: dict
    labels: LabelSet
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    orientation: OrientationSpec = field(default_factory=OrientationSpec)
    fusion: str = "mean"
    title: str = ""
    provenance: dict = field(default_factory=dict)
    licence: str = ""

    def __post_init__(self) -> None:
        if self.fusion not in ("mean", "stage2"):
            raise DescriptionError(f"unknown fusion {self.fusion!r} (mean|stage2)")
        arch = self.architecture
        for key in ("backbone", "image_size"):
            if key not in arch:
                raise DescriptionError(f"architecture lacks {key!r}")
        if arch["backbone"] not in ("sam_vit", "litemedsam"):
            raise DescriptionError(f"unknown backbone {arch['backbone']!r} (sam_vit|litemedsam)")

    @property
    def backbone(self) -> str:
        return self.architecture["backbone"]

    @property
    def image_size(self) -> int:
        return int(self.architecture["image_size"])

    @property
    def num_classes(self) -> int:
        """Network outputs including background."""
        return self.labels.num_classes

    def with_changes(self, **changes: Any) -> "ModelDescription":
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update(changes)
        return ModelDescription(**data)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": self.name, "title": self.title,
            "architecture": copy.deepcopy(self.architecture), "fusion": self.fusion,
            "labels": self.labels.to_json(), "intensity": self.intensity.to_json(),
            "orientation": self.orientation.to_json(), "provenance": copy.deepcopy(self.provenance),
            "licence": self.licence,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: dict) -> "ModelDescription":
        if d.get("format") != FORMAT_NAME:
            raise DescriptionError(f"not an H-SAM model description (format={d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise DescriptionError(f"model description version {d['format_version']} is newer than this "
                                   f"hsam ({FORMAT_VERSION}); update hsam")
        try:
            return cls(name=d["name"], title=d.get("title", ""), architecture=d["architecture"],
                       labels=LabelSet.from_json(d["labels"]), intensity=IntensitySpec.from_json(d["intensity"]),
                       orientation=OrientationSpec.from_json(d["orientation"]), fusion=d.get("fusion", "mean"),
                       provenance=d.get("provenance", {}), licence=d.get("licence", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise DescriptionError(f"malformed model description: {exc}") from exc

    @classmethod
    def loads(cls, text: str) -> "ModelDescription":
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise DescriptionError(f"model description is not valid JSON: {exc}") from exc


def sam_vit_architecture(variant: str = "vit_b", image_size: int = 512, lora_rank: int = 5,
                         **overrides: Any) -> dict:
    """Architecture dict of an H-SAM on a SAM ViT encoder (``variant`` vit_b|vit_l|vit_h).
    ``overrides`` may replace encoder keys (e.g. a tiny test encoder) or give ``decoder``."""
    if variant not in SAM_VIT_PRESETS:
        raise DescriptionError(f"unknown SAM variant {variant!r} ({'|'.join(SAM_VIT_PRESETS)})")
    decoder = dict(DEFAULT_DECODER)
    decoder.update(overrides.pop("decoder", {}))
    encoder = {**SAM_VIT_COMMON, **SAM_VIT_PRESETS[variant], **overrides}
    return {"backbone": "sam_vit", "variant": variant, "image_size": int(image_size), "encoder": encoder,
            "lora_rank": int(lora_rank), "decoder": decoder}


def litemedsam_architecture(image_size: int = 256) -> dict:
    """Architecture dict of an H-SAM on LiteMedSAM's TinyViT encoder (256 px → 256×64×64)."""
    return {"backbone": "litemedsam", "image_size": int(image_size), "encoder": {"embedding_grid": image_size // 4},
            "lora_rank": 0, "decoder": dict(DEFAULT_DECODER)}
