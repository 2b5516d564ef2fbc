"""Intensity anchors measured on the real CT of ../shared/data, which the phase ranges of ``intensities`` hold.

Each number is the mean HU inside one organ of the case's TotalSegmentator map (eroded by one voxel, so
the boundary's partial volume stays out; the labels are silver). Hollow organs are left out: their gas
makes the mean meaningless. ``measure_tissue_hu`` re-measures them (the tests do, on the real files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .vocabulary import TISSUES, label_table_path, read_label_table, tissue_lookup

# phase -> (case folder, {tissue: mean HU}).
MEASURED_HU = {
    "non-contrast": ("ts-abdomen-3mm", {
        "liver": 46.4, "spleen": 34.9, "kidney_right": 14.5, "kidney_left": 21.1, "gallbladder": 3.3,
        "pancreas": 1.1,  # a fatty gland: drawn as fat-infiltrated (intensities.FAT_FRACTION)
        "small_bowel": 25.1, "adrenal": 18.0, "aorta": 43.8, "inferior_vena_cava": 42.4, "portal_vein": 40.9,
        "artery": 48.8, "vein": 47.7, "urinary_bladder": 12.5, "vertebra": 125.2, "rib": 77.9, "bone": 202.3,
        "muscle": 24.0,
    }),
    "portal-venous": ("ts-venous-dicom", {
        "liver": 90.6, "spleen": 81.3, "pancreas": 70.6, "adrenal": 49.1, "aorta": 179.9,
        "inferior_vena_cava": 95.8, "portal_vein": 136.6, "vertebra": 238.7, "rib": 197.9, "bone": 669.4,
        "spinal_cord": 19.0, "muscle": 24.9,
    }),
}
HOLLOW = ("stomach", "duodenum", "colon", "rectum", "lung", "airway")


def measure_tissue_hu(case_dir: Path) -> dict[str, float]:
    """Mean HU per tissue of one case folder (ct.nii.gz or dicom/, organs.nii.gz + its json)."""
    from AttentionUNetSegLib.imageio import read_image

    image = read_image(case_dir / "ct.nii.gz" if (case_dir / "ct.nii.gz").is_file() else case_dir / "dicom")
    organs = sitk.ReadImage(str(case_dir / "organs.nii.gz"))
    # The label map may have another direction and origin (ts-venous-dicom): match through physical space.
    organs = sitk.Resample(organs, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, organs.GetPixelID())
    tissues = tissue_lookup(read_label_table(label_table_path(case_dir)))[sitk.GetArrayViewFromImage(organs)]
    hu = sitk.GetArrayViewFromImage(image)
    means = {}
    for tissue in np.unique(tissues[tissues > 0]):
        name = TISSUES[tissue]
        mask = tissues == tissue
        core = ndimage.binary_erosion(mask) if mask.sum() > 200 else mask
        if name not in HOLLOW and core.sum() >= 20:
            means[name] = round(float(hu[core].mean()), 1)
    return means
