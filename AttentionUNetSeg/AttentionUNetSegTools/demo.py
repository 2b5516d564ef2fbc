"""Segment a real abdominal CT and write the segmentation, the attention map and a PNG preview.

With no INPUT, the CT is the first case of the project's shared data folder (../shared/data beside the
repository, or $ATTENTION_UNET_SEG_DATA), else Slicer's "CTAAbdomenPanoramix" sample, downloaded once
into a cache and verified by its SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from AttentionUNetSegLib import imageio, outputs
from AttentionUNetSegLib.cli import add_model_arguments, load_segmenter, segment_with_progress
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.locations import shared_data_dir

DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class SampleCT:
    name: str
    file_name: str
    url: str
    sha256: str


# The abdominal CTA that Slicer's SampleData module offers (Modules/Scripted/SampleData/SampleData.py).
PANORAMIX = SampleCT(
    name="Panoramix-cropped",
    file_name="Panoramix-cropped.nrrd",
    url="https://github.com/Slicer/SlicerTestingData/releases/download/"
    "SHA256/146af87511520c500a3706b7b2bfb545f40d5d04dd180be3a7a2c6940e447433",
    sha256="146af87511520c500a3706b7b2bfb545f40d5d04dd180be3a7a2c6940e447433",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", type=Path,
                        help="CT file or DICOM series folder (default: a real abdominal CT, see above)")
    parser.add_argument("--output-dir", type=Path, default=Path("output"), help="where to write (default: ./output)")
    parser.add_argument("--label-format", choices=outputs.LABEL_FORMATS, default="seg.nrrd",
                        help="segmentation file format (default: seg.nrrd, which Slicer loads as a segmentation)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output_dir = outputs.check_output_folder(args.output_dir)
    segmenter = load_segmenter(args)  # before any download: without a model there is nothing to demonstrate
    ct_path, case = _ct_and_name(args.input)
    print(f"Segmenting {ct_path}", flush=True)
    image = imageio.read_image(ct_path)
    result = segment_with_progress(segmenter, image, args.progress)

    from .preview import render_overlays  # matplotlib: only once there is something to draw

    files = outputs.named_files(output_dir, args.label_format, prefix=f"{case}_")
    preview_path = output_dir / f"{case}_preview.png"
    title = f"{case}: {outputs.summary_line(result.volume_ml, result.verdict)} (model {segmenter.model.spec.version})"
    attention = result.attention_maps["combined"]
    preview = (preview_path, lambda path: render_overlays(image, result.mask, attention, path, title=title))
    outputs.write_result(result, files, seconds=time.perf_counter() - started,
                         model=outputs.model_name(segmenter.model), inputs=[ct_path], extra=[preview])
    print(f"Segmentation:  {files.label}")
    print(f"Attention map: {files.maps[0][0]}")
    print(f"Preview:       {preview_path}")
    print(f"Report:        {files.report}")
    print(outputs.summary_line(result.volume_ml, result.verdict, time.perf_counter() - started, result.device),
          flush=True)
    return 0


def _ct_and_name(given: Path | None) -> tuple[Path, str]:
    """The CT to segment and the name its files start with (``ct.nii.gz`` -> ``ct``, a DICOM folder's name)."""
    if given is None:
        return default_input()
    return given, outputs.safe_name(outputs.image_stem(given.absolute())) or "ct"


def default_input() -> tuple[Path, str]:
    """The first case of the shared data folder, else the cached (or downloaded) Slicer sample CT."""
    data = shared_data_dir()
    cases = sorted(p for p in data.iterdir() if (p / "ct.nii.gz").is_file()) if data.is_dir() else []
    if cases:
        return cases[0] / "ct.nii.gz", cases[0].name
    try:
        return fetch_verified(PANORAMIX.url, PANORAMIX.sha256, cache_dir() / PANORAMIX.file_name), PANORAMIX.name
    except UserError as exc:
        raise UserError(
            "no CT to run the demo on",
            f"{data} has no cases and the sample CT could not be fetched ({exc.what}: {exc.why})",
            "pass a CT: attention-unet-seg demo PATH/TO/ct.nii.gz (or a DICOM folder)",
        ) from None


def cache_dir() -> Path:
    override = os.environ.get("ATTENTION_UNET_SEG_CACHE")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attention-unet-seg"


def fetch_verified(url: str, sha256: str, destination: Path) -> Path:
    """``destination`` if it holds the file with that SHA-256; otherwise download it there and check it."""
    if destination.is_file() and _file_sha256(destination) == sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with imageio.replacing(destination) as partial:
        with partial.open("wb") as out:
            _download(url, out)
        if _file_sha256(partial) != sha256:
            raise UserError(f"the download of {destination.name} failed its SHA-256 check",
                            f"{url} did not serve the expected file", "try again later")
    return destination


def _download(url: str, out) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.wrapattr(out, "write", total=size, desc=f"Downloading {Path(url).name[:16]}",
                               unit="B", unit_scale=True, leave=False) as progress:
                shutil.copyfileobj(response, progress)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot download {url}", str(reason), "check the internet connection") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
