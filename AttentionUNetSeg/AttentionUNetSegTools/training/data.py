"""Training data: real (CT, label) pairs and synthetic CT, on the model's canonical grid, cut into patches."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib import geometry
from AttentionUNetSegLib.engine import AIR_HU
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.imageio import read_image
from .config import DataSource, TrainingConfig, resolve_path

IMAGE_GLOBS = ("*.nii.gz", "*.nii", "*.nrrd", "*.mha")


@dataclass
class Case:
    """A CT (HU) and its pancreas mask as (z, y, x) arrays on an identity-direction grid."""

    ct: np.ndarray
    pancreas: np.ndarray
    name: str


def load_pair(image_path: Path, label_path: Path, spacing_mm, label_values=(1,)) -> Case:
    """Read a CT and its label map and bring both onto the canonical grid through physical space."""
    image = read_image(image_path)
    label = sitk.ReadImage(str(label_path))
    grid = geometry.canonical_grid(image, spacing_mm)
    ct = geometry.downsample_smoothly(image, grid, AIR_HU)
    pancreas = np.isin(sitk.GetArrayViewFromImage(label), list(label_values)).astype(np.float32)
    as_float = sitk.GetImageFromArray(pancreas)
    as_float.CopyInformation(label)
    on_grid = geometry.resample_like(as_float, grid, sitk.sitkLinear, 0.0)
    return Case(
        ct=sitk.GetArrayFromImage(ct),
        pancreas=(sitk.GetArrayFromImage(on_grid) > 0.5).astype(np.uint8),
        name=image_path.name,
    )


def source_pairs(source: DataSource) -> list[tuple[Path, Path]]:
    """The (image, label) files a folder source names, in the layouts users have."""
    if source.kind == "pairs":
        return [(resolve_path(i), resolve_path(lbl)) for i, lbl in source.pairs]
    if source.kind == "msd":
        root = resolve_path(source.path)
        return _matched(root / "imagesTr", root / "labelsTr", lambda name: name)
    if source.kind == "nih":
        # NIH Pancreas-CT as NIfTI: PANCREAS_0001.nii.gz with label0001.nii.gz (or the same file names).
        images, labels = resolve_path(source.images), resolve_path(source.labels)
        return _matched(images, labels, lambda name: name.replace("PANCREAS_", "label"))
    raise UserError(f"unknown data source kind {source.kind!r}", "", "use msd, nih, pairs or synthetic")


def _matched(images: Path, labels: Path, label_name) -> list[tuple[Path, Path]]:
    if not images.is_dir() or not labels.is_dir():
        raise UserError(f"data folders {images} / {labels} not found", "", "check the paths in the config")
    pairs = []
    for image in sorted(p for g in IMAGE_GLOBS for p in images.glob(g) if not p.name.startswith("._")):
        for candidate in (labels / label_name(image.name), labels / image.name):
            if candidate.is_file():
                pairs.append((image, candidate))
                break
    if not pairs:
        raise UserError(f"no image/label pairs in {images} and {labels}", "", "check the layout")
    return pairs


class RealCases:
    """All cases of a folder source, loaded once (they are small on the 3 mm grid)."""

    def __init__(self, source: DataSource, spacing_mm):
        values = source.label_values if source.kind != "msd" else [1, 2]  # MSD: tumour is inside the pancreas
        self.cases = [load_pair(i, lbl, spacing_mm, values) for i, lbl in source_pairs(source)]

    def draw(self, rng: np.random.Generator) -> Case:
        return self.cases[rng.integers(len(self.cases))]


class SyntheticCases:
    """A pool of synthetic cases, one replaced at a time by a background thread while training runs."""

    def __init__(self, entries, spacing_mm, pool_size: int, seed: int):
        from ..synthesis.generator import SyntheticCTGenerator

        self.generator = SyntheticCTGenerator(entries, spacing_mm=spacing_mm, seed=seed)
        self.rng = np.random.default_rng(seed)
        self.pool = [self._make() for _ in range(max(2, pool_size // 4))]
        self.pool_size = pool_size
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._refresh, daemon=True)
        self.thread.start()

    def _make(self) -> Case:
        ct, pancreas = self.generator.sample(self.rng)
        return Case(ct=ct, pancreas=pancreas, name="synthetic")

    def _refresh(self) -> None:
        while not self.stop.is_set():
            case = self._make()
            with self.lock:
                if len(self.pool) < self.pool_size:
                    self.pool.append(case)
                else:
                    self.pool[self.rng.integers(len(self.pool))] = case

    def draw(self, rng: np.random.Generator) -> Case:
        with self.lock:
            return self.pool[rng.integers(len(self.pool))]

    def close(self) -> None:
        self.stop.set()


def build_sources(config: TrainingConfig, train_entries) -> tuple[list, np.ndarray]:
    """Data sources and their draw probabilities."""
    sources, weights = [], []
    for source in config.sources:
        if source.kind == "synthetic":
            sources.append(SyntheticCases(train_entries, config.spacing_mm, config.synthetic_pool, config.seed))
        else:
            sources.append(RealCases(source, config.spacing_mm))
        weights.append(source.weight)
    if not sources:
        raise UserError("the training config names no data sources", "", "add entries under 'sources'")
    weights = np.asarray(weights, dtype=float)
    return sources, weights / weights.sum()


def sample_patch(case: Case, patch_zyx, rng: np.random.Generator, foreground_fraction: float):
    """A patch centred on a random pancreas voxel (with probability ``foreground_fraction``) or anywhere."""
    ct, label = _pad_to(case.ct, patch_zyx, AIR_HU), _pad_to(case.pancreas, patch_zyx, 0)
    foreground = np.argwhere(label) if rng.random() < foreground_fraction else np.empty((0, 3))
    if len(foreground):
        centre = foreground[rng.integers(len(foreground))] + rng.integers(-8, 9, size=3)
    else:
        centre = np.array([rng.integers(n) for n in ct.shape])
    start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, patch_zyx, ct.shape)]
    box = tuple(slice(s, s + p) for s, p in zip(start, patch_zyx))
    return ct[box], label[box]


def _pad_to(array: np.ndarray, shape, value) -> np.ndarray:
    pad = [(0, max(p - n, 0)) for n, p in zip(array.shape, shape)]
    return np.pad(array, pad, constant_values=value) if any(after for _, after in pad) else array
