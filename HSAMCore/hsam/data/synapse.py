"""Facts about the Synapse (BTCV abdomen) data the official H-SAM weights were trained on."""

from __future__ import annotations

from ..description import OrientationSpec

# See hsam/data/tables/synapse_orientation_notes.md for the sources and the derivation.
SYNAPSE_ORIENTATION = OrientationSpec(
    slice="S", row="P", column="L", verified=False,
    source="assumption: BTCV NIfTI voxel order kept by the TransUNet preprocessing (slices along k, "
           "rows along j, columns along i; DICOM-like axial order); not confirmed by a public source, "
           "override with --orientation",
)
