"""One case, in the three steps both engines run: read the CT, segment it, write ``OUT/<case>/``.

A case folder holds one result of one input, whole: it is written as a hidden staging folder beside it and
swapped in at the end, so Ctrl-C or a dead worker leaves only a hidden ``.<case>-partial-*`` folder that the next
run removes. A case counts as done when its report says it was made from the same input (path, size and
modification time; for a DICOM folder, those of its files) and every expected file reads back; anything
else is redone, so a rerun never reports one CT's result for another (a CT replaced, or a name that now
belongs to another CT).
"""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class Layout:
    """What a finished case folder holds, given the batch's options."""

    label_format: str = "seg.nrrd"
    dicom_seg: bool = False

    def files(self, folder: Path) -> outputs.ResultFiles:
        return outputs.named_files(folder, self.label_format)

    def wants_dicom_seg(self, case: Case) -> bool:
        return self.dicom_seg and case.is_dicom

    def file_names(self, case: Case) -> list[str]:
        from .. import dicom_seg

        names = [path.name for path in self.files(Path()).paths()]
        return names + ([dicom_seg.FILE_NAME] if self.wants_dicom_seg(case) else [])


def _result_file_names() -> set[str]:
    """Every file a case folder of any layout holds: only a folder of these is ever replaced."""
    from .. import dicom_seg

    return {p.name for fmt in outputs.LABEL_FORMATS for p in outputs.named_files(Path(), fmt).paths()} | {
        dicom_seg.FILE_NAME}


@dataclass
class Loaded:
    """A case read and ready for the network."""

    case: Case
    image: sitk.Image
    dicom_sources: list | None  # the series' datasets, where a DICOM SEG is to be written
    input_record: dict  # taken before reading it: a CT changed while being read is redone on the next run


def read(case: Case, layout: Layout) -> Loaded:
    record = input_record(case)
    image = imageio.read_image(case.input, case.series)
    sources = None
    if layout.wants_dicom_seg(case):
        from .. import dicom_seg

        sources = dicom_seg.read_series(case.input, case.series)
    return Loaded(case, image, sources, record)


def input_record(case: Case) -> dict:
    """What a case's result is made from, for resuming: the input's resolved path, size and modification time;
    for a DICOM folder a digest of its files' names, sizes and times (and the series read)."""
    path = case.input.resolve()
    if not path.is_dir():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    for file in outputs.input_files(path):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"path": str(path), "series": case.series, "files": digest.hexdigest()}


def segment(segmenter, loaded: Loaded):
    """The engine's one use case; returns the result and the seconds it took."""
    started = time.perf_counter()
    result = segmenter.segment(loaded.image, maps=("combined",))
    return result, time.perf_counter() - started


def write(out_dir: Path, loaded: Loaded, layout: Layout, result, seconds: float, model_name: str) -> dict:
    """Write the case folder (staged, swapped in at the end) and return its report."""
    final = out_dir / loaded.case.name
    with outputs.writing(final):  # the staging folder is ours: a failure names the case folder
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{loaded.case.name}{outputs.STAGING_MARK}"))
        try:
            report = outputs.write_result(result, layout.files(staging), seconds=seconds, model=model_name,
                                          extra=_dicom_seg(staging, loaded, result, model_name),
                                          input_record=loaded.input_record)
            outputs.give_default_permissions(staging)
            _swap_in(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return report


def _dicom_seg(folder: Path, loaded: Loaded, result, model_name: str) -> list:
    if loaded.dicom_sources is None:
        return []
    from .. import dicom_seg

    return [(folder / dicom_seg.FILE_NAME, dicom_seg.writer(result.mask, loaded.dicom_sources, model_name))]


def _swap_in(staging: Path, final: Path) -> None:
    """Rename the staging folder into place. An earlier result there is first set aside under a staging name and
    removed only once the new one is in place (a crash between leaves it to :func:`remove_staging`); a folder
    holding anything else is the user's, and left alone."""
    if not final.exists() and not final.is_symlink():
        os.rename(staging, final)
        return
    names = _result_file_names()
    if final.is_symlink() or not final.is_dir() or any(
            p.name not in names and not p.name.startswith(".") for p in final.iterdir()):
        raise UserError(f"{final} holds files this batch did not write", "it is not replaced",
                        "move them away, or choose another output folder")
    earlier = staging.with_name(f"{staging.name}-earlier")
    os.rename(final, earlier)
    os.rename(staging, final)
    shutil.rmtree(earlier, ignore_errors=True)


def finished_report(out_dir: Path, case: Case, layout: Layout) -> dict | None:
    """The report of a case already done from this same input and intact, else None (missing, half-written,
    unreadable, or made from another input)."""
    folder = out_dir / case.name
    try:
        report = json.loads(layout.files(folder).report.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or any(key not in report for key in outputs.REPORT_KEYS):
            return None
        if report.get("input") != input_record(case):
            return None
        for name in layout.file_names(case):
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
    """Hidden staging folders and files left by an earlier run that was killed, or by a worker that died."""
    for path in out_dir.glob(f".*{outputs.STAGING_MARK}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def one_line(exc: BaseException) -> str:
    """A failed case's reason for the summary: the user's error as is, anything else with its type."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; crop or downsample the CT, or run fewer workers per machine"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"unexpected {type(exc).__name__}: {exc}{place}; please report it"
