"""The verdict: never "ok" on a failure, nothing confident where there is no pancreas, each doubt named."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegLib import verdict
from AttentionUNetSegLib.engine import Segmenter
from AttentionUNetSegLib.imageio import read_image
from AttentionUNetSegLib.verdict import CHECK, NOT_FOUND, OK, Evidence, verdict_of
from AttentionUNetSegLib.weights import bundled_model_path

SPACING = (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def bundled():
    if not bundled_model_path().is_file():
        pytest.skip("no bundled model in this copy")
    return Segmenter()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_ok_only_where_the_real_ct_agrees_with_its_reference(bundled, data_dir):
    """On the real cases, a result below Dice 0.5 against the (silver) reference is never called ok."""
    for case in ("ts-abdomen-3mm", "ts-abdomen-3mm-crop"):
        image = read_image(data_dir / case / "ct.nii.gz")
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / case / "pancreas.nii.gz"))) > 0
        result = bundled.segment(image)
        score = dice(sitk.GetArrayFromImage(result.mask) > 0, reference)
        assert result.verdict.qc in (OK, CHECK, NOT_FOUND)
        assert not (score < 0.5 and result.verdict.qc == OK), (case, score, result.verdict)
        assert (result.verdict.reason == "") == (result.verdict.qc == OK)


def test_a_scan_without_the_pancreas_gets_no_ok(bundled, abdomen_ct, data_dir):
    """The lower abdomen and pelvis of the real CT (its pancreas lies in slices 81-98): no confident pancreas."""
    image = read_image(abdomen_ct)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ts-abdomen-3mm" / "pancreas.nii.gz"))) > 0
    lower = image[:, :, :65]
    assert not reference[:65].any()
    result = bundled.segment(lower)
    assert result.verdict.qc != OK, result.verdict


def evidence(**changes) -> Evidence:
    values = dict(volume_ml=60.0, candidates_ml=62.0, mean_probability=0.95, boundary_certainty=0.9, agreement=0.95,
                  touches_edge=False, lung_fraction=0.05, spine_offset_mm=(70.0, 20.0))
    return Evidence(**{**values, **changes})


def test_a_plausible_certain_gland_is_ok():
    result = verdict_of(evidence())
    assert result.qc == OK and result.reason == "" and result.confidence >= verdict.OK_CONFIDENCE_TTA


def test_a_run_with_tta_is_judged_by_its_own_threshold():
    """TTA's disagreement lowers every confidence, so the same confidence passes with TTA and not without."""
    with_tta = evidence(boundary_certainty=0.95, agreement=0.85)
    without = evidence(boundary_certainty=0.95 * 0.85, agreement=None)
    assert with_tta.confidence == pytest.approx(without.confidence)
    assert verdict.OK_CONFIDENCE_TTA <= with_tta.confidence < verdict.OK_CONFIDENCE
    assert verdict_of(with_tta).qc == OK
    assert verdict_of(without).qc == CHECK and "unsure" in verdict_of(without).reason


@pytest.mark.parametrize("changes, reason", [
    ({"lung_fraction": 0.5}, "lungs"),
    ({"volume_ml": 20.0, "candidates_ml": 20.0}, "small"),  # smaller than any of 158 manually labelled glands
    ({"volume_ml": 400.0, "candidates_ml": 400.0}, "large"),
    ({"touches_edge": True}, "edge of the scan"),
    ({"candidates_ml": 120.0}, "several separate candidates"),
    ({"boundary_certainty": 0.5}, "unsure"),
    ({"agreement": 0.4}, "unsure"),
    ({"spine_offset_mm": (-30.0, 0.0)}, "not in front of the spine"),  # behind it: the back muscles
    ({"spine_offset_mm": (60.0, -120.0)}, "not in front of the spine"),  # far to the right: the liver
])
def test_each_doubt_turns_ok_into_check_with_its_reason(changes, reason):
    result = verdict_of(evidence(**changes))
    assert result.qc == CHECK and reason in result.reason
    assert result.describe().startswith("check: ")


def test_nothing_found_is_said_as_such():
    result = verdict_of(evidence(volume_ml=0.0, candidates_ml=0.0))
    assert result.qc == NOT_FOUND and result.confidence == 0.0
    assert result.describe() == "no pancreas found"


def test_evidence_is_measured_from_the_arrays():
    shape = (20, 30, 30)
    kept = np.zeros(shape, bool)
    kept[8:12, 10:20, 10:20] = True
    probability = np.where(kept, 0.95, 0.02).astype(np.float32)
    probability[2:4, 2:4, 2:4] = 0.9  # a second, separate candidate
    hu = np.full(shape, 40.0, np.float32)
    hu[:, :, :8] = -800.0  # air inside the body beside the gland: a lung
    body = np.ones(shape, bool)
    measured = Evidence.measure(probability, kept, hu, body, SPACING, agreement=0.8)
    voxel_ml = 27 / 1000
    assert measured.volume_ml == pytest.approx(400 * voxel_ml)
    assert measured.candidates_ml == pytest.approx(408 * voxel_ml)
    assert measured.mean_probability == pytest.approx(0.95)
    assert measured.lung_fraction == pytest.approx(8 / 30)
    assert not measured.touches_edge and measured.agreement == 0.8
    assert measured.spine_offset_mm is None  # no bone in view
    hu[:, 24:28, 13:17] = 700.0  # a spine behind the gland (+y is posterior), at the middle of the body
    ahead, left = Evidence.measure(probability, kept, hu, body, SPACING, None).spine_offset_mm
    assert ahead == pytest.approx((25.5 - 14.5) * 3) and left == pytest.approx((14.5 - 14.5) * 3)
    kept[0] = True
    assert Evidence.measure(probability, kept, hu, body, SPACING, None).touches_edge
