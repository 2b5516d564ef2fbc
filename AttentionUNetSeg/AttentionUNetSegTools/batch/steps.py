"""One case, in the three steps both engines run: read the CT, segment it, write ``OUT/<case>/``.

A case folder appears whole or not at all: it is written as a hidden staging folder beside it and renamed
at the end, so Ctrl-C or a dead worker leaves only a hidden ``.<case>-partial-*`` folder that the next run
removes. A case counts as done when its folder holds every expected file, the report parses and the images
read back; anything less is redone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from AttentionUNetSegLib import imageio, outputs
from AttentionUNetSegLib.errors import UserError

from .inputs import Case

LABEL_FORMATS = ("seg.nrrd", "nii.gz")
REPORT_NAME = "report.json"
STAGING_MARK = "-partial-"


@dataclass(frozen=True)
class Layout:
    """What a finished case folder holds, given the batch's options."""

    label_format: str = "seg.nrrd"
    dicom_seg: bool = False

    @property
    def label_name(self) -> str:
        return f"pancreas.{self.label_format}"

    @property
    def attention_name(self) -> str:
        # NRRD beside a .seg.nrrd: Slicer opens both, and it writes faster than .nii.gz on large CTs.
        return "attention.nii.gz" if self.label_format == "nii.gz" else "attention.nrrd"

    def wants_dicom_seg(self, case: Case) -> bool:
        return self.dicom_seg and case.is_dicom

    def files(self, case: Case) -> list[str]:
        from .. import dicom_seg

        return [self.label_name, self.attention_name, REPORT_NAME,
                *([dicom_seg.FILE_NAME] if self.wants_dicom_seg(case) else [])]


@dataclass
class Loaded:
    """A case read and ready for the network."""

    case: Case
    image: sitk.Image
    dicom_sources: list | None  # the series' datasets, where a DICOM SEG is to be written


def read(case: Case, layout: Layout) -> Loaded:
    image = imageio.read_image(case.input, case.series)
    sources = None
    if layout.wants_dicom_seg(case):
        from .. import dicom_seg

        sources = dicom_seg.read_series(case.input, case.series)
    return Loaded(case, image, sources)


def segment(segmenter, loaded: Loaded):
    """The engine's one use case; returns the result and the seconds it took."""
    started = time.perf_counter()
    result = segmenter.segment(loaded.image, maps=("combined",))
    return result, time.perf_counter() - started


def write(out_dir: Path, loaded: Loaded, layout: Layout, result, seconds: float, model_name: str) -> dict:
    """Write the case folder (staged, renamed at the end) and return its report."""
    case = loaded.case
    report = outputs.report(result, seconds, model_name)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{case.name}{STAGING_MARK}"))
    try:
        label = staging / layout.label_name
        writers = {
            label: outputs.label_writer(result.mask, label),
            staging / layout.attention_name: outputs.attention_writer(result.attention_maps["combined"]),
            staging / REPORT_NAME: outputs.json_writer(report),
        }
        if loaded.dicom_sources is not None:
            from .. import dicom_seg

            writers[staging / dicom_seg.FILE_NAME] = dicom_seg.writer(result.mask, loaded.dicom_sources, model_name)
        outputs.write_outputs(writers)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        final = out_dir / case.name
        if final.exists():  # found incomplete at the start: replaced whole
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def finished_report(out_dir: Path, case: Case, layout: Layout) -> dict | None:
    """The report of a case already done and intact, else None (missing, half-written or unreadable)."""
    folder = out_dir / case.name
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
        if not isinstance(report, dict) or any(key not in report for key in outputs.REPORT_KEYS):
            return None
        for name in layout.files(case):
            _read_back(folder / name)
    except (OSError, ValueError, RuntimeError):
        return None
    return report


def _read_back(path: Path) -> None:
    if path.name.endswith(".json"):
        return
    if path.name.endswith(".dcm"):
        import pydicom

        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding it is the check
        return
    imageio.read_image(path)  # with its check for a gzip stream cut short


def remove_staging(out_dir: Path) -> None:
    """Hidden staging folders left by an earlier run that was killed, or by a worker that died."""
    for folder in out_dir.glob(f".*{STAGING_MARK}*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def one_line(exc: BaseException) -> str:
    """A failed case's reason for the summary: the user's error as is, anything else with its type."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; crop or downsample the CT, or run fewer workers per machine"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"unexpected {type(exc).__name__}: {exc}{place}; please report it"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
