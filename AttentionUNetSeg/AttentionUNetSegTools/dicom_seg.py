"""DICOM Segmentation objects (highdicom) for PACS viewers (OHIF, Slicer's DICOM module).

The object references the source CT series (each frame derives from the CT slice at the same position), and
its one segment carries the pancreas's SNOMED CT codes from :data:`PANCREAS_SEGMENT`, the one place
the project names them. Needs the ``dicom`` extra (highdicom); imported only when a DICOM SEG is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib import __version__, imageio
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.segment_description import PANCREAS_SEGMENT

FILE_NAME = "pancreas.dcm"
SERIES_NUMBER_OFFSET = 1000  # the SEG series numbered after its CT series, as Slicer's exporter does


def require_dicom_input(path: Path) -> None:
    """One clear line when a DICOM SEG is asked for a CT that is not a DICOM series."""
    if not Path(path).is_dir():
        raise UserError(f"--dicom-seg needs a DICOM series, and {Path(path).name} is a file",
                        "a DICOM SEG references the slices of the CT it was made from",
                        "pass the DICOM folder, or leave out --dicom-seg")


def add_segment_arguments(parser) -> None:
    """``segment --dicom-seg FILE.dcm``: registered by the console script (the runtime knows no highdicom)."""
    parser.add_argument("--dicom-seg", type=Path, metavar="FILE.dcm",
                        help="also write a DICOM SEG of the pancreas referencing the input DICOM series "
                        "(needs the dicom extra)")


def segment_outputs(args):
    """Checked before any work: ``(result, model_name) -> {path: writer}`` for ``segment``'s outputs."""
    if not args.dicom_seg:
        return lambda result, model_name: {}
    require_dicom_input(args.input)
    path = imageio.check_output_path(args.dicom_seg, (".dcm",))
    require_highdicom()
    sources = read_series(args.input, args.series)  # the series segmented (--series)
    return lambda result, model_name: {path: writer(result.mask, sources, model_name)}


def require_highdicom() -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UserError("--dicom-seg needs highdicom", "it is an optional part",
                        "pip install 'attention-unet-seg[dicom]'") from None


def read_series(folder: Path, series: str | None = None) -> list:
    """The headers of the series' slices, in the order :func:`imageio.read_image` stacks them.

    Blank SOP class and instance UIDs are taken from each file's meta header (some anonymisers blank only
    the dataset's copy); a series without study and series UIDs cannot be referenced and is refused.
    """
    import pydicom

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in imageio.dicom_series_files(folder, series)]
    for source in sources:
        source.SOPClassUID = source.get("SOPClassUID") or source.file_meta.get("MediaStorageSOPClassUID", "")
        source.SOPInstanceUID = source.get("SOPInstanceUID") or source.file_meta.get("MediaStorageSOPInstanceUID", "")
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
               if not all(source.get(key) for source in sources)]
    if missing:
        raise UserError(f"the DICOM series in {folder} has no {', '.join(missing)}",
                        "a DICOM SEG references its CT by these UIDs (an anonymiser blanked them)",
                        "export the series with its UIDs, or leave out --dicom-seg")
    return sources


def writer(mask: sitk.Image, sources: list, model_name: str = "pancreas"):
    """An ``outputs`` writer: the mask (on the series' grid, as read) as a DICOM SEG of ``sources``."""
    return lambda path: build(mask, sources, model_name).save_as(str(path))


def build(mask: sitk.Image, sources: list, model_name: str = "pancreas"):
    import highdicom as hd

    frames = sitk.GetArrayViewFromImage(mask)  # (slice, row, column), slices in the series' file order
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if frames.shape != expected:
        raise UserError(f"the mask {frames.shape} is not on the grid of its DICOM series {expected}",
                        "a DICOM SEG needs one frame per CT slice", "segment the series itself")
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(frames > 0),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_pancreas_segment(model_name)],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_OFFSET + int(sources[0].get("SeriesNumber") or 0),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="AttentionUNetSeg",
        manufacturer_model_name="Attention U-Net pancreas",
        software_versions=__version__,
        device_serial_number="none",
        content_label="PANCREAS",
        content_description="Pancreas (3D Attention U-Net)",
        series_description="Pancreas segmentation",
        omit_empty_frames=False,  # one frame per CT slice: viewers and readers align them 1:1
    )


def _pancreas_segment(model_name: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, kind = pancreas_codes()
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=PANCREAS_SEGMENT["name"],
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="AttentionUNetSeg", family=codes.cid7162.ArtificialIntelligence, version=model_name[:64]),
        display_color=hd.color.CIELabColor.from_rgb(*PANCREAS_SEGMENT["color"]),
    )


def pancreas_codes():
    """(category, type) as pydicom Codes, read from Slicer's terminology string of the pancreas segment."""
    from pydicom.sr.coding import Code

    fields = PANCREAS_SEGMENT["terminology"].split("~")  # context~category~type~...
    codes = []
    for entry in fields[1:3]:
        scheme, value, meaning = entry.split("^")
        codes.append(Code(value, scheme, meaning))
    return tuple(codes)
