"""Helpers shared by the test suites (import as ``from hsam_testlib import ...``; ``conftest`` is not
importable reliably: each suite folder may have its own)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_REFERENCE = SHARED / "fixtures" / "hsam_reference" / "reference_outputs.npz"


def reference_fixture_path() -> Path:
    """The official-equivalence fixture (``HSAM_REFERENCE_FIXTURE`` overrides the default)."""
    return Path(os.environ.get("HSAM_REFERENCE_FIXTURE", DEFAULT_REFERENCE))


# ------------------------------------------------------------------------------------------ tiny models
TINY_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=4, out_chans=32)
TINY_DECODER = dict(transformer_dim=32, mlp_dim=64, num_heads=2, upscale_channels=[8, 4],
                    pixel_decoder_channels=[4, 4])


def tiny_description(name: str = "tiny-test", image_size: int = 64, labels=None, **changes):
    """A model description with a tiny ViT (64 px, 2 blocks) for fast tests."""
    from hsam.data.labels import SYNAPSE_ORGANS
    from hsam.description import IntensitySpec, ModelDescription, OrientationSpec, sam_vit_architecture

    arch = sam_vit_architecture("vit_b", image_size=image_size, lora_rank=2, decoder=dict(TINY_DECODER),
                                **TINY_ENCODER)
    fields = dict(name=name, title="tiny test model", architecture=arch, labels=labels or SYNAPSE_ORGANS,
                  intensity=IntensitySpec("window", -125.0, 275.0, "CT"),
                  orientation=OrientationSpec(verified=True, source="test"), provenance={"source": "tests"},
                  licence="MIT")
    fields.update(changes)
    return ModelDescription(**fields)


def make_tiny_model_file(path, seed: int = 0, **description_changes):
    """Write a randomly initialised tiny model in our format; returns the path."""
    import torch

    from hsam.model import build_from_description
    from hsam.weights.modelfile import save_model_file

    torch.manual_seed(seed)
    description = tiny_description(**description_changes)
    model = build_from_description(description)
    # LoRA B starts at zero; give it values so merging is exercised.
    for name, param in model.named_parameters():
        if name.endswith(("lora_q_b", "lora_v_b")):
            torch.nn.init.normal_(param, std=0.02)
    save_model_file(path, {k: v.detach().clone() for k, v in model.state_dict().items()}, description)
    return path


def ct_like_volume(shape=(6, 40, 48), spacing=(0.8, 0.8, 2.5), seed: int = 0):
    """A small synthetic abdomen-like CT (HU): air, a body ellipse, two brighter 'organs'.
    ``shape`` is (k, j, i); returns a SimpleITK image."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    k, j, i = shape
    zz, yy, xx = np.meshgrid(np.arange(k), np.linspace(-1, 1, j), np.linspace(-1, 1, i), indexing="ij")
    volume = np.full(shape, -1000.0, dtype=np.float32)
    body = (xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1
    volume[body] = 20.0
    volume[((xx + 0.35) / 0.3) ** 2 + (yy / 0.3) ** 2 < 1] = 60.0
    volume[((xx - 0.4) / 0.15) ** 2 + ((yy + 0.1) / 0.15) ** 2 < 1] = 250.0
    volume += rng.normal(0, 5, shape).astype(np.float32)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    return image


def write_training_dataset(root, cases: int = 2, shape=(6, 32, 32)):
    """A tiny training set for ``hsam train``: ``root/images`` and ``root/labels`` with ``cases`` CT-like volumes
    (:func:`ct_like_volume`) and label maps (1 where 40 < HU < 100, 5 above 200 HU). Returns ``root``."""
    import numpy as np
    import SimpleITK as sitk

    root = Path(root)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for case in range(cases):
        image = ct_like_volume(shape=shape, seed=case)
        array = sitk.GetArrayFromImage(image)
        labels = np.zeros(array.shape, np.uint8)
        labels[(array > 40) & (array < 100)] = 1
        labels[array > 200] = 5
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        sitk.WriteImage(image, str(root / "images" / f"case{case}.nii.gz"))
        sitk.WriteImage(label_image, str(root / "labels" / f"case{case}.nii.gz"))
    return root
