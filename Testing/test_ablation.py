"""Ablation arms: the committed spec is valid, a tiny spec trains and scores two arms, a rerun redoes nothing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml

from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.locations import REPOSITORY
from AttentionUNetSegTools.training.ablation import DEFAULT_SPEC, arm_configs, arm_row
from AttentionUNetSegTools.training.config import TrainingConfig

from test_training import tiny_config

BUNDLED_EVALUATION = REPOSITORY / "Resources" / "Training" / "evaluation.csv"


def test_every_arm_of_the_committed_spec_is_the_bundled_recipe_with_its_changes():
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    configs = arm_configs(DEFAULT_SPEC)
    base = TrainingConfig.load(REPOSITORY / spec["base"]).to_dict()
    for name, config in configs.items():
        arm = TrainingConfig.from_dict(config).to_dict()
        changed = {key for key in arm if arm[key] != base[key]}
        assert changed <= set(spec["common"]) | set(spec["arms"][name] or {}), name
    assert configs["control"] == {**yaml.safe_load((REPOSITORY / spec["base"]).read_text()), **spec["common"]}


def test_a_misspelt_setting_is_refused_before_any_training(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": str(DEFAULT_SPEC.parent / "gpu.train.yaml"), "common": {},
                                    "arms": {"typo": {"negativ_fraction": 0.3}}}))
    with pytest.raises(UserError, match="unknown training settings"):
        arm_configs(spec)


def test_a_row_agrees_with_the_evaluation_summary():
    """The row of the bundled model's evaluation gives the per-phase means and the case counts its
    summary.csv gives (the table's own mean row is no case)."""
    cells = arm_row("bundled", BUNDLED_EVALUATION)
    by_phase = dict(zip(["non-contrast", "arterial", "portal-venous", "delayed", "random contrast"], cells[1:6]))
    summary = list(csv.DictReader((BUNDLED_EVALUATION.parent / "summary.csv").open()))
    for phase_row in summary:
        if phase_row["source"] == "synthetic" and phase_row["view"] == "abdomen":
            assert float(by_phase[phase_row["phase"]]) == pytest.approx(float(phase_row["mean_dice"]), abs=0.006)
    negatives = sum(int(r["cases"]) for r in summary if r["view"] != "abdomen")
    failures = sum(r["view"] == "abdomen" and float(r["dice"]) < 0.5 for r in csv.DictReader(BUNDLED_EVALUATION.open()))
    assert cells[-1] == f"0 of {negatives + failures}"


def test_two_tiny_arms_train_score_and_are_not_redone(data_dir, labelmaps_dir, tmp_path):
    base = tiny_config(data_dir, labelmaps_dir, tmp_path / "unused", steps=1).to_dict()
    base.update(validate_every=1, checkpoint_every=1, validation_synthetic=1, validation_negatives=0)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "common": {"threads": 1},
                                    "arms": {"plain": {}, "more-negatives": {"negative_fraction": 0.9}}}))
    (tmp_path / "data").mkdir()  # the arms are scored on the small real case only, to keep the test short
    (tmp_path / "data" / "ts-abdomen-3mm-crop").symlink_to(data_dir / "ts-abdomen-3mm-crop")
    env = {**os.environ, "ATTENTION_UNET_SEG_DATA": str(tmp_path / "data")}
    command = [sys.executable, "-m", "AttentionUNetSegTools.cli", "ablate", "plain", "more-negatives", "--spec",
               str(spec), "--run-dir", str(tmp_path / "runs"), "--synthetic", "1", "--negatives", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines] == ["| arm", "| plain", "| more-negatives"]
    assert (tmp_path / "runs" / "ablation.md").read_text() in done.stdout
    arm = yaml.safe_load((tmp_path / "runs" / "more-negatives" / "arm.train.yaml").read_text())
    assert arm["negative_fraction"] == 0.9 and arm["threads"] == 1
    weights = tmp_path / "runs" / "plain" / "last.safetensors"
    written = weights.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert again.returncode == 0, again.stderr
    assert weights.stat().st_mtime_ns == written and again.stdout == done.stdout  # nothing trained or scored again
    scored = tmp_path / "runs" / "plain" / "evaluation" / "evaluation.csv"
    before = scored.stat().st_mtime_ns
    fewer = subprocess.run([*command[:-1], "0"], capture_output=True, text=True, timeout=600, check=False, env=env)
    assert fewer.returncode == 0, fewer.stderr  # other case counts: scored again, not trained again
    assert scored.stat().st_mtime_ns > before and weights.stat().st_mtime_ns == written
    assert [r["view"] for r in csv.DictReader(scored.open()) if r["source"].startswith("synthetic")] == ["abdomen"]

    spec.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "common": {"threads": 1},
                                    "arms": {"plain": {"negative_fraction": 0.2}}}))
    changed = subprocess.run(command[:5] + command[6:], capture_output=True, text=True, timeout=600, check=False,
                             env=env)
    assert changed.returncode == 2 and changed.stderr.startswith("error: arm plain") and len(
        changed.stderr.strip().splitlines()) == 1
    assert weights.stat().st_mtime_ns == written
