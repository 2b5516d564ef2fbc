"""Ablation arms: train each as a spec says, score them all on the same held-out cases, print one table.

A spec (``Resources/Training/ablation.yaml``) names a base training config, settings common to every arm
and, per arm, the settings it changes. Each arm trains in RUN_DIR/ARM (a finished arm is not trained
again, a stopped one resumes) and is scored by ``evaluate``; the table (mean Dice per phase, volume error,
real cases, false-positive mL on negatives, "ok" on failures) is printed and written to RUN_DIR/ablation.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.locations import REPOSITORY
from AttentionUNetSegLib.weights import bundled_model_path

from .config import TrainingConfig, resolve_path
from .loop import final_weights

DEFAULT_SPEC = REPOSITORY / "Resources" / "Training" / "ablation.yaml"
BUNDLED = "bundled"  # the arm name that scores the bundled model as it is
PHASES = ("non-contrast", "arterial", "portal-venous", "delayed", "random contrast")
TRAINED_MARKER = "trained"
SCORED_MARKER = "scored"  # holds what the arm was scored with: weights, their time, case counts
ARM_CONFIG = "arm.train.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arms", nargs="*", help=f"arms of the spec (default: all, and '{BUNDLED}' first)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="ablation spec (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=Path.home() / ".cache" / "attention-unet-seg" / "ablation",
                        help="where the arms train and are scored (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="arms at a time, one thread each (default: 2; on 2 cores two single-thread runs "
                             "finish sooner than two of two threads one after the other)")
    parser.add_argument("--synthetic", type=int, default=15, help="held-out synthetic patients scored (default: 15)")
    parser.add_argument("--negatives", type=int, default=6, help="synthetic negatives scored (default: 6)")


def run(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        raise UserError(f"--parallel {args.parallel} runs nothing", "", "give 1 or more")
    configs = arm_configs(args.spec)
    names = args.arms or [BUNDLED, *configs]
    unknown = sorted(set(names) - set(configs) - {BUNDLED})
    if unknown:
        raise UserError(f"unknown arms {unknown}", f"{args.spec} has {sorted(configs)}", f"or '{BUNDLED}'")
    trained = [name for name in names if name in configs]
    for name in trained:
        refuse_changed_arm(name, configs[name], args.run_dir)
    run_all([train_command(name, configs[name], args.run_dir) for name in trained if not is_trained(args.run_dir / name)],
            args.parallel)
    scorings = [evaluate_command(name, args.run_dir, args.synthetic, args.negatives) for name in names]
    run_all([(command, log) for command, log, key in scorings if _read(log.parent / SCORED_MARKER) != key],
            args.parallel)
    text = table(names, args.run_dir)
    (args.run_dir / "ablation.md").write_text(text)
    print(text)
    return 0


def arm_configs(spec_path: Path) -> dict[str, dict]:
    """Each arm's whole training config: the base, then the common settings, then the arm's own."""
    if not spec_path.is_file():
        raise UserError(f"ablation spec {spec_path} not found", "", f"see {DEFAULT_SPEC} for the layout")
    spec = yaml.safe_load(spec_path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("arms"), dict) or "base" not in spec:
        raise UserError(f"ablation spec {spec_path} lacks 'base' or 'arms'", "", f"see {DEFAULT_SPEC} for the layout")
    base_path = resolve_path(spec["base"])
    TrainingConfig.load(base_path)  # one line if it is missing or not a config
    base = yaml.safe_load(base_path.read_text())
    configs = {name: {**base, **spec.get("common", {}), **(changes or {})} for name, changes in spec["arms"].items()}
    for config in configs.values():
        TrainingConfig.from_dict(config)  # refuse a misspelt setting before hours of training
    return configs


def refuse_changed_arm(name: str, config: dict, run_dir: Path) -> None:
    """An arm trained (or begun) with other settings would be scored as if it had these."""
    saved = run_dir / name / ARM_CONFIG
    if saved.is_file() and yaml.safe_load(saved.read_text()) != config:
        raise UserError(f"arm {name} in {run_dir} was trained with other settings than the spec has now",
                        "its results would not be this arm's", f"remove {run_dir / name} or choose another --run-dir")


def is_trained(arm_dir: Path) -> bool:
    return (arm_dir / TRAINED_MARKER).is_file()


def train_command(name: str, config: dict, run_dir: Path) -> tuple[list[str], Path]:
    arm_dir = run_dir / name
    arm_dir.mkdir(parents=True, exist_ok=True)
    (arm_dir / ARM_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    resume = ["--resume"] if (arm_dir / "last.optimizer.pt").is_file() else []
    command = [*tool(), "train", str(arm_dir / ARM_CONFIG), "--output-dir", str(arm_dir), *resume]
    # the marker says the arm finished, so that a rerun goes straight to scoring it
    return then_mark(command, arm_dir / TRAINED_MARKER, "done"), arm_dir / "train.log"


def evaluate_command(name: str, run_dir: Path, synthetic: int, negatives: int) -> tuple[list[str], Path, str]:
    """The command, its log and the key it is scored with: a new key (other weights, a newer file, other
    counts) scores the arm again."""
    arm_dir = run_dir / name
    arm_dir.mkdir(parents=True, exist_ok=True)
    weights = bundled_model_path() if name == BUNDLED else final_weights(arm_dir)
    key = f"{weights} {weights.stat().st_mtime_ns} {synthetic} {negatives}"
    command = [*tool(), "evaluate", "--weights", str(weights), "--synthetic", str(synthetic),
               "--negatives", str(negatives), "--output-dir", str(arm_dir / "evaluation")]
    return then_mark(command, arm_dir / SCORED_MARKER, key), arm_dir / "evaluate.log", key


def then_mark(command: list[str], marker: Path, text: str) -> list[str]:
    """``command``, then ``text`` written to ``marker`` if it succeeded (a stopped run leaves no marker)."""
    return ["sh", "-c", 'm=$0; t=$1; shift; "$@" && printf %s "$t" > "$m"', str(marker), text, *command]


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def tool() -> list[str]:
    return [sys.executable, "-m", "AttentionUNetSegTools.cli"]


def run_all(commands: list[tuple[list[str], Path]], parallel: int) -> None:
    """Run the commands ``parallel`` at a time, one thread each; stop after the first group with a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for start in range(0, len(commands), parallel):
        running = []
        for command, log in commands[start:start + parallel]:
            with log.open("w") as output:
                running.append((subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env), log))
        failed = [log for process, log in running if process.wait() != 0]
        if failed:
            raise UserError(f"{len(failed)} ablation run(s) failed", f"see {', '.join(map(str, failed))}",
                            "fix the cause and run ablate again: finished arms are kept")


def table(names: list[str], run_dir: Path) -> str:
    header = ["arm", *(f"synthetic {p}" for p in PHASES), "synthetic all", "volume error", "real (silver)",
              "negatives mL mean / max", "ok on failures"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(arm_row(name, run_dir / name / "evaluation" / "evaluation.csv")) + " |"
              for name in names]
    return "\n".join(lines) + "\n"


def arm_row(name: str, evaluation_csv: Path) -> list[str]:
    rows = [r for r in csv.DictReader(evaluation_csv.open()) if r["view"]]  # not the table's mean row
    with_pancreas = [r for r in rows if r["view"] == "abdomen"]
    synthetic = [r for r in with_pancreas if r["source"] != "real"]
    negatives = [r for r in rows if r["view"] != "abdomen"]
    failures = [r for r in with_pancreas if float(r["dice"]) < 0.5] + negatives
    found = [float(r["false_positive_ml"]) for r in negatives]
    return [
        name,
        *(_mean(r["dice"] for r in synthetic if r["phase"] == phase) for phase in PHASES),
        _mean(r["dice"] for r in synthetic),
        _mean([r["volume_difference_pct"] for r in synthetic], "{:.0f}%"),
        _mean(r["dice"] for r in with_pancreas if r["source"] == "real"),
        f"{sum(found) / len(found):.1f} / {max(found):.1f}" if found else "-",
        f"{sum(r['qc'] == 'ok' for r in failures)} of {len(failures)}",
    ]


def _mean(values, form: str = "{:.2f}") -> str:
    values = [float(v) for v in values]
    return form.format(sum(values) / len(values)) if values else "-"
