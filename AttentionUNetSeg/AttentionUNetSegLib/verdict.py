"""The verdict on a segmentation: ``ok``, ``check`` (with the reason) or ``not found``, and a confidence.

Measured from the run itself on the model grid: how sure the network is inside and around the mask, whether
its mass is in one piece, whether a test-time-augmented pass agrees, and whether the result is anatomically
plausible (size, the scan's edge, lungs around it). The thresholds were calibrated on held-out data so
that no case below Dice 0.5 gets ``ok`` (see the model card); ``ok`` is kept for results worth trusting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OK, CHECK, NOT_FOUND = "ok", "check", "not found"
MIN_FOUND_ML = 1.0  # below this, nothing was found
# Adult pancreas volumes, atrophic to swollen. The floor: of the 158 manually labelled glands of the shared
# label maps the smallest is 22 mL and 1 in 100 is under 28 mL, while the model's misses mostly keep 10-30 mL
# of the wrong tissue or a fragment (a Dice-0.03 case at 14 mL passed every other test with TTA).
PLAUSIBLE_ML = (30.0, 250.0)
MIN_LARGEST_SHARE = 0.8  # the kept component's share of all voxels above 0.5
MAX_LUNG_FRACTION = 0.3  # air inside the body around the mask: lungs mean the chest, not the pancreas
# Calibrated (`attention-unet-seg calibrate`, with TTA and with --no-tta; model card) on 184 held-out scans:
# above the most confident failure (a case below Dice 0.5, or a negative), raised to the least confident good
# case called ok. TTA's disagreement lowers every case's confidence, so each mode has its own threshold; with
# TTA (the default) the failures lie further below the good cases (ok for 43 of 95 good cases, not 14 of 88).
OK_CONFIDENCE_TTA = 0.74  # most confident failure 0.726 (Dice 0.46)
OK_CONFIDENCE = 0.88  # without TTA: most confident failure 0.866 (Dice 0.49)
# A threshold belongs to the weights it was calibrated for: the two above to the bundled weights, named by their
# SHA-256 (new bundled weights need both recalibrated and this digest updated). Other weights carry their own in
# their metadata (training[THRESHOLDS_KEY], per mode, written by `attention-unet-seg finetune --calibrate`), or
# have none, and then no result of theirs is called ok.
CALIBRATED_WEIGHTS_SHA256 = "78851144660b7f53c83fa428bd21500e2b2029eb7587853c9f503ae57c2525b0"
THRESHOLDS_KEY = "verdict_thresholds"  # {"tta": threshold, "no_tta": threshold}
NOT_CALIBRATED = "not calibrated for these weights"
LUNG_HU = -400.0
BONE_HU = 200.0
# Where the pancreas lies relative to the spine's centre on the same slices, in mm on the model grid (LPS: -y
# is anterior, +x the patient's left): in front of it and mostly to its left (on the real cases here:
# 57-79 mm in front, 17-46 mm to the left).
MIN_SPINE_VOXELS = 20
SPINE_OFFSET_MM = {"anterior": (15.0, 150.0), "left": (-70.0, 130.0)}


@dataclass(frozen=True)
class Verdict:
    qc: str  # ok | check | not found
    confidence: float  # 0..1: how far to trust the segmentation (0 when nothing was found)
    reason: str  # empty for ok

    def describe(self) -> str:
        """``ok (confidence 0.83)``, ``check: <reason>`` or ``no pancreas found``."""
        if self.qc == OK:
            return f"ok (confidence {self.confidence:.2f})"
        if self.qc == NOT_FOUND:
            return "no pancreas found"
        return f"check: {self.reason} (confidence {self.confidence:.2f})"


@dataclass(frozen=True)
class Evidence:
    """What a run measured about its own result."""

    volume_ml: float  # of the kept component, on the model grid
    candidates_ml: float  # all voxels above 0.5
    mean_probability: float  # inside the kept component
    boundary_certainty: float  # mean |2p - 1| on the kept component and its one-voxel shell
    agreement: float | None  # Dice between the two test-time-augmented passes, None without TTA
    touches_edge: bool  # the kept component reaches the first or last slice of the scan
    lung_fraction: float  # share of air in the body on the slices the mask spans
    spine_offset_mm: tuple[float, float] | None = None  # (anterior, left) of the spine; None: no spine seen

    @classmethod
    def measure(cls, probability: np.ndarray, kept: np.ndarray, hu: np.ndarray, body: np.ndarray,
                spacing: tuple[float, ...], agreement: float | None) -> Evidence:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        count = int(kept.sum())
        if not count:
            return cls(0.0, float((probability > 0.5).sum()) * voxel_ml, 0.0, 0.0, agreement, False, 0.0)
        slices = np.nonzero(kept.any(axis=(1, 2)))[0]
        shell = dilated(kept)
        span = slice(int(slices.min()), int(slices.max()) + 1)
        body_span = body[span]
        return cls(
            volume_ml=count * voxel_ml,
            candidates_ml=float((probability > 0.5).sum()) * voxel_ml,
            mean_probability=float(probability[kept].mean()),
            boundary_certainty=float(np.abs(2 * probability[shell] - 1).mean()),
            agreement=agreement,
            touches_edge=bool(slices.min() == 0 or slices.max() == kept.shape[0] - 1),
            lung_fraction=float((hu[span][body_span] < LUNG_HU).mean()) if body_span.any() else 0.0,
            spine_offset_mm=_spine_offset(kept[span], hu[span], body_span, spacing),
        )

    @property
    def confidence(self) -> float:
        """Certainty around the mask, times the share of the network's mass that the mask keeps, times the
        agreement of the TTA passes when there are two."""
        if self.volume_ml <= 0:
            return 0.0
        share = min(self.volume_ml / self.candidates_ml, 1.0) if self.candidates_ml else 0.0
        agreement = 1.0 if self.agreement is None else self.agreement
        return float(np.clip(self.boundary_certainty * share * agreement, 0.0, 1.0))


def ok_threshold_for(tta: bool) -> float:
    return OK_CONFIDENCE_TTA if tta else OK_CONFIDENCE


def ok_threshold_of(weights_sha256: str, training: dict, tta: bool) -> float | None:
    """The ok threshold calibrated for these weights (their digest and metadata) in this mode; None if none."""
    recorded = training.get(THRESHOLDS_KEY) or {}
    mode = "tta" if tta else "no_tta"
    if mode in recorded:
        return float(recorded[mode])
    return ok_threshold_for(tta) if weights_sha256 == CALIBRATED_WEIGHTS_SHA256 else None


def verdict_for_weights(evidence: Evidence, weights_sha256: str, training: dict) -> Verdict:
    """The verdict on the threshold of the weights that made the result; without one, never ``ok``."""
    threshold = ok_threshold_of(weights_sha256, training, evidence.agreement is not None)
    return verdict_of(evidence, threshold, calibrated=threshold is not None)


def verdict_of(evidence: Evidence, ok_confidence: float | None = None, calibrated: bool = True) -> Verdict:
    """The first reason to doubt, in order of how much it says; ``ok`` only when there is none. The ok
    threshold defaults to the calibrated one of the run's mode (with or without TTA); ``calibrated`` False
    (weights without a threshold of their own) puts :data:`NOT_CALIBRATED` in the place of the confidence test."""
    if ok_confidence is None:
        ok_confidence = ok_threshold_for(evidence.agreement is not None)
    confidence = round(evidence.confidence, 3)
    if evidence.volume_ml < MIN_FOUND_ML:
        return Verdict(NOT_FOUND, 0.0, "nothing in this scan looks like pancreas to the model")
    reasons = [
        (evidence.lung_fraction > MAX_LUNG_FRACTION, "found among the lungs: likely not pancreas"),
        (evidence.volume_ml < PLAUSIBLE_ML[0],
         f"small ({evidence.volume_ml:.0f} mL; adult glands are rarely under {PLAUSIBLE_ML[0]:.0f}): part of the gland "
         "may be missed, or it is not the gland"),
        (evidence.volume_ml > PLAUSIBLE_ML[1], f"large ({evidence.volume_ml:.0f} mL): may include other tissue"),
        (evidence.touches_edge, "reaches the edge of the scan: the gland may be cut off"),
        (not _where_the_pancreas_lies(evidence.spine_offset_mm), "not in front of the spine, where the pancreas lies"),
        (evidence.candidates_ml and evidence.volume_ml / evidence.candidates_ml < MIN_LARGEST_SHARE,
         "the model found several separate candidates"),
        (calibrated and confidence < ok_confidence, "the model is unsure of the outline"),
        (not calibrated, NOT_CALIBRATED),
    ]
    reason = next((text for doubt, text in reasons if doubt), "")
    return Verdict(CHECK if reason else OK, confidence, reason)


def _spine_offset(kept: np.ndarray, hu: np.ndarray, body: np.ndarray, spacing) -> tuple[float, float] | None:
    """The mask's centroid minus the spine's (bone in the middle third of the body's width), in mm."""
    columns = np.nonzero(body.any(axis=(0, 1)))[0]
    if not columns.size:
        return None
    middle, width = (columns.min() + columns.max()) / 2, columns.max() - columns.min()
    bone = (hu > BONE_HU) & body
    bone[..., np.abs(np.arange(hu.shape[2]) - middle) > width / 6] = False
    if bone.sum() < MIN_SPINE_VOXELS:
        return None
    _, bone_y, bone_x = np.nonzero(bone)
    _, mask_y, mask_x = np.nonzero(kept)
    return (float(bone_y.mean() - mask_y.mean()) * spacing[1], float(mask_x.mean() - bone_x.mean()) * spacing[0])


def _where_the_pancreas_lies(offset: tuple[float, float] | None) -> bool:
    if offset is None:
        return True  # no spine in view to judge by
    (low_ap, high_ap), (low_lr, high_lr) = SPINE_OFFSET_MM["anterior"], SPINE_OFFSET_MM["left"]
    return low_ap <= offset[0] <= high_ap and low_lr <= offset[1] <= high_lr


def dilated(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its six-connected neighbours (no wrap-around at the borders)."""
    grown = mask.copy()
    for axis in range(mask.ndim):
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        grown[tuple(lower)] |= mask[tuple(upper)]
        grown[tuple(upper)] |= mask[tuple(lower)]
    return grown
