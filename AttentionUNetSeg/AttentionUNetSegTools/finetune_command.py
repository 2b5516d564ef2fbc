"""Fine-tune the model on your own labelled cases, within a time budget; or calibrate the verdict for weights
that a fine-tune wrote (``--calibrate MODEL``).

CASES are folders, each searched by the naming rule (CASE/ct.nii.gz with CASE/label.nii.gz, or a DICOM folder
CASE/dicom/; or X.nii.gz beside X_label.nii.gz or X.seg.nrrd), the Medical Segmentation Decathlon Task07 layout
(imagesTr/, labelsTr/), NIH Pancreas-CT as NIfTI (PANCREAS_0001.nii.gz and label0001.nii.gz under the folder),
or CSV files with `ct` and `label` columns (paths relative to the CSV; an optional `case` column names them).
Labels: 1 = pancreas, on the CT's own voxels. The last case is held out (Dice before and after) when there
are 3 or more. DIR gets model.safetensors, its .sha256, the card (finetune.json, MODEL_CARD.md) and a checkpoint:
the same command again resumes a stopped run. Besides your cases, a share of the patches is synthetic CT made
from the label maps the bundled model was trained on (when they are here), some of it with no pancreas in
view, so that the model does not forget what it knew.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

from AttentionUNetSegLib.cli import EXIT_INTERRUPTED, PROGRESS_MODES, progress_reporter
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.finetune import (
    MODEL_FILE,
    FinetuneOptions,
    PatchSource,
    finetune,
    process_start,
    record_verdict_thresholds,
    refuse_bundled,
)
from AttentionUNetSegLib.finetune_data import RULE, FinetuneCase, case_name, find_cases, unique_names

SYNTHETIC_SHARE = 0.25  # of the patches
SYNTHETIC_NEGATIVES = 0.3  # of the synthetic cases: no pancreas in view (above or below the gland)
RANDOM_CONTRAST = 0.25  # of the synthetic cases, as in the bundled recipe
SYNTHETIC_POOL = 8  # synthetic cases kept in memory (each gives about two patches before it is replaced)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cases", nargs="*", type=Path, metavar="CASES",
                        help="folders of cases (naming rule, MSD Task07, NIH Pancreas-CT) or CSV files (ct,label)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="where the weights, their card and the checkpoint go (never the bundled model's folder)")
    parser.add_argument("--weights", type=Path, help="start from these weights (default: the bundled model)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="time budget of this call, reading and scoring included (default: 10)")
    parser.add_argument("--steps", type=int, help="at most this many steps (default: 100 per case, 100 to 2000, "
                        "cut to what the budget allows)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                        help="bar on stderr, 'PROGRESS <fraction> <text>' lines on stdout, or none")
    parser.add_argument("--no-synthetic", dest="synthetic_patches", action="store_false",
                        help="no synthetic CT patches: your cases and their no-pancreas slabs only (as in Slicer)")
    calibration = parser.add_argument_group("calibrating the verdict for fine-tuned weights")
    calibration.add_argument("--calibrate", type=Path, metavar="MODEL",
                             help="set the ok threshold for these weights on held-out scans and store it in them")
    calibration.add_argument("--synthetic", type=int, default=150, help="held-out synthetic scans (default: 150)")
    calibration.add_argument("--negatives", type=int, default=30,
                             help="held-out synthetic scans without a pancreas (default: 30)")
    calibration.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                             help="calibrate runs with test-time augmentation (default) or, --no-tta, without")


def run(args: argparse.Namespace) -> int:
    if args.calibrate:
        return calibrate(args)
    if not args.output_dir:
        raise UserError("no --output-dir given", "the fine-tuned weights need a folder of their own",
                        "add --output-dir DIR")
    cases = discover(args.cases)
    options = FinetuneOptions(minutes=args.minutes, device=args.device, weights=args.weights, max_steps=args.steps,
                              threads=args.threads, started=process_start())
    sources, close = synthetic_source(args) if args.synthetic_patches else ([], lambda: None)
    try:
        with progress_reporter(args.progress) as report:
            result = finetune(cases, args.output_dir, options, progress=report, extra_sources=sources)
    except KeyboardInterrupt:
        weights = args.output_dir / MODEL_FILE
        kept = f"the best weights so far are in {weights}" if weights.is_file() else "no weights were kept yet"
        print(f"error: interrupted; {kept}; the same command resumes the run", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        close()
    print(result.summary(), flush=True)
    return 0


def discover(inputs: list[Path]) -> list[FinetuneCase]:
    """The cases of every input, in the order given, each input by its layout."""
    if not inputs:
        raise UserError("no cases given", "fine-tuning learns from CT with their pancreas labels",
                        f"pass folders or CSV files of cases ({RULE})")
    cases = []
    for path in inputs:
        if not path.exists():
            raise UserError(f"input {path} does not exist", "", "check the path")
        if path.is_file() and path.name.lower().endswith(".csv"):
            cases += _csv_cases(path)
        elif path.is_dir() and (path / "imagesTr").is_dir() and (path / "labelsTr").is_dir():
            cases += _layout_cases("msd", (1, 2), path=str(path))  # MSD: the tumour (2) is inside the pancreas
        elif path.is_dir() and _nih_folders(path):
            images, labels = _nih_folders(path)
            cases += _layout_cases("nih", (1,), images=str(images), labels=str(labels))
        elif path.is_dir():
            cases += find_cases(path)
        else:
            raise UserError(f"{path} is neither a folder of cases nor a CSV file", "",
                            f"{RULE}, or list them in a CSV with ct and label columns")
    return unique_names(cases)


def _layout_cases(kind: str, label_values: tuple[int, ...], **where: str) -> list[FinetuneCase]:
    """The pairs of a layout that training reads (``training.data.source_pairs``)."""
    from .training.config import DataSource
    from .training.data import source_pairs

    pairs = source_pairs(DataSource(kind=kind, label_values=list(label_values), **where))
    return [FinetuneCase(case_name(image), image, label, label_values) for image, label in pairs]


def _nih_folders(root: Path) -> tuple[Path, Path] | None:
    images = next(iter(sorted(root.rglob("PANCREAS_*.nii.gz"))), None)
    labels = next(iter(sorted(root.rglob("label*.nii.gz"))), None)
    return (images.parent, labels.parent) if images and labels else None


def _csv_cases(path: Path) -> list[FinetuneCase]:
    with open(path, newline="", encoding="utf-8-sig") as stream:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(stream)
        if not {"ct", "label"} <= set(reader.fieldnames or []):
            raise UserError(f"{path.name} has no 'ct' and 'label' columns", "each row is one CT and its label",
                            "add the columns (an optional 'case' column names the cases)")
        cases = []
        for number, row in enumerate(reader, start=2):
            ct, label = ((row.get(key) or "").strip() for key in ("ct", "label"))
            if not ct or not label:
                raise UserError(f"row {number} of {path.name} lacks its ct or label", "", "fill it in or remove the row")
            ct_path, label_path = (p if p.is_absolute() else path.parent / p for p in (Path(ct), Path(label)))
            cases.append(FinetuneCase((row.get("case") or "").strip() or case_name(ct_path), ct_path, label_path))
    return cases


def synthetic_source(args: argparse.Namespace) -> tuple[list[PatchSource], Callable[[], None]]:
    """Synthetic CT of the label maps the bundled model was trained on (its split's training side), made
    by a background thread; none where the label maps are not (a warning says so)."""
    from AttentionUNetSegLib.locations import labelmaps_dir
    from AttentionUNetSegLib.weights import bundled_model_path, read_spec

    from .synthesis.catalog import labelmap_catalog, split_by_patient
    from .training.data import SyntheticCases

    folder = labelmaps_dir()
    if not folder.is_dir():
        print(f"warning: no label maps at {folder}, so no synthetic patches: your cases and their no-pancreas "
              "slabs only", file=sys.stderr)
        return [], lambda: None
    entries = split_by_patient(labelmap_catalog(folder))[0]
    spacing = read_spec(args.weights or bundled_model_path()).spacing_mm  # the patches' grid is the model's
    options = {"negative_probability": SYNTHETIC_NEGATIVES, "random_contrast_probability": RANDOM_CONTRAST}
    cases = SyntheticCases(entries, spacing, SYNTHETIC_POOL, seed=0, options=options)
    description = (f"synthetic CT of {len(entries)} label maps the bundled model was trained on "
                   f"({SYNTHETIC_NEGATIVES:.0%} with no pancreas in view)")
    return [PatchSource(cases.draw, SYNTHETIC_SHARE, description)], cases.close


def calibrate(args: argparse.Namespace) -> int:
    """The calibrate command's threshold (its held-out scans, its rule) for these weights, stored in them."""
    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter

    from .calibration import measure, ok_threshold, rates
    from .evaluation import calibration_cases

    if args.cases or args.output_dir:
        raise UserError("--calibrate takes a model file only", "it writes the threshold into that file",
                        "leave out the cases and --output-dir")
    if args.negatives < 1:
        raise UserError("--negatives must be at least 1", "the threshold lies above the most confident failure, "
                        "and scans without a pancreas are the failures every model has", "pass --negatives 30")
    refuse_bundled(args.calibrate)
    segmenter = Segmenter(args.calibrate, SegmentationOptions(device=args.device, tta=args.tta))
    spacing = segmenter.model.spec.spacing_mm
    cases = [measure(segmenter, *case) for case in calibration_cases(args.synthetic, args.negatives,
                                                                         spacing_mm=spacing)]
    threshold = ok_threshold(cases, args.tta)
    mode = "tta" if args.tta else "no_tta"
    record_verdict_thresholds(args.calibrate, {mode: threshold})
    found = rates(cases, threshold)
    print(f"ok threshold {threshold:.2f} ({mode.replace('_', ' ')}) stored in {args.calibrate}; on {len(cases)} "
          f"held-out scans: ok on {found['ok_on_bad_cases']} bad cases, {found['good_cases_flagged']} good cases "
          "flagged", flush=True)
    return 0
