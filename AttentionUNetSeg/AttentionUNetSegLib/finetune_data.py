"""The cases a fine-tune learns from: (CT, pancreas label) pairs found by the naming rule, checked, brought onto
the model's grid, and cut into augmented patches (torch and numpy only: this runs in Slicer's child process).

The naming rule, in a folder and all its subfolders (hidden ones skipped):

- a case folder: the CT as ``ct.<ext>`` or as a DICOM series in a subfolder ``ct/`` or ``dicom/``, and the label
  as ``label.<ext>`` or ``pancreas.<ext>``; the case is named after the folder (other files are ignored);
- side by side: the CT ``X.<ext>`` (or a DICOM series folder ``X/``) and its label ``X_label.<ext>`` or
  ``X.seg.nrrd``; the case is named ``X``.

``<ext>`` is ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or ``.seg.nrrd``. A label holds 1 = pancreas (0 elsewhere)
on its CT's own voxels: the same voxel grid, stored in any axis order or direction (a DICOM series and a NIfTI
label of it may flip an axis), never cropped or resampled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import geometry
from .engine import AIR_HU
from .errors import UserError
from .imageio import dicom_series_ids, read_image, validate_ct

EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
CASE_FOLDER_CT, CASE_FOLDER_LABELS, DICOM_FOLDERS = "ct", ("label", "pancreas"), ("ct", "dicom")
LABEL_SUFFIX = "_label"
RULE = ("name them CASE/ct.nii.gz with CASE/label.nii.gz (or a DICOM folder CASE/dicom/), or X.nii.gz beside "
        "X_label.nii.gz or X.seg.nrrd")
# No-pancreas slabs: as far from the gland and as long as the negatives the bundled model was trained on.
NEGATIVE_MARGIN_MM, NEGATIVE_MIN_MM = 25.0, 60.0
LATTICE_TOLERANCE = 0.05  # voxels: header rounding, not another grid
FOREGROUND_FRACTION = 0.67  # patches centred on a pancreas voxel, as in training
FOREGROUND_JITTER = 8  # voxels around that centre
AFFINE_PROBABILITY, MAX_ROTATION, MAX_SCALE = 0.3, 0.2, 0.15  # radians; relative: training's RandAffine
INTENSITY_PROBABILITY = 0.3  # each of: scale, shift, gamma, noise (training's MONAI intensity transforms)


@dataclass(frozen=True)
class FinetuneCase:
    name: str
    ct: Path  # a CT file or a DICOM series folder
    label: Path
    label_values: tuple[int, ...] = (1,)  # the values that are pancreas (MSD: 1 and 2, the tumour is inside it)


@dataclass
class Volume:
    """A CT (HU) and its pancreas mask as (z, y, x) arrays on the model's canonical grid."""

    ct: np.ndarray
    pancreas: np.ndarray
    name: str
    foreground: np.ndarray = field(init=False, repr=False)  # the pancreas voxels' indices, found once

    def __post_init__(self):
        self.foreground = np.argwhere(self.pancreas)


@dataclass
class HeldOut:
    """The case kept out of training, at its own resolution, to score the weights as users will run them."""

    name: str
    image: sitk.Image
    pancreas: np.ndarray  # (z, y, x) on the image's grid


# --- finding cases ---------------------------------------------------------------------------------------


def find_cases(folder: Path) -> list[FinetuneCase]:
    """The cases under ``folder`` by the naming rule, sorted by path; a CT without its label is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of cases", "", RULE)
    cases = []
    for here, subfolders, files in os.walk(folder):
        here = Path(here)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files = sorted(f for f in files if not f.startswith("."))
        case = _case_folder(here, files, subfolders)
        if case is not None:
            cases.append(case)
            subfolders[:] = []  # its DICOM folder is part of it
        else:
            cases.extend(_side_by_side(here, files, subfolders))
    return unique_names(cases)


def case_name(ct: Path) -> str:
    """The CT file's stem, or its folder's name for ``CASE/ct.*`` and DICOM folders ``CASE/dicom``."""
    parts = _split(Path(ct).name)
    stem = parts[0] if parts else Path(ct).name
    return Path(ct).resolve().parent.name if stem.lower() in DICOM_FOLDERS else stem


def unique_names(cases: Sequence[FinetuneCase]) -> list[FinetuneCase]:
    """Each (CT, label) pair once, where it first appears, under a name no other case has."""
    seen_pairs, seen_names, named = set(), {}, []
    for case in cases:
        pair = (Path(case.ct).resolve(), Path(case.label).resolve())
        if pair in seen_pairs:
            continue
        seen_pairs.add(pair)
        seen_names[case.name] = seen_names.get(case.name, 0) + 1
        name = case.name if seen_names[case.name] == 1 else f"{case.name}-{seen_names[case.name]}"
        named.append(FinetuneCase(name, case.ct, case.label, case.label_values))
    return named


def _split(name: str) -> tuple[str, str] | None:
    """``X.nii.gz`` -> ``("X", ".nii.gz")``; None for other files."""
    suffix = next((s for s in EXTENSIONS if name.lower().endswith(s)), None)
    return (name[: -len(suffix)], suffix) if suffix else None


def _case_folder(here: Path, files: list[str], subfolders: list[str]) -> FinetuneCase | None:
    stems = {parts[0]: here / name for name in files if (parts := _split(name))}
    ct = stems.get(CASE_FOLDER_CT) or next((here / d for d in subfolders if d in DICOM_FOLDERS
                                            and dicom_series_ids(here / d)), None)
    label = next((stems[s] for s in CASE_FOLDER_LABELS if s in stems), None)
    if ct is None and label is None:
        return None
    if ct is None or label is None:
        found, missing = (ct, "its label (label.* or pancreas.*)") if label is None else (label, "its CT (ct.*)")
        raise UserError(f"case folder {here} has {found.name} but not {missing}", "each CT needs its label", RULE)
    return FinetuneCase(here.name, ct, label)


def _side_by_side(here: Path, files: list[str], subfolders: list[str]) -> Iterator[FinetuneCase]:
    cts, labels = {}, {}
    for name in files:
        stem, suffix = _split(name) or ("", "")
        if suffix.lower() == ".seg.nrrd":
            labels[stem] = name
        elif stem.endswith(LABEL_SUFFIX):
            labels[stem[: -len(LABEL_SUFFIX)]] = name
        elif stem:
            cts[stem] = here / name
    cts.update({d: here / d for d in subfolders if d in labels and d not in cts and dicom_series_ids(here / d)})
    for stem in sorted(set(cts) | set(labels)):
        if stem not in labels:
            raise UserError(f"{cts[stem]} has no label beside it", f"expected {stem}{LABEL_SUFFIX}.nii.gz or "
                            f"{stem}.seg.nrrd", RULE)
        if stem not in cts:
            raise UserError(f"label {here / labels[stem]} has no CT beside it", f"expected {stem}.nii.gz (or a "
                            f"DICOM folder {stem}/)", RULE)
        yield FinetuneCase(stem, cts[stem], here / labels[stem])


# --- checking and loading cases ----------------------------------------------------------------------------


def read_case(case: FinetuneCase) -> tuple[sitk.Image, np.ndarray]:
    """The CT and its pancreas mask on the CT's grid, (z, y, x); one clear line for each way a case is wrong."""
    image = read_image(case.ct)
    validate_ct(image, f"CT {case.ct}")
    label = read_image(case.label)
    values = sitk.GetArrayViewFromImage(label)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255 or not np.array_equal(values, np.round(values)):
        raise UserError(f"label {case.label} is not a label map (values {low:g}..{high:g})",
                        "a label holds whole numbers, 1 = pancreas", "pass the label, not a CT or a probability map")
    _check_same_voxels(image, label, case)
    pancreas = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask = np.isin(sitk.GetArrayViewFromImage(pancreas), case.label_values)
    if not mask.any():
        raise UserError(f"label {case.label} is empty", f"no voxel has the value {' or '.join(map(str, case.label_values))}"
                        " (pancreas)", "draw the pancreas in it, or leave the case out")
    return image, mask


def _check_same_voxels(image: sitk.Image, label: sitk.Image, case: FinetuneCase) -> None:
    """The label's voxels are the CT's: each label axis steps one CT voxel along one CT axis, and the label
    covers the whole CT (so a flipped axis passes; a crop, another spacing or another scan does not)."""
    steps = np.array([image.TransformPhysicalPointToContinuousIndex(label.TransformContinuousIndexToPhysicalPoint(
        [float(i == axis) for i in range(3)])) for axis in range(3)])
    origin = np.array(image.TransformPhysicalPointToContinuousIndex(label.GetOrigin()))
    steps -= origin
    magnitudes = np.abs(np.round(steps))
    far = origin + (np.array(label.GetSize()) - 1) @ steps
    corners = np.sort(np.stack([origin, far]), axis=0)
    expected = np.stack([np.zeros(3), np.array(image.GetSize()) - 1.0])
    same = (np.allclose(steps, np.round(steps), atol=LATTICE_TOLERANCE) and magnitudes.max() <= 1
            and np.all(magnitudes.sum(axis=0) == 1) and np.all(magnitudes.sum(axis=1) == 1)
            and np.allclose(corners, expected, atol=LATTICE_TOLERANCE))
    if not same:
        raise UserError(f"label {case.label} is not on the grid of its CT {case.ct.name}",
                        f"label {_describe_grid(label)}, CT {_describe_grid(image)}",
                        "save the label with the CT as its reference geometry (whole CT, same voxels)")


def _describe_grid(image: sitk.Image) -> str:
    size = "x".join(map(str, image.GetSize()))
    spacing = "x".join(f"{s:g}" for s in image.GetSpacing())
    return f"{size} voxels of {spacing} mm at ({', '.join(f'{o:.1f}' for o in image.GetOrigin())})"


def on_model_grid(image: sitk.Image, mask: np.ndarray, spacing_mm, name: str) -> Volume:
    """The CT and its mask on the canonical grid through physical space, as training's ``load_pair`` does."""
    grid = geometry.canonical_grid(image, spacing_mm)
    ct = geometry.downsample_smoothly(image, grid, AIR_HU)
    as_float = sitk.GetImageFromArray(mask.astype(np.float32))
    as_float.CopyInformation(image)
    pancreas = geometry.resample_like(as_float, grid, sitk.sitkLinear, 0.0)
    return Volume(sitk.GetArrayFromImage(ct).astype(np.float32),
                  (sitk.GetArrayFromImage(pancreas) > 0.5).astype(np.uint8), name)


def pancreas_free_slabs(volume: Volume, slice_mm: float) -> list[Volume]:
    """The slabs of a case above and below its pancreas, far enough from it and long enough, labelled empty:
    the "no pancreas" patches the user's own cases can give (training's ``crops`` source does the same)."""
    rows = np.nonzero(volume.pancreas.any(axis=(1, 2)))[0]
    if not rows.size:
        return []
    margin, shortest = math.ceil(NEGATIVE_MARGIN_MM / slice_mm), NEGATIVE_MIN_MM / slice_mm
    slabs = {"below": slice(0, int(rows.min()) - margin), "above": slice(int(rows.max()) + margin + 1, len(volume.ct))}
    return [Volume(volume.ct[rows_kept].copy(), np.zeros_like(volume.pancreas[rows_kept]), f"{volume.name}-{side}")
            for side, rows_kept in slabs.items() if rows_kept.stop - rows_kept.start >= shortest]


# --- patches ---------------------------------------------------------------------------------------------


class VolumeDraw:
    """Draws one of a list of volumes (the user's cases, or their no-pancreas slabs)."""

    def __init__(self, volumes: Sequence[Volume]):
        self.volumes = list(volumes)

    def draw(self, rng: np.random.Generator) -> Volume:
        return self.volumes[rng.integers(len(self.volumes))]


def sample_patch(volume, patch_zyx, rng: np.random.Generator,
                 foreground_fraction: float = FOREGROUND_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """A patch centred near a random pancreas voxel (with probability ``foreground_fraction``) or anywhere,
    padded with air where the volume is smaller: how training and fine-tuning sample them. ``volume``: anything
    with ``ct``, ``pancreas`` and ``foreground`` (the pancreas voxels' indices)."""
    ct, label = _pad_to(volume.ct, patch_zyx, AIR_HU), _pad_to(volume.pancreas, patch_zyx, 0)
    foreground = volume.foreground if rng.random() < foreground_fraction else ()
    if len(foreground):
        centre = foreground[rng.integers(len(foreground))] + rng.integers(
            -FOREGROUND_JITTER, FOREGROUND_JITTER + 1, size=3)
    else:
        centre = np.array([rng.integers(n) for n in ct.shape])
    start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, patch_zyx, ct.shape)]
    box = tuple(slice(s, s + p) for s, p in zip(start, patch_zyx))
    return ct[box], label[box]


def _pad_to(array: np.ndarray, shape, value) -> np.ndarray:
    pad = [(0, max(p - n, 0)) for n, p in zip(array.shape, shape)]
    return np.pad(array, pad, constant_values=value) if any(after for _, after in pad) else array


def augment(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's augmentations without MONAI, on one normalised patch (1, z, y, x) and its label: a small
    rotation and scaling, then intensity scale, shift, gamma and noise. No flips: on the canonical (LPS) grid
    the pancreas lies left of the spine, which the network has learnt and the verdict checks."""
    if rng.random() < AFFINE_PROBABILITY:
        image, label = _affine(image, label, rng)
    if rng.random() < INTENSITY_PROBABILITY:
        image = image * (1 + rng.uniform(-0.1, 0.1))
    if rng.random() < INTENSITY_PROBABILITY:
        image = image + rng.uniform(-0.05, 0.05)
    if rng.random() < INTENSITY_PROBABILITY:
        low, high = image.min(), image.max()
        span = (high - low).clamp(min=1e-6)
        image = ((image - low) / span) ** rng.uniform(0.8, 1.25) * span + low
    if rng.random() < INTENSITY_PROBABILITY:
        image = image + torch.from_numpy(rng.normal(0, rng.uniform(0, 0.03), image.shape).astype(np.float32)).to(
            image.device)
    return image, label


def _affine(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator):
    angles = rng.uniform(-MAX_ROTATION, MAX_ROTATION, 3)
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        turn = np.eye(3)
        a, b = [i for i in range(3) if i != axis]
        turn[a, a] = turn[b, b] = math.cos(angle)
        turn[a, b], turn[b, a] = -math.sin(angle), math.sin(angle)
        rotation = rotation @ turn
    matrix = rotation @ np.diag(1 + rng.uniform(-MAX_SCALE, MAX_SCALE, 3))
    theta = torch.zeros(1, 3, 4, dtype=torch.float32, device=image.device)
    theta[0, :, :3] = torch.from_numpy(matrix.astype(np.float32))
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    label = F.grid_sample(label[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return image, label.round().to(torch.long)
