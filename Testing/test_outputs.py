"""A run's files (``outputs``): every file checked before it is renamed into place, a full disk as one line
and nothing left behind, outputs kept apart from inputs, names made plain, and the one wording of a result.

The full-disk fixtures are shared with ``test_cli`` and ``test_batch``: a tmpfs of a few KiB where one can be
mounted (root), and everywhere on POSIX a file size limit (RLIMIT_FSIZE), under which writes fail as on a
full disk (``File too large``), some of them silently short, as ITK's NIfTI writer leaves them.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegLib import imageio, outputs, protocol
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.verdict import CHECK, NOT_FOUND, OK, Verdict

SMALL_DISK_BYTES = 48 * 1024  # the small CT's label (2.5 KB) fits, its attention map (50 KB and more) does not
FILE_SIZE_LIMIT_BYTES = 16 * 1024
IMAGE_FILES = ("a.nii.gz", "a.nii", "a.nrrd", "a.seg.nrrd", "a.mha")
FULL_DISK_ADVICE = "free disk space or choose another folder"


@dataclass
class FullDisk:
    """A folder on a disk that fills up, and how to start the process that writes there."""

    folder: Path
    preexec_fn: object = None  # for subprocess: sets the file size limit in the child
    env: dict | None = None


@pytest.fixture(params=["small-tmpfs", "file-size-limit"])
def full_disk(request, tmp_path):
    if request.param == "file-size-limit":
        if sys.platform == "win32":
            pytest.skip("no file size limit on Windows")
        folder = tmp_path / "out"
        folder.mkdir()
        yield FullDisk(folder, _file_size_limit, {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield FullDisk(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _file_size_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))


def noise(dtype=np.float32) -> sitk.Image:
    """Random voxels, which compress badly: every byte of the file counts."""
    array = np.random.default_rng(0).integers(0, 200, (12, 20, 24)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-10.0, 4.0, 30.0))
    return image


def fake_result() -> SimpleNamespace:
    """What write_result needs of an engine result."""
    mask = sitk.Cast(noise(np.uint8) > 100, sitk.sitkUInt8)
    return SimpleNamespace(mask=mask, attention_maps={"combined": noise(np.uint8)}, volume_ml=12.3456,
                           device="cpu", verdict=Verdict(OK, 0.9, ""))


# --- verified writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "raw"])
@pytest.mark.parametrize("name", IMAGE_FILES)
def test_every_image_format_passes_its_check_and_reads_back(tmp_path, name, compress):
    """The check after each write knows every format the outputs use, compressed or not: no false alarm."""
    image = noise(np.uint8 if name.endswith(".seg.nrrd") else np.float32)
    path = tmp_path / name
    outputs.write_outputs({path: outputs.label_writer(image, path, compress) if name.endswith(".seg.nrrd")
                           else outputs.image_writer(image, compress)})
    written = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("cut", ["last-byte", "half"])
@pytest.mark.parametrize("name", IMAGE_FILES)
def test_an_image_that_reached_the_disk_short_is_refused_and_nothing_is_left(tmp_path, monkeypatch, name, cut):
    """As ITK's NIfTI writer leaves one on a full disk, without an error: a file that reads back as zeros."""
    original = sitk.ImageFileWriter.Execute

    def write_then_lose_the_end(writer, *args):
        original(writer, *args)
        path = Path(writer.GetFileName())
        os.truncate(path, path.stat().st_size - 1 if cut == "last-byte" else path.stat().st_size // 2)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", write_then_lose_the_end)
    kept = tmp_path / name
    kept.write_bytes(b"the user's earlier file")
    with pytest.raises(outputs.WriteError) as raised:
        outputs.write_outputs({tmp_path / "report.json": outputs.json_writer({"a": 1}),
                               kept: outputs.image_writer(noise())})
    assert str(raised.value) == f"cannot write {kept}; only part of it reached the disk; {FULL_DISK_ADVICE}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert kept.read_bytes() == b"the user's earlier file"


def test_a_file_written_in_small_pieces_is_whole(tmp_path, monkeypatch):
    """The system may write less than asked (a short write); the rest follows."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    path = tmp_path / "report.json"
    outputs.write_outputs({path: outputs.json_writer({"volume_ml": 72.4, "reason": "x" * 100})})
    monkeypatch.undo()
    assert path.read_text().startswith('{\n  "volume_ml": 72.4')


@pytest.mark.parametrize("failure", ["no-space", "quota", "no-progress"])
def test_a_full_disk_under_a_python_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure):
    real_write = os.write
    calls = []

    def fill_up(fd, data):
        calls.append(len(data))
        if failure == "no-progress":
            return 0
        if len(calls) > 1:
            code = errno.ENOSPC if failure == "no-space" else errno.EDQUOT
            raise OSError(code, os.strerror(code))
        return real_write(fd, bytes(data[: len(data) // 2]))  # a short write first, as the disk fills

    kept = tmp_path / "report.json"
    kept.write_text("the user's earlier report")
    monkeypatch.setattr(os, "write", fill_up)
    with pytest.raises(outputs.WriteError) as raised:
        outputs.write_outputs({tmp_path / "label.nrrd": outputs.image_writer(noise()),
                               kept: outputs.json_writer({"volume_ml": 72.4})})
    monkeypatch.undo()
    why = os.strerror(errno.EDQUOT if failure == "quota" else errno.ENOSPC)
    assert str(raised.value) == f"cannot write {kept}; {why[0].lower() + why[1:]}; {FULL_DISK_ADVICE}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert kept.read_text() == "the user's earlier report"


def test_the_image_writers_own_failure_lines_are_dropped_and_other_output_passes(tmp_path, monkeypatch, capfd):
    """niftilib prints "** ERROR: NWAD: ..." to the C stderr as a write comes up short; the one-line error says it.
    Whatever else reaches stderr during the write (another thread's line) still gets out."""
    original = sitk.ImageFileWriter.Execute

    def chatty(writer, *args):
        os.write(2, b"** ERROR: NWAD: wrote only 0 of 4096 bytes to file\nanother thread's line\n")
        original(writer, *args)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", chatty)
    imageio.write_image(noise(), tmp_path / "a.nii.gz")
    stderr = capfd.readouterr().err
    assert "another thread's line" in stderr and "NWAD" not in stderr


def test_the_panels_child_on_a_full_disk_exits_2_with_one_line_and_leaves_nothing(small_ct, tiny_model, full_disk):
    work = full_disk.folder / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", protocol.MODULE, "segment", str(small_ct), "--work-dir", str(work),
                           "--device", "cpu", "--weights", str(tiny_model)],
                          capture_output=True, text=True, env=protocol.child_environment(full_disk.env),
                          preexec_fn=full_disk.preexec_fn, check=False)
    assert done.returncode == protocol.EXIT_USER_ERROR, done.stderr
    line = protocol.user_error_line(done.stderr.splitlines())
    assert done.stderr.strip().splitlines() == [f"error: {line}"]
    assert line.startswith(f"cannot write {work}") and line.endswith(FULL_DISK_ADVICE)
    assert list(work.rglob("*")) == []


# --- outputs apart from inputs ---------------------------------------------------------------------------


def test_no_output_may_be_an_input_a_file_of_its_folder_or_a_folder_holding_it(tmp_path, dicom_dir):
    ct = tmp_path / "cases" / "ct.nii.gz"
    ct.parent.mkdir()
    ct.write_bytes(b"a CT")
    series = tmp_path / "series"
    series.mkdir()
    for source in sorted(dicom_dir.iterdir())[:3]:
        (series / source.name).write_bytes(source.read_bytes())
    (tmp_path / "link.nii.gz").symlink_to(ct)
    clashes = {
        ct: "is the input", tmp_path / "cases" / ".." / "cases" / "ct.nii.gz": "is the input",
        tmp_path / "link.nii.gz": "is the input", ct.parent: f"holds the input {ct}", tmp_path: f"holds the input {ct}",
        sorted(series.iterdir())[1]: f"is a file of the input {series}", series: "is the input",
    }
    for output, words in clashes.items():
        with pytest.raises(UserError, match=f"^{re.escape(f'output {output} {words}; it would be overwritten')}"):
            outputs.refuse_clashes([ct, series], [tmp_path / "new.nii.gz", output])
    outputs.refuse_clashes([ct, series], [ct.parent / "pancreas.nii.gz", series / "pancreas.dcm"])
    with pytest.raises(UserError, match="^two outputs name the same file"):
        outputs.refuse_clashes([ct], [tmp_path / "a.nii.gz", tmp_path / "cases" / ".." / "a.nii.gz"])


def test_a_result_is_written_all_or_nothing_and_never_over_an_input(tmp_path):
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"a CT")
    files = outputs.named_files(tmp_path / "out", "seg.nrrd")
    never_called = (ct, lambda path: pytest.fail("an extra file over the input was written"))
    with pytest.raises(UserError, match=f"^{re.escape(f'output {ct} is the input')}"):
        outputs.write_result(fake_result(), files, seconds=1.0, model="m", inputs=[ct], extra=[never_called])
    with pytest.raises(UserError, match="^two outputs name the same file"):
        outputs.write_result(fake_result(), files, seconds=1.0, model="m", extra=[(files.label, never_called[1])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"] and ct.read_bytes() == b"a CT"

    report = outputs.write_result(fake_result(), files, seconds=1.234, model="m", inputs=[ct], input_record={"path": "x"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["attention.nrrd", "pancreas.seg.nrrd",
                                                                    "report.json"]
    assert report == {"volume_ml": 12.35, "confidence": 0.9, "qc": OK, "reason": "", "seconds": 1.23, "device": "cpu",
                      "model": "m", "input": {"path": "x"}}
    attention = sitk.ReadImage(str(tmp_path / "out" / "attention.nrrd"))
    assert attention.GetPixelID() == sitk.sitkFloat32 and sitk.GetArrayViewFromImage(attention).max() <= 1


@pytest.mark.parametrize(("text", "name"), [
    ("..", ""), (".", ""), ("", ""), ("../x", "x"), ("/tmp/x", "tmp-x"), ("a/b", "a-b"), ("a\\b", "a-b"),
    (".hidden", "hidden"), ("patient 7_ct.v2", "patient-7_ct.v2"), ("Ünïcode", "n-code"), ("x" * 300, "x" * 100),
])
def test_names_from_input_become_plain_names(text, name):
    assert outputs.safe_name(text) == name


def test_image_stems_drop_the_image_suffix_whatever_its_case():
    assert outputs.image_stem(Path("/a/ct.nii.gz")) == "ct"
    assert outputs.image_stem(Path("CT.NII.GZ")) == "CT"
    assert outputs.image_stem(Path("/a/dicom")) == "dicom"
    assert outputs.image_stem(Path(".nrrd")) == ".nrrd"


# --- the one wording -------------------------------------------------------------------------------------


def test_a_result_is_worded_one_way_by_every_front_end():
    ok, check, nothing = Verdict(OK, 0.834, ""), Verdict(CHECK, 0.61, "the model is unsure of the outline"), \
        Verdict(NOT_FOUND, 0.0, "nothing in this scan looks like pancreas to the model")
    assert outputs.summary_line(72.44, ok, 3.14, "cpu") == "Pancreas 72.4 mL; ok (confidence 0.83); 3.1 s on cpu"
    assert outputs.summary_line(48.2, check) == \
        "Pancreas 48.2 mL; check: the model is unsure of the outline (confidence 0.61)"
    assert outputs.summary_line(0.0, nothing, 2.0, "cuda") == "No pancreas found; 2.0 s on cuda"
    # The panel's child reports the verdict's fields; rebuilt, they read the same.
    child = protocol.ChildResult(48.2, 0.61, CHECK, "the model is unsure of the outline", 3.0, "cpu", "m")
    assert outputs.summary_line(child.volume_ml, Verdict(child.qc, child.confidence, child.reason)) == \
        outputs.summary_line(48.2, check)
