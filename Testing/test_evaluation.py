"""Evaluation that tells the truth: metrics on known shapes, negatives cut from real CT, tables per source and
phase with the verdict, and the cases offered for calibrating the verdict."""

import csv
import hashlib
import math

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegLib.engine import Segmenter
from AttentionUNetSegLib.imageio import read_image
from AttentionUNetSegTools.evaluation import (
    calibration_cases,
    evaluate,
    evaluation_cases,
    negative_crops,
    real_negative_cases,
    reference_on_grid,
    shared_cases,
)
from AttentionUNetSegTools.metrics import NEGATIVE_MARGIN_MM, NEGATIVE_MIN_MM, dice, pancreas_free_rows, surface_scores
from AttentionUNetSegTools.synthesis.intensities import PHASES, RANDOM_CONTRAST


def test_metrics_on_known_shapes():
    grid = np.indices((40, 40, 40))
    sphere = ((grid - 20) ** 2).sum(0) <= 8**2
    shifted = ((grid - np.array([20, 20, 22])[:, None, None, None]) ** 2).sum(0) <= 8**2
    assert dice(sphere, sphere) == 1.0 and dice(sphere, np.zeros_like(sphere)) == 0.0
    hd95, nsd = surface_scores(sphere, sphere, (1.0, 1.0, 1.0))
    assert hd95 == 0.0 and nsd == 1.0
    hd95, nsd = surface_scores(sphere, shifted, (1.0, 1.0, 1.5))  # 2 voxels apart along x, 1.5 mm each
    assert 2.0 <= hd95 <= 3.0 + 1e-6 and 0.5 < nsd < 1.0


def test_pancreas_free_rows_keep_the_margin_and_the_length():
    rows = np.arange(40, 50)  # the gland on rows 40..49 of 100, 3 mm rows
    assert pancreas_free_rows(rows, 100, 3.0, 25.0, 60.0) == {"low": slice(0, 31), "high": slice(59, 100)}
    assert pancreas_free_rows(rows, 60, 3.0, 25.0, 60.0) == {"low": slice(0, 31)}  # 1 row above: too short


def _world_z(image, index_range, axis):
    """World z (mm) of the first and last slice of ``image`` along voxel ``axis`` within ``index_range``."""
    corner = [0, 0, 0]
    zs = []
    for i in (index_range[0], index_range[1] - 1):
        corner[axis] = i
        zs.append(image.TransformIndexToPhysicalPoint(corner)[2])
    return sorted(zs)


@pytest.mark.parametrize("flip", [False, True])
def test_a_negative_crop_of_real_ct_holds_no_pancreas_whatever_the_storage_order(data_dir, flip):
    case = data_dir / "ts-abdomen-3mm"
    image = read_image(case / "ct.nii.gz")
    image = sitk.Flip(image, [False, False, True]) if flip else image  # same anatomy, slices stored reversed
    crops = negative_crops(image, reference_on_grid(case / "pancreas.nii.gz", image))
    assert list(crops) == ["below-pancreas"]  # the scan ends 13 slices above the gland: no room there
    crop = crops["below-pancreas"]
    assert not reference_on_grid(case / "pancreas.nii.gz", crop).any()
    assert sitk.GetArrayViewFromImage(crop).max() > 200  # real CT: bone in view, not padding
    gland = np.argwhere(reference_on_grid(case / "pancreas.nii.gz", image))
    gland_z = [image.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]])[2] for p in gland[::50]]
    low, high = _world_z(crop, (0, crop.GetSize()[2]), 2)
    assert high <= min(gland_z) - NEGATIVE_MARGIN_MM + 1e-3  # below the gland, by the margin
    assert high - low >= NEGATIVE_MIN_MM


def test_evaluation_scores_positives_and_negatives_with_the_verdict(tiny_model, data_dir, tmp_path):
    cases = [c for c in shared_cases(data_dir) if c.name == "ts-abdomen-3mm-crop"]
    cases += real_negative_cases(data_dir)
    scores = evaluate(Segmenter(tiny_model), cases, tmp_path)
    by_name = {s.case: s for s in scores}
    positive, negative = by_name["ts-abdomen-3mm-crop"], by_name["ts-abdomen-3mm-below-pancreas"]
    assert positive.in_training == "no" and positive.labels == "silver" and positive.phase == "non-contrast"
    assert positive.reference_ml == pytest.approx(17.4, abs=0.3)  # the README's 17.4 mL label
    assert math.isnan(positive.false_positive_ml)
    assert negative.view == "below-pancreas" and negative.labels == "anatomy" and math.isnan(negative.dice)
    assert negative.false_positive_ml == negative.volume_ml and negative.reference_ml == 0.0
    for score in scores:
        assert score.qc in ("ok", "check", "not found") and 0.0 <= score.confidence <= 1.0
    table = (tmp_path / "evaluation.md").read_text()
    assert "ts-abdomen-3mm-crop" in table and "| mean |" in table and "## Per phase and view" in table and "## Per source" in table
    assert "ok on a case below Dice 0.5" in table
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert {(r["source"], r["view"]) for r in summary} == {("real", "abdomen"), ("real", "below-pancreas")}
    assert (tmp_path / "evaluation.png").stat().st_size > 10_000


def test_the_verdict_is_calibrated_on_other_synthetic_scans_than_evaluate_scores(labelmaps_dir, tmp_path):
    """Otherwise evaluate's "never ok on a failure" would be measured on the cases the threshold was set on."""
    def fingerprints(cases):
        return {hashlib.sha1(sitk.GetArrayViewFromImage(image).tobytes()).hexdigest()
                for _, image, _, _, _ in cases}

    def evaluated():
        for case in evaluation_cases(3, 2, labelmaps_dir=labelmaps_dir, real=False):
            image, reference = case.load()
            yield case.name, image, reference, case.source, case.phase

    calibrated = fingerprints(calibration_cases(3, 2, data_dir=tmp_path / "none", labelmaps_dir=labelmaps_dir))
    assert len(calibrated) == 5 and not calibrated & fingerprints(evaluated())


def test_calibration_cases_cover_every_phase_negatives_and_real_ct(data_dir, labelmaps_dir):
    cases = list(calibration_cases(synthetic=5, negatives=2, data_dir=data_dir, labelmaps_dir=labelmaps_dir))
    names = [c[0] for c in cases]
    assert len(set(names)) == len(names) == 3 + 1 + 5 + 2  # real, real negative, synthetic, synthetic negatives
    phases = {phase for _, _, reference, source, phase in cases if source.startswith("synthetic") and
              reference is not None}
    assert phases == {*PHASES, RANDOM_CONTRAST}
    for name, image, reference, source, phase in cases:
        assert isinstance(image, sitk.Image)
        if reference is None:  # a negative: nothing to find
            assert name.endswith(("above-pancreas", "below-pancreas"))
        else:
            assert reference.shape == sitk.GetArrayViewFromImage(image).shape and reference.any()
    assert sum(reference is None for _, _, reference, _, _ in cases) == 3
    sources = {source for _, _, _, source, _ in cases}
    assert "real" in sources and all(s == "real" or s.startswith("synthetic/") for s in sources)
