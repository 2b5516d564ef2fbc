"""``attention-unet-seg batch`` run as a user runs it, on real CT (files and a DICOM series) and a bad file:
the summary, each case on its input's grid, resuming, Ctrl-C, and a Ray worker killed in mid-batch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import test_outputs
from conftest import same_grid

from AttentionUNetSegLib import outputs
from AttentionUNetSegLib.imageio import read_image
from AttentionUNetSegTools.batch import command, inputs, steps
from AttentionUNetSegTools.batch.summary import COLUMNS

CONSOLE_SCRIPT = Path(sys.executable).with_name("attention-unet-seg")
LAYOUT = steps.Layout()
CASE_FILES = {"pancreas.seg.nrrd", "attention.nrrd", "report.json"}
full_disk = test_outputs.full_disk  # the fixture, shared with the other tests of writing


def batch_command(*args) -> list[str]:
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: run 'pip install -e .' in this environment"
    return [str(CONSOLE_SCRIPT), "batch", *map(str, args), "--progress", "none"]


def run_batch(*args) -> subprocess.CompletedProcess:
    return subprocess.run(batch_command(*args), capture_output=True, text=True, timeout=240, check=False)


def read_summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}


def file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def cohort(tmp_path, small_ct, abdomen_ct, dicom_dir) -> Path:
    """A study folder as researchers keep one: a folder per patient, a DICOM series, a failed download."""
    root = tmp_path / "cohort"
    (root / "patient1").mkdir(parents=True)
    (root / "patient1" / "ct.nii.gz").symlink_to(small_ct)
    (root / "patient2").mkdir()
    (root / "patient2" / "ct").symlink_to(dicom_dir, target_is_directory=True)
    broken = root / "patient3" / "ct.nii.gz"
    broken.parent.mkdir()
    broken.write_text("<html><body>502 Bad Gateway</body></html>\n")
    return root


@pytest.fixture
def cohort_csv(tmp_path, abdomen_ct) -> Path:
    """A CSV of one more case with columns of its own, the path relative to the CSV."""
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "ct.nii.gz").symlink_to(abdomen_ct)
    table = tmp_path / "cohort.csv"
    table.write_text("path,age,site\nmore/ct.nii.gz,61,Basel\n")
    return table


def test_batch_segments_each_case_on_its_grid_reports_the_bad_one_and_resumes(cohort, cohort_csv, tmp_path,
                                                                              tiny_model, dicom_dir):
    out = tmp_path / "out"
    first = run_batch(cohort, cohort_csv, "-o", out, "--weights", tiny_model)
    assert first.returncode == 1, first.stderr
    rows = read_summary(out)
    assert list(rows) == ["patient1_ct", "patient2_ct", "patient3_ct", "ct"]
    assert list(next(iter(rows.values())))[: len(COLUMNS)] == list(COLUMNS)
    assert [rows[c]["status"] for c in rows] == ["ok", "ok", "error", "ok"]
    bad = rows["patient3_ct"]
    assert "ct.nii.gz is not an image" in bad["error"] and "\n" not in bad["error"] and bad["volume_ml"] == ""
    assert "patient3_ct: error: ct.nii.gz is not an image" in first.stderr and "1 failed: patient3_ct" in first.stdout
    assert (rows["ct"]["age"], rows["ct"]["site"]) == ("61", "Basel")  # carried from the CSV
    assert rows["patient1_ct"]["age"] == ""
    assert sorted(p.name for p in out.iterdir()) == [command.LOCK_NAME, "ct", "patient1_ct", "patient2_ct",
                                                     "summary.csv"]

    sources = {"patient1_ct": cohort / "patient1" / "ct.nii.gz", "patient2_ct": dicom_dir,
               "ct": cohort_csv.parent / "more" / "ct.nii.gz"}
    for case, source in sources.items():
        folder = out / case
        assert {p.name for p in folder.iterdir()} == CASE_FILES
        ct = read_image(source)
        mask = sitk.ReadImage(str(folder / "pancreas.seg.nrrd"))
        attention = sitk.ReadImage(str(folder / "attention.nrrd"))
        assert same_grid(mask, ct) and same_grid(attention, ct), case
        report = json.loads((folder / "report.json").read_text())
        assert set(report) == {*outputs.REPORT_KEYS, "input"}
        assert report["input"]["path"] == str(source.resolve())  # what resuming checks the input against
        assert rows[case]["volume_ml"] == f"{report['volume_ml']:.2f}" and rows[case]["qc"] == report["qc"]
        voxels = sum(sitk.GetArrayViewFromImage(mask).ravel() > 0)
        assert abs(voxels * float(ct.GetSpacing()[0] * ct.GetSpacing()[1] * ct.GetSpacing()[2]) / 1000
                   - report["volume_ml"]) < 0.01

    before = file_times(out)
    second = run_batch(cohort, cohort_csv, "-o", out, "--weights", tiny_model)
    assert second.returncode == 1 and "(3 already done)" in second.stdout
    assert {k: v for k, v in file_times(out).items() if k != "summary.csv"} == \
        {k: v for k, v in before.items() if k != "summary.csv"}  # nothing rewritten
    assert read_summary(out) == rows

    # Half-written cases: a file missing, a file cut short, and a staging folder left by a killed run.
    (out / "patient1_ct" / "attention.nrrd").unlink()
    cut = out / "ct" / "pancreas.seg.nrrd"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (out / ".patient2_ct-partial-x1").mkdir()
    untouched = {k: v for k, v in file_times(out / "patient2_ct").items()}
    third = run_batch(cohort, cohort_csv, "-o", out, "--weights", tiny_model)
    assert third.returncode == 1 and "(1 already done)" in third.stdout, third.stdout
    assert file_times(out / "patient2_ct") == untouched
    for case in ("patient1_ct", "ct"):
        assert {p.name for p in (out / case).iterdir()} == CASE_FILES
        assert steps.finished_report(out, inputs.Case(case, sources[case]), LAYOUT) is not None
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != command.LOCK_NAME]  # no staging
    assert [r["status"] for r in read_summary(out).values()] == ["ok", "ok", "error", "ok"]


def test_bad_usage_is_one_line_and_exit_2(tmp_path, small_ct):
    missing = run_batch(tmp_path / "nowhere", "-o", tmp_path / "out")
    no_path = tmp_path / "list.csv"
    no_path.write_text("file,age\nct.nii.gz,50\n")
    no_path_column = run_batch(no_path, "-o", tmp_path / "out")
    not_dicom = run_batch(small_ct, "-o", tmp_path / "out", "--dicom-seg")
    for result, expected in ((missing, "does not exist"), (no_path_column, "has no 'path' column"),
                             (not_dicom, "--dicom-seg needs a DICOM series")):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_second_batch_into_the_same_folder_is_refused_and_leaves_the_first_ones_work(tmp_path, small_ct):
    from filelock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    first_ones_staging = out / f".case{outputs.STAGING_MARK}abc"
    first_ones_staging.mkdir()
    with FileLock(out / command.LOCK_NAME):  # the first batch, still running
        second = run_batch(small_ct, "-o", out)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: another batch is writing into"), second.stderr
    assert first_ones_staging.is_dir()
    assert not (out / "summary.csv").exists()


def test_case_names_are_unique_and_stable(tmp_path, small_ct):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    (tmp_path / "a" / "ct.nii.gz").symlink_to(small_ct)
    (tmp_path / "b" / "ct.nii.gz").symlink_to(small_ct)
    (tmp_path / "b" / "ct.nrrd").write_bytes(b"")  # same stem, other format
    (tmp_path / "b" / ".hidden.nii.gz").write_bytes(b"")
    named = [str(tmp_path / "a" / "ct.nii.gz"), str(tmp_path / "b" / "ct.nii.gz")]
    cases, _ = inputs.discover([Path(p) for p in named])
    assert [c.name for c in cases] == ["a_ct", "b_ct"]  # two files named alike: their folders tell them apart
    cases, _ = inputs.discover([tmp_path])
    names = [c.name for c in cases]
    assert names == ["a_ct", "b_ct", "b_ct-2"] and inputs.discover([tmp_path])[0] == cases


def test_ctrl_c_keeps_finished_cases_whole_and_the_rerun_finishes(tmp_path, abdomen_ct, tiny_model):
    root = tmp_path / "cohort"
    for number in range(8):
        (root / f"p{number}").mkdir(parents=True)
        (root / f"p{number}" / "ct.nii.gz").symlink_to(abdomen_ct)
    out = tmp_path / "out"
    process = subprocess.Popen(batch_command(root, "-o", out, "--weights", tiny_model), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: "ok" in statuses(out).values(), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    done = [name for name, status in statuses(out).items() if status == "ok"]
    assert 0 < len(done) < 8
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(done)  # no half-written case
    for name in done:
        ct = root / name.removesuffix("_ct") / "ct.nii.gz"
        assert steps.finished_report(out, inputs.Case(name, ct), LAYOUT) is not None
    rerun = run_batch(root, "-o", out, "--weights", tiny_model)
    assert rerun.returncode == 0 and f"({len(done)} already done)" in rerun.stdout, rerun.stderr
    assert set(statuses(out).values()) == {"ok"}


def statuses(out: Path) -> dict[str, str]:
    try:
        return {case: row["status"] for case, row in read_summary(out).items()}
    except (OSError, KeyError):
        return {}


def wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the batch"
        time.sleep(0.05)


def test_ray_batch_survives_a_killed_worker_and_writes_each_case_once(tmp_path, small_ct, dicom_dir, tiny_model):
    pytest.importorskip("ray")
    root = tmp_path / "cohort"
    for number in range(5):
        (root / f"p{number}").mkdir(parents=True)
        (root / f"p{number}" / "ct.nii.gz").symlink_to(small_ct)
    (root / "p5").symlink_to(dicom_dir, target_is_directory=True)
    out = tmp_path / "out"
    process = subprocess.Popen(batch_command(root, "-o", out, "--weights", tiny_model, "--engine", "ray",
                                             "--workers", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    folders: dict[str, int] = {}  # case -> inode of its folder when first seen; a rewrite would change it

    def watch() -> bool:
        for folder in out.iterdir() if out.exists() else ():
            if folder.is_dir() and not folder.name.startswith("."):
                assert folders.setdefault(folder.name, folder.stat().st_ino) == folder.stat().st_ino, folder
        return False

    wait_for(lambda: watch() or any(line.startswith("worker 1 ready") for line in log), process)
    pid = int(next(line for line in log if line.startswith("worker 1 ready")).split("pid ")[1].split()[0])
    wait_for(lambda: watch() or "ok" in statuses(out).values(), process)
    os.kill(pid, signal.SIGKILL)
    while process.poll() is None:
        watch()
        time.sleep(0.05)
    stdout = process.stdout.read()
    assert process.returncode == 0, "".join(log)
    assert any(line.startswith("worker 1 died") for line in log), "".join(log)
    assert "6 case(s): 6 ok, 0 failed" in stdout
    watch()
    cases = [f"p{n}_ct" for n in range(5)] + ["p5"]
    assert sorted(folders) == sorted(cases) == sorted(p.name for p in out.iterdir() if p.is_dir())
    assert set(statuses(out).values()) == {"ok"}
    for case in cases:
        assert {p.name for p in (out / case).iterdir()} == CASE_FILES
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != command.LOCK_NAME]  # no staging



def crop(ct: Path, slices: int, path: Path) -> Path:
    """Another CT: the first ``slices`` slices of ``ct``, on a grid of its own."""
    image = read_image(ct)
    sitk.WriteImage(image[:, :, :slices], str(path))
    return path


def test_csv_case_names_never_reach_outside_the_output_folder(tmp_path, small_ct, tiny_model):
    """A ``case`` column of ``..`` emptied the folder holding OUT; ``/abs`` named a folder anywhere. Sentinels
    around OUT, in the input folder and in the folder an absolute name points at must all survive."""
    data, work, elsewhere = tmp_path / "data", tmp_path / "work", tmp_path / "elsewhere"
    for folder in (data, work, elsewhere):
        folder.mkdir()
    sentinels = [data / "notes.txt", work / "keep.txt", elsewhere / "precious.txt", tmp_path / "beside.txt"]
    given = ["..", ".", "../x", str(elsewhere), "", "a/b"]
    for number, _ in enumerate(given):
        (data / f"ct{number}.nii.gz").symlink_to(small_ct)
    table = data / "list.csv"
    table.write_text("path,case\n" + "".join(f"ct{n}.nii.gz,{name}\n" for n, name in enumerate(given)))
    sentinels.append(table)
    for sentinel in sentinels[:4]:
        sentinel.write_text("keep me")
    before = {path: path.read_bytes() for path in sentinels}
    out = work / "out"

    for run, done in ((1, ""), (2, f"({len(given)} already done)")):
        result = run_batch(table, "-o", out, "--weights", tiny_model)
        assert result.returncode == 0 and done in result.stdout, result.stderr
        assert {path: path.read_bytes() for path in sentinels} == before, f"run {run}"
    names = ["ct0", "ct1", "x", outputs.safe_name(str(elsewhere)), "ct4", "a-b"]
    assert list(read_summary(out)) == names
    assert sorted(p.name for p in out.iterdir()) == sorted([command.LOCK_NAME, "summary.csv", *names])
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "out"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]


def test_names_are_unique_without_letter_case_and_never_the_summarys(tmp_path, small_ct):
    table = tmp_path / "list.csv"
    table.write_text("path,case\n" + "".join(f"ct{n}.nii.gz,{name}\n"
                                             for n, name in enumerate(["A", "a", "a-2", "summary.csv"])))
    for number in range(4):
        (tmp_path / f"ct{number}.nii.gz").symlink_to(small_ct)
    cases, _ = inputs.discover([table])
    assert [c.name for c in cases] == ["A", "a-2", "a-2-2", "summary.csv-2"]
    with pytest.raises(ValueError):
        inputs.Case("..", small_ct)


def test_a_case_folder_holding_other_files_is_not_replaced(tmp_path, small_ct, tiny_model):
    out = tmp_path / "out"
    (out / "ct").mkdir(parents=True)
    (out / "ct" / "notes.txt").write_text("the user's")
    result = run_batch(small_ct, "-o", out, "--weights", tiny_model)
    assert result.returncode == 1
    assert read_summary(out)["ct"]["error"] == (f"{out / 'ct'} holds files this batch did not write; it is not "
                                                "replaced; move them away, or choose another output folder")
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["notes.txt"]


def test_an_output_folder_holding_the_inputs_is_refused(tmp_path, small_ct, tiny_model):
    cohort = tmp_path / "cohort"
    (cohort / "p1").mkdir(parents=True)
    (cohort / "p1" / "ct.nii.gz").symlink_to(small_ct)
    result = run_batch(cohort, "-o", cohort, "--weights", tiny_model)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: output {cohort} is the input; it would be overwritten; choose another output"
    assert sorted(p.name for p in cohort.iterdir()) == ["p1"]


def test_a_rerun_after_adding_and_replacing_cts_reports_each_cts_own_result(tmp_path, small_ct, tiny_model):
    """Adding scan.mha beside scan.nii.gz and scan.nrrd shifts their numbered names: the rerun must redo them,
    not report one CT's volume for another; replacing keep.nii.gz by another CT redoes it too."""
    root, out = tmp_path / "cohort", tmp_path / "out"
    root.mkdir()
    (root / "keep.nii.gz").symlink_to(small_ct)
    (root / "scan.nii.gz").symlink_to(small_ct)
    crop(small_ct, 25, root / "scan.nrrd")
    assert run_batch(root, "-o", out, "--weights", tiny_model).returncode == 0
    assert_each_case_is_its_inputs(out)

    crop(small_ct, 20, root / "scan.mha")
    second = run_batch(root, "-o", out, "--weights", tiny_model)
    assert second.returncode == 0 and "(1 already done)" in second.stdout, second.stdout
    rows = read_summary(out)
    assert {name: Path(row["input"]).name for name, row in rows.items()} == {
        "keep": "keep.nii.gz", "scan": "scan.mha", "scan-2": "scan.nii.gz", "scan-3": "scan.nrrd"}
    assert_each_case_is_its_inputs(out)

    (root / "keep.nii.gz").unlink()
    crop(small_ct, 22, root / "keep.nii.gz")
    third = run_batch(root, "-o", out, "--weights", tiny_model)
    assert third.returncode == 0 and "(3 already done)" in third.stdout, third.stdout
    assert_each_case_is_its_inputs(out)


def assert_each_case_is_its_inputs(out: Path) -> None:
    """Each row's mask lies on its own input's grid, and its volume is that mask's."""
    for name, row in read_summary(out).items():
        ct = read_image(row["input"])
        mask = sitk.ReadImage(str(out / name / "pancreas.seg.nrrd"))
        assert same_grid(mask, ct), name
        voxels = int((sitk.GetArrayViewFromImage(mask) > 0).sum())
        assert float(row["volume_ml"]) == pytest.approx(voxels * float(np.prod(ct.GetSpacing())) / 1000, abs=0.01)


def test_a_full_disk_fails_the_case_with_one_line_and_leaves_no_case_folder(small_ct, tiny_model, full_disk):
    out = full_disk.folder / "out"
    result = subprocess.run(batch_command(small_ct, "-o", out, "--weights", tiny_model, "--label-format", "nii.gz"),
                            capture_output=True, text=True, timeout=240, env=full_disk.env,
                            preexec_fn=full_disk.preexec_fn, check=False)
    assert result.returncode == 1, result.stderr
    row = read_summary(out)["ct"]
    assert row["status"] == "error"
    assert row["error"] == f"cannot write {out / 'ct'}; only part of it reached the disk; " \
        "free disk space or choose another folder"
    assert f"ct: error: {row['error']}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [command.LOCK_NAME, "summary.csv"]


def test_a_summary_that_cannot_be_written_is_reported(tmp_path, small_ct, tiny_model, monkeypatch, capsys):
    """The disk fills up after the first summary: the case is kept, and the batch ends saying the file is behind."""
    from AttentionUNetSegTools import cli

    out = tmp_path / "out"
    real_write_outputs = outputs.write_outputs
    summaries = []

    def summary_fails_after_the_first(writers, inputs=()):
        writers = list(writers.items() if isinstance(writers, dict) else writers)
        if any(Path(path).name == "summary.csv" for path, _ in writers):
            summaries.append(1)
            if len(summaries) > 1:
                raise outputs.WriteError(out / "summary.csv", "no space left on device")
        real_write_outputs(writers, inputs)

    monkeypatch.setattr(outputs, "write_outputs", summary_fails_after_the_first)
    status = cli.main(["batch", str(small_ct), "-o", str(out), "--weights", str(tiny_model), "--progress", "none"])
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / 'summary.csv'}; no space left on device; free disk space or choose another "
        "folder, then run the same command again (finished cases are kept)")
    assert (out / "ct" / "report.json").is_file() and read_summary(out)["ct"]["status"] == "pending"
