"""Inference on real CT: outputs on exactly the input grid, whatever its geometry; progress, cancel, devices."""

import gc

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import same_grid

from AttentionUNetSegLib import geometry, tiling
from AttentionUNetSegLib.engine import ATTENTION_MAP_NAMES, SegmentationOptions, Segmenter, resolve_device
from AttentionUNetSegLib.errors import Cancelled, DeviceError, UserError
from AttentionUNetSegLib.imageio import read_image


def flipped_storage(image: sitk.Image, axis: int) -> sitk.Image:
    """The same physical image stored with one voxel axis reversed (as many scanners write it)."""
    flipped = sitk.Flip(image, [i == axis for i in range(3)])
    assert np.allclose(flipped.TransformIndexToPhysicalPoint((0, 0, 0)),
                       image.TransformIndexToPhysicalPoint([n - 1 if i == axis else 0
                                                            for i, n in enumerate(image.GetSize())]))
    return flipped


def oblique(image: sitk.Image, degrees: float) -> sitk.Image:
    """Resample onto a grid rotated about z (an oblique acquisition)."""
    rotation = sitk.VersorTransform((0, 0, 1), np.radians(degrees))
    grid = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection(np.array(rotation.GetMatrix()).ravel().tolist())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    grid.SetOrigin((centre - np.array(grid.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in image.GetSize()])) + np.array(grid.GetOrigin())).tolist())
    return geometry.resample_like(image, grid, sitk.sitkLinear, -1024.0)


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(tiny_model, SegmentationOptions(device="cpu"))


@pytest.fixture(scope="module")
def ct(small_ct):
    return read_image(small_ct)


def test_outputs_lie_on_the_input_grid_and_are_in_range(segmenter, ct):
    result = segmenter.segment(ct, maps=ATTENTION_MAP_NAMES)
    assert same_grid(result.mask, ct)
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    voxels = int(sitk.GetArrayViewFromImage(result.mask).sum())
    assert result.volume_ml == pytest.approx(voxels * np.prod(ct.GetSpacing()) / 1000)
    assert set(result.timings) == {"preprocess", "inference", "postprocess", "resample"}
    assert result.device == "cpu"
    assert list(result.attention_maps) == list(ATTENTION_MAP_NAMES)
    for name, attention in result.attention_maps.items():
        assert same_grid(attention, ct) and attention.GetPixelID() == sitk.sitkUInt8, name
        assert sitk.GetArrayViewFromImage(attention).max() > 0, name
    assert result.verdict.qc in ("ok", "check", "not found") and 0.0 <= result.verdict.confidence <= 1.0


def test_only_the_maps_asked_for_are_made(segmenter, ct):
    assert list(segmenter.segment(ct).attention_maps) == ["combined"]
    assert list(segmenter.segment(ct, maps=("level3",)).attention_maps) == ["level3"]
    assert segmenter.segment(ct, maps=()).attention_maps == {}
    with pytest.raises(UserError, match="no attention map named level9"):
        segmenter.segment(ct, maps=("combined", "level9"))


def test_attention_is_zero_off_the_body(segmenter, ct):
    """The air around the patient (and the table's gap) gets no heat: it means nothing there."""
    attention = sitk.GetArrayFromImage(segmenter.segment(ct).attention_maps["combined"])
    hu = sitk.GetArrayViewFromImage(ct)
    # Air at least two voxels (6 mm, more than a model voxel) from anything denser, in the outer rows
    far_air = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Cast(ct < -500, sitk.sitkUInt8), [2, 2, 2])) > 0
    outside = np.zeros(hu.shape, bool)
    outside[:, :3] = outside[:, -3:] = True  # the first and last rows of every slice lie outside the patient
    assert (far_air & outside).sum() > 10000 and not attention[far_air & outside].any()
    assert attention[hu > 0].mean() > 0


def test_combined_is_the_mean_of_the_levels(segmenter, ct):
    maps = {k: sitk.GetArrayViewFromImage(v).astype(float)
            for k, v in segmenter.segment(ct, maps=ATTENTION_MAP_NAMES).attention_maps.items()}
    levels = np.mean([maps[k] for k in ATTENTION_MAP_NAMES[1:]], axis=0)
    assert np.abs(maps["combined"] - levels).max() <= 2  # 8-bit rounding of four resampled maps


def test_test_time_augmentation_is_the_default_and_informs_the_verdict(tiny_model, ct):
    """Every front end gets the two-pass verdict unless it asks for one pass (--no-tta)."""
    result = Segmenter(tiny_model, SegmentationOptions(device="cpu")).segment(ct)
    assert same_grid(result.mask, ct) and same_grid(result.attention_maps["combined"], ct)
    assert 0.0 <= result.evidence.agreement <= 1.0 and 0.0 <= result.verdict.confidence <= 1.0
    assert Segmenter(tiny_model, SegmentationOptions(device="cpu", tta=False)).segment(ct).evidence.agreement is None


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flipped_storage_gives_the_same_physical_result(segmenter, ct, axis):
    """No silent orientation flips: the same anatomy stored mirrored gives the same maps in physical space."""
    reference = segmenter.segment(ct)
    flipped = flipped_storage(ct, axis)
    result = segmenter.segment(flipped)
    assert same_grid(result.attention_maps["combined"], flipped)
    for image, original in ((result.attention_maps["combined"], reference.attention_maps["combined"]),
                            (result.mask, reference.mask)):
        back = sitk.GetArrayFromImage(geometry.resample_like(image, ct, sitk.sitkNearestNeighbor)).astype(int)
        differing = np.abs(back - sitk.GetArrayViewFromImage(original)) > 1  # beyond 8-bit rounding
        # A voxel whose HU rounds to either side of the body threshold may fall in or out of the body (where
        # the maps are zeroed): a few such voxels on the skin, never a mirrored map
        assert differing.mean() < 1e-4, differing.sum()


def test_oblique_anisotropic_and_tiny_inputs_keep_their_grid(segmenter, ct):
    thick = sitk.Resample(ct, [ct.GetSize()[0] * 6, ct.GetSize()[1] * 6, 9], sitk.Transform(), sitk.sitkLinear,
                          ct.GetOrigin(), [0.5, 0.5, 10.0], ct.GetDirection(), -1024.0)
    tiny = ct[40:52, 40:50, 10:13]
    for image in (oblique(ct, 25), thick, tiny):
        result = segmenter.segment(image)
        assert same_grid(result.mask, image) and same_grid(result.attention_maps["combined"], image)


def test_a_structure_keeps_its_physical_place_through_the_model_grid(ct):
    """A bright block placed at a physical point is found there on the model grid and back on the input grid."""
    for image in (ct, flipped_storage(ct, 0), oblique(ct, 30)):
        marked = sitk.Image(image.GetSize(), sitk.sitkFloat32)
        marked.CopyInformation(image)
        index = [n // 3 for n in image.GetSize()]
        point = np.array(image.TransformIndexToPhysicalPoint(index))
        block = sitk.GetArrayFromImage(marked)
        block[index[2] - 2:index[2] + 3, index[1] - 4:index[1] + 5, index[0] - 4:index[0] + 5] = 1000
        marked = sitk.GetImageFromArray(block)
        marked.CopyInformation(image)
        grid = geometry.canonical_grid(image, (3.0, 3.0, 3.0))
        on_grid = geometry.resample_like(marked, grid)
        assert np.linalg.norm(bright_centroid(on_grid) - point) < 2.0
        assert np.linalg.norm(bright_centroid(geometry.resample_like(on_grid, image)) - point) < 2.0


def bright_centroid(image: sitk.Image) -> np.ndarray:
    indices = np.argwhere(sitk.GetArrayViewFromImage(image) > 500)[:, ::-1]
    return np.mean([image.TransformIndexToPhysicalPoint([int(i) for i in index]) for index in indices], axis=0)


def test_runs_are_deterministic(segmenter, ct):
    first, second = segmenter.segment(ct), segmenter.segment(ct)
    assert np.array_equal(sitk.GetArrayViewFromImage(first.attention_maps["combined"]),
                          sitk.GetArrayViewFromImage(second.attention_maps["combined"]))
    assert np.array_equal(sitk.GetArrayViewFromImage(first.mask), sitk.GetArrayViewFromImage(second.mask))


def test_a_long_lived_segmenter_keeps_nothing_per_shape(segmenter, ct):
    """``batch`` and ``serve`` run one Segmenter over CTs of every size for hours: no tensor may stay behind
    per shape (a cache of Gaussian weights per tile shape once grew with every CT). RSS itself is measured by
    Testing/benchmark.py --memory-growth; it is too noisy for a test."""
    def tensors_alive() -> int:
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())  # type(): no __class__ hooks

    segmenter.segment(ct[:40, :30])
    before = tensors_alive()
    for size in range(50, 122, 18):  # each a new tile shape on the tiny model's 4 mm grid
        segmenter.segment(ct[:size, :size - 20])
    assert tensors_alive() == before


def test_progress_is_reported_and_cancel_stops(segmenter, ct):
    seen = []
    segmenter.segment(ct, progress=lambda fraction, text: seen.append((fraction, text)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(text.startswith("Tile") for _, text in seen)
    with pytest.raises(Cancelled):
        segmenter.segment(ct, cancel=lambda: True)


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_tiled_inference_matches_one_tile():
    """Gaussian blending of overlapping tiles reproduces a position-independent predictor exactly."""
    volume = torch.rand(1, 1, 40, 56, 72)

    def predict(tiles):
        return [tiles * 2, torch.nn.functional.avg_pool3d(tiles, 4)]

    whole = tiling.sliding_window(volume, (48, 64, 80), 0.5, predict)
    tiled = tiling.sliding_window(volume, (16, 32, 32), 0.5, predict)
    assert tiling.count_windows(volume.shape[2:], (16, 32, 32), 0.5, 16) > 1
    for a, b in zip(whole, tiled):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert whole[0].shape[2:] == volume.shape[2:]
