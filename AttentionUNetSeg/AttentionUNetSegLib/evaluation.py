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


def shared_cases(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, CT file or DICOM folder, pancreas label) for each case of the shared data folder."""
    cases = []
    for folder in sorted(p for p in data_dir.iterdir() if (p / "pancreas.nii.gz").is_file()):
        image = folder / "ct.nii.gz" if (folder / "ct.nii.gz").is_file() else folder / "dicom"
        cases.append((folder.name, image, folder / "pancreas.nii.gz"))
    return cases


def score_case(name, result, image, reference: np.ndarray, trained_on: set[str]) -> CaseScore:
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
    )


def evaluate(segmenter, cases, output_dir: Path) -> list[CaseScore]:
    """Segment every case, score it, and write CSV, markdown and a PNG montage into ``output_dir``."""
    from .imageio import read_image
    from .preview import render_overlays

    output_dir.mkdir(parents=True, exist_ok=True)
    trained_on = set(segmenter.model.spec.training.get("real_cases", []))
    scores, panels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, image_path, label_path in cases:
            image = read_image(image_path)
            reference = reference_on_grid(label_path, image)
            result = segmenter.segment(image)
            score = score_case(name, result, image, reference, trained_on)
            scores.append(score)
            panels.append(render_overlays(image, result.mask, result.attention, Path(tmp) / f"{name}.png",
                                          title=f"{name}: Dice {score.dice:.3f}, {score.volume_ml:.1f} mL "
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
    overall = {"case": "mean", "in_training": ""}
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
    parser.add_argument("--output-dir", default="output/evaluation", help="where the tables and montage go")
    parser.add_argument("--weights", help="model file (default: the bundled model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from .engine import SegmentationOptions, Segmenter
    from .errors import UserError
    from .locations import shared_data_dir

    if args.pairs:
        cases = [(Path(i).parent.name if Path(i).name in ("ct.nii.gz", "dicom") else Path(i).name, Path(i), Path(lbl))
                 for i, lbl in args.pairs]
    else:
        data_dir = Path(args.data_dir) if args.data_dir else shared_data_dir()
        cases = shared_cases(data_dir) if data_dir.is_dir() else []
    if not cases:
        raise UserError("no cases to evaluate", "no --pairs given and no cases in the data folder",
                        "pass --pairs IMAGE LABEL or --data-dir")
    segmenter = Segmenter(args.weights, SegmentationOptions(device=args.device))
    scores = evaluate(segmenter, cases, Path(args.output_dir))
    print((Path(args.output_dir) / "evaluation.md").read_text(), end="")
    print(f"written: {Path(args.output_dir) / 'evaluation.csv'}, {Path(args.output_dir) / 'evaluation.png'}")
    return 0 if scores else 1
