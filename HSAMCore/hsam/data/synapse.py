"""Facts about the Synapse (BTCV abdomen) data the official H-SAM weights were trained on."""

from __future__ import annotations

from ..description import OrientationSpec

# See hsam/data/tables/synapse_orientation_notes.md for the sources and the derivation.
SYNAPSE_ORIENTATION = OrientationSpec(
    slice="S", row="P", column="L", verified=False,
    source=("training arrays = np.transpose(nibabel get_fdata(), (2, 1, 0)) of the BTCV RawData NIfTI "
            "(hitachinsk/SAMed and Cccccczh404/H-SAM preprocess/preprocess_data.py: rows = voxel axis j, "
            "columns = i, slices = k; confirmed); the raw files' axis directions (assumed L,P,S as DICOM-"
            "converted axial CT) were not found in any public source: unverified, override with --orientation"),
)
