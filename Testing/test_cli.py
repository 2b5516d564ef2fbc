"""The ``attention-unet-seg`` command run as a user runs it (a child process) on real CT."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import test_outputs
from conftest import same_grid

from AttentionUNetSegLib import outputs
from AttentionUNetSegLib.engine import ATTENTION_MAP_NAMES, ATTENTION_SCALE
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.imageio import PANCREAS_SEGMENT, read_image
from AttentionUNetSegTools import demo

CONSOLE_SCRIPT = Path(sys.executable).with_name("attention-unet-seg")
full_disk = test_outputs.full_disk  # the fixture, shared with the other tests of writing
SUMMARY = re.compile(r"^Pancreas (?P<ml>[0-9.]+) mL; (?P<verdict>ok .*|check: .*); [0-9.]+ s on cpu$"
                     r"|^No pancreas found; [0-9.]+ s on cpu$")


def run_cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script (``pip install -e .`` makes it), as a user would call it."""
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: run 'pip install -e .' in this environment"
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)], check=False, capture_output=True, text=True, timeout=240,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )


def reported_volume_ml(stdout: str) -> float:
    match = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert match, stdout
    return float(match.group("ml") or 0)


@pytest.fixture(scope="module")
def small_run(small_ct, tiny_model, tmp_path_factory):
    """One segmentation of the small real CT with every output, progress as PROGRESS lines."""
    out = tmp_path_factory.mktemp("small_run")
    result = run_cli("segment", small_ct, "-o", out / "pancreas.nii.gz", "--attention", out / "attention.nii.gz",
                     "--attention-maps", out / "maps", "--report", out / "report.json", "--weights", tiny_model,
                     "--progress", "lines")
    assert result.returncode == 0, result.stderr
    return out, result


def test_label_map_is_uint8_on_the_input_grid(small_run, small_ct):
    out, _ = small_run
    label = sitk.ReadImage(str(out / "pancreas.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8
    assert same_grid(label, sitk.ReadImage(str(small_ct)))
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1}


def test_cli_writes_what_the_engine_computes(small_run, small_ct, tiny_model):
    from AttentionUNetSegLib.engine import Segmenter

    out, result = small_run
    expected = Segmenter(tiny_model).segment(read_image(small_ct))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pancreas.nii.gz")))
    assert np.array_equal(label, sitk.GetArrayViewFromImage(expected.mask))
    assert reported_volume_ml(result.stdout) == pytest.approx(expected.volume_ml, abs=0.05)


def test_no_tta_runs_the_single_pass_the_engine_runs_without_it(small_ct, tmp_path):
    """With the bundled model (the untrained test model marks the whole body either way): one pass and two
    differ at the gland's border, and --no-tta writes the one pass."""
    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter
    from AttentionUNetSegLib.weights import bundled_model_path

    if not bundled_model_path().is_file():
        pytest.skip("no bundled model in this copy")
    result = run_cli("segment", small_ct, "-o", tmp_path / "p.nii.gz", "--no-tta", "--progress", "none")
    assert result.returncode == 0, result.stderr
    ct = read_image(small_ct)
    expected = Segmenter(None, SegmentationOptions(tta=False)).segment(ct)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz")))
    assert np.array_equal(written, sitk.GetArrayViewFromImage(expected.mask))
    assert not np.array_equal(written, sitk.GetArrayViewFromImage(Segmenter().segment(ct).mask))
    assert reported_volume_ml(result.stdout) == pytest.approx(expected.volume_ml, abs=0.05)


def test_summary_volume_matches_the_written_label_map(small_run):
    out, result = small_run
    label = sitk.ReadImage(str(out / "pancreas.nii.gz"))
    volume_ml = np.count_nonzero(sitk.GetArrayViewFromImage(label)) * np.prod(label.GetSpacing()) / 1000
    assert reported_volume_ml(result.stdout) == pytest.approx(volume_ml, abs=0.05)


def test_attention_is_float32_in_unit_range_on_the_input_grid(small_run, small_ct):
    out, _ = small_run
    attention = sitk.ReadImage(str(out / "attention.nii.gz"))
    values = sitk.GetArrayViewFromImage(attention)
    assert attention.GetPixelID() == sitk.sitkFloat32
    assert same_grid(attention, sitk.ReadImage(str(small_ct)))
    assert values.min() >= 0 and values.max() <= 1 and values.std() > 0


def test_attention_maps_folder_holds_every_map_on_the_input_grid(small_run, small_ct):
    out, _ = small_run
    written = {p.name[: -len(".nrrd")]: sitk.ReadImage(str(p)) for p in (out / "maps").glob("*.nrrd")}
    assert set(written) == set(ATTENTION_MAP_NAMES)
    ct = sitk.ReadImage(str(small_ct))
    assert all(same_grid(image, ct) for image in written.values())
    combined = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "attention.nii.gz")))
    assert np.array_equal(sitk.GetArrayViewFromImage(written["combined"]), combined)
    assert not np.array_equal(sitk.GetArrayViewFromImage(written["level2"]), combined)


def test_report_holds_the_volume_verdict_time_device_and_model(small_run, tiny_model):
    out, result = small_run
    report = json.loads((out / "report.json").read_text())
    assert tuple(report) == outputs.REPORT_KEYS
    label = sitk.ReadImage(str(out / "pancreas.nii.gz"))
    volume_ml = np.count_nonzero(sitk.GetArrayViewFromImage(label)) * np.prod(label.GetSpacing()) / 1000
    assert report["volume_ml"] == pytest.approx(volume_ml, abs=0.01)
    assert report["qc"] in ("ok", "check", "not found") and 0 <= report["confidence"] <= 1
    assert (report["reason"] == "") == (report["qc"] == "ok")
    assert report["device"] == "cpu" and report["seconds"] > 0
    assert report["model"] == f"{Path(tiny_model).name} (test)"
    summary = result.stdout.strip().splitlines()[-1]
    assert (report["qc"] if report["qc"] != "not found" else "No pancreas found") in summary


def test_map_names_choose_the_maps_written(small_ct, tiny_model, tmp_path):
    result = run_cli("segment", small_ct, "-o", tmp_path / "p.nii.gz", "--attention-maps", tmp_path / "maps",
                     "--map-names", "combined,level3", "--weights", tiny_model, "--progress", "none")
    assert result.returncode == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["combined.nrrd", "level3.nrrd"]
    result = run_cli("segment", small_ct, "-o", tmp_path / "q.nii.gz", "--attention-maps", tmp_path / "maps2",
                     "--map-names", "level9", "--weights", tiny_model, "--progress", "none")
    assert result.returncode == 2 and "no attention map named level9" in result.stderr
    assert not (tmp_path / "q.nii.gz").exists()


def test_progress_lines_go_to_stdout_and_reach_one(small_run):
    _, result = small_run
    progress = [line.split(" ", 2) for line in result.stdout.splitlines() if line.startswith("PROGRESS ")]
    fractions = [float(fraction) for _, fraction, _ in progress]
    assert len(fractions) >= 3 and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert all(text for _, _, text in progress)
    assert result.stderr == ""  # no bar, no warnings


def test_seg_nrrd_output_carries_the_pancreas_segment(small_ct, tiny_model, tmp_path):
    result = run_cli("segment", small_ct, "-o", tmp_path / "pancreas.seg.nrrd", "--weights", tiny_model, "--fast")
    assert result.returncode == 0, result.stderr
    label = sitk.ReadImage(str(tmp_path / "pancreas.seg.nrrd"))
    assert same_grid(label, sitk.ReadImage(str(small_ct)))
    assert label.GetMetaData("Segment0_Name") == "Pancreas"
    assert label.GetMetaData("Segment0_LabelValue") == "1"
    colour = [round(float(c) * 255) for c in label.GetMetaData("Segment0_Color").split()]
    assert tuple(colour) == PANCREAS_SEGMENT["color"]
    assert_slicer_reads_one_pancreas_segment(tmp_path / "pancreas.seg.nrrd")
    assert "100%" in result.stderr  # the progress bar
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]  # one summary line
    assert reported_volume_ml(result.stdout) > 0


def assert_slicer_reads_one_pancreas_segment(path: Path) -> None:
    """Slicer's own segmentation reader (slicer-core), as File > Add Data would load the file."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Pancreas"
    assert tuple(round(c * 255) for c in segment.GetColor()) == PANCREAS_SEGMENT["color"]


def test_plain_nrrd_output_is_a_label_map(small_ct, tiny_model, tmp_path):
    result = run_cli("segment", small_ct, "-o", tmp_path / "pancreas.nrrd", "--weights", tiny_model,
                     "--progress", "none")
    assert result.returncode == 0, result.stderr
    label = sitk.ReadImage(str(tmp_path / "pancreas.nrrd"))
    assert same_grid(label, sitk.ReadImage(str(small_ct)))
    assert not label.HasMetaDataKey("Segment0_Name")
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1 and SUMMARY.match(result.stdout.strip())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pancreas.nrrd"]  # no temporary files left


def test_dicom_series_and_its_flipped_twin_agree_in_physical_space(dicom_dir, tiny_model, tmp_path):
    """The DICOM series and its label file's grid (y flipped, other origin): outputs match through space."""
    organs = sitk.ReadImage(str(dicom_dir.parent / "organs.nii.gz"))
    dicom = read_image(dicom_dir)
    assert not np.allclose(organs.GetDirection(), dicom.GetDirection())  # the case this test is about
    flipped_ct = tmp_path / "ct_on_label_grid.nii.gz"
    sitk.WriteImage(sitk.Resample(dicom, organs, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32),
                    str(flipped_ct))
    for name, source in (("dicom", dicom_dir), ("flipped", flipped_ct)):
        result = run_cli("segment", source, "-o", tmp_path / f"{name}_mask.nii.gz",
                         "--attention", tmp_path / f"{name}_attention.nii.gz", "--weights", tiny_model)
        assert result.returncode == 0, result.stderr

    mask = sitk.ReadImage(str(tmp_path / "dicom_mask.nii.gz"))
    twin_mask = sitk.ReadImage(str(tmp_path / "flipped_mask.nii.gz"))
    assert same_grid(mask, dicom) and same_grid(twin_mask, organs)
    by_space = sitk.GetArrayFromImage(sitk.Resample(twin_mask, mask, sitk.Transform(), sitk.sitkNearestNeighbor))
    by_index = sitk.GetArrayViewFromImage(twin_mask)
    values = sitk.GetArrayViewFromImage(mask)
    assert np.mean(by_space == values) > 0.999
    assert np.mean(by_index == values) < 0.95  # matching voxels by index would be wrong

    attention = sitk.ReadImage(str(tmp_path / "dicom_attention.nii.gz"))
    twin_attention = sitk.Resample(sitk.ReadImage(str(tmp_path / "flipped_attention.nii.gz")), attention)
    difference = np.abs(sitk.GetArrayFromImage(twin_attention) - sitk.GetArrayFromImage(attention))
    assert difference.max() <= 1 / ATTENTION_SCALE + 1e-6  # one 8-bit step at most


def test_info_without_a_bundled_model_says_how_to_pass_one(tmp_path):
    result = run_cli("info", env={"ATTENTION_UNET_SEG_MODELS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "No trained model is bundled" in result.stdout
    assert "--weights FILE" in result.stdout
    assert re.search(r"^Devices: .*--device auto uses (cpu|cuda)", result.stdout, re.MULTILINE)


def test_info_prints_the_bundled_model_and_its_card(tiny_model, tmp_path):
    from AttentionUNetSegLib.locations import MODEL_CARD_NAME
    from AttentionUNetSegLib.weights import BUNDLED_MODEL_NAME

    shutil.copy(tiny_model, tmp_path / BUNDLED_MODEL_NAME)
    shutil.copy(f"{tiny_model}.sha256", tmp_path / f"{BUNDLED_MODEL_NAME}.sha256")
    (tmp_path / MODEL_CARD_NAME).write_text("# Pancreas model card\nTrained on nothing: a test model.\n")
    result = run_cli("info", env={"ATTENTION_UNET_SEG_MODELS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "version test" in result.stdout and "4 x 4 x 4 mm voxels" in result.stdout
    assert "Trained on nothing: a test model." in result.stdout


def test_demo_on_the_first_real_case_writes_four_files(data_dir, abdomen_ct, tiny_model, tmp_path):
    result = run_cli("demo", "--weights", tiny_model, env={"ATTENTION_UNET_SEG_DATA": str(data_dir)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "output"  # the default output folder, relative to where the user is
    names = ["ts-abdomen-3mm_attention.nrrd", "ts-abdomen-3mm_pancreas.seg.nrrd", "ts-abdomen-3mm_preview.png",
             "ts-abdomen-3mm_report.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert str(Path("output") / name) in result.stdout
    assert f"Segmenting {abdomen_ct}" in result.stdout
    ct = sitk.ReadImage(str(abdomen_ct))
    assert same_grid(sitk.ReadImage(str(out / names[1])), ct)
    assert same_grid(sitk.ReadImage(str(out / names[0])), ct)
    assert_preview_shows_the_mask(out / names[2])


def assert_preview_shows_the_mask(png: Path) -> None:
    """The untrained test model marks nearly everything: the segmentation row is tinted in the segment colour."""
    from matplotlib.image import imread

    pixels = imread(str(png))[..., :3]
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    top_row = pixels[: pixels.shape[0] // 2]
    warm = top_row[..., 0] - top_row[..., 2] > 0.15  # grey CT has red == blue; (249, 180, 111) does not
    assert np.count_nonzero(warm) > 0.2 * warm.size


def test_demo_without_a_model_says_so_and_writes_nothing(data_dir, tmp_path):
    result = run_cli("demo", env={"ATTENTION_UNET_SEG_MODELS": str(tmp_path / "no-models"),
                                  "ATTENTION_UNET_SEG_DATA": str(data_dir)}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no trained model is bundled")
    assert "--weights FILE" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "output").exists()


def test_demo_offline_without_data_says_how_to_pass_a_ct(tiny_model, tmp_path):
    unreachable_proxy = "http://127.0.0.1:9"  # the discard port: the download fails at once, as offline
    env = {"ATTENTION_UNET_SEG_DATA": str(tmp_path / "no-data"), "ATTENTION_UNET_SEG_CACHE": str(tmp_path / "cache"),
           "https_proxy": unreachable_proxy, "HTTPS_PROXY": unreachable_proxy, "no_proxy": "", "NO_PROXY": ""}
    result = run_cli("demo", "--weights", tiny_model, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no CT to run the demo on")
    assert "attention-unet-seg demo PATH" in result.stderr and len(result.stderr.splitlines()) == 1
    assert list((tmp_path / "cache").iterdir()) == []  # no partial download left
    assert not (tmp_path / "output").exists()


def test_demo_on_a_given_dicom_folder_names_outputs_after_it(dicom_dir, tiny_model, tmp_path):
    result = run_cli("demo", dicom_dir, "--weights", tiny_model, "--output-dir", tmp_path / "out",
                     "--label-format", "nii.gz", "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dicom_attention.nii.gz", "dicom_pancreas.nii.gz", "dicom_preview.png", "dicom_report.json"]
    assert same_grid(sitk.ReadImage(str(tmp_path / "out" / "dicom_pancreas.nii.gz")), read_image(dicom_dir))


def test_sample_download_is_verified_and_cached(tmp_path):
    served = tmp_path / "served.nrrd"
    served.write_bytes(b"NRRD0004\n" + os.urandom(4096))
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    cached = tmp_path / "cache" / "sample.nrrd"

    assert demo.fetch_verified(served.as_uri(), digest, cached) == cached
    assert cached.read_bytes() == served.read_bytes()
    served.unlink()  # a second call must not need the source
    assert demo.fetch_verified(served.as_uri(), digest, cached) == cached


def test_sample_download_with_the_wrong_checksum_is_refused_and_removed(tmp_path):
    served = tmp_path / "served.nrrd"
    served.write_bytes(b"not the sample CT")
    cached = tmp_path / "cache" / "sample.nrrd"
    with pytest.raises(UserError, match="failed its SHA-256 check"):
        demo.fetch_verified(served.as_uri(), "0" * 64, cached)
    assert list(cached.parent.iterdir()) == []


@pytest.mark.parametrize("failure", [UserError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failed_write_removes_what_it_wrote_and_keeps_the_users_file(tmp_path, failure):
    kept = tmp_path / "existing.nii.gz"
    kept.write_bytes(b"the user's file")
    image = sitk.Image([4, 4, 4], sitk.sitkUInt8)

    def third_output_fails(path):
        raise failure

    with pytest.raises(type(failure)):
        outputs.write_outputs({tmp_path / "first.nii.gz": outputs.image_writer(image), kept: outputs.image_writer(image),
                               tmp_path / "maps" / "third.nii.gz": third_output_fails})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.nii.gz"]
    assert kept.read_bytes() == b"the user's file"


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "terminate"])
def test_interrupted_run_exits_130_and_leaves_nothing(abdomen_ct, tiny_model, tmp_path, signal_number):
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "segment", str(abdomen_ct), "-o", str(out / "pancreas.nii.gz"), "--attention-maps",
         str(out / "maps"), "--weights", str(tiny_model), "--progress", "lines"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().startswith("PROGRESS 0.000")  # segmentation has started
    child.send_signal(signal_number)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130
    assert stderr.strip() == "error: interrupted; nothing half-written was left behind"
    assert list(out.iterdir()) == []


def test_preview_slices_cross_inside_a_curved_pancreas(data_dir, tmp_path):
    """The real pancreas label: all three views show it (its centroid alone lies outside it)."""
    from matplotlib.image import imread

    from AttentionUNetSegTools.preview import render_overlays

    case = data_dir / "ts-abdomen-3mm"
    ct = sitk.ReadImage(str(case / "ct.nii.gz"), sitk.sitkFloat32)
    pancreas = sitk.ReadImage(str(case / "pancreas.nii.gz"))
    attention = sitk.Cast(sitk.SmoothingRecursiveGaussian(sitk.Cast(pancreas, sitk.sitkFloat32), 6.0), sitk.sitkFloat32)
    png = render_overlays(ct, pancreas, attention, tmp_path / "preview.png", title="label")
    pixels = imread(str(png))[..., :3]
    top_row = pixels[: pixels.shape[0] // 2]
    is_pancreas = np.abs(top_row - np.array(PANCREAS_SEGMENT["color"]) / 255).max(axis=-1) < 0.03
    panel_width = int(pixels.shape[1] * 0.9) // 3  # the colour bar takes the right edge
    assert all(is_pancreas[:, i * panel_width : (i + 1) * panel_width].sum() > 10 for i in range(3))


def test_preview_of_an_empty_mask_centres_on_the_attention_peak(small_ct, tmp_path):
    from matplotlib.image import imread

    from AttentionUNetSegTools.preview import render_overlays

    ct = sitk.ReadImage(str(small_ct), sitk.sitkFloat32)
    empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct)
    attention = sitk.Image(ct.GetSize(), sitk.sitkUInt8)  # an engine map: 8-bit
    attention.CopyInformation(ct)
    attention[60, 50, 15] = round(0.6 * ATTENTION_SCALE)  # one hot voxel (orange; 1.0 is white, like PET heat)
    pixels = imread(str(render_overlays(ct, empty, attention, tmp_path / "preview.png")))[..., :3]
    bottom_row = pixels[pixels.shape[0] // 2 :]
    coloured = np.ptp(bottom_row, axis=-1) > 0.2  # the CT is grey; only the heatmap has colour
    panel_width = int(pixels.shape[1] * 0.9) // 3
    assert all(coloured[:, i * panel_width : (i + 1) * panel_width].any() for i in range(3))
    assert not np.ptp(pixels[: pixels.shape[0] // 2, : 3 * panel_width], axis=-1).max() > 0.2  # no mask drawn


def test_attention_maps_folder_holding_the_input_under_a_maps_name_is_refused(small_ct, tiny_model, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    ct = maps / "combined.nrrd"  # what --attention-maps would write there
    sitk.WriteImage(read_image(small_ct), str(ct))
    before = ct.read_bytes()
    result = run_cli("segment", ct, "-o", tmp_path / "p.nii.gz", "--attention-maps", maps, "--weights", tiny_model)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: output {ct} is the input; it would be overwritten; choose another output"
    assert ct.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["maps"]


def test_dicom_seg_over_a_slice_of_the_input_series_is_refused(dicom_dir, tiny_model, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    series = tmp_path / "series"
    series.mkdir()
    for source in dicom_dir.iterdir():  # with the UIDs a DICOM SEG needs, named as --dicom-seg names its file
        dataset = pydicom.dcmread(source)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
        dataset.save_as(series / f"{source.name}.dcm")
    slice_file = sorted(series.iterdir())[3]
    before = slice_file.read_bytes()
    result = run_cli("segment", series, "-o", tmp_path / "p.nii.gz", "--dicom-seg", slice_file, "--weights",
                     tiny_model, "--progress", "none")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: output {slice_file} is a file of the input {series}; it would be "
                                     "overwritten; choose another output")
    assert slice_file.read_bytes() == before and not (tmp_path / "p.nii.gz").exists()


def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(small_ct, tiny_model, full_disk):
    """The attention map does not fit (the NIfTI writer itself says nothing); the label, written first, goes too."""
    out = full_disk.folder
    attention = out / "attention.nii.gz"
    command = [str(CONSOLE_SCRIPT), "segment", str(small_ct), "-o", str(out / "pancreas.nii.gz"), "--attention",
               str(attention), "--report", str(out / "report.json"), "--weights", str(tiny_model), "--progress", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=full_disk.env,
                            preexec_fn=full_disk.preexec_fn, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: cannot write {attention}; only part of it reached the disk; "
                                     "free disk space or choose another folder")
    assert list(out.iterdir()) == []
