"""Label sets: class values, names, colours and standard (SNOMED CT) terminology.

No torch here: the Slicer panel reads label sets before torch is installed.

A label set lists the foreground classes of a model; value 0 is always background and is not listed.
Slicer stores terminology on each segment as one string (``Segment.GetTerminologyEntryTagName()``):
``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier`` where each
coded entry is ``scheme^value^meaning`` (in a ``.seg.nrrd`` header a ``|`` ends each tag).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import HSAMError

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """One coded concept, e.g. ``Code("SCT", "10200004", "Liver")``."""

    scheme: str
    value: str
    meaning: str

    def to_slicer(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> "Code | None":
        parts = text.split("^")
        if len(parts) != 3 or not any(parts):
            return None
        return cls(*parts)


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Terminology:
    """Category / type / modifier of one segment (DICOM SEG "segmented property")."""

    type: Code
    category: Code = ANATOMICAL_STRUCTURE
    modifier: Code | None = None

    def to_slicer_tag(self) -> str:
        modifier = self.modifier.to_slicer() if self.modifier else "^^"
        return (f"{TERMINOLOGY_CONTEXT}~{self.category.to_slicer()}~{self.type.to_slicer()}~{modifier}"
                f"~{ANATOMIC_CONTEXT}~^^~^^")

    @classmethod
    def from_slicer_tag(cls, tag: str) -> "Terminology":
        parts = tag.rstrip("|").split("~")
        if len(parts) < 4:
            raise ValueError(f"not a Slicer terminology entry: {tag!r}")
        category, type_, modifier = (Code.parse(p) for p in parts[1:4])
        if category is None or type_ is None:
            raise ValueError(f"terminology entry without category or type: {tag!r}")
        return cls(type=type_, category=category, modifier=modifier)

    def to_json(self) -> dict:
        out = {"category": list(_code_tuple(self.category)), "type": list(_code_tuple(self.type))}
        if self.modifier:
            out["modifier"] = list(_code_tuple(self.modifier))
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Terminology":
        return cls(type=Code(*data["type"]), category=Code(*data.get("category", _code_tuple(ANATOMICAL_STRUCTURE))),
                   modifier=Code(*data["modifier"]) if data.get("modifier") else None)


def _code_tuple(code: Code) -> tuple[str, str, str]:
    return (code.scheme, code.value, code.meaning)


@dataclass(frozen=True)
class LabelClass:
    """One foreground class: its value in label maps (1..255), name, RGB colour (0-255), terminology."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: Terminology | None = None

    def __post_init__(self) -> None:
        if not 1 <= int(self.value) <= 255:
            raise ValueError(f"label value {self.value} of {self.name!r} is outside 1..255")
        if len(self.color) != 3 or not all(0 <= int(c) <= 255 for c in self.color):
            raise ValueError(f"colour {self.color} of {self.name!r} is not an RGB triple in 0..255")

    def to_json(self) -> dict:
        out = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.terminology:
            out["terminology"] = self.terminology.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> "LabelClass":
        term = data.get("terminology")
        return cls(value=int(data["value"]), name=str(data["name"]), color=tuple(int(c) for c in data["color"]),
                   terminology=Terminology.from_json(term) if term else None)


@dataclass(frozen=True)
class LabelSet:
    """The foreground classes of a model. Class index k of the network output = ``classes[k-1]``;
    the network has ``num_classes = len(classes) + 1`` outputs (background first)."""

    name: str
    classes: tuple[LabelClass, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        values = [c.value for c in self.classes]
        if len(set(values)) != len(values):
            raise ValueError(f"label set {self.name!r} repeats a label value: {values}")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"label set {self.name!r} repeats a class name: {names}")
        if not self.classes:
            raise ValueError(f"label set {self.name!r} has no classes")

    @property
    def num_classes(self) -> int:
        """Network outputs including background."""
        return len(self.classes) + 1

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(c.value for c in self.classes)

    def by_value(self, value: int) -> LabelClass:
        for c in self.classes:
            if c.value == value:
                return c
        raise KeyError(value)

    def index_to_value_lut(self) -> list[int]:
        """Lookup table network class index (0..K-1) → label value (0 for background)."""
        return [0] + [c.value for c in self.classes]

    def check_values(self, present: Iterable[int]) -> None:
        """Raise a clear error if a label map holds values this set does not define."""
        unknown = sorted(set(int(v) for v in present) - {0} - set(self.values))
        if unknown:
            raise HSAMError(
                f"label values {unknown} are not in the label set {self.name!r} (known: {list(self.values)}); "
                "relabel them, or give a label table that names them")

    def to_json(self) -> dict:
        return {"name": self.name, "classes": [c.to_json() for c in self.classes]}

    @classmethod
    def from_json(cls, data: dict) -> "LabelSet":
        return cls(name=str(data["name"]), classes=tuple(LabelClass.from_json(c) for c in data["classes"]))

    @classmethod
    def from_table(cls, path: str | Path, name: str | None = None) -> "LabelSet":
        """Read a label table: our JSON layout, a CSV/TSV with columns ``value,name[,r,g,b]`` (a header
        row is optional; missing colours get a distinct default), or a Slicer/ITK-SNAP-style colour
        table (``.ctbl``/``.txt``/``.lut``: ``value name r g b [a]`` separated by blanks, ``_`` for spaces)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        if suffix in (".ctbl", ".txt", ".lut"):
            rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
            rows = [[row[0], row[1].replace("_", " "), *row[2:]] if len(row) >= 2 else row for row in rows]
        else:
            with path.open(encoding="utf-8", newline="") as fh:
                rows = list(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        classes = []
        for row in rows:
            row = [c.strip() for c in row if c.strip()]
            if not row or row[0].startswith("#") or not row[0].lstrip("-").isdigit() or int(row[0]) == 0:
                continue
            value = int(row[0])
            color = tuple(int(float(c)) for c in row[2:5]) if len(row) >= 5 else default_color(value)
            classes.append(LabelClass(value=value, name=row[1], color=color))
        return cls(name=name or path.stem, classes=tuple(classes))


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]


def default_color(value: int) -> tuple[int, int, int]:
    """A distinct colour for label values without one."""
    return _PALETTE[(value - 1) % len(_PALETTE)]


def _sct(value: str, meaning: str) -> Code:
    return Code("SCT", value, meaning)


KIDNEY = _sct("64033007", "Kidney")

# Synapse multi-organ CT (BTCV subset) as the H-SAM authors train it; colours as TotalSegmentator uses them.
SYNAPSE_ORGANS = LabelSet(
    name="synapse-8-organs",
    classes=(
        LabelClass(1, "spleen", (157, 108, 162), Terminology(_sct("78961009", "Spleen"))),
        LabelClass(2, "right kidney", (212, 126, 151), Terminology(KIDNEY, modifier=_sct("24028007", "Right"))),
        LabelClass(3, "left kidney", (212, 126, 151), Terminology(KIDNEY, modifier=_sct("7771000", "Left"))),
        LabelClass(4, "gallbladder", (139, 150, 98), Terminology(_sct("28231008", "Gallbladder"))),
        LabelClass(5, "liver", (221, 130, 101), Terminology(_sct("10200004", "Liver"))),
        LabelClass(6, "stomach", (160, 139, 76), Terminology(_sct("69695003", "Stomach"))),
        LabelClass(7, "aorta", (224, 97, 76), Terminology(_sct("15825003", "Aorta"))),
        LabelClass(8, "pancreas", (249, 180, 111), Terminology(_sct("15776009", "Pancreas"))),
    ),
)

BUILTIN_LABEL_SETS = {SYNAPSE_ORGANS.name: SYNAPSE_ORGANS}
