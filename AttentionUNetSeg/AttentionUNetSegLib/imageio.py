"""Reading CT (file or DICOM series) with checks that end in one clear line, and atomic writing."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UserError
from .segment_description import PANCREAS_SEGMENT

# Bytes of memory per input voxel that a run needs at its peak: the CT as float32, the mask, the combined
# attention map, and resampling buffers. Measured on the 512x512x200 benchmark (see Testing/benchmark.py).
PEAK_BYTES_PER_INPUT_VOXEL = 16
GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER_BYTES = 348
COMPACT_PIXEL_TYPES = (sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16)
GZIP_SEARCH_BYTES = 65536  # a NRRD header ends well before this
HEADER_SLACK_BYTES = 2**20  # a NIfTI header with its extensions, before the voxels, in the same stream
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_image(path: str | Path, series: str | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder as a CT in HU: 8- and 16-bit integers as they are
    stored (a 512x512x600 CT stays 300 MB, not 600 MB), anything else as float32.

    ``series``: the DICOM series ID to read from a folder holding several (default: the largest).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path} does not exist", "", "check the path")
    reader, size, components = _dicom_reader(path, series) if path.is_dir() else _file_reader(path)
    _check_header(size, components, path)
    if path.is_file():
        _check_complete(path, int(np.prod(size, dtype=np.float64)) * components * _bytes_per_value(reader))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"cannot read {path}", _first_line(exc), "check that the file is complete") from None
    return image if image.GetPixelID() in COMPACT_PIXEL_TYPES else sitk.Cast(image, sitk.sitkFloat32)


def _file_reader(path: Path) -> tuple[sitk.ImageFileReader, tuple[int, ...], int]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise UserError(
            f"{path.name} is not an image SimpleITK can read",
            "expected NIfTI, NRRD, MHA or a DICOM series folder",
            "convert the file or pass the DICOM folder",
        ) from None
    return reader, reader.GetSize(), reader.GetNumberOfComponents()


def dicom_series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series in a folder (not its subfolders); none when it holds no DICOM."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's multi-line warning; the error below says it once
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def dicom_series_files(folder: Path, series: str | None = None) -> list[str]:
    """The slice files of one series in the order the volume is read (default: the largest series)."""
    ids = dicom_series_ids(folder)
    if not ids:
        raise UserError(f"no DICOM series in folder {folder}", "", "pass a folder of DICOM slices or an image file")
    if series is not None and series not in ids:
        raise UserError(f"no DICOM series {series} in folder {folder}", "", "check the folder")
    chosen = ids if series is None else (series,)
    files_per_series = [list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s)) for s in chosen]
    return max(files_per_series, key=len)  # the largest series is the CT volume


def _dicom_reader(folder: Path, series: str | None = None) -> tuple[sitk.ImageSeriesReader, tuple[int, ...], int]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, series))
    info = sitk.ImageFileReader()
    info.SetFileName(reader.GetFileNames()[0])
    info.ReadImageInformation()
    return reader, (*info.GetSize()[:2], len(reader.GetFileNames())), info.GetNumberOfComponents()


def _check_header(size: tuple[int, ...], components: int, path: Path) -> None:
    dims = sum(1 for n in size if n > 1)
    if len(size) != 3 or dims != 3:
        raise UserError(f"{path.name} is {dims}D", "a CT volume has three dimensions", "pass a 3D CT")
    if components != 1:
        raise UserError(
            f"{path.name} has {components} components per voxel",
            "a CT has one intensity per voxel",
            "pass a scalar (grey-level) CT",
        )
    needed = int(np.prod(size, dtype=np.float64)) * PEAK_BYTES_PER_INPUT_VOXEL
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(
            f"{path.name} ({'x'.join(map(str, size))} voxels) needs about {needed / 2**30:.1f} GiB",
            f"only {available / 2**30:.1f} GiB of memory is free",
            "crop or downsample the CT first",
        )


def _check_complete(path: Path, data_bytes: int) -> None:
    """Refuse a gzip-compressed file cut short (an interrupted copy or download): ITK reads one without an
    error, as a volume of zeros. The gzip trailer holds the uncompressed size, which must cover the voxels;
    only when it does not is the stream decompressed to be sure."""
    start = _gzip_data_start(path)
    if start is None:
        _check_nifti_length(path, data_bytes)
        return
    with open(path, "rb") as stream:
        stream.seek(-4, os.SEEK_END)
        stored = int.from_bytes(stream.read(4), "little")
        if (stored - data_bytes) % 2**32 < HEADER_SLACK_BYTES:  # the size is stored modulo 4 GiB
            return
        stream.seek(start)
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while chunk := stream.read(2**22):
            decompressor.decompress(chunk, 2**16)
            while decompressor.unconsumed_tail:
                decompressor.decompress(decompressor.unconsumed_tail, 2**16)
        if not decompressor.eof:
            raise UserError(f"{path.name} is incomplete", "its compressed data ends before the image does",
                            "copy or download the file again")


def _check_nifti_length(path: Path, data_bytes: int) -> None:
    """An uncompressed NIfTI file must hold its header and all its voxels (ITK pads a short one with zeros;
    NRRD and MetaImage readers already fail)."""
    with open(path, "rb") as stream:
        header = stream.read(NIFTI1_HEADER_BYTES)
    if len(header) < NIFTI1_HEADER_BYTES or header[344:347] not in (b"n+1", b"ni1"):
        return
    order = "<" if int.from_bytes(header[:4], "little") == NIFTI1_HEADER_BYTES else ">"
    voxel_offset = int(struct.unpack(f"{order}f", header[108:112])[0])
    if path.stat().st_size < voxel_offset + data_bytes:
        raise UserError(f"{path.name} is incomplete", "the file ends before the image does",
                        "copy or download the file again")


def _gzip_data_start(path: Path) -> int | None:
    """Where the gzip stream of a .nii.gz or a gzip-encoded .nrrd begins; None for other files."""
    with open(path, "rb") as stream:
        head = stream.read(GZIP_SEARCH_BYTES)
    if head.startswith(GZIP_MAGIC):
        return 0
    end = head.find(b"\n\n")
    if head.startswith(b"NRRD") and end > 0 and re.search(rb"^encoding:\s*(gz|gzip)\s*$", head[:end], re.M):
        return end + 2
    return None


def _bytes_per_value(reader: sitk.ImageFileReader) -> int:
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).itemsize


def available_memory() -> int | None:
    """Free memory in bytes, or None where it cannot be told."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def validate_ct(image: sitk.Image, name: str = "the input") -> None:
    """Reject images the model cannot segment meaningfully, with one line saying why."""
    if image.GetDimension() != 3:
        raise UserError(f"{name} is {image.GetDimension()}D", "a CT volume has three dimensions", "pass a 3D CT")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{name} has several components per voxel", "a CT has one", "pass a scalar CT")
    spacing = image.GetSpacing()
    if min(spacing) < 0.05 or max(spacing) > 50:
        raise UserError(
            f"{name} has voxel spacing {tuple(round(s, 3) for s in spacing)} mm",
            "CT voxels are between 0.05 and 50 mm",
            "fix the spacing in the file header",
        )
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise UserError(f"{name} contains NaN or infinite voxels", "", "replace them (e.g. with -1024 HU) first")
    low, high = float(array.min()), float(array.max())
    if high - low < 1:
        raise UserError(f"{name} is constant ({low:g})", "there is nothing to segment", "pass a real CT")
    if low >= 0:
        raise UserError(
            f"{name} has no voxel below 0 (range {low:g}..{high:g})",
            "a CT in Hounsfield units has air and fat below 0",
            "pass a CT in HU (not a label map, MR, or unscaled raw values)",
        )


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write so that the target is either complete or untouched (temp file, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}", f"folder {path.parent} does not exist", "create it or choose another")
    with replacing(path) as temporary:
        write_file(image, temporary, compress)


def write_file(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write ``path`` in place (callers stage it: :func:`write_image`, ``outputs.write_outputs``)."""
    try:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(path))
        writer.SetUseCompression(compress)
        writer.SetCompressionLevel(1)  # NRRD/MHA: 7x faster than the default, 1% larger; NIfTI ignores it
        writer.Execute(image)
    except RuntimeError as exc:
        raise UserError(f"cannot write {path}", _first_line(exc), "check the file name and free disk space") from None


def hidden_twin(path: Path) -> Path:
    """A new, empty hidden file beside ``path`` with the same extension (which picks the file format)."""
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: -len(suffix)] if suffix else path.name
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}-partial-", suffix=suffix)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Write into the yielded hidden file; on success it replaces ``path``, on any failure it vanishes."""
    temporary = hidden_twin(Path(path))
    try:
        yield temporary
        give_default_permissions(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def give_default_permissions(path: str | Path) -> None:
    """The mode a plainly created file gets (mkstemp makes temporary files private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_output_path(path: str | Path, kinds: tuple[str, ...]) -> Path:
    """Fail before any work when an output cannot be written."""
    path = Path(path)
    if not path.name.endswith(kinds):
        raise UserError(f"output {path.name} has an unsupported extension", f"use one of {', '.join(kinds)}", "")
    if not path.parent.is_dir() or not folder_takes_files(path.parent):
        raise UserError(f"cannot write {path}", f"folder {path.parent} is missing or not writable", "choose another")
    return path


def folder_takes_files(folder: Path) -> bool:
    """Try it: ``os.access`` says yes to root even on read-only or virtual file systems."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            return True
    except OSError:
        return False


def with_segment_metadata(mask: sitk.Image) -> sitk.Image:
    """Add the keys that make Slicer read a label map .seg.nrrd as a "Pancreas" segment."""
    mask = sitk.Image(mask)
    seg = PANCREAS_SEGMENT
    extent = " ".join(f"0 {n - 1}" for n in mask.GetSize())
    entries = {
        "Segment0_ID": "Pancreas",
        "Segment0_Name": seg["name"],
        "Segment0_Color": " ".join(f"{c / 255:.6f}" for c in seg["color"]),
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment0_Extent": extent,
        "Segment0_Tags": f"TerminologyEntry:{seg['terminology']}|",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for key, value in entries.items():
        mask.SetMetaData(key, value)
    return mask


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
