"""The AAL atlas grouped into a few large structures, and the Colin27 volume it is drawn on.

AAL — Automated Anatomical Labeling: Tzourio-Mazoyer N, Landeau B, Papathanassiou D, Crivello F, Etard O,
Delcroix N, Mazoyer B, Joliot M. "Automated anatomical labeling of activations in SPM using a macroscopic
anatomical parcellation of the MNI MRI single-subject brain." NeuroImage 15(1):273–289, 2002.
Its 116 regions are drawn on the Colin27 single-subject T1 template (Holmes et al., J Comput Assist Tomogr
22(2):324–333, 1998). Debian's ``mricron-data`` ships both on one grid (``ch2.nii.gz``, ``aal.nii.gz``) and
the region names (``aal.nii.txt``). ``tables/aal_groups.json`` groups the regions by their AAL code family
into 7 structures (see the file). No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputVolumeError
from .labels import LabelClass, LabelSet, Terminology

TABLE = Path(__file__).resolve().parent / "tables" / "aal_groups.json"
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
COLIN27_T1 = "ch2.nii.gz"
AAL_ATLAS = "aal.nii.gz"
AAL_NAMES = "aal.nii.txt"


@dataclass(frozen=True)
class AALGroups:
    """The grouping: a label set (one class per structure) and a lookup table AAL value → structure value."""

    labelset: LabelSet
    lut: np.ndarray  # (256,) uint8
    regions: dict[int, list[str]]  # structure value → AAL region names
    citation: str
    table: dict

    def group(self, aal: np.ndarray) -> np.ndarray:
        """An AAL label array (any shape, values 0..116) → structure values (uint8)."""
        aal = np.asarray(aal)
        if aal.size and (aal.min() < 0 or aal.max() > 255):
            raise InputVolumeError(f"AAL label values must lie in 0..255, got {aal.min()}..{aal.max()}")
        return self.lut[aal.astype(np.int64)]


def load_aal_groups(path: str | Path | None = None) -> AALGroups:
    """Read ``aal_groups.json`` (or ``path``)."""
    table = json.loads(Path(path or TABLE).read_text(encoding="utf-8"))
    classes = []
    lut = np.zeros(256, dtype=np.uint8)
    regions = {}
    for g in table["groups"]:
        term = Terminology.from_json(g["terminology"]) if g.get("terminology") else None
        classes.append(LabelClass(value=int(g["value"]), name=g["name"], color=tuple(g["color"]), terminology=term))
        for v in g["aal_values"]:
            if lut[v]:
                raise ValueError(f"AAL value {v} is in two groups of {path or TABLE}")
            lut[v] = int(g["value"])
        regions[int(g["value"])] = list(g["aal_regions"])
    return AALGroups(LabelSet(name=table["name"], classes=tuple(classes)), lut, regions, table["citation"], table)


def check_region_names(groups: AALGroups, names_file: str | Path) -> None:
    """Check the grouping against an atlas's own ``aal.nii.txt`` (``value name code`` per line): every region
    named in the table must carry that value there. Raises InputVolumeError naming the first mismatch."""
    names = {}
    for line in Path(names_file).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    for g in groups.table["groups"]:
        for value, region in zip(g["aal_values"], g["aal_regions"]):
            if names.get(value) != region:
                raise InputVolumeError(f"{names_file}: AAL value {value} is {names.get(value)!r}, but the grouping "
                                       f"expects {region!r}: this is another AAL version")


def colin27_paths(folder: str | Path | None = None) -> tuple[Path, Path, Path]:
    """(T1, AAL, names) under ``folder`` (default: Debian's mricron-data templates). InputVolumeError if missing."""
    folder = Path(folder) if folder else MRICRON_TEMPLATES
    paths = tuple(folder / n for n in (COLIN27_T1, AAL_ATLAS, AAL_NAMES))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputVolumeError(f"the Colin27 / AAL data is missing ({', '.join(missing)}): install the Debian package "
                               "mricron-data (sudo apt-get install mricron-data), or give the folder holding "
                               f"{COLIN27_T1}, {AAL_ATLAS} and {AAL_NAMES}")
    return paths  # type: ignore[return-value]
