"""Fill what a label map leaves unlabelled with a plausible body, so background is never one flat value.

Works on the warped tissue map (z, y, x; x to the patient's left, y to the back, z up; ``vox`` in mm).
From the labelled organs it estimates the midline, the spine and the body's cross-section per slice, then
adds, each only where the map is silent and only when the map lacks it: vertebrae, aorta and IVC,
portal/splenic vein and superior mesenteric vessels, ribs, back muscles and psoas, the abdominal wall
muscle, subcutaneous fat, lung bases, bowel loops with wall, fluid, gas and faeces, mesenteric fat with
small nodules, random soft-tissue regions, air around the body and sometimes the CT table.
Offsets (aorta to vertebral body, kidneys to spine) were measured on the TotalSegmentator label maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from .noise import fine_noise, smooth_noise
from .vocabulary import TISSUE, TISSUES

T = TISSUE
HOLLOW = ("stomach", "duodenum", "small_bowel", "colon", "rectum")
DOME_ORGANS = ("liver", "spleen", "stomach", "heart")


@dataclass
class Frame:
    """Where the body is, per slice (arrays of length z) and as 3D fields (broadcastable, mm)."""

    mid_x: float  # voxels
    spine_y: np.ndarray  # vertebral body centre, voxels
    dx: np.ndarray  # (1, 1, x) mm from the midline
    dy: np.ndarray  # (z, y, 1) mm from the cross-section centre (positive = posterior)
    depth: np.ndarray  # (z, y, x) mm outside the wall muscle's outer surface (negative inside)
    cosine: np.ndarray  # (z, y, x) cosine of the angle from straight back: 1 at the back, -1 in front
    wall_mm: float


def add_body(tissues: np.ndarray, rng: np.random.Generator, vox: np.ndarray) -> None:
    """Replace every unlabelled voxel of ``tissues`` (in place) by a synthetic tissue."""
    counts = np.bincount(tissues.ravel(), minlength=len(TISSUES))
    present = {name for name in TISSUES if counts[T[name]] > 20}
    frame = estimate_frame(tissues, present, rng, vox)
    aorta_xy = aorta_track(tissues, frame, rng, vox, draw="aorta" not in present)
    if "vertebra" not in present:
        add_spine(tissues, frame, rng, vox)
    if "inferior_vena_cava" not in present:
        add_inferior_vena_cava(tissues, frame, rng, vox)
    if "portal_vein" not in present and "pancreas" in present:
        add_mesenteric_veins(tissues, rng, vox)
    add_superior_mesenteric_artery(tissues, aorta_xy, rng, vox)
    if "duodenum" not in present and "pancreas" in present:
        add_duodenum(tissues, rng, vox)
    if "rib" not in present:
        add_ribs(tissues, frame, rng, vox)
    if "muscle" not in present:
        add_back_muscles(tissues, frame, rng, vox)
    add_wall_and_fat(tissues, frame, rng)
    if "lung" not in present:
        add_lungs(tissues, frame)
    add_abdominal_contents(tissues, frame, rng, vox)
    if rng.random() < 0.6:
        add_table(tissues, frame, rng, vox)


def estimate_frame(tissues: np.ndarray, present: set, rng: np.random.Generator, vox: np.ndarray) -> Frame:
    nz, ny, nx = tissues.shape
    organ = (tissues > 0) & (tissues != T["lung"])
    z_index = np.arange(nz)

    def centroid(name: str) -> np.ndarray:
        return np.argwhere(tissues == T[name]).mean(axis=0)

    kidneys = [centroid(k) for k in ("kidney_left", "kidney_right") if k in present]
    if len(kidneys) == 2:
        mid_x = (kidneys[0][2] + kidneys[1][2]) / 2
    elif "aorta" in present:
        mid_x = centroid("aorta")[2] - 12 / vox[2]
    else:
        columns = np.nonzero(organ.any(axis=(0, 1)))[0]
        mid_x = (columns[0] + columns[-1]) / 2
    if "aorta" in present:
        aorta = tissues == T["aorta"]
        rows = aorta.any(axis=(1, 2))
        aorta_y = np.array([np.nonzero(aorta[z].any(axis=1))[0].mean() for z in np.nonzero(rows)[0]])
        spine_y = np.interp(z_index, np.nonzero(rows)[0], aorta_y) + 32 / vox[1]
    elif kidneys:
        spine_y = np.full(nz, np.mean([k[1] for k in kidneys]) - 12 / vox[1])
    else:
        spine_y = np.full(nz, np.nonzero(organ.any(axis=(0, 2)))[0][-1] - 30 / vox[1])
    spine_y = ndimage.gaussian_filter1d(spine_y.astype(float), 15 / vox[0], mode="nearest")

    # Organ extents per slice (front, and the lateral reach each row needs), carried over empty slices.
    has = organ.any(axis=(1, 2))
    rows_any = organ.any(axis=2)
    front = np.where(has, rows_any.argmax(axis=1), np.nan)
    back = np.where(has, ny - 1 - rows_any[:, ::-1].argmax(axis=1), np.nan)
    left = np.where(organ.any(axis=2), nx - 1 - organ[:, :, ::-1].argmax(axis=2), -1)  # (z, y)
    right = np.where(organ.any(axis=2), organ.argmax(axis=2), nx)
    reach_x = np.maximum(left - mid_x, mid_x - right).clip(0) * vox[2]  # (z, y) mm

    gap, wall = rng.uniform(1, 5), rng.uniform(9, 17)
    front_mm = (spine_y - _fill(front, has)) * vox[1] + gap + wall
    back_mm = rng.uniform(72, 95) + np.zeros(nz)
    back_mm = np.maximum(back_mm, (_fill(back, has) - spine_y) * vox[1] + 12)
    centre_y = spine_y - 15 / vox[1]
    semi_front = front_mm - 15
    semi_back = back_mm + 15
    # Cross-section: a superellipse (boxier than an ellipse, as abdomens are), wide enough for the organs
    # of every row, plus the wall; organs at the front corners may touch the wall.
    power = rng.uniform(2.2, 3.0)
    row_dy = (np.arange(ny)[None, :] - centre_y[:, None]) * vox[1]
    semi_y = np.where(row_dy < 0, semi_front[:, None], semi_back[:, None])
    room = np.clip(1 - np.abs(row_dy / semi_y) ** power, 0.3, 1) ** (1 / power)
    needed = np.where(reach_x > 0, reach_x / room, 0).max(axis=1)
    needed = np.minimum(needed, 1.15 * reach_x.max(axis=1)) + gap + wall
    semi_x = _envelope(np.where(has, needed, np.nan), has, 60 / vox[0])
    semi_x = np.maximum(semi_x, rng.uniform(100, 125))
    semi_front = np.maximum(_envelope(semi_front, has, 60 / vox[0]), 70)

    dx = ((np.arange(nx) - mid_x) * vox[2]).astype(np.float32)[None, None, :]
    dy = ((np.arange(ny)[None, :] - centre_y[:, None]) * vox[1]).astype(np.float32)[:, :, None]
    semi_y3 = np.where(dy < 0, semi_front[:, None, None], semi_back[:, None, None]).astype(np.float32)
    semi_x3 = semi_x[:, None, None].astype(np.float32)
    radius = np.sqrt(dx * dx + dy * dy) + np.float32(1e-3)
    power = np.float32(power)
    scaled = (np.abs(dx / semi_x3) ** power + np.abs(dy / semi_y3) ** power) ** (1 / power) + np.float32(1e-6)
    depth = radius * (1 - 1 / scaled)  # mm along the ray from the centre, outside the cross-section
    cosine = dy / radius
    return Frame(
        mid_x=float(mid_x),
        spine_y=spine_y,
        dx=dx,
        dy=dy,
        depth=depth,
        cosine=cosine,
        wall_mm=wall,
    )


def _fill(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Carry values over the slices where they are missing (nearest valid slice)."""
    index = np.arange(len(values))
    return np.interp(index, index[valid], values[valid])


def _envelope(values: np.ndarray, valid: np.ndarray, width_vox: float) -> np.ndarray:
    """Running maximum over ``width_vox`` slices, smoothed: bodies are wider than any one slice's organs."""
    filled = ndimage.maximum_filter1d(_fill(values, valid), max(int(width_vox), 1), mode="nearest")
    return ndimage.gaussian_filter1d(filled, width_vox / 4, mode="nearest")


def _paint(tissues: np.ndarray, mask: np.ndarray, tissue: str, onto: tuple[str, ...] = ("unlabelled",)) -> None:
    """Set ``tissue`` where ``mask`` is true and the voxel currently holds one of ``onto``."""
    allowed = np.isin(tissues, [T[name] for name in onto]) if len(onto) > 1 else tissues == T[onto[0]]
    tissues[mask & allowed] = T[tissue]


def aorta_track(tissues, frame, rng, vox, draw: bool) -> np.ndarray:
    """(z, 2) aorta centre (y, x) in voxels per slice; draws a synthetic aorta and iliac arteries if asked."""
    nz = tissues.shape[0]
    aorta = tissues == T["aorta"]
    rows = np.nonzero(aorta.any(axis=(1, 2)))[0]
    if not draw and len(rows):
        centres = np.array([np.argwhere(aorta[z]).mean(axis=0) for z in rows])
        return np.stack([np.interp(np.arange(nz), rows, centres[:, i]) for i in range(2)], axis=1)
    radius = rng.uniform(9, 13)
    centre_y = frame.spine_y - rng.uniform(28, 36) / vox[1]
    centre_x = np.full(nz, frame.mid_x + rng.uniform(6, 16) / vox[2])
    kidney_rows = np.nonzero(np.isin(tissues, [T["kidney_left"], T["kidney_right"]]).any(axis=(1, 2)))[0]
    bifurcation = (kidney_rows[0] if len(kidney_rows) else nz // 3) - rng.uniform(5, 40) / vox[0]
    below = np.clip((bifurcation - np.arange(nz)) * vox[0], 0, None)  # mm below the bifurcation
    for side in (-1, 1):
        spread = np.where(below > 0, side * (4 + 0.45 * below), 0) / vox[2]
        r = np.where(below > 0, radius * 0.6, radius)
        x = np.where(below > 0, frame.mid_x + spread, centre_x)
        _paint_vertical(tissues, centre_y, x, r, r, vox, "aorta" if side > 0 else "artery",
                        rows=(below > 0) if side < 0 else None)
    return np.stack([centre_y, centre_x], axis=1)


def _paint_vertical(tissues, centre_y, centre_x, radius_x, radius_y, vox, tissue, rows=None,
                    onto=("unlabelled",)) -> None:
    """An elliptic tube with one centre per slice (radii in mm, scalars or per slice)."""
    nz, ny, nx = tissues.shape
    radius_x = np.broadcast_to(radius_x, (nz,))
    radius_y = np.broadcast_to(radius_y, (nz,))
    y0 = int(max(np.floor(np.min(centre_y - radius_y / vox[1])) - 1, 0))
    y1 = int(min(np.ceil(np.max(centre_y + radius_y / vox[1])) + 2, ny))
    x0 = int(max(np.floor(np.min(centre_x - radius_x / vox[2])) - 1, 0))
    x1 = int(min(np.ceil(np.max(centre_x + radius_x / vox[2])) + 2, nx))
    if y0 >= y1 or x0 >= x1:
        return
    y = np.arange(y0, y1)[None, :, None]
    x = np.arange(x0, x1)[None, None, :]
    inside = (((y - centre_y[:, None, None]) * vox[1] / radius_y[:, None, None]) ** 2
              + ((x - centre_x[:, None, None]) * vox[2] / radius_x[:, None, None]) ** 2) < 1
    if rows is not None:
        inside &= rows[:, None, None]
    _paint(tissues[:, y0:y1, x0:x1], inside, tissue, onto)


def add_inferior_vena_cava(tissues, frame, rng, vox) -> None:
    """Right of the spine (lower x), in front of it, through the back of the liver."""
    centre_x = np.full(tissues.shape[0], frame.mid_x - rng.uniform(18, 28) / vox[2])
    centre_y = frame.spine_y - rng.uniform(22, 30) / vox[1]
    _paint_vertical(tissues, centre_y, centre_x, rng.uniform(10, 15), rng.uniform(7, 11), vox,
                    "inferior_vena_cava", onto=("unlabelled", "liver"))


def paint_tube(tissues, points, radius_mm, tissue, vox, onto=("unlabelled",)) -> None:
    """A tube of ``radius_mm`` along the polyline ``points`` ((n, 3) voxel coordinates, z y x)."""
    points = np.asarray(points, dtype=float)
    reach = radius_mm / vox + 1
    low = np.maximum(np.floor(points.min(axis=0) - reach), 0).astype(int)
    high = np.minimum(np.ceil(points.max(axis=0) + reach) + 1, tissues.shape).astype(int)
    if np.any(high <= low):
        return
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), axis=-1) * vox
    mm = points * vox
    nearest = np.full(grid.shape[:3], np.inf)
    for start, end in zip(mm[:-1], mm[1:]):
        segment = end - start
        t = np.clip(((grid - start) @ segment) / max(segment @ segment, 1e-6), 0, 1)
        nearest = np.minimum(nearest, np.linalg.norm(grid - (start + t[..., None] * segment), axis=-1))
    region = tissues[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    _paint(region, nearest < radius_mm, tissue, onto)


def add_mesenteric_veins(tissues, rng, vox) -> None:
    """Splenic vein along the back of the pancreas body and tail, portal vein to the liver, SMV downwards."""
    zs, ys, xs = np.nonzero(tissues == T["pancreas"])
    x_head, x_tail = xs.min(), xs.max()
    x_neck = x_head + 0.3 * (x_tail - x_head)
    radius = rng.uniform(3.5, 5.5)
    line = []
    for x in np.linspace(x_neck, x_tail - 0.1 * (x_tail - x_head), 8):
        column = np.abs(xs - x) <= 1
        if column.any():
            line.append((zs[column].mean(), ys[column].max() + radius / vox[1] + 0.5, x))
    if len(line) < 2:
        return
    line = np.array(line)
    paint_tube(tissues, line, radius, "portal_vein", vox)
    confluence = line[0]
    portal_end = confluence + np.array([rng.uniform(30, 50), rng.uniform(-8, 4), -rng.uniform(15, 30)]) / vox
    paint_tube(tissues, [confluence, portal_end], rng.uniform(5, 8), "portal_vein", vox, onto=("unlabelled", "liver"))
    smv_end = confluence + np.array([-rng.uniform(40, 80), rng.uniform(-15, -5), -rng.uniform(0, 10)]) / vox
    paint_tube(tissues, [confluence, smv_end], rng.uniform(4, 6), "portal_vein", vox)


def add_duodenum(tissues, rng, vox) -> None:
    """The duodenal C-loop around the pancreatic head: down its right side, across below it, up to the left."""
    zs, ys, xs = np.nonzero(tissues == T["pancreas"])
    x_head, x_tail = xs.min(), xs.max()
    head = xs < x_head + 0.3 * (x_tail - x_head)
    top, bottom, front = zs[head].max(), zs[head].min(), ys[head].mean()
    radius = rng.uniform(9, 14)
    r = radius / vox
    side = x_head - r[2] - rng.uniform(0, 4) / vox[2]
    under = bottom - r[0] - rng.uniform(0, 6) / vox[0]
    points = [
        (top + rng.uniform(0, 12) / vox[0], front - rng.uniform(5, 20) / vox[1], side + r[2]),  # bulb
        (top, front, side),
        (under + r[0], front + rng.uniform(-5, 5) / vox[1], side),
        (under, front + rng.uniform(0, 10) / vox[1], x_head + 0.3 * (x_tail - x_head)),  # third part
        (under + rng.uniform(15, 35) / vox[0], front, x_head + rng.uniform(0.35, 0.5) * (x_tail - x_head)),
    ]
    paint_tube(tissues, points, radius, "duodenum", vox)


def add_superior_mesenteric_artery(tissues, aorta_yx, rng, vox) -> None:
    """The SMA leaves the aorta's front near the pancreas and runs down in front of it, in a fat collar."""
    rows = np.nonzero((tissues == T["pancreas"]).any(axis=(1, 2)))[0]
    if not len(rows):
        return
    top = min(rows[-1] + int(rng.uniform(0, 10) / vox[0]), tissues.shape[0] - 1)
    bottom = max(top - int(rng.uniform(60, 100) / vox[0]), 0)
    gap = rng.uniform(10, 16) / vox[1]
    points = [(z, aorta_yx[z, 0] - gap * min(1, (top - z + 2) / 4), aorta_yx[z, 1] - 3 / vox[2])
              for z in np.linspace(top, bottom, 6).astype(int)]
    paint_tube(tissues, points, rng.uniform(3, 4.5), "artery", vox)


def add_spine(tissues, frame, rng, vox) -> None:
    """Vertebral bodies (cortex, marrow) with discs, canal, neural arch, spinous and transverse processes."""
    nz = tissues.shape[0]
    z_mm = (np.arange(nz) * vox[0])[:, None, None]
    period, disc = rng.uniform(30, 38), rng.uniform(6, 10)
    level = (z_mm + rng.uniform(0, period)) % period  # mm into the current vertebra+disc unit
    is_disc = level < disc
    rx, ry = rng.uniform(19, 25), rng.uniform(15, 19)
    dx = frame.dx
    dy_spine = ((np.arange(tissues.shape[1])[None, :] - frame.spine_y[:, None]) * vox[1])[:, :, None]
    body = (dx / rx) ** 2 + (dy_spine / ry) ** 2
    canal_r = rng.uniform(8, 11)
    canal_dy = dy_spine - (ry + canal_r + 2)
    canal = np.sqrt(dx**2 + canal_dy**2)
    arch_level = (level > disc + 0.45 * (period - disc)) & (level < period - 2)
    pedicle_level = level > disc
    spinous = (np.abs(dx) < 4) & (canal_dy > canal_r) & (canal_dy < canal_r + rng.uniform(22, 34))
    transverse = (np.abs(canal_dy + canal_r * 0.8) < 3.5) & (np.abs(dx) < rx + rng.uniform(8, 20)) & (
        (level > disc + 0.5 * (period - disc)) & (level < disc + 0.75 * (period - disc))
    )
    _paint(tissues, (body < 1) & is_disc, "disc")
    _paint(tissues, (body < 0.7) & ~is_disc, "bone_marrow")
    _paint(tissues, (body < 1) & ~is_disc, "bone_cortex")
    _paint(tissues, canal < canal_r, "csf")
    lamina = (canal < canal_r + 5) & ((canal_dy > 0) | pedicle_level)  # facets and laminae at disc levels too
    _paint(tissues, lamina | (spinous & arch_level) | transverse, "bone_cortex")


def add_ribs(tissues, frame, rng, vox) -> None:
    """Ribs 7-12 in the body wall: they descend from the spine towards the front; the lowest stop short."""
    band = np.abs(frame.depth + frame.wall_mm / 2) < rng.uniform(3.5, 5)  # ribs are about 8 mm thick
    where = np.nonzero(band)
    if not len(where[0]):
        return
    kidney_rows = np.nonzero(np.isin(tissues, [T["kidney_left"], T["kidney_right"]]).any(axis=(1, 2)))[0]
    anchor = kidney_rows.mean() if len(kidney_rows) else tissues.shape[0] / 2
    rib12_mm = anchor * vox[0] + rng.uniform(-5, 25)
    period, drop, half = rng.uniform(24, 32), rng.uniform(60, 110), rng.uniform(3.5, 5.5)
    reach = np.array([rng.uniform(0.9, 1.3), rng.uniform(1.4, 1.9), rng.uniform(2.1, 2.5)] + [2.8] * 6)
    angle = np.arccos(np.clip(frame.cosine[where], -1, 1))  # 0 straight back, pi straight in front
    position = (where[0] * vox[0] - rib12_mm + drop * angle / (np.pi / 2)) / period
    rib = np.rint(position).astype(int)
    on_rib = (np.abs(position - rib) * period < half) & (rib >= 0) & (rib < len(reach))
    on_rib &= angle <= reach[np.clip(rib, 0, len(reach) - 1)]
    mask = np.zeros_like(band)
    mask[tuple(w[on_rib] for w in where)] = True
    _paint(tissues, mask, "rib")


def add_back_muscles(tissues, frame, rng, vox) -> None:
    """Paraspinal muscles behind the spine and psoas muscles beside it, growing towards the pelvis."""
    dy_spine = ((np.arange(tissues.shape[1])[None, :] - frame.spine_y[:, None]) * vox[1])[:, :, None]
    inside = frame.depth < 0
    # Erector spinae: one oval bundle each side of the spinous process.
    side_mm, depth_mm = rng.uniform(22, 32), rng.uniform(42, 55)
    radius_x, radius_y = rng.uniform(20, 30), rng.uniform(24, 34)
    bundles = ((np.abs(frame.dx) - side_mm) / radius_x) ** 2 + ((dy_spine - depth_mm) / radius_y) ** 2 < 1
    _paint(tissues, inside & bundles, "muscle")
    kidney_rows = np.nonzero(np.isin(tissues, [T["kidney_left"], T["kidney_right"]]).any(axis=(1, 2)))[0]
    top = kidney_rows.mean() if len(kidney_rows) else tissues.shape[0] * 0.6
    below = np.clip((top - np.arange(tissues.shape[0])) * vox[0], 0, None)[:, None, None]
    radius = np.minimum(7 + 0.22 * below, 28) * (below > 0)
    offset = rng.uniform(22, 28) + radius * 0.8
    psoas = ((np.abs(frame.dx) - offset) ** 2 + (dy_spine + 2) ** 2) < radius**2
    _paint(tissues, psoas, "muscle")
    quadratus = (np.abs(np.abs(frame.dx) - offset - radius - 18) < 14) & (np.abs(dy_spine - 12) < 12)
    _paint(tissues, quadratus & inside & (below > 0), "muscle")


def add_wall_and_fat(tissues, frame, rng) -> None:
    """Abdominal wall muscle ring, subcutaneous fat (thicker in front, thinner at the back), air outside."""
    base = rng.gamma(2.5, 7) + 3
    anterior = np.clip(-frame.cosine, 0, 1)
    fat = base * (1 + rng.uniform(0.1, 0.8) * anterior) * np.where(frame.dy > 0, rng.uniform(0.5, 1), 1)
    fat = fat.astype(np.float32)
    depth = frame.depth
    _paint(tissues, (depth >= -frame.wall_mm) & (depth < 0), "wall_muscle")
    _paint(tissues, (depth >= 0) & (depth < fat), "subcutaneous_fat")
    _paint(tissues, depth >= fat, "air")


def add_lungs(tissues, frame) -> None:
    """Lung bases above the diaphragm dome (the top of liver, spleen and stomach under each column)."""
    dome = np.isin(tissues, [T[name] for name in DOME_ORGANS])
    has = dome.any(axis=0)
    if not has.any():
        return
    nz = tissues.shape[0]
    top = np.where(has, nz - 1 - dome[::-1].argmax(axis=0), -1).astype(float)
    top = ndimage.grey_dilation(top, size=(7, 7))
    top[top < 0] = np.percentile(top[has], 90)
    top = ndimage.gaussian_filter(top, 2)
    above = np.arange(nz)[:, None, None] > top[None] + 1
    _paint(tissues, above & (frame.depth < -frame.wall_mm), "lung")


def add_abdominal_contents(tissues, frame, rng, vox) -> None:
    """Bowel loops (wall, fluid, gas rising to the front, faeces), mesenteric fat, nodules, odd regions."""
    shape = tissues.shape
    free = tissues == 0
    in_front = (np.arange(shape[1])[None, :] < (frame.spine_y - 8 / vox[1])[:, None])[:, :, None]
    # Loops: where two smooth fields are both near zero, a tangle of tubes a few centimetres wide.
    loop_a, loop_b = smooth_noise(rng, shape, rng.uniform(28, 45) / vox.min(), channels=2)
    content, odd = smooth_noise(rng, shape, rng.uniform(9, 14) / vox.min(), channels=2)
    width = rng.uniform(0.3, 0.65)
    synthetic_bowel = free & in_front & (np.abs(loop_a) < width) & (np.abs(loop_b) < width)
    tissues[synthetic_bowel] = T["bowel_wall"]

    hollow = np.isin(tissues, [T[name] for name in HOLLOW] + [T["bowel_wall"]])
    lumen = hollow.copy()
    for axis in range(3):  # lumen: hollow voxels whose six neighbours are the same viscus
        for step in (1, -1):
            lumen &= np.roll(tissues, step, axis=axis) == tissues
    gas_share = np.zeros(256, dtype=np.float32)
    for name, (low, high) in {"stomach": (0, 0.6), "duodenum": (0, 0.35), "small_bowel": (0, 0.2),
                              "colon": (0.05, 0.7), "rectum": (0, 0.5), "bowel_wall": (0, 0.35)}.items():
        gas_share[T[name]] = rng.uniform(low, high)
    index = np.nonzero(lumen)
    kind = tissues[index]
    rise = np.clip(-frame.cosine[index], 0, 1) * np.float32(1.5) - np.float32(0.5)  # gas floats to the front
    gas = content[index] + rise > ndtri(1 - gas_share[kind].clip(1e-3, 0.999)) + 0.2
    faecal = np.isin(kind, [T["colon"], T["rectum"]]) & ~gas & (rng.random() < 0.8)
    # Small bowel labels cover a packet of loops: collapsed loops and the walls between them look solid.
    packed = np.isin(kind, [T["small_bowel"], T["duodenum"], T["bowel_wall"]]) & ~gas
    packed &= (np.abs(odd[index]) < rng.uniform(0.1, 0.3)) | (content[index] < ndtri(rng.uniform(0.1, 0.6)))
    result = np.full(kind.shape, T["bowel_fluid"], dtype=np.uint8)
    result[gas] = T["bowel_gas"]
    result[faecal] = T["feces"]
    result[packed] = T["bowel_wall"]
    tissues[index] = result

    free = tissues == 0
    nodules = free & (fine_noise(rng, shape, 2 / vox.min()) > rng.uniform(1.8, 2.4))
    tissues[nodules] = T["soft_nodule"]
    tissues[free & ~nodules & (odd > rng.uniform(1.8, 2.6))] = T["distractor"]
    tissues[tissues == 0] = T["visceral_fat"]


def add_table(tissues, frame, rng, vox) -> None:
    """A curved CT table under the patient's back: a dense shell with a light foam core."""
    ny = tissues.shape[1]
    body = tissues != T["air"]
    back = np.where(body.any(axis=(0, 2)))[0]
    if not len(back):
        return
    top = back[-1] + rng.uniform(0, 8) / vox[1]
    curve = rng.uniform(0, 6e-4) * frame.dx[0, 0] ** 2 / vox[1]  # rises at the sides, in voxels
    half_width = rng.uniform(180, 260)
    thickness = rng.uniform(8, 25) / vox[1]
    y = np.arange(ny)[:, None]
    surface = top - curve[None, :]
    slab = (y >= surface) & (y < surface + thickness) & (np.abs(frame.dx[0]) < half_width)
    shell = slab & ((y < surface + 1.5) | (y >= surface + thickness - 1.5))
    layer = np.where(shell, T["table"], np.where(slab, T["table_foam"], 0)).astype(np.uint8)
    paint = (layer[None] > 0) & (tissues == T["air"])
    tissues[paint] = np.broadcast_to(layer[None], tissues.shape)[paint]
