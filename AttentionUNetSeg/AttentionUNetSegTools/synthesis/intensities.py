"""CT intensities: per-tissue HU for a contrast phase with per-case jitter, texture, then the scanner.

Ranges are typical published values for abdominal CT that hold the values measured on the real cases in
../shared/data (``calibration.MEASURED_HU``: mean HU inside each organ map, eroded; a test re-measures them
and checks that each phase range holds its anchor). The non-contrast real case has a fatty pancreas (about
1 HU); a normal non-contrast gland is 30-50 HU, so both are drawn. Now and then every tissue gets an
arbitrary contrast (SynthSeg-style), so that shape and context, not one HU value, carry the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .noise import fine_noise, smooth_noise
from .vocabulary import TISSUE

PHASES = ("non-contrast", "arterial", "portal-venous", "delayed")
_WALL = ((15, 45), (60, 100), (70, 110), (60, 90))
_MUSCLE = ((15, 55), (25, 60), (20, 65), (30, 65))
_FAT = ((-120, -85),) * 4
# Tissue -> (low, high) HU of its mean, per phase in the order of PHASES.
PHASE_HU = {
    "liver": ((40, 70), (60, 85), (80, 130), (70, 95)),
    "spleen": ((28, 55), (85, 140), (75, 135), (75, 100)),
    "kidney_right": ((10, 40), (120, 200), (140, 200), (110, 160)),
    "kidney_left": ((10, 40), (120, 200), (140, 200), (110, 160)),
    "kidney_cyst": ((0, 20),) * 4,
    "gallbladder": ((0, 25),) * 4,
    "stomach": _WALL,
    "pancreas": ((30, 50), (85, 130), (65, 125), (60, 85)),
    "duodenum": _WALL,
    "small_bowel": _WALL,
    "colon": _WALL,
    "rectum": _WALL,
    "esophagus": ((35, 50), (50, 80), (60, 90), (55, 80)),
    "adrenal": ((10, 40), (50, 80), (40, 85), (45, 70)),
    "aorta": ((35, 50), (250, 450), (140, 210), (100, 140)),
    "inferior_vena_cava": ((35, 50), (70, 130), (90, 180), (100, 140)),
    "portal_vein": ((35, 50), (80, 150), (120, 220), (110, 150)),
    "artery": ((35, 55), (250, 450), (140, 210), (100, 140)),
    "vein": ((35, 55), (70, 130), (90, 180), (100, 140)),
    "heart": ((35, 50), (200, 400), (120, 180), (100, 130)),
    "lung": ((-880, -750),) * 4,
    "airway": ((-1000, -950),) * 4,
    "urinary_bladder": ((0, 20), (0, 20), (5, 25), (5, 60)),
    "prostate_uterus": ((35, 55), (60, 110), (70, 110), (60, 90)),
    "thyroid": ((80, 110), (120, 200), (110, 170), (90, 130)),
    "vertebra": ((110, 300),) * 4,
    "rib": ((70, 350),) * 4,
    "bone": ((180, 700),) * 4,
    "spinal_cord": ((15, 35),) * 4,
    "muscle": _MUSCLE,
    "brain": ((25, 40),) * 4,
    "face": ((-20, 40),) * 4,
    "visceral_fat": ((-115, -75),) * 4,
    "subcutaneous_fat": _FAT,
    "wall_muscle": _MUSCLE,
    "bone_cortex": ((220, 450),) * 4,
    "bone_marrow": ((120, 260),) * 4,
    "disc": ((60, 110),) * 4,
    "csf": ((0, 25),) * 4,
    "bowel_wall": _WALL,
    "bowel_fluid": ((-5, 25),) * 4,
    "bowel_gas": ((-1000, -900),) * 4,
    "feces": ((-150, 50),) * 4,
    "soft_nodule": ((20, 60), (40, 100), (50, 110), (40, 90)),
    "distractor": ((-60, 160),) * 4,
    "air": ((-1010, -990),) * 4,
    "table": ((-200, 300),) * 4,
    "table_foam": ((-950, -600),) * 4,
}
# Texture: standard deviation (HU) of each tissue's fine-grained inhomogeneity.
TEXTURE_HU = {
    "liver": 6, "spleen": 7, "kidney_right": 10, "kidney_left": 10, "pancreas": 9, "lung": 40, "vertebra": 70,
    "rib": 60, "bone": 120, "bone_cortex": 120, "bone_marrow": 40, "feces": 90, "bowel_fluid": 6,
    "bowel_gas": 20, "visceral_fat": 10, "subcutaneous_fat": 8, "muscle": 8, "wall_muscle": 8,
    "table": 80, "table_foam": 60, "distractor": 20, "air": 5,
}
DEFAULT_TEXTURE_HU = 6
# Domain randomisation (SynthSeg): every tissue inside the body gets any mean in this window (the network's
# input window is -250..350 HU); air, lung and gas stay dark so the body outline stays a body.
RANDOM_CONTRAST = "random contrast"
RANDOM_TISSUE_HU = (-200, 320)
KEPT_DARK = ("lung", "airway", "bowel_gas", "air", "table_foam")
RANDOMISED_TISSUES = tuple(name for name in PHASE_HU if name not in KEPT_DARK)
FAT_HU = -95.0
FAT_FRACTION = (0.1, 0.45)  # share of fat in a fatty gland (the real non-contrast case: about 0.3)
ORAL_CONTRAST_HU = (150, 450)


@dataclass
class Appearance:
    """The per-case draw: phase, mean HU of each tissue, texture, and the scanner settings."""

    phase: str
    mean_hu: np.ndarray  # (256,) float32, by tissue id
    texture_hu: np.ndarray  # (256,) float32
    pancreas_hu: float
    pancreas_fat_fraction: float
    oral_contrast: bool
    blur_mm: tuple[float, float, float]  # Gaussian sigma (z, y, x)
    slice_thickness_mm: float
    noise_hu: float
    bias_hu: float  # amplitude of a smooth offset across the field (beam hardening, scatter)


def draw_appearance(
    rng: np.random.Generator, fatty_pancreas_probability: float = 0.2, random_contrast_probability: float = 0.25,
    phase: str | None = None,
) -> Appearance:
    """A case's look, for ``phase`` (one of PHASES or RANDOM_CONTRAST) or a random one. With random
    contrast (SynthSeg-style domain randomisation) every tissue in the body gets an arbitrary mean, so that
    the network must also recognise the pancreas by shape and place."""
    phase_index = PHASES.index(phase) if phase in PHASES else int(rng.integers(len(PHASES)))
    mean = np.zeros(256, dtype=np.float32)
    for name, ranges in PHASE_HU.items():
        mean[TISSUE[name]] = rng.uniform(*ranges[phase_index])
    random_contrast = phase == RANDOM_CONTRAST if phase is not None else rng.random() < random_contrast_probability
    if random_contrast:
        for name in RANDOMISED_TISSUES:
            mean[TISSUE[name]] = rng.uniform(*RANDOM_TISSUE_HU)
    texture = np.full(256, DEFAULT_TEXTURE_HU, dtype=np.float32)
    for name, hu in TEXTURE_HU.items():
        texture[TISSUE[name]] = hu * rng.uniform(0.6, 1.4)
    if random_contrast:
        texture *= np.float32(rng.uniform(0.5, 2.5))
    # Fatty pancreas: fat interleaved with the lobules pulls the mean down (as in the real 3 mm case).
    fat_fraction = rng.uniform(*FAT_FRACTION) if rng.random() < fatty_pancreas_probability else 0.0
    pancreas = TISSUE["pancreas"]
    mean[pancreas] = (1 - fat_fraction) * mean[pancreas] + fat_fraction * FAT_HU
    texture[pancreas] += 40 * fat_fraction
    oral_contrast = bool(rng.random() < 0.15)
    if oral_contrast:
        mean[TISSUE["bowel_fluid"]] = rng.uniform(*ORAL_CONTRAST_HU)
    in_plane = rng.uniform(0.8, 2.0)  # Gaussian sigma (mm): sharp to soft kernels and coarse pixels
    thickness = rng.uniform(0.8, 6.0)
    return Appearance(
        phase=RANDOM_CONTRAST if random_contrast else PHASES[phase_index],
        mean_hu=mean,
        texture_hu=texture,
        pancreas_hu=float(mean[pancreas]),
        pancreas_fat_fraction=float(fat_fraction),
        oral_contrast=oral_contrast,
        blur_mm=(max(in_plane, 0.42 * thickness), in_plane, in_plane),
        slice_thickness_mm=float(thickness),
        noise_hu=float(rng.uniform(3, 22) if rng.random() < 0.8 else rng.uniform(22, 45)),  # low dose now and then
        bias_hu=float(rng.uniform(0, 15)),
    )


def render(tissues: np.ndarray, look: Appearance, rng: np.random.Generator, vox: np.ndarray) -> np.ndarray:
    """The CT image (float32 HU) of a tissue map: means, textures, organ detail, then the scanner."""
    shape = tissues.shape
    fine = fine_noise(rng, shape, 0.8)
    coarse = smooth_noise(rng, shape, 6 / vox.min())
    image = look.mean_hu[tissues] + look.texture_hu[tissues] * (np.float32(0.7) * fine + np.float32(0.7) * coarse)
    _add_fat_septa(image, tissues, look, rng, vox)
    _add_liver_vessels(image, tissues, look, rng, vox)
    _add_kidney_cortex(image, tissues, look)
    return scan(image, look, rng, vox)


def _add_fat_septa(image, tissues, look, rng, vox) -> None:
    """Fat is never flat in CT: thin fibrous septa and small vessels run through it (a few percent of voxels)."""
    fat = np.isin(tissues, [TISSUE["visceral_fat"], TISSUE["subcutaneous_fat"]])
    strands = np.abs(smooth_noise(rng, tissues.shape, 5 / vox.min())) < rng.uniform(0.03, 0.1)
    septa = fat & strands
    image[septa] += np.float32(rng.uniform(30, 90))


def _add_liver_vessels(image, tissues, look, rng, vox) -> None:
    """Branching hepatic and portal vessels: where two smooth random fields both cross zero."""
    liver = tissues == TISSUE["liver"]
    boxes = ndimage.find_objects(liver.astype(np.uint8))
    if not boxes:
        return
    box = boxes[0]
    fields = smooth_noise(rng, liver[box].shape, 12 / vox.min(), channels=2)
    width = rng.uniform(0.12, 0.22)
    vessels = liver[box] & (np.abs(fields[0]) < width) & (np.abs(fields[1]) < width)
    region = image[box]
    region[vessels] = 0.5 * region[vessels] + 0.5 * look.mean_hu[TISSUE["portal_vein"]]


def _add_kidney_cortex(image, tissues, look) -> None:
    """Arterial phase: the renal cortex enhances before the medulla (corticomedullary contrast)."""
    if look.phase != "arterial":
        return
    for side in ("kidney_left", "kidney_right"):
        kidney = tissues == TISSUE[side]
        boxes = ndimage.find_objects(kidney.astype(np.uint8))
        if not boxes:
            continue
        box = boxes[0]
        medulla = ndimage.binary_erosion(kidney[box], iterations=2)
        image[box][medulla] -= np.float32(0.4 * (look.mean_hu[TISSUE[side]] - 40))


def scan(image: np.ndarray, look: Appearance, rng: np.random.Generator, vox: np.ndarray) -> np.ndarray:
    """Scanner effects: partial-volume blur (slice profile included), thick slices interpolated back to the
    grid, correlated noise, calibration offsets, the reconstruction circle."""
    image = ndimage.gaussian_filter(image, np.array(look.blur_mm) / vox, truncate=2.5)
    if look.slice_thickness_mm > 1.4 * vox[0]:
        image = _thick_slices(image, look.slice_thickness_mm / vox[0], rng.uniform(0, 1))
    image += fine_noise(rng, image.shape, 0.6) * np.float32(look.noise_hu)
    image += smooth_noise(rng, image.shape, 80 / vox.min()) * np.float32(look.bias_hu)
    image *= np.float32(rng.uniform(0.97, 1.03))
    image += np.float32(rng.uniform(-8, 8))
    if rng.random() < 0.3:
        _outside_reconstruction_circle(image, rng)
    return np.clip(image, -1024, 3071, out=image)


def _thick_slices(image: np.ndarray, step: float, phase: float) -> np.ndarray:
    """Keep only slices ``step`` voxels apart (linear sampling), then interpolate linearly back to every voxel."""
    last = image.shape[0] - 1
    positions = np.arange(-phase * step, last + step, step).clip(0, last)
    below = np.floor(positions).astype(int)
    weight = (positions - below).astype(np.float32)[:, None, None]
    upper = np.minimum(below + 1, last)
    slices = image[below] * (1 - weight) + image[upper] * weight
    where = (np.arange(image.shape[0]) + phase * step) / step
    lower = np.minimum(np.floor(where).astype(int), len(positions) - 2)
    weight = (where - lower).astype(np.float32)[:, None, None]
    return slices[lower] * (1 - weight) + slices[lower + 1] * weight


def _outside_reconstruction_circle(image, rng) -> None:
    """Scanners reconstruct a disc; corners outside it hold a padding value."""
    ny, nx = image.shape[1:]
    radius = rng.uniform(0.5, 0.6) * max(ny, nx)
    y = np.arange(ny)[:, None] - (ny - 1) / 2
    x = np.arange(nx)[None, :] - (nx - 1) / 2
    image[:, y**2 + x**2 > radius**2] = -1024
