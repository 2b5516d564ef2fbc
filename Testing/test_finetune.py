"""Fine-tuning's contract, not its Dice: a tiny network fine-tuned for a few steps on the real crop writes
checksummed weights and a card, never touches the bundled model, resumes, keeps its best weights on Ctrl-C,
refuses bad input in one line with nothing written, and its weights are never called ok until calibrated."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegLib import protocol
from AttentionUNetSegLib.engine import Segmenter
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.finetune import (
    CARD_FILE,
    CARD_TEXT_FILE,
    CHECKPOINT_FILE,
    MODEL_FILE,
    record_verdict_thresholds,
)
from AttentionUNetSegLib.finetune_data import find_cases
from AttentionUNetSegLib.locations import labelmaps_dir
from AttentionUNetSegLib.model_card import model_card_summary
from AttentionUNetSegLib.verdict import (
    CHECK,
    NOT_CALIBRATED,
    OK,
    OK_CONFIDENCE_TTA,
    THRESHOLDS_KEY,
    Evidence,
    ok_threshold_of,
    verdict_for_weights,
)
from AttentionUNetSegLib.weights import bundled_model_path, load_model, read_spec, save_model
from AttentionUNetSegTools.cli import main
from AttentionUNetSegTools.finetune_command import discover

CONSOLE_SCRIPT = Path(sys.executable).with_name("attention-unet-seg")


@pytest.fixture(scope="module")
def tiny(tiny_patch_model) -> Path:
    return tiny_patch_model


@pytest.fixture(scope="module")
def cases(data_dir, tmp_path_factory) -> Path:
    """Three case folders (CASE/ct.nii.gz + CASE/label.nii.gz) of the real 30-slice crop: the last is held out."""
    root = tmp_path_factory.mktemp("cases")
    for name in ("a", "b", "c"):
        (root / name).mkdir()
        shutil.copy(data_dir / "ts-abdomen-3mm-crop" / "ct.nii.gz", root / name / "ct.nii.gz")
        shutil.copy(data_dir / "ts-abdomen-3mm-crop" / "pancreas.nii.gz", root / name / "label.nii.gz")
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fine_tune(*args) -> list[str]:
    return ["finetune", *map(str, args), "--progress", "none"]


@pytest.fixture(scope="module")
def finetuned(cases, tiny, tmp_path_factory) -> tuple[Path, str, dict]:
    """One fine-tune as the command line runs it (synthetic patches included): its folder, its summary line, and
    the bundled model's files as they were before it."""
    bundled = {p: digest(p) for p in bundled_model_path().parent.iterdir() if p.is_file()}
    out = tmp_path_factory.mktemp("finetuned") / "out"
    done = subprocess.run([str(CONSOLE_SCRIPT), *fine_tune(cases, "--output-dir", out, "--weights", tiny, "--steps", 4)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return out, done.stdout, bundled


def test_finetune_writes_checksummed_weights_and_a_card_and_leaves_the_bundled_model(finetuned):
    out, stdout, bundled = finetuned
    assert "held out c" in stdout
    model = load_model(out / MODEL_FILE)  # verified against its .sha256
    card = json.loads((out / CARD_FILE).read_text())
    assert card["cases"] == ["a", "b"] and card["held_out"] == "c" and card["device"] == "cpu"
    assert card["steps_done"] == card["planned_steps"] == 4 and 1 <= card["steps"] <= 4 and card["status"] == "done"
    assert 0 <= card["dice_before"] <= 1 and 0 <= card["dice_after"] <= 1 and card["minutes"] > 0
    assert any(source.startswith("synthetic CT") for source in card["patches"]) == labelmaps_dir().is_dir()
    assert card[THRESHOLDS_KEY] is None
    assert model.spec.training["fine_tune"]["steps"] == card["steps"] and THRESHOLDS_KEY not in model.spec.training
    summary, limits = model_card_summary((out / CARD_TEXT_FILE).read_text())
    assert "held-out case c" in summary and "Not calibrated" in (out / CARD_TEXT_FILE).read_text() and limits
    assert {p: digest(p) for p in bundled} == bundled


def test_segment_with_fine_tuned_weights_never_says_ok_before_calibration(finetuned, cases, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finetuned[0], out)
    report = tmp_path / "report.json"

    assert main(["segment", str(cases / "a" / "ct.nii.gz"), "-o", str(tmp_path / "mask.nii.gz"), "--weights",
                 str(out / MODEL_FILE), "--report", str(report), "--progress", "none"]) == 0

    assert "; ok" not in capsys.readouterr().out
    assert json.loads(report.read_text())["qc"] != OK
    sure = Evidence(volume_ml=60.0, candidates_ml=62.0, mean_probability=0.95, boundary_certainty=0.9,
                    agreement=0.95, touches_edge=False, lung_fraction=0.05, spine_offset_mm=(70.0, 20.0))
    training = load_model(out / MODEL_FILE).spec.training
    assert verdict_for_weights(sure, digest(out / MODEL_FILE), training).reason == NOT_CALIBRATED

    record_verdict_thresholds(out / MODEL_FILE, {"tta": 0.5})

    calibrated = load_model(out / MODEL_FILE)
    assert verdict_for_weights(sure, calibrated.sha256, calibrated.spec.training).qc == OK
    assert ok_threshold_of(calibrated.sha256, calibrated.spec.training, tta=False) is None  # that mode is not
    assert json.loads((out / CARD_FILE).read_text())[THRESHOLDS_KEY] == {"tta": 0.5}
    assert "Calibrated for these weights" in (out / CARD_TEXT_FILE).read_text()


def test_calibrate_stores_a_threshold_in_fine_tuned_weights_and_never_in_the_bundled_ones(finetuned, tmp_path,
                                                                                           capsys):
    out = tmp_path / "out"
    shutil.copytree(finetuned[0], out)

    assert main(["finetune", "--calibrate", str(out / MODEL_FILE), "--synthetic", "1", "--negatives", "1"]) == 0

    thresholds = read_spec(out / MODEL_FILE).training[THRESHOLDS_KEY]
    assert list(thresholds) == ["tta"] and isinstance(thresholds["tta"], float)
    assert f"stored in {out / MODEL_FILE}" in capsys.readouterr().out
    assert main(["finetune", "--calibrate", str(bundled_model_path())]) == 2
    assert "is a bundled model" in capsys.readouterr().err


def test_the_bundled_weights_are_the_ones_the_thresholds_were_calibrated_for():
    """Fails when new bundled weights are committed without their own calibration: recalibrate, then update
    OK_CONFIDENCE_TTA, OK_CONFIDENCE and CALIBRATED_WEIGHTS_SHA256 in verdict.py together."""
    if not bundled_model_path().is_file():
        pytest.skip("no bundled model in this copy")
    bundled = load_model()
    assert ok_threshold_of(bundled.sha256, bundled.spec.training, tta=True) == OK_CONFIDENCE_TTA


def test_the_same_weights_in_another_file_are_not_ok_until_calibrated_for_it(labelmaps_dir, tmp_path):
    """A synthetic scan the bundled model calls ok: its tensors saved as another model file get "check" (the
    thresholds are the bundled file's), and ok again once a threshold is recorded for that file."""
    from AttentionUNetSegTools.evaluation import CALIBRATION_SEED, synthetic_cases
    from AttentionUNetSegTools.synthesis.catalog import held_out_label_maps

    if not bundled_model_path().is_file():
        pytest.skip("no bundled model in this copy")
    image, _ = synthetic_cases(held_out_label_maps(labelmaps_dir), 7, (3.0, 3.0, 3.0), CALIBRATION_SEED)[6].load()
    bundled = load_model()
    assert Segmenter(bundled).segment(image, maps=()).verdict.qc == OK, "choose a scan the bundled model calls ok"
    copy = tmp_path / MODEL_FILE
    save_model(bundled.network, dataclasses.replace(bundled.spec, version="copy"), copy)

    verdict = Segmenter(copy).segment(image, maps=()).verdict
    assert (verdict.qc, verdict.reason) == (CHECK, NOT_CALIBRATED)

    record_verdict_thresholds(copy, {"tta": OK_CONFIDENCE_TTA})
    assert Segmenter(copy).segment(image, maps=()).verdict.qc == OK


def test_cases_are_found_by_the_naming_rule_and_the_layouts_training_reads(data_dir, tmp_path):
    shared = [(c.name, c.ct.name, c.label.name) for c in find_cases(data_dir)]
    assert shared == [("ts-abdomen-3mm", "ct.nii.gz", "pancreas.nii.gz"),
                      ("ts-abdomen-3mm-crop", "ct.nii.gz", "pancreas.nii.gz"),
                      ("ts-venous-dicom", "dicom", "pancreas.nii.gz")]  # a DICOM series folder beside its label
    for name in ("flat/p1.nii.gz", "flat/p1_label.nii.gz", "flat/p2.nrrd", "flat/p2.seg.nrrd", "other/q.nii.gz",
                 "other/q_mask.nii.gz", "msd/imagesTr/pancreas_001.nii.gz", "msd/labelsTr/pancreas_001.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "list.csv").write_text("case,ct,label\nq-case,other/q.nii.gz,other/q_mask.nii.gz\n"
                                       ",flat/p1.nii.gz,flat/p1_label.nii.gz\n")

    cases = discover([tmp_path / "flat", tmp_path / "msd", tmp_path / "list.csv"])

    assert [(c.name, c.label.name, c.label_values) for c in cases] == [
        ("p1", "p1_label.nii.gz", (1,)), ("p2", "p2.seg.nrrd", (1,)), ("pancreas_001", "pancreas_001.nii.gz", (1, 2)),
        ("q-case", "q_mask.nii.gz", (1,))]  # the CSV's second row is p1 again: once
    (tmp_path / "flat" / "p3.nii.gz").touch()
    with pytest.raises(UserError, match="p3.nii.gz has no label beside it"):
        discover([tmp_path / "flat"])


def bad_case(root: Path, data_dir: Path, ct: str, label: np.ndarray | str) -> Path:
    (root / "case").mkdir(parents=True)
    shutil.copy(data_dir / ct, root / "case" / "ct.nii.gz")
    if isinstance(label, str):
        shutil.copy(data_dir / label, root / "case" / "label.nii.gz")
    else:
        reference = sitk.ReadImage(str(root / "case" / "ct.nii.gz"))
        image = sitk.GetImageFromArray(label)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(root / "case" / "label.nii.gz"))
    return root


CROP = "ts-abdomen-3mm-crop"
BAD_INPUTS = {
    "another grid": (lambda root, data: bad_case(root, data, "ts-abdomen-3mm/ct.nii.gz", f"{CROP}/pancreas.nii.gz"),
                     "is not on the grid of its CT"),
    "empty label": (lambda root, data: bad_case(root, data, f"{CROP}/ct.nii.gz", np.zeros((30, 101, 122), np.uint8)),
                    "is empty"),
    "not a CT": (lambda root, data: bad_case(root, data, f"{CROP}/pancreas.nii.gz", f"{CROP}/pancreas.nii.gz"),
                 "has no voxel below 0"),
    "no cases": (lambda root, data: root, "no cases to fine-tune on"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_nothing_is_written(kind, data_dir, tiny, tmp_path, capsys):
    make, message = BAD_INPUTS[kind]
    (tmp_path / "cases").mkdir()
    root = make(tmp_path / "cases", data_dir)
    out = tmp_path / "out"

    assert main(fine_tune(root, "--output-dir", out, "--weights", tiny, "--steps", 2, "--no-synthetic")) == 2

    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_an_output_folder_holding_the_cases_is_refused(cases, tiny, capsys):
    before = sorted(p.name for p in cases.rglob("*"))
    assert main(fine_tune(cases, "--output-dir", cases, "--weights", tiny, "--no-synthetic")) == 2
    assert "holds the cases" in capsys.readouterr().err
    assert sorted(p.name for p in cases.rglob("*")) == before


def test_ctrl_c_keeps_the_best_weights_and_the_same_command_resumes(cases, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = fine_tune(cases, "--output-dir", out, "--weights", tiny, "--steps", 8, "--no-synthetic")
    process = subprocess.Popen([str(CONSOLE_SCRIPT), *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not (out / MODEL_FILE).is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first validation (step 2 of 8) keeps the first weights
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted; the best weights so far are in")
    stopped = json.loads((out / CARD_FILE).read_text())
    assert load_model(out / MODEL_FILE).spec.training["fine_tune"]["steps"] == stopped["steps"] > 0
    assert stopped["status"] == "interrupted" and stopped["steps_done"] < 8 and (out / CHECKPOINT_FILE).is_file()

    assert main(arguments) == 0

    card = json.loads((out / CARD_FILE).read_text())
    assert [(r["from_step"], r["to_step"]) for r in card["runs"]] == [(0, stopped["steps_done"]),
                                                                       (stopped["steps_done"], 8)]
    assert card["status"] == "done" and card["dice_before"] == stopped["dice_before"]
    capsys.readouterr()
    assert main(arguments) == 2
    assert "already holds a finished fine-tune" in capsys.readouterr().err


def test_the_slicer_child_fine_tunes_from_pairs_with_progress_lines(cases, tiny, tmp_path):
    """The panel's child: no tools, so no synthetic patches; PROGRESS lines, one summary line."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", protocol.MODULE, "finetune", "--case", str(cases / "a" / "ct.nii.gz"),
               str(cases / "a" / "label.nii.gz"), "--output-dir", str(out), "--weights", str(tiny), "--steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=protocol.child_environment(), timeout=120,
                          check=False)

    assert done.returncode == 0, done.stderr
    progress = [protocol.parse_progress(line) for line in done.stdout.splitlines()]
    assert progress[-2] == protocol.Progress(1.0, "Done") and "Fine-tuned on 1 case(s)" in done.stdout
    card = json.loads((out / CARD_FILE).read_text())
    assert card["cases"] == ["a"] and card["held_out"] is None and list(card["patches"]) == ["your 1 case(s)"]
    assert read_spec(out / MODEL_FILE).version == "fine-tuned-2-steps"
