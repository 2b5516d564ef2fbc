"""The verdict's calibration: the threshold leaves no bad case "ok", and the command reports on real cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from AttentionUNetSegTools.calibration import MARGIN, CalibrationCase, ok_threshold, rates

CONSOLE_SCRIPT = Path(sys.executable).with_name("attention-unet-seg")


def case(name: str, dice: float, confidence: float, other_doubt: bool = False) -> CalibrationCase:
    return CalibrationCase(name, "synthetic", "venous", dice, confidence, "check", other_doubt)


def test_threshold_lies_above_every_bad_case_even_those_another_doubt_stops():
    cases = [case("good", 0.85, 0.9), case("fair", 0.6, 0.7), case("bad", 0.3, 0.75),
             case("bad but cut off", 0.2, 0.8, other_doubt=True), case("negative", math.nan, 0.6)]
    threshold = ok_threshold(cases, tta=False)
    assert threshold > 0.8 + MARGIN / 2  # above the cut-off bad case too
    result = rates(cases, threshold)
    assert result["ok_on_bad_cases"] == "0 of 3"
    assert result["good_cases_flagged"] == "1 of 2" and result["mean_dice_of_ok"] == 0.85


def test_threshold_rises_to_the_least_confident_good_case_it_calls_ok():
    """Between the most confident failure (0.72) and the least confident good case called ok (0.802) every
    threshold flags the same good cases here; the strictest of them leaves room for unseen failures."""
    cases = [case("bad", 0.3, 0.72), case("good", 0.8, 0.802), case("better", 0.9, 0.88),
             case("good but cut off", 0.7, 0.5, other_doubt=True)]
    threshold = ok_threshold(cases, tta=False)
    assert threshold == 0.8
    assert rates(cases, threshold) == rates(cases, round(0.72 + MARGIN, 2))
    assert rates(cases, threshold + 0.01)["good_cases_flagged"] == "2 of 3"


def test_calibrate_command_on_the_real_and_held_out_cases(tiny_model, data_dir, tmp_path):
    done = subprocess.run([str(CONSOLE_SCRIPT), "calibrate", "--synthetic", "1", "--negatives", "1", "--weights",
                           str(tiny_model), "--output-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "ATTENTION_UNET_SEG_DATA": str(data_dir)})
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "calibration.json").read_text())
    names = [c["name"] for c in written["cases"]]
    assert {"ts-abdomen-3mm", "ts-abdomen-3mm-crop", "ts-venous-dicom"} <= set(names)
    assert any(math.isnan(c["dice"]) for c in written["cases"])  # negatives are part of it
    assert written["ok_on_bad_cases"].startswith("0 of ")
    assert "| case | source |" in (tmp_path / "calibration.md").read_text()
