"""The child-process protocol, both ends: the command line, progress lines, the input NRRD the parent writes,
and the child's files and result.json, on real CT in a real child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ijk_to_ras, new_scene, read_with_slicer, same_grid

from AttentionUNetSegLib import mrml_bridge, protocol, runner
from AttentionUNetSegLib.imageio import read_image


def run_child(*args, cwd=None):
    command = [sys.executable, "-m", protocol.MODULE, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=protocol.child_environment(), check=False,
                          cwd=cwd)


def test_progress_lines_are_parsed_and_other_lines_ignored():
    assert protocol.parse_progress("PROGRESS 0.420 Tile 3 of 8") == protocol.Progress(0.42, "Tile 3 of 8")
    assert protocol.parse_progress("PROGRESS 1.000 Done") == protocol.Progress(1.0, "Done")
    assert protocol.parse_progress("PROGRESS 0.5") == protocol.Progress(0.5, "")
    assert protocol.parse_progress("PROGRESS 1.7 x") == protocol.Progress(1.0, "x")
    for other in ("Pancreas 12.0 mL; 3.1 s on cpu", "PROGRESS soon", "progress 0.5 x", ""):
        assert protocol.parse_progress(other) is None


def test_segment_command_names_the_protocol_module_and_asks_for_every_map(tmp_path):
    command = protocol.segment_command("py", tmp_path / "in.nrrd", tmp_path, device="cuda", quality="fast",
                                       weights=tmp_path / "m.safetensors")
    assert command[:4] == ["py", "-m", "AttentionUNetSegLib.protocol", "segment"]
    assert command[command.index("--maps") + 1] == "combined,level2,level3,level4"
    assert command[command.index("--device") + 1] == "cuda"
    assert command[command.index("--quality") + 1] == "fast"
    assert command[-2:] == ["--weights", str(tmp_path / "m.safetensors")]
    with pytest.raises(ValueError):
        protocol.segment_command("py", tmp_path, tmp_path, quality="best")
    assert protocol.gpu_command("py") == ["py", "-m", "AttentionUNetSegLib.protocol", "gpu"]


def test_the_child_imports_this_copy_of_the_lib():
    env = protocol.child_environment({"PYTHONPATH": "/elsewhere"})
    lib_parent = str(protocol.Path(protocol.__file__).resolve().parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [lib_parent, "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_the_childs_lines_reach_the_parent_in_utf8(tmp_path):
    """Piped, a child on Windows writes the ANSI code page (cp1252 here stands for it) unless told otherwise;
    the parent decodes UTF-8, so a non-ASCII path in the error line would arrive garbled."""
    missing = tmp_path / "Übersicht-北京.nrrd"
    env = protocol.child_environment({**os.environ, "PYTHONIOENCODING": "cp1252"})
    child = runner.ChildProcess(protocol.segment_command(sys.executable, missing, tmp_path), env=env)
    assert child.wait() == protocol.EXIT_USER_ERROR
    assert str(missing) in protocol.user_error_line(child.stderr_lines)


@pytest.mark.parametrize("name", ["ts-abdomen-3mm-crop/ct.nii.gz", "ts-venous-dicom/dicom"])
def test_the_input_keeps_its_pixel_type_and_its_place(data_dir, tmp_path, name):
    """Slicer's reader -> volume node -> write_input -> ITK reads the same voxels, in the same type, on the
    same grid as ITK reads the original."""
    source = data_dir / name
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else source
    node = read_with_slicer(new_scene(), files)
    voxels, geometry = mrml_bridge.volume_node_voxels(node)
    path = tmp_path / "input.nrrd"

    protocol.write_input(path, voxels, geometry)

    written = sitk.ReadImage(str(path))
    assert sitk.GetArrayViewFromImage(written).dtype == voxels.dtype
    assert voxels.dtype.kind in "iu", "a CT read by Slicer is stored as integers"
    assert path.stat().st_size < voxels.nbytes + 1024, "compressed, or not in its own type"
    reference = read_image(source)
    assert same_grid(written, reference)
    assert np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(reference))
    assert np.allclose(ijk_to_ras(read_with_slicer(new_scene(), path)), ijk_to_ras(node), atol=1e-4)


def test_write_input_refuses_what_nrrd_cannot_hold(tmp_path):
    geometry = protocol.Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError):
        protocol.write_input(tmp_path / "x.nrrd", np.zeros((2, 2), np.int16), geometry)
    with pytest.raises(ValueError):
        protocol.write_input(tmp_path / "x.nrrd", np.zeros((2, 2, 2), np.complex64), geometry)


@pytest.fixture(scope="module")
def child_run(small_ct, tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    done = run_child("segment", small_ct, "--work-dir", work, "--maps", "combined,level4", "--device", "cpu",
                     "--weights", tiny_model)
    return done, work


def test_the_child_writes_the_mask_the_maps_and_its_result(child_run, small_ct):
    done, work = child_run
    assert done.returncode == 0, done.stderr
    progress = [protocol.parse_progress(line) for line in done.stdout.splitlines()]
    assert progress and None not in progress, "the child printed something else than progress on stdout"
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    ct = read_image(small_ct)
    mask = sitk.ReadImage(str(work / protocol.SEGMENTATION_FILE))
    assert same_grid(mask, ct) and mask.GetPixelID() == sitk.sitkUInt8
    assert sorted(p.name for p in (work / protocol.MAPS_FOLDER).iterdir()) == ["combined.nrrd", "level4.nrrd"]
    for name in ("combined", "level4"):
        attention = sitk.ReadImage(str(protocol.map_path(work, name)))
        assert same_grid(attention, ct) and attention.GetPixelID() == sitk.sitkUInt8
    assert not any(p.name.startswith(".") for p in work.rglob("*")), "a staging file was left behind"

    report = json.loads((work / protocol.RESULT_FILE).read_text())
    assert set(report) == {"volume_ml", "confidence", "qc", "reason", "seconds", "device", "model"}
    result = protocol.read_result(work)
    assert result.qc in ("ok", "check", "not found") and 0.0 <= result.confidence <= 1.0
    assert result.device == "cpu" and result.seconds > 0 and "tiny.safetensors" in result.model
    voxel_ml = np.prod(mask.GetSpacing()) / 1000.0
    assert result.volume_ml == pytest.approx(np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * voxel_ml,
                                             abs=0.01)


def test_a_user_error_is_one_line_on_stderr_and_exit_2(tmp_path, tiny_model):
    flat = sitk.Image(40, 40, 20, sitk.sitkInt16) + 40
    sitk.WriteImage(flat, str(tmp_path / "Flat.nrrd"))
    work = tmp_path / "work"
    work.mkdir()
    done = run_child("segment", tmp_path / "Flat.nrrd", "--work-dir", work, "--weights", tiny_model)
    assert done.returncode == protocol.EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert protocol.user_error_line(done.stderr.splitlines()).startswith("the input is constant (40)")
    assert list(work.iterdir()) == []


def test_unknown_map_names_are_a_user_error(small_ct, tiny_model, tmp_path):
    done = run_child("segment", small_ct, "--work-dir", tmp_path, "--maps", "combined,level9", "--weights",
                     tiny_model)
    assert done.returncode == protocol.EXIT_USER_ERROR and "level9" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_gpu_question_is_a_protocol_subcommand():
    from AttentionUNetSegLib.engine import describe_gpu

    done = run_child("gpu")
    assert done.returncode == 0
    assert protocol.read_gpu_answer(done.stdout.splitlines()) == describe_gpu()
    assert protocol.read_gpu_answer(["noise", "{}"]) is None
