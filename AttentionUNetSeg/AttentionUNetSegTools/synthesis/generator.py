"""SynthSeg-style synthetic CT: (CT-like image in HU, pancreas label) pairs from real label maps.

One sample: pick a whole-abdomen label map (the host) and, half of the time, another patient's pancreas
to swap in; reshape the pancreas and jitter the organs; warp the map (rotation, scaling, elastic) onto a
random field of view around the pancreas; fill everything unlabelled with a synthetic body; paint
intensities for a random contrast phase; simulate the scanner. A share of samples are negatives: a field
of view above the gland (upper abdomen, lung bases) or below it (lower abdomen, pelvis) with no pancreas
at all, so that the network learns to find nothing there. Label maps are read once, resampled to
the working spacing and kept in memory, so sampling is pure numpy/scipy on the host's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from AttentionUNetSegLib.errors import UserError

from .anatomy import add_body
from .catalog import LabelMapEntry
from .intensities import Appearance, draw_appearance, render
from .shapes import PANCREAS, bounding_box, jitter_organs, load_tissue_map, swap_in_pancreas, vary_pancreas, warp
from .vocabulary import TISSUE

# Donor glands outside these limits are mostly cystic tumours (README: a 868 mL case) or odd outliers
# (one 189 mm tall "pancreas"); they stay out of the swap.
MAX_DONOR_ML = 250.0
MAX_DONOR_HEIGHT_MM = 130.0
# Negatives: the field of view keeps this far from the gland (rotation and elastic warping move rows by
# less), and is at least this long.
NEGATIVE_MARGIN_MM = 25.0
NEGATIVE_MIN_MM = 60.0
VIEWS = ("abdomen", "above-pancreas", "below-pancreas")


@dataclass
class SyntheticCase:
    image: np.ndarray  # float32 HU, (z, y, x)
    pancreas: np.ndarray  # uint8 0/1, (z, y, x)
    tissues: np.ndarray  # uint8 tissue ids of the vocabulary, (z, y, x)
    spacing_mm: tuple[float, float, float]  # (x, y, z), identity direction
    host: LabelMapEntry
    pancreas_source: LabelMapEntry
    look: Appearance
    view: str = "abdomen"  # one of VIEWS; the two others hold no pancreas


class SyntheticCTGenerator:
    """Draws synthetic CT cases from label map entries (see ``catalog.labelmap_catalog``).

    ``sample(rng)`` -> (image float32 HU, pancreas uint8), both (z, y, x) on an identity-direction grid at
    ``spacing_mm`` (x, y, z). Same entries, spacing and rng state -> the same case.
    """

    def __init__(
        self,
        entries: list[LabelMapEntry],
        spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0),
        seed: int = 0,
        swap_probability: float = 0.5,
        fatty_pancreas_probability: float = 0.2,
        random_contrast_probability: float = 0.25,
        cut_pancreas_probability: float = 0.1,
        negative_probability: float = 0.0,
        appearance: Callable[[np.random.Generator], Appearance] | None = None,
        field_of_view_mm: float | None = None,
    ):
        self.entries = list(entries)
        self.hosts = [e for e in self.entries if not e.pancreas_only]
        if not self.hosts:
            raise UserError(
                "no whole-abdomen label map among the entries",
                "synthetic CT needs organs around the pancreas; pancreas-only maps only lend their shape",
                "include multi-organ label maps (e.g. WORD, BTCV)",
            )
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.vox = np.array(self.spacing_mm[::-1])  # (z, y, x)
        self.swap_probability = swap_probability
        self.fatty_pancreas_probability = fatty_pancreas_probability
        self.random_contrast_probability = random_contrast_probability
        self.cut_pancreas_probability = cut_pancreas_probability
        self.negative_probability = negative_probability
        # One scanner and protocol (a "site", see site.py): each case's look from ``appearance(rng)`` instead of
        # a random phase and scanner, and a fixed square field of view; None (the default): drawn per case.
        self.appearance = appearance
        self.field_of_view_mm = field_of_view_mm
        self.rng = np.random.default_rng(seed)
        self._maps: dict[str, np.ndarray] = {}
        self._donors: dict[str, np.ndarray | None] = {}

    def sample(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        case = self.sample_case(rng)
        return case.image, case.pancreas

    def sample_case(self, rng: np.random.Generator | None = None, view: str | None = None,
                    phase: str | None = None) -> SyntheticCase:
        """One case. ``view`` (one of VIEWS) forces the field of view, else negatives come at their rate;
        ``phase`` (intensities.PHASES or RANDOM_CONTRAST) forces the look."""
        rng = self.rng if rng is None else rng
        if view is None:
            view = "abdomen" if rng.random() >= self.negative_probability else VIEWS[1 + rng.integers(2)]
        for _ in range(20):
            case = self._try_sample(rng, view, phase)
            if case is not None:
                return case
        raise RuntimeError(f"twenty synthetic {view} cases in a row failed")  # a bug, not bad input

    def tissue_map(self, entry: LabelMapEntry) -> np.ndarray:
        """The entry's tissue map at the working spacing (read once, then kept)."""
        key = str(entry.path)
        if key not in self._maps:
            self._maps[key] = load_tissue_map(entry, self.spacing_mm)
        return self._maps[key]

    def donor_pancreas(self, entry: LabelMapEntry) -> np.ndarray | None:
        """The entry's pancreas mask cropped to itself, or None when it is implausible as a gland."""
        key = str(entry.path)
        if key not in self._donors:
            gland = self.tissue_map(entry) == PANCREAS
            box = bounding_box(gland)
            volume_ml = gland.sum() * np.prod(self.vox) / 1000
            height_mm = (box[0].stop - box[0].start) * self.vox[0] if box is not None else np.inf
            plausible = volume_ml <= MAX_DONOR_ML and height_mm <= MAX_DONOR_HEIGHT_MM
            self._donors[key] = gland[box].copy() if plausible else None
            if entry.pancreas_only:
                del self._maps[key]  # only the shape is ever needed
        return self._donors[key]

    def _try_sample(self, rng: np.random.Generator, view: str, phase: str | None) -> SyntheticCase | None:
        host = self.hosts[rng.integers(len(self.hosts))]
        tissues = self.tissue_map(host).copy()
        source = host
        if rng.random() < self.swap_probability:
            donor = self.entries[rng.integers(len(self.entries))]
            shape = self.donor_pancreas(donor) if donor is not host else None
            if shape is not None and swap_in_pancreas(tissues, shape, rng, self.vox):
                source = donor
        if rng.random() < 0.8:
            vary_pancreas(tissues, rng, self.vox)
        jitter_organs(tissues, rng)
        view_box = self._field_of_view(tissues, rng) if view == "abdomen" else self._negative_view(tissues, view, rng)
        if view_box is None:
            return None  # this host's map does not reach far enough beyond the gland
        tissues = warp(tissues, *view_box, rng, self.vox, elastic_mm=rng.uniform(0, 4))
        pancreas = tissues == PANCREAS
        if pancreas.any() != (view == "abdomen") or (tissues > 0).sum() < 2000:
            return None
        add_body(tissues, rng, self.vox)
        if self.appearance is not None:
            look = self.appearance(rng)
        else:
            look = draw_appearance(rng, self.fatty_pancreas_probability, self.random_contrast_probability, phase)
        image = render(tissues, look, rng, self.vox)
        return SyntheticCase(image, pancreas.astype(np.uint8), tissues, self.spacing_mm, host, source, look, view)

    def _field_of_view(self, tissues: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, int, int], np.ndarray]:
        """A random box (shape, centre in source voxels) that holds the pancreas with some abdomen around."""
        gland = np.argwhere(tissues == PANCREAS)
        low, high = gland.min(axis=0), gland.max(axis=0)
        organs = bounding_box(tissues > 0)
        length, centre_z = self._slab(tissues, organs[0], low[0], high[0], rng)
        margin = 10 / self.vox[1:]
        field_mm = self._field_mm(rng)
        half = field_mm / 2 / self.vox[1:]
        body_centre = np.array([(s.start + s.stop) / 2 for s in organs[1:]]) + np.array([10 / self.vox[1], 0])
        centre_yx = body_centre + rng.normal(0, 25, 2) / self.vox[1:]
        centre_yx = np.clip(centre_yx, high[1:] + margin - half, low[1:] - margin + half)  # the gland stays in view
        shape = (round(length), *[round(2 * h) for h in half])
        return shape, np.array([centre_z, *centre_yx])

    def _negative_view(self, tissues: np.ndarray, view: str, rng: np.random.Generator):
        """A box (shape, centre) wholly above or below the gland, inside the map; None if there is no room."""
        rows = np.nonzero((tissues == PANCREAS).any(axis=(1, 2)))[0]
        organs = bounding_box(tissues > 0)
        margin, shortest = NEGATIVE_MARGIN_MM / self.vox[0], NEGATIVE_MIN_MM / self.vox[0]
        if view == "above-pancreas":
            low, high = rows[-1] + margin, organs[0].stop - 1
        else:
            low, high = organs[0].start, rows[0] - margin
        if high - low < shortest:
            return None
        length = rng.uniform(shortest, min(high - low, 300 / self.vox[0]))
        start = rng.uniform(low, high - length)
        field_mm = self._field_mm(rng)
        body_centre = np.array([(s.start + s.stop) / 2 for s in organs[1:]]) + np.array([10 / self.vox[1], 0])
        centre_yx = body_centre + rng.normal(0, 15, 2) / self.vox[1:]
        shape = (round(length), *[round(f / v) for f, v in zip(field_mm, self.vox[1:])])
        return shape, np.array([start + length / 2, *centre_yx])

    def _field_mm(self, rng: np.random.Generator) -> np.ndarray:
        """The field of view (y, x) in mm: random, or the site's fixed square one (the draws are made either way)."""
        field_mm = rng.uniform(300, 460) * np.array([rng.uniform(0.85, 1.0), 1.0])
        return field_mm if self.field_of_view_mm is None else np.full(2, float(self.field_of_view_mm))

    def _slab(self, tissues, rows: slice, low: int, high: int, rng) -> tuple[float, float]:
        """(length, centre) in slices: between a little above the liver dome and a little below the kidneys,
        inside the map, around the gland (rows ``low``..``high``); now and then cutting through the gland."""
        vox_z = self.vox[0]
        top, bottom = rows.stop - 1, rows.start
        liver = np.nonzero((tissues == TISSUE["liver"]).any(axis=(1, 2)))[0]
        if len(liver):
            top = min(top, liver[-1] + rng.uniform(0, 40) / vox_z)
        kidneys = np.nonzero(np.isin(tissues, [TISSUE["kidney_left"], TISSUE["kidney_right"]]).any(axis=(1, 2)))[0]
        bottom = max(bottom, (kidneys[0] if len(kidneys) else low) - rng.uniform(20, 80) / vox_z)
        margin = 10 / vox_z
        length = max(min(rng.uniform(120, 300) / vox_z, top - bottom), high - low + 2 * margin)
        start_low, start_high = max(bottom, high + margin - length), min(low - margin, top - length)
        start = rng.uniform(start_low, start_high) if start_low < start_high else (low + high - length) / 2
        if rng.random() < self.cut_pancreas_probability:  # the gland runs out of the field of view
            kept = rng.uniform(0.3, 0.7) * (high - low)
            start = low - length + kept if rng.random() < 0.5 else high - kept
        return length, start + length / 2
