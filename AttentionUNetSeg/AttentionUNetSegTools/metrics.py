"""Segmentation metrics on masks: Dice, HD95 and normalised surface Dice (MONAI), false-positive volume."""

from __future__ import annotations

import math
import warnings

import numpy as np

NSD_TOLERANCE_MM = 2.0
# A negative crop (no pancreas in view) keeps this far from the reference pancreas and is at least this long.
NEGATIVE_MARGIN_MM = 25.0
NEGATIVE_MIN_MM = 60.0


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


def pancreas_free_rows(rows_with_pancreas: np.ndarray, row_count: int, row_mm: float, margin_mm: float,
                       shortest_mm: float) -> dict[str, slice]:
    """Row ranges that keep ``margin_mm`` from every pancreas row and are at least ``shortest_mm`` long.

    Keys ``low`` (rows before the gland) and ``high`` (rows after it); a side without room is left out.
    """
    margin = math.ceil(margin_mm / row_mm)
    first, last = int(rows_with_pancreas.min()), int(rows_with_pancreas.max())
    ranges = {"low": slice(0, first - margin), "high": slice(last + margin + 1, row_count)}
    return {side: rows for side, rows in ranges.items() if (rows.stop - rows.start) * row_mm >= shortest_mm}
