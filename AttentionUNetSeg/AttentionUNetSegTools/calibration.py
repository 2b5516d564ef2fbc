"""Calibrate the verdict's "ok" threshold on held-out cases, and say how the verdict does at it.

Segments the calibration cases of ``evaluation.calibration_cases`` (held-out synthetic patients of every
phase with manual labels, synthetic and real negatives, the real cases with silver labels), then picks the
lowest confidence at which no case below Dice 0.5 and no negative would be called "ok" on its confidence,
raises it to the strictest that calls no fewer good cases ok, and reports how many good cases are flagged at
that threshold. Runs with TTA (the default) and with ``--no-tta`` have a threshold each.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib.cli import add_model_arguments, load_segmenter
from AttentionUNetSegLib.outputs import check_output_folder, json_writer, write_outputs
from AttentionUNetSegLib.verdict import OK, ok_threshold_for, verdict_of

from .evaluation import GOOD_DICE, calibration_cases
from .metrics import dice

MARGIN = 0.01  # above the most confident bad case


@dataclass(frozen=True)
class CalibrationCase:
    name: str
    source: str
    phase: str
    dice: float  # NaN for a negative
    confidence: float
    qc_at_default: str
    doubts_besides_confidence: bool  # another reason than confidence already keeps it from "ok"

    @property
    def bad(self) -> bool:
        return math.isnan(self.dice) or self.dice < GOOD_DICE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The threshold rests on the most confident failure among them, so more is safer: on 54 scans it was 0.07
    # too low for scans drawn later (about 15 minutes on 2 CPU cores for the defaults).
    parser.add_argument("--synthetic", type=int, default=150, help="held-out synthetic scans (default: 150)")
    parser.add_argument("--negatives", type=int, default=30, help="synthetic scans without a pancreas (default: 30)")
    parser.add_argument("--output-dir", type=Path, default=Path("calibration"), help="where to write the tables")
    add_model_arguments(parser, progress=False)


def run(args: argparse.Namespace) -> int:
    output_dir = check_output_folder(args.output_dir)
    segmenter = load_segmenter(args)
    cases = [measure(segmenter, *case) for case in calibration_cases(args.synthetic, args.negatives)]
    threshold = ok_threshold(cases, args.tta)
    summary = {"model": segmenter.model.path.name, "tta": args.tta, "cases": len(cases),
               "ok_threshold": threshold, **rates(cases, threshold)}
    write_outputs({output_dir / "calibration.json": json_writer({**summary, "cases": [asdict(c) for c in cases]}),
                   output_dir / "calibration.md": lambda path: path.write_text(markdown(summary, cases))})
    print(json.dumps(summary, indent=2))
    return 0


def measure(segmenter, name: str, image: sitk.Image, reference, source: str, phase: str) -> CalibrationCase:
    result = segmenter.segment(image, maps=())
    prediction = sitk.GetArrayViewFromImage(result.mask) > 0
    score = math.nan if reference is None else round(dice(prediction, reference), 4)
    blocked = verdict_of(result.evidence, ok_confidence=0.0).qc != OK
    print(f"{name}: Dice {score}, {result.verdict.describe()}", flush=True)
    return CalibrationCase(name, source, phase, score, round(result.verdict.confidence, 4), result.verdict.qc,
                           blocked)


def ok_threshold(cases: list[CalibrationCase], tta: bool) -> float:
    """The strictest confidence threshold that calls ok every good case the lowest safe one calls ok.

    The lowest safe threshold lies just above the most confident bad case (below Dice 0.5, or a negative),
    counted even where another doubt already stops it: with a few dozen cases the other doubts are no
    margin to count on. Raising it up to the least confident good case it calls ok costs nothing on these
    cases and leaves room for the failures they do not hold.
    """
    bad = [c.confidence for c in cases if c.bad]
    if not bad:
        return ok_threshold_for(tta)
    safe = round(max(bad) + MARGIN, 2)
    passed = [c.confidence for c in cases if not c.bad and not c.doubts_besides_confidence and c.confidence >= safe]
    return max(safe, math.floor(min(passed) * 100) / 100) if passed else safe


def rates(cases: list[CalibrationCase], threshold: float) -> dict:
    ok = [c for c in cases if not c.doubts_besides_confidence and c.confidence >= threshold]
    good = [c for c in cases if not c.bad]
    bad = [c for c in cases if c.bad]
    return {"ok_on_bad_cases": f"{sum(c.bad for c in ok)} of {len(bad)}",
            "good_cases_flagged": f"{sum(c not in ok for c in good)} of {len(good)}",
            "good_cases_flagged_only_for_confidence": sum(c not in ok and not c.doubts_besides_confidence
                                                          for c in good),
            "mean_dice_of_ok": round(float(np.mean([c.dice for c in ok])), 3) if ok else None}


def markdown(summary: dict, cases: list[CalibrationCase]) -> str:
    lines = [f"# Verdict calibration ({summary['model']}, TTA {'on' if summary['tta'] else 'off'})", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items() if key not in ("model", "tta")]
    lines += ["", "| case | source | phase | Dice | confidence | verdict | other doubt |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.source} | {c.phase} | {c.dice} | {c.confidence} | {c.qc_at_default} | "
              f"{'yes' if c.doubts_besides_confidence else ''} |" for c in cases]
    return "\n".join(lines) + "\n"
