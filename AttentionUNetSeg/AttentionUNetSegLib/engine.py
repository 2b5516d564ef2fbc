"""Inference: a CT (SimpleITK image, any geometry) in; a pancreas mask and attention maps on its grid out.

Stages, in order: canonical grid + resampling (``geometry``), intensity normalisation, body crop,
sliding-window inference with Gaussian blending (``tiling``), post-processing, resampling back.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import geometry, tiling
from .errors import Cancelled, DeviceError
from .imageio import validate_ct
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
ATTENTION_LEVELS = 1024.0


@dataclass
class SegmentationOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    quality: str = "full"  # full | fast (less tile overlap)
    body_crop: bool = True
    keep_largest_component: bool = True
    fill_holes: bool = True
    sw_batch_size: int = 1
    threads: int | None = None  # CPU threads; None = all cores

    def __post_init__(self):
        if self.quality not in OVERLAP:
            raise ValueError(f"quality must be one of {sorted(OVERLAP)}, not {self.quality!r}")


@dataclass
class SegmentationResult:
    """Mask and attention on the input's grid, plus what the run measured."""

    mask: sitk.Image  # UInt8, 1 = pancreas
    attention: sitk.Image  # float32 in [0, 1], all gates combined
    volume_ml: float
    device: str
    timings: dict[str, float]
    model_grid_maps: dict[str, sitk.Image] = field(repr=False)  # per level / gate, on the model grid
    input_grid: sitk.Image = field(repr=False)
    _resampled: dict[str, sitk.Image] = field(default_factory=dict, repr=False)

    @property
    def attention_names(self) -> list[str]:
        return ["combined", *self.model_grid_maps]

    def attention_map(self, name: str = "combined") -> sitk.Image:
        """One attention map on the input grid: ``combined``, ``level2``..``level4`` or ``level2_gate1``..."""
        if name == "combined":
            return self.attention
        if name not in self.model_grid_maps:
            raise KeyError(f"no attention map {name!r}; available: {', '.join(self.attention_names)}")
        if name not in self._resampled:
            self._resampled[name] = _to_input_grid(self.model_grid_maps[name], self.input_grid)
        return self._resampled[name]


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
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.options = options or SegmentationOptions()
        self.device = resolve_device(self.options.device)

    def segment(
        self,
        image: sitk.Image,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> SegmentationResult:
        """Segment the pancreas in ``image`` (HU). ``cancel()`` returning True stops between tiles."""
        report = progress or (lambda fraction, stage: None)
        is_cancelled = cancel or (lambda: False)
        validate_ct(image)
        torch.set_num_threads(self.options.threads or os.cpu_count() or 1)
        timings: dict[str, float] = {}

        clock = time.perf_counter()
        report(0.0, "Resampling to the model grid")
        grid = geometry.canonical_grid(image, self.model.spec.spacing_mm)
        ct = geometry.downsample_smoothly(image, grid, AIR_HU)
        volume = sitk.GetArrayFromImage(ct)  # (z, y, x)
        box = _body_box(volume) if self.options.body_crop else tuple(slice(0, n) for n in volume.shape)
        tensor = torch.from_numpy(self._normalise(volume[box]))[None, None]
        timings["preprocess"] = time.perf_counter() - clock

        clock = time.perf_counter()
        probabilities, alphas, device_used = self._infer(tensor, report, is_cancelled)
        timings["inference"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report(0.9, "Post-processing")
        mask = self._postprocess(_paste(probabilities[1] > 0.5, box, volume.shape).astype(np.uint8), grid)
        maps = _attention_maps(alphas, box, volume.shape, grid)
        timings["postprocess"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report(0.95, "Resampling to the input grid")
        mask_on_input = geometry.resample_like(mask, image, sitk.sitkNearestNeighbor, 0)
        combined = _to_input_grid(maps.pop("combined"), image)
        timings["resample"] = time.perf_counter() - clock
        report(1.0, "Done")
        return SegmentationResult(
            mask=mask_on_input,
            attention=combined,
            volume_ml=_volume_ml(mask_on_input),
            device=device_used,
            timings=timings,
            model_grid_maps=maps,
            input_grid=image,
        )

    def _normalise(self, volume: np.ndarray) -> np.ndarray:
        return normalise_hu(volume, self.model.spec.hu_range)

    def _infer(self, tensor, report, is_cancelled):
        """Sliding-window inference; on CUDA out-of-memory, smaller batches, then the CPU."""
        device, batch = self.device, self.options.sw_batch_size
        while True:
            try:
                return (*self._sliding_window(tensor, device, batch, report, is_cancelled), str(device))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch > 1:
                    batch //= 2
                    continue
                warnings.warn(f"{device} ran out of memory; continuing on the CPU (slower)", stacklevel=2)
                report(0.1, "GPU out of memory: continuing on the CPU")
                device = torch.device("cpu")

    def _sliding_window(self, tensor, device, batch, report, is_cancelled):
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
            probabilities, *alphas = tiling.sliding_window(tensor, roi, overlap, predict, DIVISOR, batch)
        levels = {f"level{k}": a[0] for k, a in zip(network.attention_levels, alphas)}
        return probabilities[0].numpy(), levels

    def _postprocess(self, mask: np.ndarray, grid: sitk.Image) -> sitk.Image:
        image = _on_grid(mask, grid)
        if self.options.keep_largest_component and mask.any():
            components = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True)
            image = sitk.Cast(components == 1, sitk.sitkUInt8)
        if self.options.fill_holes:
            image = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
        return image


def normalise_hu(volume: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """The model's intensity normalisation: clip to the HU range stored with the weights, scale to [0, 1]."""
    low, high = hu_range
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Half precision where the hardware runs it fast: bf16/fp16 on CUDA, bf16 on CPUs with native bf16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def _tile_size(shape: tuple[int, ...], roi: tuple[int, ...]) -> tuple[int, ...]:
    """The whole (padded) volume as one tile when it fits the budget, else the model's tile."""
    whole = tuple(int(np.ceil(n / DIVISOR)) * DIVISOR for n in shape)
    whole = tuple(max(w, r) if n > r else w for w, r, n in zip(whole, roi, shape))
    return whole if np.prod(whole, dtype=np.float64) <= MAX_TILE_VOXELS else roi


def _body_box(volume: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the largest non-air component (the body), with a margin; whole volume if none."""
    body = sitk.GetImageFromArray((volume > BODY_THRESHOLD_HU).astype(np.uint8))
    if not sitk.GetArrayViewFromImage(body).any():
        return tuple(slice(0, n) for n in volume.shape)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(body), sortByObjectSize=True) == 1
    indices = np.nonzero(sitk.GetArrayViewFromImage(largest))
    return tuple(
        slice(max(int(i.min()) - BODY_MARGIN_VOXELS, 0), min(int(i.max()) + 1 + BODY_MARGIN_VOXELS, n))
        for i, n in zip(indices, volume.shape)
    )


def _paste(values: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    full = np.zeros(shape, dtype=values.dtype)
    full[box] = values
    return full


def _attention_maps(alphas: dict[str, torch.Tensor], box, shape, grid: sitk.Image) -> dict[str, sitk.Image]:
    """Per-gate and per-level maps on the model grid, and their mean as the combined map."""
    crop_size = tuple(s.stop - s.start for s in box)
    maps: dict[str, np.ndarray] = {}
    for level, alpha in sorted(alphas.items()):
        full = F.interpolate(alpha[None], size=crop_size, mode="trilinear", align_corners=False)[0].numpy()
        for gate, values in enumerate(full, start=1):
            maps[f"{level}_gate{gate}"] = values
        maps[level] = full.mean(axis=0)
    levels = [v for k, v in maps.items() if "_gate" not in k]
    maps["combined"] = np.mean(levels, axis=0)
    return {k: _on_grid(_paste(np.clip(v, 0, 1).astype(np.float32), box, shape), grid) for k, v in maps.items()}


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _to_input_grid(attention: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Linear resampling onto the input grid; values kept in [0, 1] and rounded to 1/1024.

    The rounding is far below what a heatmap shows, and makes the written map compress 6x (about 4 s less
    to write a 512x512x200 map).
    """
    values = sitk.GetArrayFromImage(geometry.resample_like(attention, reference, sitk.sitkLinear, 0.0))
    np.clip(values, 0.0, 1.0, out=values)
    np.multiply(values, ATTENTION_LEVELS, out=values)
    np.round(values, out=values)
    np.divide(values, ATTENTION_LEVELS, out=values)
    return _on_grid(values, reference)


def _volume_ml(mask: sitk.Image) -> float:
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return voxels * float(np.prod(mask.GetSpacing())) / 1000.0
