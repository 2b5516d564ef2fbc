"""The module's logic in the Slicer application's namespace (``slicer_app``), for what its self-test does not
cover: learning from the user's corrections. Cases are saved from a real segmentation of the real CT,
fine-tuning runs in a real child process through the ``PythonSlicer`` stand-in, Cancel ends its process tree,
and Segment Pancreas uses the chosen model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicer_app
from conftest import image_data_voxels, read_with_slicer

from AttentionUNetSegLib import mrml_bridge, protocol, user_cases
from AttentionUNetSegLib.errors import Cancelled, UserError

MODULE_DIR = Path(__file__).resolve().parent.parent / "AttentionUNetSeg"


@pytest.fixture(scope="module")
def module():
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import AttentionUNetSeg
    finally:
        sys.path.remove(str(MODULE_DIR))
    return AttentionUNetSeg


@pytest.fixture()
def logic(module, tmp_path, monkeypatch):
    """The logic with PythonSlicer on PATH and a settings folder of this test's own."""
    (tmp_path / "bin").mkdir()
    slicer_app.write_launcher(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slicer.app, "slicerUserSettingsFilePath", str(tmp_path / "settings" / "Slicer.ini"))
    yield module.AttentionUNetSegLogic()
    slicer.mrmlScene.Clear()


@pytest.fixture()
def corrected(small_ct, data_dir):
    """The real crop CT in the scene with its pancreas label as a segmentation, as a user's corrected result."""
    volume = read_with_slicer(slicer.mrmlScene, small_ct, name="Crop CT")
    label = sitk.ReadImage(str(data_dir / "ts-abdomen-3mm-crop" / "pancreas.nii.gz"))
    outputs = mrml_bridge.import_result(slicer.mrmlScene, volume, label, {})
    return volume, outputs.segmentation_node, sitk.GetArrayFromImage(label) != 0


def test_an_added_case_holds_the_ct_and_the_corrected_segment_on_its_voxels(logic, corrected):
    volume, segmentation, label = corrected
    name = logic.addCase(volume, segmentation)
    assert name == "Crop-CT" and logic.caseNames() == [name]
    folder = logic.caseLibrary().cases_dir / name
    ct = sitk.ReadImage(str(folder / user_cases.CT_FILE))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), image_data_voxels(volume.GetImageData()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / user_cases.LABEL_FILE))), label)
    assert logic.addCase(volume, segmentation) == "Crop-CT-2"  # the same CT again: another case, never over it


def test_a_case_is_removed_by_its_name_and_only_a_saved_name_is_taken(logic, corrected):
    name = logic.addCase(*corrected[:2])
    with pytest.raises(UserError, match="no case"):
        logic.removeCase("../..")
    logic.removeCase(name)
    assert logic.caseNames() == []


def test_an_empty_segment_is_no_case_and_nothing_is_written(logic, corrected, data_dir):
    volume = corrected[0]
    label = sitk.ReadImage(str(data_dir / "ts-abdomen-3mm-crop" / "pancreas.nii.gz")) * 0
    segmentation = mrml_bridge.import_result(slicer.mrmlScene, volume, label, {}).segmentation_node
    with pytest.raises(UserError, match="empty"):
        logic.addCase(volume, segmentation)
    cases = logic.caseLibrary().cases_dir
    assert not cases.exists() or list(cases.iterdir()) == []


def test_fine_tuning_on_the_saved_cases_makes_a_model_segment_pancreas_uses(logic, corrected, tiny_patch_model):
    with pytest.raises(UserError, match="no saved cases"):
        logic.fineTune(minutes=1, weights=tiny_patch_model, steps=2)
    logic.addCase(*corrected[:2])
    progress = []
    model = logic.fineTune(minutes=2, device="cpu", weights=tiny_patch_model, steps=2,
                           progressCallback=lambda fraction, text: progress.append(text))
    assert progress and model.weights.is_file() and model.card["cases"] == ["Crop-CT"]
    assert [m.weights for m in logic.fineTunedModels()] == [model.weights]
    assert "1 cases" in model.describe()

    result = logic.segmentPancreas(corrected[0], device="cpu", weights=model.weights)
    assert result.report.qc != "ok"  # weights fine-tuned by the user carry no calibrated threshold
    assert result.report.model.startswith(f"{protocol.FINETUNE_MODEL_FILE} (fine-tuned")  # the result names it


def test_cancel_ends_the_fine_tune_at_once_and_leaves_no_process(module, logic, corrected, tiny_patch_model):
    logic.addCase(*corrected[:2])
    outcome, progressed = [], []
    logic.fineTune(minutes=5, device="cpu", weights=tiny_patch_model, waitForCompletion=False,
                   progressCallback=lambda fraction, text: progressed.append(text),
                   completionCallback=lambda model, error: outcome.append(error))
    run = logic._run
    assert logic.running == "finetune"
    with pytest.raises(UserError, match="already running"):
        logic.segmentPancreas(corrected[0], device="cpu")
    while logic.running and not progressed:
        slicer.app.processEvents()
        time.sleep(0.05)
    started = time.monotonic()
    logic.cancel()
    assert time.monotonic() - started < module.CANCEL_LIMIT_SECONDS
    assert not run.child.tree_alive(module.CANCEL_LIMIT_SECONDS)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled) and logic.running is None
