"""The bundled model on real CT: it finds the pancreas, on the input's grid, whatever the storage orientation.

Reference labels are TotalSegmentator's (silver, not manual); ts-abdomen-3mm was used in training, the crop
of it is the same patient, ts-venous-dicom is a patient the model never saw (only its pancreatic tail is in
the field of view, and the model finds none of it). Thresholds sit below the measured values in the model
card, to catch regressions.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegLib import geometry
from AttentionUNetSegLib.engine import Segmenter
from AttentionUNetSegLib.imageio import read_image
from AttentionUNetSegLib.weights import bundled_model_path, load_model
from AttentionUNetSegTools.evaluation import negative_crops, reference_on_grid
from AttentionUNetSegTools.metrics import dice


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(None)


def test_the_bundled_model_is_verified_and_documented():
    model = load_model(None)
    assert model.path == bundled_model_path()
    assert model.spec.training["total_steps"] > 1000 and "ts-abdomen-3mm" in model.spec.training["real_cases"]
    assert (bundled_model_path().parent / "MODEL_CARD.md").read_text().count("silver") >= 1


@pytest.mark.parametrize("case, minimum_dice", [("ts-abdomen-3mm", 0.5), ("ts-abdomen-3mm-crop", 0.4)])
def test_it_segments_the_pancreas_in_real_ct(segmenter, data_dir, case, minimum_dice):
    image = read_image(data_dir / case / "ct.nii.gz")
    reference = reference_on_grid(data_dir / case / "pancreas.nii.gz", image)
    result = segmenter.segment(image)
    assert dice(sitk.GetArrayViewFromImage(result.mask), reference) >= minimum_dice
    assert 5.0 < result.volume_ml < 150.0


@pytest.mark.parametrize("axes", [[True, False, False], [False, True, False]])
def test_the_same_anatomy_stored_flipped_gives_the_same_mask(segmenter, data_dir, axes):
    """Zero silent orientation flips: the CT stored with a mirrored voxel axis gives the same pancreas."""
    ct = read_image(data_dir / "ts-abdomen-3mm" / "ct.nii.gz")
    flipped = sitk.Flip(ct, axes)  # same physical image, voxels stored in the other order
    first, second = segmenter.segment(ct), segmenter.segment(flipped)
    back = geometry.resample_like(second.mask, ct, sitk.sitkNearestNeighbor)
    a, b = sitk.GetArrayViewFromImage(first.mask), sitk.GetArrayViewFromImage(back)
    assert a.any() and dice(a, b) > 0.98
    assert np.isclose(first.volume_ml, second.volume_ml, rtol=0.02)


def test_it_finds_no_pancreas_where_there_is_none(segmenter, data_dir):
    """The real CT cut below its pancreas (lower abdomen and pelvis): nothing found, and never an ok verdict."""
    case = data_dir / "ts-abdomen-3mm"
    image = read_image(case / "ct.nii.gz")
    pelvis = negative_crops(image, reference_on_grid(case / "pancreas.nii.gz", image))["below-pancreas"]
    result = segmenter.segment(pelvis, maps=())
    assert result.volume_ml < 5.0 and result.verdict.qc != "ok"
