"""Inference: a CT (SimpleITK image, any geometry) in; a pancreas mask and attention maps on its grid out.

Stages, in order: canonical grid + resampling (``geometry``), intensity normalisation, body crop,
sliding-window inference with Gaussian blending (``tiling``), post-processing, resampling back.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import geometry, tiling
from .errors import Cancelled, DeviceError, UserError
from .imageio import validate_ct
from .network import GATED_LEVELS
from .verdict import NOT_FOUND, Evidence, Verdict, dilated, verdict_for_weights
from .weights import LoadedModel, load_model

ProgressCallback = Callable[[float, str], None]
AIR_HU = -1024.0
BODY_THRESHOLD_HU = -500.0
BODY_MARGIN_VOXELS = 4
OVERLAP = {"full": 0.5, "fast": 0.25}
# Tiles may grow past the training patch up to this many voxels: the network is fully convolutional, and
# on the CPU one large tile costs far less than many overlapping small ones (see Testing/benchmark.py).
MAX_TILE_VOXELS = 200**3
DIVISOR = 16  # four 2x poolings
TTA_SHIFT = 5  # voxels; not a multiple of the poolings' 16, so the second pass sees the CT differently aligned
ATTENTION_MAP_NAMES = ("combined", *(f"level{k}" for k in GATED_LEVELS))  # combined = mean of the levels
ATTENTION_SCALE = 255  # attention maps are 8-bit: value / ATTENTION_SCALE = gate coefficient in [0, 1]
# oneDNN (torch's CPU convolutions) caches a compiled kernel per layer and input shape, 1024 by default, and
# nearly every CT brings new shapes, so a long-lived process (batch, serve) fills it. 256 still holds the ~65
# of one forward pass several times over, so the repeated tiles of a large CT stay fast (0 would recompile
# them for every tile), in half the memory of a full default cache. Read at the first convolution; a user's
# own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")


@dataclass
class SegmentationOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    quality: str = "full"  # full | fast (less tile overlap)
    # A second, shifted pass, averaged in. On by default: its agreement with the first is what lets the verdict
    # tell failures from good results (calibrated: it calls ok 3x as many good cases, still no failure).
    tta: bool = True
    threads: int | None = None  # CPU threads; None = all cores

    def __post_init__(self):
        if self.quality not in OVERLAP:
            raise ValueError(f"quality must be one of {sorted(OVERLAP)}, not {self.quality!r}")


@dataclass
class SegmentationResult:
    """Mask, the attention maps asked for and the verdict, on the input's grid, plus what the run measured."""

    mask: sitk.Image  # UInt8, 1 = pancreas
    attention_maps: dict[str, sitk.Image]  # UInt8, value / ATTENTION_SCALE = gate coefficient; 0 off the body
    volume_ml: float
    device: str
    timings: dict[str, float]
    verdict: Verdict
    evidence: Evidence = field(repr=False)  # what the verdict was drawn from

    @property
    def found(self) -> bool:
        return self.verdict.qc != NOT_FOUND


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; a named device that does not exist is a :class:`DeviceError`."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} requested but no CUDA GPU is usable", describe_gpu(), "use --device cpu")
        index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name} does not exist", f"{torch.cuda.device_count()} GPU(s) found", "")
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {name!r}", "", "use auto, cpu, cuda or cuda:N")


def describe_gpu() -> str:
    """Which GPU inference would use, or why there is none (for the CLI and the Slicer panel)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch to use a GPU)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has CUDA {torch.version.cuda} but finds no GPU or driver"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"CUDA {torch.version.cuda}: " + ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))


class Segmenter:
    """Holds a loaded model; ``segment`` may be called for many images."""

    def __init__(self, model: LoadedModel | str | Path | None = None, options: SegmentationOptions | None = None):
        self.options = options or SegmentationOptions()
        self.device = resolve_device(self.options.device)  # first: cheap, and says what is wrong before the load
        self.model = model if isinstance(model, LoadedModel) else load_model(model)

    def segment(
        self,
        image: sitk.Image,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        maps: Sequence[str] = ("combined",),
    ) -> SegmentationResult:
        """Segment the pancreas in ``image`` (HU): the one use case every front end calls.

        Validates the CT, returns the mask, the verdict and only the attention ``maps`` asked for (names from
        :data:`ATTENTION_MAP_NAMES`), each resampled once onto the input grid. ``cancel()`` returning True
        stops between tiles.
        """
        try:
            return self._segment(image, progress, cancel, maps)
        finally:
            release_freed_memory()  # after the run's arrays are gone, error or not

    def _segment(self, image, progress, cancel, maps) -> SegmentationResult:
        report = progress or (lambda fraction, stage: None)
        is_cancelled = cancel or (lambda: False)
        unknown = [name for name in maps if name not in ATTENTION_MAP_NAMES]
        if unknown:
            raise UserError(f"no attention map named {', '.join(unknown)}",
                            f"the maps are {', '.join(ATTENTION_MAP_NAMES)}", "choose from those")
        validate_ct(image)
        torch.set_num_threads(self.options.threads or os.cpu_count() or 1)
        timings: dict[str, float] = {}

        clock = time.perf_counter()
        report(0.0, "Resampling to the model grid")
        grid = geometry.canonical_grid(image, self.model.spec.spacing_mm)
        volume = sitk.GetArrayFromImage(geometry.downsample_smoothly(image, grid, AIR_HU))  # (z, y, x)
        body = _body(volume)
        box = _bounding_box(body, BODY_MARGIN_VOXELS) or tuple(slice(0, n) for n in volume.shape)
        tensor = torch.from_numpy(self._normalise(volume[box]))[None, None]
        timings["preprocess"] = time.perf_counter() - clock

        clock = time.perf_counter()
        probability, alphas, agreement, device_used = self._infer(tensor, report, is_cancelled)
        timings["inference"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report(0.9, "Post-processing")
        probability = _paste(probability, box, volume.shape)
        kept = _largest_filled_component(probability > 0.5, grid)
        evidence = Evidence.measure(probability, kept, volume, body, grid.GetSpacing(), agreement)
        model_maps = _attention_maps(alphas, box, volume.shape, body, maps)
        timings["postprocess"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report(0.95, "Resampling to the input grid")
        mask = _mask_on_input(probability, kept, grid, image)
        attention = {name: _map_on_input(values, grid, image) for name, values in model_maps.items()}
        timings["resample"] = time.perf_counter() - clock
        report(1.0, "Done")
        volume_ml = _volume_ml(mask)
        verdict = verdict_for_weights(evidence, self.model.sha256, self.model.spec.training)
        return SegmentationResult(mask, attention, volume_ml, device_used, timings, verdict, evidence)

    def _normalise(self, volume: np.ndarray) -> np.ndarray:
        return normalise_hu(volume, self.model.spec.hu_range)

    def _infer(self, tensor, report, is_cancelled):
        """Probability (z, y, x) and attention per level on the crop; with TTA, a shifted second pass is
        averaged in and the two passes' mask agreement (Dice) is returned, else None."""
        probability, alphas, device = self._infer_on_device(tensor, report, is_cancelled)
        if not self.options.tta:
            return probability, alphas, None, device
        shifted, _, _ = self._infer_on_device(_shift(tensor, TTA_SHIFT), report, is_cancelled)
        shifted = shifted[tuple(slice(TTA_SHIFT, None) for _ in range(3))]
        agreement = _dice(probability > 0.5, shifted > 0.5)
        return (probability + shifted) / 2, alphas, agreement, device

    def _infer_on_device(self, tensor, report, is_cancelled):
        """Sliding-window inference; on CUDA out of memory, the CPU (with a warning)."""
        try:
            return (*self._sliding_window(tensor, self.device, report, is_cancelled), str(self.device))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            warnings.warn(f"{self.device} ran out of memory; continuing on the CPU (slower)", stacklevel=2)
            report(0.1, "GPU out of memory: continuing on the CPU")
            cpu = torch.device("cpu")
            return (*self._sliding_window(tensor, cpu, report, is_cancelled), str(cpu))

    def _sliding_window(self, tensor, device, report, is_cancelled):
        network = self.model.network.to(device).to(memory_format=torch.channels_last_3d)
        roi = _tile_size(tensor.shape[2:], tuple(reversed(self.model.spec.roi_size)))  # spec is (x, y, z)
        overlap = OVERLAP[self.options.quality]
        total = tiling.count_windows(tensor.shape[2:], roi, overlap, DIVISOR)
        done = 0
        low_precision = autocast_dtype(device)

        def predict(tiles: torch.Tensor) -> list[torch.Tensor]:
            nonlocal done
            if is_cancelled():
                raise Cancelled("segmentation cancelled")
            tiles = tiles.to(device, memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
                logits, alphas = network(tiles, return_attention=True)
            done += tiles.shape[0]
            report(0.1 + 0.8 * min(done / total, 1.0), f"Tile {min(done, total)} of {total}")
            return [torch.softmax(logits.float(), dim=1), *(alphas[k] for k in network.attention_levels)]

        with torch.inference_mode():
            probabilities, *alphas = tiling.sliding_window(tensor, roi, overlap, predict, DIVISOR)
        levels = {f"level{k}": a[0] for k, a in zip(network.attention_levels, alphas)}
        return probabilities[0, 1].numpy(), levels


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``; None under another C library (macOS, Windows, musl), which has no such call."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Give the memory a run freed back to the system. glibc keeps freed blocks below 32 MB in its heaps for
    reuse, and every CT frees arrays of new sizes: without this a long-lived process (batch, serve) stays near
    its largest run's peak between CTs, about three times what it needs (Testing/benchmark.py --memory-growth).
    The price is small: the next run's pages are faulted in afresh."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def normalise_hu(volume: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """The model's intensity normalisation: clip to the HU range stored with the weights, scale to [0, 1]."""
    low, high = hu_range
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Half precision where the hardware runs it fast: bf16/fp16 on CUDA, bf16 on CPUs with native bf16.

    oneDNN also "supports" bf16 on plain AVX-512 by emulation, which measured 20% slower than fp32 there
    (Testing/benchmark.py), so the CPU needs the AVX-512 BF16 or AMX instructions themselves.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return torch.bfloat16 if any(check() for check in native) else None
    except RuntimeError:
        return None


def _tile_size(shape: tuple[int, ...], roi: tuple[int, ...]) -> tuple[int, ...]:
    """The whole (padded) volume as one tile when it fits the budget, else the model's tile."""
    whole = tuple(int(np.ceil(n / DIVISOR)) * DIVISOR for n in shape)
    whole = tuple(max(w, r) if n > r else w for w, r, n in zip(whole, roi, shape))
    return whole if np.prod(whole, dtype=np.float64) <= MAX_TILE_VOXELS else roi


def _body(volume: np.ndarray) -> np.ndarray:
    """The largest non-air component with its holes (lungs, bowel gas) filled; all False when there is none."""
    above = sitk.GetImageFromArray((volume > BODY_THRESHOLD_HU).astype(np.uint8))
    if not sitk.GetArrayViewFromImage(above).any():
        return np.zeros(volume.shape, bool)
    largest = sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(above), sortByObjectSize=True) == 1,
                        sitk.sitkUInt8)
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(largest, fullyConnected=False, foregroundValue=1)) > 0


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    indices = np.nonzero(mask)
    if not indices[0].size:
        return None
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + 1 + margin, n))
                 for i, n in zip(indices, mask.shape))


def _paste(values: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    full = np.zeros(shape, dtype=values.dtype)
    full[box] = values
    return full


def _shift(tensor: torch.Tensor, voxels: int) -> torch.Tensor:
    """The crop moved by ``voxels`` along every axis (air in front): another alignment to the poolings."""
    air = float(tensor.min())
    return F.pad(tensor, [voxels, 0] * 3, value=air)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def _largest_filled_component(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Post-processing on the model grid: the largest connected component, its holes filled."""
    if not mask.any():
        return mask
    image = _on_grid(mask.astype(np.uint8), grid)
    largest = sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True) == 1,
                        sitk.sitkUInt8)
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(largest, fullyConnected=False, foregroundValue=1)) > 0


def _attention_maps(alphas: dict[str, torch.Tensor], box, shape, body: np.ndarray, names) -> dict[str, np.ndarray]:
    """The maps asked for, on the model grid, in [0, 1], zero off the body: each level the mean of its gates,
    ``combined`` the mean of the levels."""
    crop_size = tuple(s.stop - s.start for s in box)

    def level(name: str) -> np.ndarray:
        alpha = alphas[name][None].float()
        return F.interpolate(alpha, size=crop_size, mode="trilinear", align_corners=False)[0].mean(0).numpy()

    levels = {name: level(name) for name in sorted(alphas) if name in names or "combined" in names}
    if "combined" in names:
        levels["combined"] = np.mean(list(levels.values()), axis=0)
    return {name: np.clip(_paste(levels[name], box, shape), 0, 1) * body for name in names}


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _mask_on_input(probability: np.ndarray, kept: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The kept component's probability (its filled holes set to 1) resampled linearly, then thresholded: smoother
    borders than nearest-neighbour. Resampled only inside the component's box on the input grid."""
    mask = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    box = _bounding_box(kept, 2)
    if box is not None:
        soft = np.where(kept, np.maximum(probability, 0.5 + 1e-3), np.minimum(probability, 0.5) * dilated(kept))
        region = _input_region(grid, box, reference)
        if region is not None:
            start, size = region
            window = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
            window.SetSpacing(reference.GetSpacing())
            window.SetDirection(reference.GetDirection())
            window.SetOrigin(reference.TransformIndexToPhysicalPoint([int(i) for i in start]))
            values = geometry.resample_like(_on_grid(soft.astype(np.float32), grid), window, sitk.sitkLinear, 0.0)
            z, y, x = (slice(int(b), int(b + n)) for b, n in zip(reversed(start), reversed(size)))
            mask[z, y, x] = sitk.GetArrayViewFromImage(values) > 0.5
    image = sitk.GetImageFromArray(mask)
    image.CopyInformation(reference)
    return image


def _input_region(grid: sitk.Image, box: tuple[slice, ...], reference: sitk.Image):
    """Start index and size, on the input grid, of the physical box that ``box`` (z, y, x on ``grid``) covers."""
    corners = [grid.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
               for corner in itertools.product(*[(s.start - 0.5, s.stop - 0.5) for s in reversed(box)])]
    indices = np.array([reference.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    size = np.array(reference.GetSize())
    start = np.clip(np.floor(indices.min(axis=0)).astype(int), 0, size)
    stop = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 1, 0, size)
    return (start, stop - start) if np.all(stop > start) else None


def _map_on_input(values: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """One linear resampling onto the input grid, straight into 8 bits (rounded: ITK's cast truncates)."""
    scaled = _on_grid((values * ATTENTION_SCALE + 0.5).astype(np.float32), grid)
    return sitk.Resample(scaled, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)


def _volume_ml(mask: sitk.Image) -> float:
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return voxels * float(np.prod(mask.GetSpacing())) / 1000.0
