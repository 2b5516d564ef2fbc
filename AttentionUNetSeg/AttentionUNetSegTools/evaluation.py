"""Score the engine on image/label pairs: Dice, HD95, surface Dice at 2 mm and volume error per case.

Metrics are computed on each CT's own grid (the label is brought there through physical space), with
MONAI's surface-distance metrics. Writes a CSV, a markdown table and a PNG montage of overlays.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

NSD_TOLERANCE_MM = 2.0


@dataclass
class CaseScore:
    case: str
    dice: float
    hd95_mm: float
    surface_dice_2mm: float
    volume_ml: float
    reference_ml: float
    volume_difference_pct: float
    in_training: str
    labels: str  # who made the reference: "silver" (a model) or "manual" (experts)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty."""
    prediction, reference = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def surface_scores(prediction: np.ndarray, reference: np.ndarray, spacing_zyx) -> tuple[float, float]:
    """HD95 (mm) and normalised surface Dice at 2 mm; NaN when either mask is empty."""
    if not prediction.any() or not reference.any():
        return math.nan, math.nan
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    def one_hot(mask):
        mask = torch.as_tensor(mask > 0)
        return torch.stack([~mask, mask])[None].float()

    pred, ref = one_hot(prediction), one_hot(reference)
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated internal argument
        hd95 = compute_hausdorff_distance(pred, ref, include_background=False, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(pred, ref, class_thresholds=[NSD_TOLERANCE_MM], include_background=False,
                                   spacing=spacing)
    return float(hd95.item()), float(nsd.item())


def reference_on_grid(label_path: Path, image: sitk.Image, values=(1,)) -> np.ndarray:
    """The label's pancreas on the CT's grid, matched through physical space (never by voxel index)."""
    label = sitk.ReadImage(str(label_path))
    pancreas = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(label), list(values)).astype(np.uint8))
    pancreas.CopyInformation(label)
    on_grid = sitk.Resample(pancreas, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(on_grid)


@dataclass
class Case:
    """A named CT and its reference, loaded only when scored."""

    name: str
    load: Callable[[], tuple[sitk.Image, np.ndarray]]
    labels: str


def file_case(name: str, image_path: Path, label_path: Path, labels: str) -> Case:
    from AttentionUNetSegLib.imageio import read_image

    def load():
        image = read_image(image_path)
        return image, reference_on_grid(label_path, image)

    return Case(name, load, labels)


def shared_cases(data_dir: Path) -> list[Case]:
    """The cases of the shared data folder (CT file or DICOM folder, pancreas label made by TotalSegmentator)."""
    cases = []
    for folder in sorted(p for p in data_dir.iterdir() if (p / "pancreas.nii.gz").is_file()):
        image = folder / "ct.nii.gz" if (folder / "ct.nii.gz").is_file() else folder / "dicom"
        cases.append(file_case(folder.name, image, folder / "pancreas.nii.gz", "silver"))
    return cases


def held_out_label_maps() -> list:
    """Label maps of the patients that training holds out (the split of the default training settings)."""
    from AttentionUNetSegLib.locations import labelmaps_dir
    from .synthesis.catalog import labelmap_catalog, split_by_patient
    from .training.config import TrainingConfig

    defaults = TrainingConfig()
    return split_by_patient(labelmap_catalog(labelmaps_dir()), defaults.validation_fraction, defaults.seed)[1]


def synthetic_cases(entries, count: int, spacing_mm, seed: int) -> list[Case]:
    """Synthetic CT made from the given label maps; the reference is the map's own pancreas."""
    from .synthesis.generator import SyntheticCTGenerator

    generator = SyntheticCTGenerator(entries, spacing_mm=spacing_mm, seed=seed)
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        sample = generator.sample_case(rng)

        def load(sample=sample):
            image = sitk.GetImageFromArray(sample.image)
            image.SetSpacing(tuple(float(s) for s in spacing_mm))
            return image, sample.pancreas

        labels = "manual" if sample.host.manual else "silver"
        cases.append(Case(f"synthetic-{index}-{sample.host.patient}-{sample.look.phase}", load, labels))
    return cases


def score_case(name, result, image, reference: np.ndarray, trained_on: set[str], labels: str) -> CaseScore:
    prediction = sitk.GetArrayViewFromImage(result.mask) > 0
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    reference_ml = float(reference.sum()) * voxel_ml
    hd95, nsd = surface_scores(prediction, reference, image.GetSpacing()[::-1])
    return CaseScore(
        case=name,
        dice=round(dice(prediction, reference), 4),
        hd95_mm=round(hd95, 2),
        surface_dice_2mm=round(nsd, 4),
        volume_ml=round(result.volume_ml, 2),
        reference_ml=round(reference_ml, 2),
        volume_difference_pct=round(100.0 * (result.volume_ml - reference_ml) / reference_ml, 1) if reference_ml else
        math.nan,
        in_training="yes" if name in trained_on else "no",
        labels=labels,
    )


def evaluate(segmenter, cases, output_dir: Path) -> list[CaseScore]:
    """Segment every case, score it, and write CSV, markdown and a PNG montage into ``output_dir``."""
    from .preview import render_overlays

    output_dir.mkdir(parents=True, exist_ok=True)
    trained_on = set(segmenter.model.spec.training.get("real_cases", []))
    scores, panels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            image, reference = case.load()
            result = segmenter.segment(image)
            score = score_case(case.name, result, image, reference, trained_on, case.labels)
            scores.append(score)
            panels.append(render_overlays(image, result.mask, result.attention, Path(tmp) / f"{case.name}.png",
                                          title=f"{case.name}: Dice {score.dice:.3f}, {score.volume_ml:.1f} mL "
                                                f"(reference {score.reference_ml:.1f} mL)"))
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


def _write_tables(scores: list[CaseScore], output_dir: Path) -> None:
    rows = [asdict(s) for s in scores]
    overall = {"case": "mean", "in_training": "", "labels": ""}
    for key in ("dice", "hd95_mm", "surface_dice_2mm", "volume_difference_pct"):
        values = [r[key] for r in rows if not math.isnan(r[key])]
        overall[key] = round(float(np.mean(values)), 4) if values else math.nan
    rows.append(overall)
    fields = list(asdict(scores[0]))
    with (output_dir / "evaluation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in fields) + " |" for r in rows]
    (output_dir / "evaluation.md").write_text("\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                        help="a CT (file or DICOM folder) and its label map, label 1 = pancreas; repeatable")
    parser.add_argument("--data-dir", help="a folder of cases (CASE/ct.nii.gz or CASE/dicom, CASE/pancreas.nii.gz);"
                        " default: the shared data folder")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also score N synthetic CTs made from label maps of patients held out from training")
    parser.add_argument("--labels", choices=("silver", "manual"), default="manual",
                        help="who made the --pairs labels (reported in the table; default: manual)")
    parser.add_argument("--output-dir", default="output/evaluation", help="where the tables and montage go")
    parser.add_argument("--weights", help="model file (default: the bundled model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter
    from AttentionUNetSegLib.errors import UserError
    from AttentionUNetSegLib.locations import shared_data_dir

    if args.pairs:
        cases = [file_case(_case_name(Path(i)), Path(i), Path(lbl), args.labels) for i, lbl in args.pairs]
    else:
        data_dir = Path(args.data_dir) if args.data_dir else shared_data_dir()
        cases = shared_cases(data_dir) if data_dir.is_dir() else []
    segmenter = Segmenter(args.weights, SegmentationOptions(device=args.device))
    if args.synthetic:
        cases += synthetic_cases(held_out_label_maps(), args.synthetic, segmenter.model.spec.spacing_mm, seed=1234)
    if not cases:
        raise UserError("no cases to evaluate", "no --pairs given and no cases in the data folder",
                        "pass --pairs IMAGE LABEL, --data-dir or --synthetic N")
    scores = evaluate(segmenter, cases, Path(args.output_dir))
    print((Path(args.output_dir) / "evaluation.md").read_text(), end="")
    print(f"written: {Path(args.output_dir) / 'evaluation.csv'}, {Path(args.output_dir) / 'evaluation.png'}")
    return 0 if scores else 1


def _case_name(image: Path) -> str:
    """The case folder for ``CASE/ct.nii.gz`` or ``CASE/dicom``, else the file name."""
    return image.parent.name if image.name in ("ct.nii.gz", "dicom") else image.name
