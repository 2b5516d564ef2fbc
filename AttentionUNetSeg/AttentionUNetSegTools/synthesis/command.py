"""Write a few synthetic CT cases made from label maps (NIfTI) and a PNG montage to look at.

Each case is a CT-like image in HU (int16) and its pancreas label (uint8), made from the label maps
(default: the shared label map folder, or $ATTENTION_UNET_SEG_LABELMAPS); a CSV lists where each came
from and its contrast phase. Existing files are never replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import csv
import textwrap
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.imageio import replacing
from AttentionUNetSegLib.locations import labelmaps_dir

WINDOW_HU = (-200, 300)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labelmaps", type=Path, help="folder of label map folders (default: the shared one)")
    parser.add_argument("--count", type=int, default=4, help="number of cases (default: 4)")
    parser.add_argument("--output-dir", type=Path, default=Path("output/synthetic"),
                        help="where to write (default: ./output/synthetic)")
    parser.add_argument("--spacing", type=float, default=3.0, help="isotropic voxel size in mm (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier run")


def run(args: argparse.Namespace) -> int:
    from AttentionUNetSegLib.outputs import check_output_folder
    from .catalog import labelmap_catalog
    from .generator import SyntheticCTGenerator

    if not 1 <= args.count <= 100:
        raise UserError(f"--count {args.count} is outside 1..100", "", "ask for a few cases")
    if not 0.5 <= args.spacing <= 8:
        raise UserError(f"--spacing {args.spacing} mm is outside 0.5..8", "", "use e.g. 3")
    outputs = output_paths(args.output_dir, args.count)
    check_output_folder(args.output_dir)
    existing = [p for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists", "an earlier run wrote there",
                        "pass --overwrite or choose another --output-dir")

    entries = labelmap_catalog(args.labelmaps or labelmaps_dir())
    generator = SyntheticCTGenerator(entries, spacing_mm=(args.spacing,) * 3, seed=args.seed)
    cases = []
    for index in range(args.count):
        cases.append(generator.sample_case())
        print(f"case {index + 1}/{args.count}: {describe(cases[-1])}", flush=True)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_cases(cases, args.output_dir)
    print(f"written: {args.count} cases, {args.output_dir / 'cases.csv'} and {args.output_dir / 'montage.png'}")
    return 0


def output_paths(folder: Path, count: int) -> list[Path]:
    names = [f"synthetic_{i:03d}_{kind}.nii.gz" for i in range(count) for kind in ("ct", "pancreas")]
    return [folder / name for name in (*names, "cases.csv", "montage.png")]


def describe(case) -> str:
    volume_ml = case.pancreas.sum() * np.prod(case.spacing_mm) / 1000
    source = "" if case.pancreas_source is case.host else f", pancreas from {case.pancreas_source.patient}"
    return (f"{case.look.phase}, body from {case.host.patient}{source}, pancreas {volume_ml:.0f} mL at "
            f"{case.look.pancreas_hu:.0f} HU, {case.image.shape[2]}x{case.image.shape[1]}x{case.image.shape[0]}")


def write_cases(cases, folder: Path) -> None:
    from AttentionUNetSegLib.imageio import write_image

    rows = []
    for index, case in enumerate(cases):
        ct = np.clip(np.rint(case.image), -1024, 3071).astype(np.int16)
        write_image(as_image(ct, case.spacing_mm), folder / f"synthetic_{index:03d}_ct.nii.gz")
        write_image(as_image(case.pancreas, case.spacing_mm), folder / f"synthetic_{index:03d}_pancreas.nii.gz")
        rows.append({
            "case": f"synthetic_{index:03d}",
            "phase": case.look.phase,
            "host": case.host.patient,
            "pancreas_from": case.pancreas_source.patient,
            "pancreas_ml": round(float(case.pancreas.sum() * np.prod(case.spacing_mm) / 1000), 1),
            "pancreas_hu": round(case.look.pancreas_hu, 1),
            "noise_hu": round(case.look.noise_hu, 1),
            "slice_thickness_mm": round(case.look.slice_thickness_mm, 1),
        })
    with replacing(folder / "cases.csv") as path:
        _write_csv(rows, path)
    with replacing(folder / "montage.png") as path:
        write_montage(cases, path)


def as_image(array: np.ndarray, spacing_mm) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_mm])
    return image


def _write_csv(rows, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_montage(cases, path: Path) -> None:
    """One row per case: axial, coronal and sagittal planes through the pancreas, its outline in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(cases), 3, figsize=(12, 4 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        z, y, x = np.argwhere(case.pancreas).mean(axis=0).astype(int)
        sx, sy, sz = case.spacing_mm
        planes = (
            (case.image[z], case.pancreas[z], sy / sx, "axial"),
            (case.image[::-1, y], case.pancreas[::-1, y], sz / sx, "coronal"),
            (case.image[::-1, :, x], case.pancreas[::-1, :, x], sz / sy, "sagittal"),
        )
        for axis, (image, label, aspect, name) in zip(row, planes):
            axis.imshow(image, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect)
            axis.contour(label, levels=[0.5], colors="red", linewidths=0.8)
            axis.set_title(textwrap.fill(describe(case), 60) if name == "axial" else name, fontsize=8)
            axis.axis("off")
    figure.suptitle(f"synthetic CT, window {WINDOW_HU[0]}..{WINDOW_HU[1]} HU; red: pancreas label", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)
