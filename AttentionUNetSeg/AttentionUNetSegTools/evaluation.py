"""Score the engine on CT with a reference: Dice, HD95, surface Dice at 2 mm, volume error, and its verdict.

Metrics are computed on each CT's own grid (the label is brought there through physical space), with
MONAI's surface-distance metrics. Cases: the real CT of the shared data folder (silver labels), crops of
it with no pancreas in view (negatives: any "pancreas" found there is a false positive), and synthetic CT
of label-map patients that training held out, of every phase and of both negative views. Writes a CSV and
markdown tables per case and per source and phase, and a PNG montage of the real cases.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib.cli import add_model_arguments, load_segmenter

from .metrics import NEGATIVE_MARGIN_MM, NEGATIVE_MIN_MM, dice, pancreas_free_rows, surface_scores

# Phases of the shared cases (their README) and the trained-on case each repeats.
REAL_CASE_PHASES = {"ts-abdomen-3mm": "non-contrast", "ts-abdomen-3mm-crop": "non-contrast",
                    "ts-venous-dicom": "portal-venous"}
SAME_PATIENT = {"ts-abdomen-3mm-crop": "ts-abdomen-3mm"}
GOOD_DICE = 0.5  # the verdict's bar: "ok" must never be said below it
EVALUATION_SEED, CALIBRATION_SEED = 1234, 4321  # of the synthetic scans each scores (negatives: seed + 1)


@dataclass
class CaseScore:
    case: str
    source: str  # "real" or "synthetic/<label map folder>"
    phase: str
    view: str  # abdomen, above-pancreas or below-pancreas (the last two are negatives)
    labels: str  # who made the reference: "silver" (a model), "manual" (experts), "anatomy" (no pancreas in view)
    in_training: str
    dice: float
    hd95_mm: float
    surface_dice_2mm: float
    volume_ml: float
    reference_ml: float
    volume_difference_pct: float
    false_positive_ml: float  # negatives: everything found; NaN on cases with a pancreas
    qc: str
    confidence: float


@dataclass
class Case:
    """A named CT and its reference (None: no pancreas in view), loaded only when scored."""

    name: str
    load: Callable[[], tuple[sitk.Image, np.ndarray | None]]
    labels: str
    source: str = "real"
    phase: str = "unknown"
    view: str = "abdomen"
    patient: str = ""  # the patient, to say whether training saw it

def reference_on_grid(label_path: Path, image: sitk.Image, values=(1,)) -> np.ndarray:
    """The label's pancreas on the CT's grid, matched through physical space (never by voxel index)."""
    label = sitk.ReadImage(str(label_path))
    pancreas = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(label), list(values)).astype(np.uint8))
    pancreas.CopyInformation(label)
    on_grid = sitk.Resample(pancreas, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(on_grid)


def file_case(name: str, image_path: Path, label_path: Path, labels: str, phase: str = "unknown") -> Case:
    from AttentionUNetSegLib.imageio import read_image

    def load():
        image = read_image(image_path)
        return image, reference_on_grid(label_path, image)

    return Case(name, load, labels, phase=phase, patient=SAME_PATIENT.get(name, name))


def _shared_folders(data_dir: Path) -> list[tuple[Path, Path]]:
    """(case folder, CT file or DICOM folder) of every shared case with a pancreas label."""
    folders = sorted(p for p in Path(data_dir).iterdir() if (p / "pancreas.nii.gz").is_file())
    return [(f, f / "ct.nii.gz" if (f / "ct.nii.gz").is_file() else f / "dicom") for f in folders]


def shared_cases(data_dir: Path) -> list[Case]:
    """The cases of the shared data folder (CT file or DICOM folder, pancreas label made by TotalSegmentator)."""
    return [file_case(folder.name, image, folder / "pancreas.nii.gz", "silver", REAL_CASE_PHASES.get(folder.name,
                                                                                                     "unknown"))
            for folder, image in _shared_folders(data_dir)]


def negative_crops(image: sitk.Image, reference: np.ndarray) -> dict[str, sitk.Image]:
    """Slabs of ``image`` wholly above or below the reference pancreas (keys ``above-pancreas``,
    ``below-pancreas``), cut along the voxel axis closest to the patient's long axis; none too short."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2])))  # image axis (x, y, z order) most along world z
    array_axis = 2 - axis
    rows = np.nonzero(reference.any(axis=tuple(a for a in range(3) if a != array_axis)))[0]
    slabs = pancreas_free_rows(rows, reference.shape[array_axis], image.GetSpacing()[axis], NEGATIVE_MARGIN_MM,
                               NEGATIVE_MIN_MM)
    upward = direction[2, axis] > 0  # LPS: +z is superior
    crops = {}
    for side, rows_kept in slabs.items():
        index = [slice(None)] * 3
        index[axis] = rows_kept
        crops["above-pancreas" if (side == "high") == upward else "below-pancreas"] = image[tuple(index)]
    return crops


def real_negative_cases(data_dir: Path) -> list[Case]:
    """Crops of the shared cases with no pancreas in view (only those long enough: see ``negative_crops``)."""
    from AttentionUNetSegLib.imageio import read_image

    cases = []
    for folder, image_path in _shared_folders(data_dir):
        image = read_image(image_path)
        for view, crop in negative_crops(image, reference_on_grid(folder / "pancreas.nii.gz", image)).items():
            cases.append(Case(f"{folder.name}-{view}", lambda crop=crop: (crop, None), "anatomy", "real",
                              REAL_CASE_PHASES.get(folder.name, "unknown"), view, SAME_PATIENT.get(folder.name,
                                                                                                  folder.name)))
    return cases


def synthetic_cases(entries, count: int, spacing_mm, seed: int, views=("abdomen",)) -> list[Case]:
    """Synthetic CT made from the given label maps, the phases (and ``views``) taken in turn; the reference is
    the map's own pancreas (None for the negative views)."""
    from .synthesis.generator import SyntheticCTGenerator
    from .synthesis.intensities import PHASES, RANDOM_CONTRAST

    generator = SyntheticCTGenerator(entries, spacing_mm=spacing_mm, seed=seed)
    rng = np.random.default_rng(seed)
    looks = (*PHASES, RANDOM_CONTRAST)
    cases = []
    for index in range(count):
        view = views[index % len(views)]
        sample = generator.sample_case(rng, view=view, phase=looks[(index // len(views)) % len(looks)])

        def load(sample=sample):
            image = sitk.GetImageFromArray(sample.image)
            image.SetSpacing(tuple(float(s) for s in spacing_mm))
            return image, sample.pancreas if sample.view == "abdomen" else None

        labels = ("manual" if sample.host.manual else "silver") if view == "abdomen" else "anatomy"
        suffix = "" if view == "abdomen" else f"-{view}"
        cases.append(Case(f"synthetic-{index}-{sample.host.patient}-{sample.look.phase}{suffix}", load, labels,
                          f"synthetic/{sample.host.source}", sample.look.phase, view, sample.host.patient))
    return cases


def calibration_cases(synthetic: int, negatives: int, data_dir: Path | None = None,
                      labelmaps_dir: Path | None = None, spacing_mm=(3.0, 3.0, 3.0), seed: int = CALIBRATION_SEED
                      ) -> Iterator[tuple[str, sitk.Image, np.ndarray | None, str, str]]:
    """(name, image, reference mask or None for a negative, source, phase) for calibrating the verdict.

    Held-out synthetic patients of every phase (``synthetic`` cases, phases in turn), synthetic negatives
    above and below the gland, the shared real cases and their negative crops. Loaded one at a time. Their
    own seed makes other synthetic scans than ``evaluate`` scores, so that the verdict's numbers there are
    not measured on the cases its threshold was set on (the patients are the same held-out ones).
    """
    for case in evaluation_cases(synthetic, negatives, data_dir, labelmaps_dir, spacing_mm, seed):
        image, reference = case.load()
        yield case.name, image, reference, case.source, case.phase


def evaluation_cases(synthetic: int, negatives: int, data_dir: Path | None = None, labelmaps_dir: Path | None = None,
                     spacing_mm=(3.0, 3.0, 3.0), seed: int = EVALUATION_SEED, real: bool = True) -> list[Case]:
    """Real cases and their negative crops (with ``real``, when the data folder exists), then held-out
    synthetic cases."""
    from AttentionUNetSegLib.locations import shared_data_dir

    from .synthesis.catalog import held_out_label_maps

    data_dir = Path(data_dir) if data_dir else shared_data_dir()
    cases = shared_cases(data_dir) + real_negative_cases(data_dir) if real and data_dir.is_dir() else []
    if synthetic or negatives:
        held_out = held_out_label_maps(labelmaps_dir)
        cases += synthetic_cases(held_out, synthetic, spacing_mm, seed)
        cases += synthetic_cases(held_out, negatives, spacing_mm, seed + 1, views=("above-pancreas", "below-pancreas"))
    return cases


def score_case(case: Case, result, image: sitk.Image, reference: np.ndarray | None, trained_on: set[str]) -> CaseScore:
    prediction = sitk.GetArrayViewFromImage(result.mask) > 0
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    negative = reference is None
    reference = np.zeros(prediction.shape, bool) if negative else reference
    reference_ml = float(reference.sum()) * voxel_ml
    hd95, nsd = surface_scores(prediction, reference, image.GetSpacing()[::-1])
    return CaseScore(
        case=case.name,
        source=case.source,
        phase=case.phase,
        view=case.view,
        labels=case.labels,
        in_training=_in_training(case, trained_on),
        dice=math.nan if negative else round(dice(prediction, reference), 4),
        hd95_mm=round(hd95, 2),
        surface_dice_2mm=round(nsd, 4),
        volume_ml=round(result.volume_ml, 2),
        reference_ml=round(reference_ml, 2),
        volume_difference_pct=round(100.0 * (result.volume_ml - reference_ml) / reference_ml, 1) if reference_ml else
        math.nan,
        false_positive_ml=round(result.volume_ml, 2) if negative else math.nan,
        qc=result.verdict.qc,
        confidence=round(result.verdict.confidence, 3),
    )


def _in_training(case: Case, trained_on: set[str]) -> str:
    if case.source != "real":
        return "no"  # synthetic cases are made from held-out patients only
    if case.name in trained_on:
        return "yes"
    return "same patient" if case.patient in trained_on else "no"


def evaluate(segmenter, cases, output_dir: Path) -> list[CaseScore]:
    """Segment every case, score it, and write the tables and a PNG montage (real cases) into ``output_dir``."""
    from .preview import render_overlays

    output_dir.mkdir(parents=True, exist_ok=True)
    trained_on = set(segmenter.model.spec.training.get("real_cases", []))
    scores, panels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            image, reference = case.load()
            result = segmenter.segment(image, maps=("combined",) if case.source == "real" else ())
            score = score_case(case, result, image, reference, trained_on)
            scores.append(score)
            if case.source == "real":
                title = (f"{case.name}: {result.verdict.describe()}, {score.volume_ml:.1f} mL (reference "
                         f"{score.reference_ml:.1f} mL" + (")" if reference is None else f", Dice {score.dice:.3f})"))
                panels.append(render_overlays(image, result.mask, result.attention_maps["combined"],
                                              Path(tmp) / f"{case.name}.png", title=title))
        if panels:
            _montage(panels, output_dir / "evaluation.png")
    _write_tables(scores, output_dir)
    return scores


def _montage(panels: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [plt.imread(p) for p in panels]
    figure, axes = plt.subplots(len(images), 1, figsize=(10, 7 * len(images)), squeeze=False)
    for ax, image in zip(axes[:, 0], images):
        ax.imshow(image)
        ax.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=80, facecolor="black")
    plt.close(figure)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return round(float(np.mean(values)), 4) if values else math.nan


def summary_rows(scores: list[CaseScore], by_source: bool = False) -> list[dict]:
    """One row per (real or synthetic, phase, view), or with ``by_source`` per (source, view): cases, mean
    Dice, volume error, false-positive mL, verdicts."""
    groups: dict[tuple[str, str, str], list[CaseScore]] = {}
    for score in scores:
        kind = score.source if by_source else score.source.split("/")[0]
        groups.setdefault((kind, "all" if by_source else score.phase, score.view), []).append(score)
    rows = []
    for (source, phase, view), group in sorted(groups.items()):
        rows.append({
            "source": source, "phase": phase, "view": view, "cases": len(group),
            "labels": "/".join(sorted({s.labels for s in group})),
            "mean_dice": _mean(s.dice for s in group),
            "min_dice": min((s.dice for s in group if not math.isnan(s.dice)), default=math.nan),
            "mean_volume_difference_pct": _mean(s.volume_difference_pct for s in group),
            "mean_false_positive_ml": _mean(s.false_positive_ml for s in group),
            "max_false_positive_ml": max((s.false_positive_ml for s in group if not math.isnan(s.false_positive_ml)),
                                         default=math.nan),
            "qc_ok": sum(s.qc == "ok" for s in group), "qc_check": sum(s.qc == "check" for s in group),
            "qc_not_found": sum(s.qc == "not found" for s in group),
        })
    return rows


def verdict_summary(scores: list[CaseScore]) -> dict[str, str]:
    """How the verdict did: "ok" on failures (target: never), good cases flagged, negatives called found."""
    positives = [s for s in scores if s.view == "abdomen"]
    failures = [s for s in positives if s.dice < GOOD_DICE]
    good = [s for s in positives if s.dice >= GOOD_DICE]
    negatives = [s for s in scores if s.view != "abdomen"]
    return {
        f"ok on a case below Dice {GOOD_DICE}": f"{sum(s.qc == 'ok' for s in failures)} of {len(failures)}",
        f"good case (Dice >= {GOOD_DICE}) not ok": f"{sum(s.qc != 'ok' for s in good)} of {len(good)}",
        "negative not called 'not found'": f"{sum(s.qc != 'not found' for s in negatives)} of {len(negatives)}",
        "negative called ok": f"{sum(s.qc == 'ok' for s in negatives)} of {len(negatives)}",
    }


def _markdown(rows: list[dict], fields: list[str]) -> list[str]:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    return lines + ["| " + " | ".join(str(r.get(k, "")) for k in fields) + " |" for r in rows]


def _write_tables(scores: list[CaseScore], output_dir: Path) -> None:
    rows = [asdict(s) for s in scores]
    overall = {"case": "mean"}
    for key in ("dice", "hd95_mm", "surface_dice_2mm", "volume_difference_pct", "false_positive_ml"):
        overall[key] = _mean(r[key] for r in rows)
    rows.append(overall)
    fields = list(asdict(scores[0]))
    with (output_dir / "evaluation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary, sources = summary_rows(scores), summary_rows(scores, by_source=True)
    for name, table in (("summary.csv", summary), ("by_source.csv", sources)):
        with (output_dir / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    verdicts = [{"check": k, "count": v} for k, v in verdict_summary(scores).items()]
    lines = ["## Per case", "", *_markdown(rows, fields), "", "## Per phase and view", "",
             *_markdown(summary, list(summary[0])), "", "## Per source", "", *_markdown(sources, list(sources[0])),
             "", "## Verdict", "", *_markdown(verdicts, ["check", "count"])]
    (output_dir / "evaluation.md").write_text("\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                        help="a CT (file or DICOM folder) and its label map, label 1 = pancreas; repeatable")
    parser.add_argument("--data-dir", help="a folder of cases (CASE/ct.nii.gz or CASE/dicom, CASE/pancreas.nii.gz),"
                        " scored with their crops that hold no pancreas; default: the shared data folder")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also score N synthetic CTs (the phases in turn) made from label maps of patients held "
                        "out from training")
    parser.add_argument("--negatives", type=int, default=0, metavar="N",
                        help="also score N synthetic CTs of held-out patients with no pancreas in view")
    parser.add_argument("--labels", choices=("silver", "manual"), default="manual",
                        help="who made the --pairs labels (reported in the table; default: manual)")
    parser.add_argument("--output-dir", default="output/evaluation", help="where the tables and montage go")
    add_model_arguments(parser, progress=False)


def run(args: argparse.Namespace) -> int:
    from AttentionUNetSegLib.errors import UserError

    segmenter = load_segmenter(args)
    spacing = segmenter.model.spec.spacing_mm
    if args.pairs:
        cases = [file_case(_case_name(Path(i)), Path(i), Path(lbl), args.labels) for i, lbl in args.pairs]
        cases += evaluation_cases(args.synthetic, args.negatives, spacing_mm=spacing, real=False)
    else:
        cases = evaluation_cases(args.synthetic, args.negatives, args.data_dir, spacing_mm=spacing)
    if not cases:
        raise UserError("no cases to evaluate", "no --pairs given and no cases in the data folder",
                        "pass --pairs IMAGE LABEL, --data-dir or --synthetic N")
    scores = evaluate(segmenter, cases, Path(args.output_dir))
    print((Path(args.output_dir) / "evaluation.md").read_text(), end="")
    print(f"written: {Path(args.output_dir) / 'evaluation.csv'}, summary.csv, by_source.csv"
          + (f", {Path(args.output_dir) / 'evaluation.png'}" if (Path(args.output_dir) / "evaluation.png").is_file()
             else ""))
    return 0 if scores else 1


def _case_name(image: Path) -> str:
    """The case folder for ``CASE/ct.nii.gz`` or ``CASE/dicom``, else the file name."""
    return image.parent.name if image.name in ("ct.nii.gz", "dicom") else image.name
