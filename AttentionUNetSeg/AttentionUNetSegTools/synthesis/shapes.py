"""Anatomy from label maps: tissue maps on the working grid, pancreas swap and variation, organ jitter, warping.

Arrays are (z, y, x) on an identity-direction grid in ITK's LPS world: x grows to the patient's left,
y to the back, z up. ``vox`` is the voxel size in mm in the same (z, y, x) order.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from AttentionUNetSegLib.geometry import canonical_grid, resample_like

from .catalog import LabelMapEntry
from .noise import smooth_noise
from .vocabulary import TISSUE, read_label_table, tissue_lookup

PANCREAS = TISSUE["pancreas"]
# What a moved or reshaped pancreas may push aside: fat and hollow viscera, never solid organs, vessels or bone.
YIELDS_TO_PANCREAS = np.zeros(256, dtype=bool)
YIELDS_TO_PANCREAS[[TISSUE[t] for t in ("unlabelled", "small_bowel", "colon", "duodenum", "stomach")]] = True
# Organs whose outline is jittered (dilate, erode, smooth) per sample.
JITTERED_ORGANS = tuple(
    TISSUE[t]
    for t in (
        "liver", "spleen", "kidney_right", "kidney_left", "gallbladder", "stomach", "duodenum", "small_bowel",
        "colon", "urinary_bladder", "adrenal", "esophagus",
    )
)


def load_tissue_map(entry: LabelMapEntry, spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    """The label map as tissue ids (uint8, z y x) on an identity-direction grid, cropped to its labels."""
    image = sitk.ReadImage(str(entry.path))
    grid = canonical_grid(image, spacing_xyz)
    labels = sitk.GetArrayFromImage(resample_like(image, grid, sitk.sitkNearestNeighbor))
    tissues = tissue_lookup(read_label_table(entry.table_path), str(entry.table_path))[labels]
    box = bounding_box(tissues > 0, margin=2)
    tissues = tissues[box] if box is not None else tissues
    if back_in_front(tissues):
        tissues = tissues[:, ::-1]
    return np.ascontiguousarray(tissues)


def back_in_front(tissues: np.ndarray) -> bool:
    """True when a map's front and back are swapped in world space: its kidneys lie in front of its pancreas.

    All 30 BTCV maps in the shared folder are like that (kidneys 27-95 mm in front of stomach and
    pancreas; in every other map they are 34-104 mm behind), although their headers say LPS.
    """
    kidneys = np.isin(tissues, [TISSUE["kidney_left"], TISSUE["kidney_right"]])
    front_organs = np.isin(tissues, [TISSUE["pancreas"], TISSUE["stomach"]])
    if not kidneys.any() or not front_organs.any():
        return False
    return np.nonzero(kidneys)[1].mean() < np.nonzero(front_organs)[1].mean()


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices around the true voxels of ``mask`` grown by ``margin`` (clipped), or None when it is empty."""
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(boxes[0], mask.shape))


def swap_in_pancreas(tissues: np.ndarray, donor: np.ndarray, rng: np.random.Generator, vox: np.ndarray) -> bool:
    """Replace the pancreas of ``tissues`` (in place) by the ``donor`` mask, centred where the old one was.

    Where the donor would cover a solid organ, vessel or bone, the host's tissue stays. Returns False (and
    changes nothing) when too little of the donor would fit, e.g. a small host abdomen and a large donor.
    """
    old = tissues == PANCREAS
    centre = np.argwhere(old).mean(axis=0) + rng.normal(0, 4.0, 3) / vox  # 4 mm placement jitter
    start = np.round(centre - np.array(donor.shape) / 2).astype(int)
    target = [slice(max(s, 0), min(s + n, m)) for s, n, m in zip(start, donor.shape, tissues.shape)]
    source = tuple(slice(t.start - s, t.stop - s) for t, s in zip(target, start))
    region = tissues[tuple(target)]
    fits = donor[source] & (YIELDS_TO_PANCREAS[region] | (region == PANCREAS))
    if fits.sum() < 0.7 * donor.sum():
        return False
    tissues[old] = TISSUE["unlabelled"]
    region[fits] = PANCREAS
    return True


def vary_pancreas(tissues: np.ndarray, rng: np.random.Generator, vox: np.ndarray) -> None:
    """Reshape the pancreas in place: length, thickness, tail height and bend, head bulk, contour wobble.

    The gland is treated as a tube along x (head on the patient's right, low x; tail to the left): each
    voxel is mapped back to the original through a per-column centre line, so thickness changes keep the
    course and tail shifts keep the head where it is.
    """
    box = bounding_box(tissues == PANCREAS, margin=int(np.ceil(24 / vox.min())))
    if box is None:
        return
    region = tissues[box]
    gland = (region == PANCREAS).astype(np.float32)
    zs, ys, xs = np.nonzero(gland)
    columns = np.unique(xs)
    centre_y = np.array([ys[xs == c].mean() for c in columns])
    centre_z = np.array([zs[xs == c].mean() for c in columns])
    x_head, x_tail = columns[0], columns[-1]
    x_neck = x_head + 0.3 * (x_tail - x_head)
    x_mid = xs.mean()

    length = rng.uniform(0.85, 1.15)
    thickness_y, thickness_z = rng.uniform(0.8, 1.25, 2)
    head_bulk = rng.uniform(0.8, 1.3)
    tail_rise_z = rng.uniform(-8, 14) / vox[0]  # mm -> voxels: tails sit higher than heads, by varying amounts
    tail_shift_y = rng.uniform(-8, 8) / vox[1]
    head_drop_z = rng.uniform(-4, 8) / vox[0]  # a longer or shorter uncinate process

    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in region.shape], indexing="ij", sparse=True)
    x_src = x_mid + (x - x_mid) / length
    tail = np.clip((x_src - x_neck) / max(x_tail - x_neck, 1), 0, 1)
    head = np.clip((x_neck - x_src) / max(x_neck - x_head, 1), 0, 1)
    line_y = np.interp(x_src, columns, centre_y).astype(np.float32)
    line_z = np.interp(x_src, columns, centre_z).astype(np.float32)
    bulk = 1 + (head_bulk - 1) * head
    wobble = smooth_noise(rng, region.shape, 8 / vox.min(), channels=2) * np.float32(0.6)
    y_src = line_y + (y - line_y - tail_shift_y * tail) / (thickness_y * bulk) + wobble[0]
    z_src = line_z + (z - line_z - tail_rise_z * tail + head_drop_z * head) / (thickness_z * bulk) + wobble[1]
    coords = np.broadcast_arrays(z_src, y_src, np.broadcast_to(x_src, region.shape))
    reshaped = ndimage.map_coordinates(gland, coords, order=1, mode="constant") > 0.5
    if reshaped.sum() < 0.3 * gland.sum():
        return
    region[region == PANCREAS] = TISSUE["unlabelled"]
    region[reshaped & YIELDS_TO_PANCREAS[region]] = PANCREAS


def jitter_organs(tissues: np.ndarray, rng: np.random.Generator, probability: float = 0.35) -> None:
    """Dilate, erode or smooth a random subset of organs by about one voxel (in place, into free space)."""
    boxes = ndimage.find_objects(tissues)
    for organ in JITTERED_ORGANS:
        if organ > len(boxes) or boxes[organ - 1] is None or rng.random() > probability:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[organ - 1])
        region = tissues[box]
        mask = region == organ
        if mask.sum() < 50:
            continue
        operation = rng.integers(3)
        if operation == 0:
            region[ndimage.binary_dilation(mask) & (region == 0)] = organ
        elif operation == 1:
            region[mask & ~ndimage.binary_erosion(mask)] = 0
        else:
            smooth = ndimage.gaussian_filter(mask.astype(np.float32), 1.0) > 0.5
            region[mask & ~smooth] = 0
            region[smooth & (region == 0)] = organ


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """Rotation about the z, y and x axes (radians), acting on (z, y, x) vectors."""
    cz, cy, cx = np.cos(angles)
    sz, sy, sx = np.sin(angles)
    about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def warp(
    tissues: np.ndarray,
    out_shape: tuple[int, int, int],
    source_centre: np.ndarray,
    rng: np.random.Generator,
    vox: np.ndarray,
    elastic_mm: float,
) -> np.ndarray:
    """Sample ``tissues`` on a new grid of ``out_shape`` whose centre lands on ``source_centre`` (voxels).

    The grid is rotated a little, scaled per axis and bent by a smooth elastic field; outside the map is
    unlabelled.
    """
    angles = np.radians(rng.uniform(-1, 1, 3) * np.array([8.0, 4.0, 5.0]))  # in-plane turn, tilts
    scales = rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, 3)
    # Output voxel offset -> source voxel offset: to mm, rotate and scale, back to voxels.
    matrix = (rotation_matrix(angles) / scales[None, :]) * vox[None, :] / vox[:, None]
    offsets = [np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in out_shape]
    elastic = smooth_noise(rng, out_shape, 40 / vox.min(), channels=3) * np.float32(elastic_mm)
    coords = []
    for axis in range(3):
        row = matrix[axis].astype(np.float32)
        coords.append(
            source_centre[axis]
            + row[0] * offsets[0][:, None, None]
            + row[1] * offsets[1][None, :, None]
            + row[2] * offsets[2][None, None, :]
            + elastic[axis] / np.float32(vox[axis])
        )
    return ndimage.map_coordinates(tissues, coords, order=0, mode="constant", cval=0)
