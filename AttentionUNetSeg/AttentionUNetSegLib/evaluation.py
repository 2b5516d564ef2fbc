"""Agreement between a predicted and a reference pancreas mask."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty."""
    prediction, reference = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total
