"""DICOM SEG written for a real CT series, read back with pydicom and highdicom as a PACS viewer would."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegLib.imageio import dicom_series_files

highdicom = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

CONSOLE_SCRIPT = Path(sys.executable).with_name("attention-unet-seg")


@pytest.fixture(scope="module")
def series_with_uids(dicom_dir, tmp_path_factory) -> Path:
    """The real venous series as a PACS exports it: the anonymiser of ../shared blanked its study and series
    UIDs (and the datasets' SOP UIDs, kept in the file meta), which every DICOM reference needs."""
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("pacs") / "venous"
    folder.mkdir()
    study, series = generate_uid(entropy_srcs=["test study"]), generate_uid(entropy_srcs=["test series"])
    for path in sorted(dicom_dir.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SeriesNumber = study, series, 3
        dataset.save_as(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def batch_out(series_with_uids, dicom_dir, small_ct, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    done = subprocess.run([str(CONSOLE_SCRIPT), "batch", series_with_uids, dicom_dir, small_ct, "-o", out,
                           "--weights", tiny_model, "--dicom-seg", "--progress", "none"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 1, done.stderr  # the blanked series cannot get a SEG
    assert "1 of 3 cases are not DICOM series and get no DICOM SEG" in done.stderr
    return out


def test_dicom_seg_references_the_series_and_its_frames_align_with_the_ct_slices(batch_out, series_with_uids):
    segmentation = highdicom.seg.segread(batch_out / "venous" / "pancreas.dcm")
    ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(series_with_uids)]
    assert segmentation.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert segmentation.StudyInstanceUID == ct[0].StudyInstanceUID
    assert segmentation.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    (referenced,) = segmentation.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct[0].SeriesInstanceUID
    ct_uids = [d.file_meta.MediaStorageSOPInstanceUID for d in ct]
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(ct_uids)

    position_of = {d.file_meta.MediaStorageSOPInstanceUID: [float(v) for v in d.ImagePositionPatient] for d in ct}
    frames = segmentation.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(ct) == segmentation.NumberOfFrames  # one frame per CT slice
    for frame in frames:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, position_of[source], atol=1e-3)
    orientation = segmentation.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orientation], [float(v) for v in ct[0].ImageOrientationPatient])


def test_dicom_seg_mask_equals_the_nrrd_output(batch_out, series_with_uids):
    segmentation = highdicom.seg.segread(batch_out / "venous" / "pancreas.dcm")
    ct_uids = [pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
               for f in dicom_series_files(series_with_uids)]
    frames = segmentation.get_pixels_by_source_instance(ct_uids, segment_numbers=[1])[..., 0]
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(batch_out / "venous" / "pancreas.seg.nrrd")))
    assert nrrd.any()
    np.testing.assert_array_equal(frames, nrrd)


def test_each_frame_holds_its_own_slice(series_with_uids, tmp_path):
    """A mask that differs from slice to slice (the bones of this CT) comes back slice for slice."""
    from AttentionUNetSegLib.imageio import read_image
    from AttentionUNetSegTools import dicom_seg

    bones = sitk.Cast(read_image(series_with_uids) > 300, sitk.sitkUInt8)
    expected = sitk.GetArrayFromImage(bones)
    assert not np.array_equal(expected, expected[::-1])  # a reversed stack would show
    dicom_seg.writer(bones, dicom_seg.read_series(series_with_uids))(tmp_path / "bones.dcm")
    ct_uids = [pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
               for f in dicom_series_files(series_with_uids)]
    frames = highdicom.seg.segread(tmp_path / "bones.dcm").get_pixels_by_source_instance(ct_uids, segment_numbers=[1])
    np.testing.assert_array_equal(frames[..., 0], expected)


def test_pancreas_segment_has_its_snomed_codes(batch_out):
    segmentation = highdicom.seg.segread(batch_out / "venous" / "pancreas.dcm")
    (segment,) = segmentation.SegmentSequence
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "15776009", "Pancreas")
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "123037004")
    assert segment.SegmentLabel == "Pancreas" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segmentation.SeriesNumber == 1003


def test_a_series_without_uids_or_a_file_gets_no_seg_but_its_segmentation(batch_out):
    with open(batch_out / "summary.csv", newline="") as stream:
        rows = {row["case"]: row for row in csv.DictReader(stream)}
    assert rows["venous"]["status"] == "ok" and rows["ct"]["status"] == "ok"
    assert rows["dicom"]["status"] == "error"
    reason = rows["dicom"]["error"]
    assert reason.startswith("the DICOM series in ") and "has no StudyInstanceUID" in reason
    assert not (batch_out / "dicom").exists() and not (batch_out / "ct" / "pancreas.dcm").exists()


def test_segment_writes_a_dicom_seg_beside_its_label_map(series_with_uids, tiny_model, tmp_path):
    done = subprocess.run([str(CONSOLE_SCRIPT), "segment", series_with_uids, "-o", tmp_path / "p.seg.nrrd",
                           "--dicom-seg", tmp_path / "p.dcm", "--weights", tiny_model, "--progress", "none"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    segmentation = highdicom.seg.segread(tmp_path / "p.dcm")
    ct_uids = [pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
               for f in dicom_series_files(series_with_uids)]
    frames = segmentation.get_pixels_by_source_instance(ct_uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(frames, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.seg.nrrd"))))


def test_segment_refuses_a_dicom_seg_of_a_file_in_one_line(small_ct, tiny_model, tmp_path):
    done = subprocess.run([str(CONSOLE_SCRIPT), "segment", small_ct, "-o", tmp_path / "p.seg.nrrd",
                           "--dicom-seg", tmp_path / "p.dcm", "--weights", tiny_model],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --dicom-seg needs a DICOM series, and ct.nii.gz is a file; a DICOM SEG "
                                   "references the slices of the CT it was made from; pass the DICOM folder, or "
                                   "leave out --dicom-seg")
    assert list(tmp_path.iterdir()) == []
