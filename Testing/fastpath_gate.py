"""The accuracy gate every CPU fast path must pass before it is a default, and the real volumes it runs on.

Gate (performance issue): on each volume, the fast path's labels against the reference path's (fp32, every
slice through the model) agree on ≥ 99.5 % of the voxels, and per class the Dice between the two is ≥ 0.99
(classes present in either map; a class in only one of them has Dice 0).

Volumes (Debian packages): the Colin27 T1 MR (``mricron-data``; labels: the AAL atlas grouped into 7
structures, ``hsam.engine.fewshot.load_colin27``) and the InVesalius head CT ``Cranium.inv3``
(``invesalius-examples``; labels by threshold: bone > 300 HU, soft tissue -100…300 HU —
a real-data stand-in task). ``*_small`` versions shrink them in-plane (all slices kept) for tests.

Models: no trained H-SAM is available offline. ``trained_tiny`` fine-tunes the tiny test model (fast mode,
frozen random encoder, trained decoders) on every 10th slice of a volume, so the gate sees a model that has
learned what is background; untrained heads label even a blank image as organs, which says nothing about a
fast path (and the pipeline refuses untrained heads: ``LoadedModel.require_trained``).

Import from tests (``from fastpath_gate import ...``) or scripts (put ``Testing/`` on ``sys.path``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GATE_AGREEMENT = 0.995
GATE_DICE = 0.99
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
CRANIUM_CANDIDATES = (Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3"),
                      Path("/usr/share/invesalius/examples/Cranium.inv3"))


@dataclass
class GateResult:
    agreement: float
    dice: dict = field(default_factory=dict)  # class value → Dice between the two maps

    @property
    def min_dice(self) -> float:
        return min(self.dice.values()) if self.dice else 1.0

    @property
    def passes(self) -> bool:
        return self.agreement >= GATE_AGREEMENT and self.min_dice >= GATE_DICE

    def summary(self) -> str:
        worst = min(self.dice, key=self.dice.get) if self.dice else None
        return (f"agreement {self.agreement:.4%}, min per-class Dice {self.min_dice:.4f}"
                f"{f' (class {worst})' if worst is not None else ''} → {'PASS' if self.passes else 'FAIL'}")


def gate(reference: np.ndarray, candidate: np.ndarray) -> GateResult:
    """Voxel agreement and per-class Dice (non-zero values present in either) of two label maps."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    dice = {}
    for value in np.union1d(np.unique(reference), np.unique(candidate)):
        if value == 0:
            continue
        a, b = reference == value, candidate == value
        dice[int(value)] = float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    return GateResult(float(np.mean(reference == candidate)), dice)


# ------------------------------------------------------------------------------------------- the volumes
def cranium_path() -> Path | None:
    for path in CRANIUM_CANDIDATES:
        if path.is_file():
            return path
    found = shutil.which("dpkg")  # elsewhere: ask dpkg where the package put it
    if found:
        import subprocess

        out = subprocess.run([found, "-L", "invesalius-examples"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.lower().endswith("cranium.inv3"):
                return Path(line)
    return None


def cranium_labelset():
    from hsam.data.labels import LabelClass, LabelSet

    return LabelSet("cranium-threshold", (LabelClass(1, "bone", (241, 214, 145)),
                                          LabelClass(2, "soft tissue", (177, 122, 101))))


def cranium_labels(hu: np.ndarray) -> np.ndarray:
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[(hu > -100) & (hu <= 300)] = 2
    labels[hu > 300] = 1
    return labels


def colin27(shrink: int = 1):
    """(image, labels (k, j, i) uint8, labelset) of Colin27 + grouped AAL, shrunk in-plane by ``shrink``."""
    import SimpleITK as sitk

    from hsam.engine.fewshot import load_colin27

    case = load_colin27()
    atlas = sitk.GetImageFromArray(case.atlas)
    atlas.CopyInformation(case.image)
    image = case.image
    if shrink > 1:
        image = sitk.BinShrink(image, [shrink, shrink, 1])
        atlas = sitk.Shrink(atlas, [shrink, shrink, 1])
    return image, sitk.GetArrayFromImage(atlas), case.labelset


def cranium(shrink: int = 1):
    """(image, labels (k, j, i) uint8, labelset) of the InVesalius head CT with threshold labels."""
    import SimpleITK as sitk

    from hsam.data.volume import read_image

    path = cranium_path()
    if path is None:
        raise FileNotFoundError("Cranium.inv3 not found: install the Debian package invesalius-examples")
    image = read_image(path)
    if shrink > 1:
        image = sitk.BinShrink(image, [shrink, shrink, 1])
    return image, cranium_labels(sitk.GetArrayFromImage(image)), cranium_labelset()


def given_every(labels: np.ndarray, every: int = 10) -> list[int]:
    """Every ``every``-th k plane of the labelled extent."""
    planes = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    return list(range(int(planes[0]), int(planes[-1]) + 1, every))


def trained_tiny(image, labels: np.ndarray, labelset, intensity, *, steps: int = 600, lr: float = 5e-3,
                 seed: int = 0, workdir=None):
    """The tiny test model fine-tuned (fast mode) on every 10th slice of ``labels``; a ``LoadedModel``."""
    import tempfile

    from hsam_testlib import make_tiny_model_file
    from hsam.engine.finetune import finetune
    from hsam.weights.loader import load_model

    folder = Path(workdir or tempfile.mkdtemp(prefix="hsam-gate-"))
    base = load_model(checkpoint=make_tiny_model_file(folder / f"tiny-{seed}.safetensors", seed=seed,
                                                      intensity=intensity))
    result = finetune(image, labels, given_every(labels), base, labelset=labelset, save=False, cache=False,
                      device="cpu", precision="fp32", steps=steps, lr=lr, guidance=0.0, validation=0.0, seed=seed)
    return result.loaded
