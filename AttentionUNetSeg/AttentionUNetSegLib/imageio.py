"""Reading CT (file or DICOM series) with checks that end in one clear line, and atomic writing."""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import os
import re
import stat
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UserError
from .outputs import IncompleteWrite, check_output_path, replacing  # noqa: F401 - the tools import check_output_path here
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
BODY_HU = -500.0  # denser than lung: the body (see water_or_denser_fraction)
MIN_WATER_OR_DENSER_FRACTION = 0.02


def read_image(path: str | Path, series: str | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder as a CT in HU: 8- and 16-bit integers as they are
    stored (a 512x512x600 CT stays 300 MB, not 600 MB), anything else as float32.

    ``series``: the DICOM series UID to read from a folder holding several (default: the largest, named in a
    warning).
    """
    path = Path(path)
    folder = input_is_folder(path)
    if folder:
        reader, size, components = _dicom_reader(path, series)
    elif series is not None:
        raise UserError(f"--series was given, and {path.name} is a file", "only a DICOM folder holds series",
                        "leave out --series or pass the DICOM folder")
    else:
        _check_nifti_spacing(path)
        reader, size, components = _file_reader(path)
    _check_header(size, components, path)
    if not folder:
        check_spacing(reader.GetSpacing(), path.name)
        _check_complete(path, int(np.prod(size, dtype=np.float64)) * components * _bytes_per_value(reader))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"cannot read {path}", _first_line(exc), "check that the file is complete") from None
    return image if image.GetPixelID() in COMPACT_PIXEL_TYPES else sitk.Cast(image, sitk.sitkFloat32)


def input_is_folder(path: Path) -> bool:
    """True for a folder, False for a regular file; one clear line, before anything opens it, for the rest:
    opening a FIFO blocks until something writes into it (deaf to Ctrl-C), a device never ends, and a link
    loop fails deep inside ITK."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"{path} is a broken symbolic link", "its target does not exist",
                            "point the link at the CT or pass the file itself") from None
        raise UserError(f"input {path} does not exist", "", "check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link loop", "following it never reaches a file",
                            "point the link at the CT or pass the file itself") from None
        raise UserError(f"cannot open {path}", exc.strerror or str(exc), "check the path and its permissions") from None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return stat.S_ISDIR(mode)
    raise UserError(f"{path} is {_special_file_kind(mode)}, not a regular file",
                    "only files on disk are read: reading a pipe or a device can wait forever",
                    "save the CT to a file and pass that")


def _special_file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


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
    _check_folder_entries(folder)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's multi-line warning; the error below says it once
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_folder_entries(folder: Path) -> None:
    """GDCM opens every file of the folder it scans (not its subfolders): each must be a regular file."""
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                input_is_folder(Path(entry.path))  # subfolders pass: they are not scanned
            except UserError as exc:
                raise UserError(exc.what, exc.why, "remove it from the DICOM folder") from None


def dicom_series_files(folder: Path, series: str | None = None) -> list[str]:
    """The slice files of one series in the order the volume is read (default: the largest series)."""
    files = _series_files(folder)
    return files[_chosen_series(files, series, folder)]


def _series_files(folder: Path) -> dict[str, list[str]]:
    ids = dicom_series_ids(folder)
    if not ids:
        raise UserError(f"no DICOM series in folder {folder}", "", "pass a folder of DICOM slices or an image file")
    return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}


def _chosen_series(files: dict[str, list[str]], series: str | None, folder: Path) -> str:
    if series is None:
        return max(files, key=lambda uid: len(files[uid]))  # the CT volume, not a scout or a few reformats
    if series not in files:
        raise UserError(f"no DICOM series {series} in folder {folder}", f"it holds {_describe_series(files)}",
                        "pass one of those to --series")
    return series


def _describe_series(files: dict[str, list[str]]) -> str:
    return ", ".join(f"{uid} ({len(names)} slices)" for uid, names in files.items())


def _dicom_reader(folder: Path, series: str | None = None) -> tuple[sitk.ImageSeriesReader, tuple[int, ...], int]:
    files = _series_files(folder)
    chosen = _chosen_series(files, series, folder)
    if series is None and len(files) > 1:  # the CLI shows it as one "warning:" line
        others = _describe_series({uid: names for uid, names in files.items() if uid != chosen})
        warnings.warn(f"{folder} holds {len(files)} DICOM series; reading the largest, {chosen} "
                      f"({len(files[chosen])} slices), not {others}; choose one with --series UID", stacklevel=3)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    info = sitk.ImageFileReader()
    info.SetFileName(files[chosen][0])
    info.ReadImageInformation()
    return reader, (*info.GetSize()[:2], len(files[chosen])), info.GetNumberOfComponents()


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
    header = _nifti_header(path)
    if header is None:
        return
    order, fields = header
    voxel_offset = int(struct.unpack(f"{order}f", fields[108:112])[0])
    if path.stat().st_size < voxel_offset + data_bytes:
        raise UserError(f"{path.name} is incomplete", "the file ends before the image does",
                        "copy or download the file again")


def _check_nifti_spacing(path: Path) -> None:
    """The voxel size a NIfTI-1 header states (pixdim[1..3]), checked before ITK reads it: ITK takes a zero
    for 1 mm and a negative size for a mirror image, with a multi-line warning at most."""
    header = _nifti_header(path)
    if header is not None:
        order, fields = header
        dimensions = min(max(struct.unpack(f"{order}h", fields[40:42])[0], 1), 3)
        check_spacing(struct.unpack(f"{order}{dimensions}f", fields[80:80 + 4 * dimensions]), path.name)


def _nifti_header(path: Path) -> tuple[str, bytes] | None:
    """The byte order and the 348 bytes of a NIfTI-1 header (of a .nii or a .nii.gz); None for other files."""
    opener = gzip.open if _gzip_data_start(path) == 0 else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(NIFTI1_HEADER_BYTES)
    except (OSError, EOFError, zlib.error):  # too damaged for a header: ITK's read or the length check says so
        return None
    if len(header) < NIFTI1_HEADER_BYTES or header[344:347] not in (b"n+1", b"ni1"):
        return None
    return ("<" if int.from_bytes(header[:4], "little") == NIFTI1_HEADER_BYTES else ">"), header


def _gzip_data_start(path: Path) -> int | None:
    """Where the gzip stream of a .nii.gz or a gzip-encoded .nrrd begins; None for other files."""
    with open(path, "rb") as stream:
        head = stream.read(GZIP_SEARCH_BYTES)
    if head.startswith(GZIP_MAGIC):
        return 0
    end = head.find(b"\n\n")
    if head.startswith(b"NRRD") and end > 0 and re.search(rb"^encoding:\s*(gz|gzip)\s*$", head[:end], re.MULTILINE):
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


def check_spacing(spacing: tuple[float, ...], name: str) -> None:
    """Voxel sizes a CT can have: positive (zero or negative would be read as 1 mm or as a mirror image) and
    between 0.05 and 50 mm."""
    shown = tuple(round(s, 3) for s in spacing)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserError(f"{name} has voxel spacing {shown} mm", "a voxel size must be positive",
                        "set the true voxel size (NIfTI pixdim) in the header, or export the CT again")
    if min(spacing) < 0.05 or max(spacing) > 50:
        raise UserError(f"{name} has voxel spacing {shown} mm", "CT voxels are between 0.05 and 50 mm",
                        "fix the spacing in the file header")


def validate_ct(image: sitk.Image, name: str = "the input") -> None:
    """Reject images the model cannot segment meaningfully, with one line saying why."""
    if image.GetDimension() != 3:
        raise UserError(f"{name} is {image.GetDimension()}D", "a CT volume has three dimensions", "pass a 3D CT")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{name} has several components per voxel", "a CT has one", "pass a scalar CT")
    check_spacing(image.GetSpacing(), name)
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
    dense = water_or_denser_fraction(array)
    if dense < MIN_WATER_OR_DENSER_FRACTION:
        raise UserError(
            f"{name} has almost nothing as dense as water ({dense:.1%} of its voxels above {BODY_HU:g} HU reach 0 HU)",
            "in a CT in HU muscle, organs, blood and bone do; an MR shifted to look like HU has none",
            "pass a CT in HU",
        )


def water_or_denser_fraction(array: np.ndarray) -> float:
    """Of the voxels denser than lung (the body), the fraction at or above water, 0 HU.

    0 HU is water by definition, and most of a body is water or denser: muscle, organs and blood at 0..150 HU,
    bone above, fat alone below (-150..-50). The real CTs of ../shared/data have 42-66% of their body voxels
    there, a 12x10x3 crop of fat and muscle 28%, synthetic CT 30% and more (15% with random contrast). An
    MR (or any image) shifted to start near -1000 HU puts its tissues between -1000 and 0: none there. The
    rule asks only for 2%, so that a fatty or an odd crop of a real CT still passes.
    """
    body = np.count_nonzero(array > BODY_HU)
    return np.count_nonzero(array >= 0) / body if body else 0.0


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write so that the target is either complete or untouched (a checked hidden file, then a rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}", f"folder {path.parent} does not exist", "create it or choose another")
    with replacing(path) as temporary:
        write_file(image, temporary, compress)


def write_file(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write ``path`` in place and check that all of it reached the disk. Callers stage it (:func:`write_image`,
    ``outputs.write_outputs``) and turn the OSError of a failure into one line naming their target."""
    path = Path(path)
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(compress)
    writer.SetCompressionLevel(1)  # NRRD/MHA: 7x faster than the default, 1% larger; NIfTI ignores it
    quiet = _writer_chatter_dropped() if path.name.endswith(CHATTY_WRITER_SUFFIXES) else contextlib.nullcontext()
    try:
        with quiet:
            writer.Execute(image)
    except RuntimeError as exc:
        raise OSError(errno.EIO, f"the image writer failed ({_first_line(exc)})") from None
    if not _written_whole(path, image):
        raise IncompleteWrite(path)


def _written_whole(path: Path, image: sitk.Image) -> bool:
    """ITK's NIfTI writer says nothing when the disk fills up, and leaves a short file that reads back as zeros
    (#22). So every image written is checked: its header reads back with the image's size and pixel type, and as
    many voxel bytes follow it as it says, by the file's size or, compressed, by the gzip stream's own length
    field (nothing is decompressed: a few small reads whatever the image's size)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    if reader.GetSize() != image.GetSize() or reader.GetPixelID() != image.GetPixelID():
        return False
    voxel_bytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    expected, found = _data_bytes_written(path, voxel_bytes)
    return found == expected


def _data_bytes_written(path: Path, voxel_bytes: int) -> tuple[int, int]:
    """(expected, found) bytes after the header: in the file, or stated by its gzip stream (modulo 4 GiB)."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(GZIP_SEARCH_BYTES)
    gzip_start = _gzip_data_start(path)
    nifti = _nifti_header(path)
    if nifti is not None:
        order, header = nifti
        expected = int(struct.unpack(f"{order}f", header[108:112])[0]) + voxel_bytes  # vox_offset: the header's end
        return (expected % 2**32, _gzip_length(path)) if gzip_start == 0 else (expected, size)
    if gzip_start is not None:  # a gzip-encoded NRRD
        return voxel_bytes % 2**32, _gzip_length(path)
    if head.startswith(b"NRRD"):
        return voxel_bytes, size - head.find(b"\n\n") - 2
    local = re.search(rb"^ElementDataFile = LOCAL\r?\n", head, re.MULTILINE)  # MetaImage
    if local:
        compressed = re.search(rb"^CompressedDataSize = (\d+)", head, re.MULTILINE)
        return (int(compressed[1]) if compressed else voxel_bytes), size - local.end()
    return voxel_bytes, voxel_bytes  # a format without a check here: its header read back


def _gzip_length(path: Path) -> int:
    """The uncompressed length a gzip stream states in its last four bytes (modulo 4 GiB)."""
    with open(path, "rb") as stream:
        stream.seek(max(path.stat().st_size - 4, 0))
        return int.from_bytes(stream.read(4), "little")


CHATTY_WRITER_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd")  # niftilib and MetaIO print as they fail
WRITER_CHATTER = (b"** ", b"MetaImage: ")  # how their lines begin
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _writer_chatter_dropped() -> Iterator[None]:
    """niftilib and MetaIO print their own lines to the C stderr when a write fails ("** ERROR: NWAD: wrote only
    ..."); the check after the write says it once, in the one-line form. So their lines are dropped, and whatever
    else reaches stderr meanwhile (other threads) is passed on afterwards."""
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (a GUI process on Windows): nothing to keep clean
            saved = None
        if saved is None:
            yield
            return
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        chunks: list[bytes] = []
        drain = threading.Thread(target=_read_until_closed, args=(read_end, chunks), daemon=True)
        drain.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            drain.join()
            os.close(read_end)
            lines = b"".join(chunks).splitlines(keepends=True)
            kept = b"".join(line for line in lines if not line.startswith(WRITER_CHATTER))
            if kept:
                os.write(2, kept)


def _read_until_closed(fd: int, chunks: list[bytes]) -> None:
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)


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
