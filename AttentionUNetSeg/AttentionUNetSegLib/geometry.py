"""Where voxels are: the model's canonical grid and resampling between grids through physical space.

The model works on an axis-aligned grid (identity direction in ITK's LPS world) at its own spacing.
One resampling from the input to that grid handles orientation (permuted, flipped, oblique axes) and
spacing together, so no voxel is ever matched by index across grids.
"""

from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest physical coordinate covered by the image's voxels (their outer faces)."""
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner])
        for corner in itertools.product(*[(0, n) for n in image.GetSize()])
    ]
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def canonical_grid(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """An empty identity-direction image at ``spacing`` that covers the whole input, centred on it.

    Centred, its outermost voxel centres overhang the input equally at both ends, so a CT stored mirrored is
    sampled the same (ITK treats the two faces of an image differently: a centre on the upper face is outside).
    """
    low, high = physical_bounds(image)
    spacing = np.asarray(spacing, dtype=float)
    size = np.maximum(np.ceil((high - low) / spacing - 1e-6).astype(int), 1)
    overhang = (size * spacing - (high - low)) / 2
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetOrigin((low - overhang + spacing / 2).tolist())
    grid.SetDirection(np.eye(3).ravel().tolist())
    return grid


def resample_like(
    image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkLinear, default: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto exactly the grid of ``reference`` (size, spacing, origin, direction)."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def downsample_smoothly(image: sitk.Image, reference: sitk.Image, default: float) -> sitk.Image:
    """Linear resampling after block-averaging along the input axes that get much coarser (no aliasing).

    Block averaging (BinShrink) is one pass over the data: on a 512x512x200 CT it takes 0.07 s where a
    Gaussian pre-filter takes 7 s on two cores.
    """
    target = min(reference.GetSpacing())
    factors = [max(int(target / spacing), 1) for spacing in image.GetSpacing()]
    if max(factors) > 1:
        image = sitk.BinShrink(image, factors)
    return resample_like(image, reference, sitk.sitkLinear, default)
