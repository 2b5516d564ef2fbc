"""Training data: real (CT, label) pairs and synthetic CT, on the model's canonical grid, cut into patches."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib import geometry
from AttentionUNetSegLib.engine import AIR_HU
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.imageio import read_image

from ..metrics import NEGATIVE_MARGIN_MM, NEGATIVE_MIN_MM, pancreas_free_rows
from .config import DataSource, TrainingConfig, resolve_path

IMAGE_GLOBS = ("*.nii.gz", "*.nii", "*.nrrd", "*.mha")
STARTUP_SECONDS = 600  # loading ~150 label maps takes about a minute on a busy CPU


@dataclass
class Case:
    """A CT (HU) and its pancreas mask as (z, y, x) arrays on an identity-direction grid."""

    ct: np.ndarray
    pancreas: np.ndarray
    name: str
    # The pancreas voxels' indices, found once where the case is made (a worker process, for synthetic cases):
    # searched for every patch instead, they cost the training process 5 ms a patch.
    foreground: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.foreground = np.argwhere(self.pancreas)


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
    if source.kind in ("pairs", "crops"):
        return [(resolve_path(i), resolve_path(lbl)) for i, lbl in source.pairs]
    if source.kind == "msd":
        root = resolve_path(source.path)
        return _matched(root / "imagesTr", root / "labelsTr", lambda name: name)
    if source.kind == "nih":
        # NIH Pancreas-CT as NIfTI: PANCREAS_0001.nii.gz with label0001.nii.gz (or the same file names).
        images, labels = resolve_path(source.images), resolve_path(source.labels)
        return _matched(images, labels, lambda name: name.replace("PANCREAS_", "label"))
    raise UserError(f"unknown data source kind {source.kind!r}", "", "use msd, nih, pairs, crops or synthetic")


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
    """A pool of synthetic cases; one new case replaces a random one every ``patches_per_case`` draws.

    The cases come from a producer that makes one case ahead: a thread (``workers`` = 0: on a CPU shared
    with training, making cases only as fast as they are used keeps both cores for the network) or
    ``workers`` processes (a GPU machine, where generation is the bottleneck).
    """

    def __init__(self, entries, spacing_mm, pool_size: int, seed: int, options: dict | None = None,
                 patches_per_case: float = 2.0, workers: int = 0):
        self.pool_size = pool_size
        self.patches_per_case = patches_per_case
        self.rng = np.random.default_rng(seed)
        self.draws = 0
        arguments = (list(entries), tuple(spacing_mm), options or {})
        if workers:
            context = multiprocessing.get_context("spawn")
            self.queue, self.stop = context.Queue(maxsize=2 * workers), context.Event()
            self.producers = [context.Process(target=produce_cases, args=(*arguments, seed + 1 + i, self.queue,
                                                                          self.stop), daemon=True)
                              for i in range(workers)]
        else:
            self.queue, self.stop = queue.Queue(maxsize=1), threading.Event()
            self.producers = [threading.Thread(target=produce_cases, args=(*arguments, seed + 1, self.queue,
                                                                           self.stop), daemon=True)]
        for producer in self.producers:
            producer.start()
        self.pool = [self._first_case() for _ in range(max(2, pool_size // 4))]

    def _first_case(self) -> Case:
        try:
            return self.queue.get(timeout=STARTUP_SECONDS)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"no synthetic case within {STARTUP_SECONDS} s: the case producer failed") from None

    def draw(self, rng: np.random.Generator) -> Case:
        self.draws += 1
        if self.draws >= self.patches_per_case:
            try:
                case = self.queue.get_nowait()
            except queue.Empty:
                case = None  # the producer is behind: reuse the pool
            if case is not None:
                self.draws = 0
                if len(self.pool) < self.pool_size:
                    self.pool.append(case)
                else:
                    self.pool[self.rng.integers(len(self.pool))] = case
        return self.pool[rng.integers(len(self.pool))]

    def close(self) -> None:
        self.stop.set()
        for producer in self.producers:
            if isinstance(producer, threading.Thread):
                continue  # a daemon thread: it ends at its next put
            producer.join(timeout=5)
            if producer.is_alive():
                producer.terminate()


def produce_cases(entries, spacing_mm, options: dict, seed: int, cases, stop) -> None:
    """Make synthetic cases into the ``cases`` queue until ``stop`` is set."""
    from ..synthesis.generator import SyntheticCTGenerator

    generator = SyntheticCTGenerator(entries, spacing_mm=spacing_mm, seed=seed, **options)
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        sample = generator.sample_case(rng)
        case = Case(ct=sample.image, pancreas=sample.pancreas, name=f"synthetic-{sample.view}")
        while not stop.is_set():
            try:
                cases.put(case, timeout=1.0)
                break
            except queue.Full:
                continue


class PancreasFreeCrops:
    """Negatives from real CT: the slabs of each case above and below its pancreas (see ``pancreas_free_rows``)."""

    def __init__(self, source: DataSource, spacing_mm):
        self.cases = []
        for case in RealCases(source, spacing_mm).cases:
            rows = np.nonzero(case.pancreas.any(axis=(1, 2)))[0]
            slabs = pancreas_free_rows(rows, case.ct.shape[0], spacing_mm[2], NEGATIVE_MARGIN_MM, NEGATIVE_MIN_MM)
            self.cases += [Case(case.ct[rows_kept].copy(), np.zeros_like(case.pancreas[rows_kept]), f"{case.name}-{side}")
                           for side, rows_kept in slabs.items()]
        if not self.cases:
            raise UserError("no CT of the 'crops' source reaches far enough beyond its pancreas",
                            f"a negative crop keeps {NEGATIVE_MARGIN_MM:.0f} mm from the gland and is at least "
                            f"{NEGATIVE_MIN_MM:.0f} mm long", "list CT that extend above or below the pancreas")

    def draw(self, rng: np.random.Generator) -> Case:
        return self.cases[rng.integers(len(self.cases))]


def build_sources(config: TrainingConfig, train_entries) -> tuple[list, np.ndarray]:
    """Data sources and their draw probabilities."""
    sources, weights = [], []
    for source in config.sources:
        if source.kind == "synthetic":
            options = {"negative_probability": config.negative_fraction,
                       "random_contrast_probability": config.random_contrast_fraction}
            sources.append(SyntheticCases(train_entries, config.spacing_mm, config.synthetic_pool, config.seed,
                                          options, config.patches_per_case, config.data_workers))
        elif source.kind == "crops":
            sources.append(PancreasFreeCrops(source, config.spacing_mm))
        else:
            sources.append(RealCases(source, config.spacing_mm))
        weights.append(source.weight)
    if not sources:
        raise UserError("the training config names no data sources", "", "add entries under 'sources'")
    weights = np.asarray(weights, dtype=float)
    return sources, weights / weights.sum()
