"""PNG previews: axial, coronal and sagittal slices through the pancreas with the mask and the attention map.

Slices are resampled through physical space onto square pixels in the patient's frame, so anisotropic,
flipped or oblique images look right: axial seen from the feet (patient's right on the left), coronal
from the front, sagittal with anterior on the left, head up. Uses matplotlib's Agg canvas directly, so
it never touches a GUI backend (inside Slicer neither).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib import geometry
from AttentionUNetSegLib.engine import AIR_HU, ATTENTION_SCALE
from AttentionUNetSegLib.imageio import PANCREAS_SEGMENT, replacing

ABDOMEN_WINDOW_HU = (-160.0, 240.0)  # level 40, width 400
MAX_PIXELS_PER_SIDE = 512
TITLE_WIDTH = 100  # characters a title line holds across the three views
# As Slicer and the web app show it (mrml_bridge): a heat map, transparent below 0.2, half opaque.
ATTENTION_SHOWN_FROM = 0.2
ATTENTION_OPACITY = 0.5
HEAT_COLOURS = "hot"
VIEWS = (("Axial", 2), ("Coronal", 1), ("Sagittal", 0))  # name, the LPS axis the slice is normal to


def render_overlays(ct: sitk.Image, mask: sitk.Image, attention: sitk.Image, path: str | Path,
                    title: str = "") -> Path:
    """Write a 2x3 PNG: segmentation (fill + contour) above, attention heatmap (+ contour) below.

    ``attention`` is an engine map (8-bit, value / ATTENTION_SCALE = coefficient).

    The slices cross at the mask voxel nearest its centroid, or at the attention peak when the mask is empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    colour = np.array(PANCREAS_SEGMENT["color"]) / 255.0
    frame = _display_frame(ct)
    centre = _focus_point(mask, attention)
    figure = Figure(figsize=(13, 9), dpi=100, facecolor="black", layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(VIEWS), sharex="col", sharey="col")  # both rows: one extent per view
    for column, (name, axis) in enumerate(VIEWS):
        plane = _plane(frame, axis, centre)
        ct_pixels = _pixels(ct, plane, axis, sitk.sitkLinear, AIR_HU)
        mask_pixels = _pixels(sitk.Cast(mask != 0, sitk.sitkUInt8), plane, axis, sitk.sitkNearestNeighbor, 0)
        attention_pixels = _pixels(attention, plane, axis, sitk.sitkLinear, 0.0) / ATTENTION_SCALE
        top, bottom = axes[0, column], axes[1, column]
        for ax in (top, bottom):
            ax.imshow(ct_pixels, cmap="gray", vmin=ABDOMEN_WINDOW_HU[0], vmax=ABDOMEN_WINDOW_HU[1],
                      interpolation="bilinear")
            ax.set_axis_off()
        fill = np.zeros((*mask_pixels.shape, 4))
        fill[mask_pixels > 0] = (*colour, 0.35)
        top.imshow(fill, interpolation="nearest")
        top.set_title(name, color="white")
        bottom.imshow(_heat_colours(attention_pixels), interpolation="bilinear")
        for ax in (top, bottom):
            if mask_pixels.any():
                ax.contour(mask_pixels, levels=[0.5], colors=[colour], linewidths=1.2)
    scale = ScalarMappable(Normalize(0.0, 1.0), HEAT_COLOURS)
    colourbar = figure.colorbar(scale, ax=axes.ravel().tolist(), shrink=0.45, label="attention coefficient")
    colourbar.ax.yaxis.label.set_color("white")
    colourbar.ax.tick_params(colors="white")
    if title:
        figure.suptitle(textwrap.fill(title, TITLE_WIDTH), color="white")  # a verdict's reason can be long
    return _save(figure, Path(path))


def _heat_colours(attention: np.ndarray) -> np.ndarray:
    """RGBA: the colour map, see-through below ATTENTION_SHOWN_FROM (kept when upsampled, unlike a mask)."""
    from matplotlib import colormaps

    rgba = colormaps[HEAT_COLOURS](np.clip(attention, 0.0, 1.0))
    rgba[..., 3] = np.where(attention >= ATTENTION_SHOWN_FROM, ATTENTION_OPACITY, 0.0)
    return rgba


@dataclass(frozen=True)
class _DisplayFrame:
    """Square pixels in the patient's LPS axes covering the CT (geometry only: no voxels allocated)."""

    origin: np.ndarray
    spacing: float
    size: tuple[int, int, int]


def _display_frame(ct: sitk.Image) -> _DisplayFrame:
    """As fine as the CT's finest spacing, with at most MAX_PIXELS_PER_SIDE pixels per side."""
    low, high = geometry.physical_bounds(ct)
    spacing = max(min(ct.GetSpacing()), float(np.max(high - low)) / MAX_PIXELS_PER_SIDE)
    size = tuple(int(n) for n in np.maximum(np.ceil((high - low) / spacing), 1))
    return _DisplayFrame(origin=low + spacing / 2, spacing=spacing, size=size)


def _focus_point(mask: sitk.Image, attention: sitk.Image) -> tuple[float, ...]:
    """The mask voxel nearest the mask's centroid (a curved pancreas can have its centroid outside it)."""
    binary = sitk.Cast(mask != 0, sitk.sitkUInt8)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(binary)
    if not shape.HasLabel(1):
        values = sitk.GetArrayViewFromImage(attention)
        peak = np.unravel_index(int(np.argmax(values)), values.shape)
        return attention.TransformIndexToPhysicalPoint([int(i) for i in reversed(peak)])
    centroid = shape.GetCentroid(1)
    if binary[binary.TransformPhysicalPointToIndex(centroid)]:
        return centroid
    x, y, z, size_x, size_y, size_z = shape.GetBoundingBox(1)
    box = sitk.GetArrayViewFromImage(binary)[z : z + size_z, y : y + size_y, x : x + size_x]
    inside = np.argwhere(box) + (z, y, x)  # (z, y, x) indices
    offsets = (inside - binary.TransformPhysicalPointToContinuousIndex(centroid)[::-1]) * binary.GetSpacing()[::-1]
    nearest = inside[int(np.argmin((offsets**2).sum(axis=1)))]
    return binary.TransformIndexToPhysicalPoint([int(i) for i in reversed(nearest)])


def _plane(frame: _DisplayFrame, axis: int, centre: tuple[float, ...]) -> sitk.Image:
    """The one-pixel-thick slab of ``frame`` normal to ``axis`` through ``centre``."""
    origin = frame.origin.copy()
    index = round((centre[axis] - origin[axis]) / frame.spacing)
    origin[axis] += frame.spacing * int(np.clip(index, 0, frame.size[axis] - 1))
    size = list(frame.size)
    size[axis] = 1
    plane = sitk.Image(size, sitk.sitkUInt8)
    plane.SetSpacing((frame.spacing,) * 3)
    plane.SetOrigin(origin.tolist())
    return plane


def _pixels(image: sitk.Image, plane: sitk.Image, axis: int, interpolator, default: float) -> np.ndarray:
    """The slice as rows x columns in display orientation (frame axes are LPS; arrays are z, y, x)."""
    values = sitk.GetArrayFromImage(geometry.resample_like(image, plane, interpolator, default))
    values = values.squeeze(axis=2 - axis).astype(np.float32)
    return values if axis == 2 else np.flipud(values)  # coronal and sagittal: head up


def _save(figure, path: Path) -> Path:
    """``path`` ends up either the whole PNG or untouched."""
    with replacing(path) as temporary:
        figure.savefig(temporary, format="png", facecolor=figure.get_facecolor())
    return path
