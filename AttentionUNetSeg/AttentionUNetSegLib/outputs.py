"""A run's files on disk, and the one recipe and the one wording of a segmentation's result.

Files: each output is written under a hidden name beside its target, checked (an image's header read back and
its voxel bytes counted, other files by size) and synced to the disk; the targets are replaced only once all
were written: all of them or none. A failure to write, a full disk above all, is one :class:`WriteError` naming
the file the user asked for. No output may replace an input (a CT file, a file of a DICOM folder) or a folder
holding one.

Results: :func:`write_result` is how ``segment``, the Slicer panel's child, ``demo`` and ``batch`` write a
segmentation; :func:`summary_line` is how every front end words it.

Imports only the standard library and numpy at start-up (SimpleITK where images are written), so that the
Slicer panel's parent can word a result without loading SimpleITK.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .verdict import NOT_FOUND

Writer = Callable[[Path], None]  # writes one whole file at the path it is given (a hidden twin of the target)
REPORT_KEYS = ("volume_ml", "confidence", "qc", "reason", "seconds", "device", "model")
LABEL_FORMATS = ("seg.nrrd", "nii.gz")  # the segmentation formats demo and batch offer
STAGING_MARK = "-partial-"  # in the names of files and folders still being written
UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 100  # a case name, with room for the staging marks within the file system's 255
WRITE_ADVICE = "free disk space or choose another folder"


class WriteError(UserError):
    """A file that could not be written (a full disk, a quota, a short write), named as the user asked for it."""

    def __init__(self, path: Path, why: str):
        self.path = Path(path)
        super().__init__(f"cannot write {path}", why, WRITE_ADVICE)


class IncompleteWrite(OSError):
    """A file that reached the disk shorter than it was written: a writer that did not notice a full disk."""

    def __init__(self, path: Path):
        super().__init__(errno.EIO, "only part of it reached the disk", str(path))


# --- one result ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultFiles:
    """Where a segmentation's files go. ``maps``: (path, attention map name) pairs. ``coefficients``: maps as
    float32 gate coefficients in [0, 1] (files for people), else the engine's 8-bit values (the panel's child)."""

    label: Path
    maps: tuple[tuple[Path, str], ...] = ()
    report: Path | None = None
    coefficients: bool = True
    compress: bool = True

    @property
    def map_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name in self.maps))

    def paths(self) -> list[Path]:
        return [self.label, *(path for path, _ in self.maps), *([self.report] if self.report else [])]


def named_files(folder: Path, label_format: str, prefix: str = "") -> ResultFiles:
    """demo's and batch's file names: ``pancreas.<format>``, the combined map and ``report.json``. The map is NRRD
    beside a ``.seg.nrrd`` (Slicer opens both, and NRRD writes 7x faster than .nii.gz on large CTs)."""
    attention = "attention.nii.gz" if label_format == "nii.gz" else "attention.nrrd"
    return ResultFiles(folder / f"{prefix}pancreas.{label_format}", ((folder / f"{prefix}{attention}", "combined"),),
                       folder / f"{prefix}report.json")


def write_result(result, files: ResultFiles, *, seconds: float, model: str, inputs: Iterable[Path] = (),
                 extra: Iterable[tuple[Path, Writer]] = (), input_record: dict | None = None) -> dict:
    """Write a segmentation: the label map, the attention maps, ``extra`` files (a DICOM SEG, a preview) and the
    report last, all or none, none of them over an input. ``input_record``: what the input was (batch resumes by
    it), kept in the report as ``input``. Returns the report."""
    values = report(result, seconds, model, input_record)
    pairs = [(files.label, label_writer(result.mask, files.label, files.compress))]
    pairs += [(path, attention_writer(result.attention_maps[name], files.coefficients, files.compress))
              for path, name in files.maps]
    pairs += list(extra)
    if files.report:
        pairs.append((files.report, json_writer(values)))
    write_outputs(pairs, inputs)
    return values


def report(result, seconds: float, model: str, input_record: dict | None = None) -> dict:
    """What ``segment --report`` writes: the volume, the verdict, the time, the device and the model (and, given
    ``input_record``, the input it was made from)."""
    verdict = result.verdict
    values = {"volume_ml": round(result.volume_ml, 2), "confidence": round(verdict.confidence, 3), "qc": verdict.qc,
              "reason": verdict.reason, "seconds": round(seconds, 2), "device": result.device, "model": model}
    return values if input_record is None else {**values, "input": input_record}


def model_name(model) -> str:
    """A loaded model as a report names it: its file and version."""
    return f"{model.path.name} ({model.spec.version})"


def summary_line(volume_ml: float, verdict, seconds: float | None = None, device: str | None = None) -> str:
    """The one wording of a result, built on :meth:`Verdict.describe`: ``Pancreas 72.4 mL; ok (confidence 0.83);
    3.1 s on cpu``, ``Pancreas 48.2 mL; check: <reason> (confidence 0.61)``, ``No pancreas found; 2.0 s on cpu``
    (the time where the caller measured it)."""
    described = verdict.describe()
    line = described.capitalize() if verdict.qc == NOT_FOUND else f"Pancreas {volume_ml:.1f} mL; {described}"
    return line if seconds is None else f"{line}; {seconds:.1f} s on {device}"


def label_writer(mask, path: Path, compress: bool = True) -> Writer:
    """``.seg.nrrd`` gets the segment metadata Slicer reads; other formats a plain label map."""
    from . import imageio

    return image_writer(imageio.with_segment_metadata(mask) if path.name.endswith(".seg.nrrd") else mask, compress)


def image_writer(image, compress: bool = True) -> Writer:
    from . import imageio

    return lambda path: imageio.write_file(image, path, compress)


def attention_writer(attention, coefficients: bool = True, compress: bool = True) -> Writer:
    """An engine map (8-bit), as float32 gate coefficients in [0, 1] (made while writing: one map at a time in
    memory) or as it is."""
    from . import imageio

    if not coefficients:
        return image_writer(attention, compress)
    return lambda path: imageio.write_file(attention_coefficients(attention), path, compress)


def attention_coefficients(attention):
    """An engine map (8-bit) as float32 gate coefficients in [0, 1], on the same grid."""
    import numpy as np
    import SimpleITK as sitk

    from .engine import ATTENTION_SCALE

    values = sitk.GetArrayViewFromImage(attention).astype(np.float32) / np.float32(ATTENTION_SCALE)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(attention)
    return image


def json_writer(values: dict) -> Writer:
    return bytes_writer((json.dumps(values, indent=2) + "\n").encode("utf-8"))


def bytes_writer(data: bytes) -> Writer:
    """Written whole however the system splits the write; a write that makes no progress is a full disk."""

    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_BINARY", 0))
        try:
            view = memoryview(data)
            while view:
                count = os.write(fd, view)
                if not count:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[count:]
            if os.fstat(fd).st_size != len(data):
                raise IncompleteWrite(path)
        finally:
            os.close(fd)

    return write


# --- names -----------------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """``text`` as a plain file or folder name: letters, digits, ``.``, ``_`` and ``-`` (other runs become ``-``),
    never hidden, ``.``, ``..`` or a path; empty when nothing is left (the caller picks a fallback)."""
    return UNSAFE_NAME_CHARACTERS.sub("-", text).strip(".-")[:MAX_NAME_LENGTH].rstrip(".-")


def image_stem(path: Path) -> str:
    """``ct.nii.gz`` -> ``ct``: the name without its image suffix (a DICOM folder keeps its name)."""
    from .imageio import IMAGE_SUFFIXES

    name = Path(path).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)] or name


# --- files -----------------------------------------------------------------------------------------------


def write_outputs(writers: dict[Path, Writer] | Iterable[tuple[Path, Writer]], inputs: Iterable[Path] = ()) -> None:
    """Write all outputs or none; files the user already had are replaced only in the last step. Each file is
    written under a hidden name in its target's folder, checked by its writer, synced, then renamed."""
    pairs = [(Path(path), write) for path, write in (writers.items() if isinstance(writers, dict) else writers)]
    targets = [path for path, _ in pairs]
    refuse_clashes(inputs, targets)
    created_folders = list(dict.fromkeys(p.parent for p in targets if not p.parent.exists()))
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for folder in created_folders:
            with writing(folder):
                folder.mkdir(parents=True)
        for target, write in pairs:
            with writing(target):
                staged.append((hidden_twin(target), target))
                write(staged[-1][0])
                sync_file(staged[-1][0])
                give_default_permissions(staged[-1][0])
        for temporary, target in staged:
            with writing(target):
                os.replace(temporary, target)
            placed.append(target)
        for folder in dict.fromkeys(target.parent for target in targets):
            sync_folder(folder)
    except BaseException:
        for path in [*placed, *(temporary for temporary, _ in staged)]:
            path.unlink(missing_ok=True)
        for folder in reversed(created_folders):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Any failure to write inside, a full disk above all, as one :class:`WriteError` naming ``path``: the file
    the user asked for, not one of the hidden files it is staged in."""
    try:
        yield
    except WriteError as exc:
        if exc.path == Path(path):
            raise
        raise WriteError(path, exc.why) from None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise WriteError(path, why[:1].lower() + why[1:]) from None


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Write into the yielded hidden file; on success it is synced and replaces ``path``, on any failure it
    vanishes. A failure to write is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    with writing(path):
        temporary = hidden_twin(path)
    try:
        with writing(path):
            yield temporary
            sync_file(temporary)
            give_default_permissions(temporary)
            os.replace(temporary, path)
        sync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def hidden_twin(path: Path) -> Path:
    """A new, empty hidden file beside ``path`` with the same extension (which picks the file format)."""
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: -len(suffix)] if suffix else path.name
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}{STAGING_MARK}", suffix=suffix)
    os.close(fd)
    return Path(name)


def sync_file(path: Path) -> None:
    """Flush ``path`` to the disk, so that a late failure (a quota on a network file system) is caught here."""
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable. POSIX only (Windows cannot open a folder for it), and some file
    systems refuse it (SMB mounts): the files themselves were synced already."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def give_default_permissions(path: str | Path) -> None:
    """The mode a plainly created file or folder gets (mkstemp and mkdtemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def check_output_path(path: str | Path, kinds: tuple[str, ...]) -> Path:
    """Fail before any work when an output cannot be written."""
    path = Path(path)
    if not path.name.endswith(kinds):
        raise UserError(f"output {path.name} has an unsupported extension", f"use one of {', '.join(kinds)}", "")
    if not path.parent.is_dir() or not folder_takes_files(path.parent):
        raise UserError(f"cannot write {path}", f"folder {path.parent} is missing or not writable", "choose another")
    return path


def check_output_folder(folder: Path) -> Path:
    """A folder that exists and takes files, or one that can be created."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not folder_takes_files(existing):
        raise UserError(f"cannot write into {folder}", f"{existing} is not a writable folder", "choose another")
    return folder


def folder_takes_files(folder: Path) -> bool:
    """Try it: ``os.access`` says yes to root even on read-only or virtual file systems."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            return True
    except OSError:
        return False


# --- inputs and outputs apart ----------------------------------------------------------------------------


def input_files(path: Path) -> list[Path]:
    """The files a CT input is: the file, or every file directly in its DICOM folder (any may be a slice)."""
    path = Path(path)
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def refuse_clashes(inputs: Iterable[Path], outputs: Sequence[Path]) -> None:
    """No output may be an input, a file of one, or a folder holding one (batch replaces case folders whole), nor
    another output. Compared as files on disk: links, ``..`` and letter case (on case-insensitive disks) do not
    hide a clash."""
    protected = _protected(inputs)
    for output in outputs:
        clash = protected.get(_identity(output))
        if clash:
            raise UserError(f"output {output} {clash}", "it would be overwritten", "choose another output")
    resolved = [Path(output).resolve() for output in outputs]
    if len(set(resolved)) != len(resolved):
        raise UserError("two outputs name the same file", "", "give each output its own name")


def _protected(inputs: Iterable[Path]) -> dict[tuple[int, int], str]:
    """Every file and folder an output must not replace, by identity on disk, with the words for the clash."""
    protected: dict[tuple[int, int] | None, str] = {}
    seen_folders: set[Path] = set()
    for given in map(Path, inputs):
        if not given.exists():
            continue  # reading it will say so
        for file in input_files(given) if given.is_dir() else []:
            protected.setdefault(_identity(file), f"is a file of the input {given}")
        protected.setdefault(_identity(given), "is the input")
        # The folders above the input as named (a link in a cohort folder) and above what it links to.
        for chain in (given.absolute().parents, given.resolve().parents):
            for folder in chain:
                if folder in seen_folders:
                    break  # and so were all above it
                seen_folders.add(folder)
                protected.setdefault(_identity(folder), f"holds the input {given}")
    protected.pop(None, None)
    return protected


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # not there (yet): it cannot be an input
    return stat.st_dev, stat.st_ino
