"""The Slicer panel's run outside Slicer: a real child process on real CT, its import into a real MRML scene
(slicer-core), and Cancel through a launcher that behaves like Slicer's PythonSlicer."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicer_app
from conftest import ijk_to_ras, image_data_voxels, new_scene, node_ids, read_with_slicer

from AttentionUNetSegLib import mrml_bridge, protocol, runner
from AttentionUNetSegLib.errors import Cancelled, UserError

CANCEL_LIMIT_SECONDS = 2.0
POSIX = os.name == "posix"


def segment_ml(segmentation_node) -> float:
    """The Pancreas segment's volume as the scene holds it."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    return int(np.count_nonzero(image_data_voxels(labelmap))) * float(np.prod(labelmap.GetSpacing())) / 1000.0


def scene_state(scene) -> list[tuple[str, int]]:
    """Every node with its modification time: equal states mean nothing was added, removed or changed."""
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime()) for i in range(scene.GetNumberOfNodes())]


def started_run(scene, volume, tiny_model, work_root, **options) -> runner.SegmentationRun:
    options.setdefault("device", "cpu")
    run = runner.SegmentationRun(scene, volume, weights=tiny_model, work_root=work_root, **options)
    run.start()
    return run


def wait_for_progress(run) -> None:
    """Until the child reports that it is working (or ends)."""
    while run.running and not run.poll():
        time.sleep(0.02)


@pytest.fixture(scope="module")
def first_run(small_ct, tiny_model, tmp_path_factory):
    """One real run, shared: the tests after it check that later runs and cancels keep the scene consistent."""
    scene = new_scene()
    volume = read_with_slicer(scene, small_ct, name="Small CT")
    work_root = tmp_path_factory.mktemp("first_run")
    updates: list[protocol.Progress] = []
    idle_calls = []
    run = started_run(scene, volume, tiny_model, work_root)
    result = run.wait(updates.append, idle=lambda: idle_calls.append(1))
    return scene, volume, result, updates, work_root, len(idle_calls)


def test_a_run_segments_in_a_child_process_and_imports_into_the_scene(first_run):
    scene, volume, result, updates, work_root, _ = first_run
    fractions = [u.fraction for u in updates]
    assert len(updates) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert result.device == "cpu" and result.seconds > 0
    assert result.report.qc in ("ok", "check", "not found")
    if not result.found:
        pytest.skip("the tiny model found nothing on this CT")  # the not-found path is tested below
    segmentation = result.outputs.segmentation_node
    assert scene.IsNodePresent(segmentation)
    assert result.volume_ml == pytest.approx(segment_ml(segmentation), abs=0.01)
    assert not segmentation.GetSegmentation().GetSegment("Pancreas").GetRepresentation("Closed surface"), (
        "a surface was built though Show 3D is off")
    assert set(result.outputs.attention_nodes) == {"combined"}, "only the shown map is imported at once"
    node = result.outputs.attention_nodes["combined"]
    assert node.GetImageData().GetScalarTypeAsString() == "unsigned char"
    assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(volume), atol=1e-4)
    work_dir = next(work_root.iterdir())
    assert sorted(p.name for p in work_dir.iterdir()) == ["attention", "pancreas.nrrd", "result.json"], (
        "the input is kept")
    assert sorted(p.name for p in (work_dir / "attention").iterdir()) == [
        f"{name}.nrrd" for name in protocol.ATTENTION_MAP_NAMES], "the child computes every gate"
    assert set(result.maps_on_disk) == {"level2", "level3", "level4"}


def test_waiting_runs_the_callers_event_loop_on_every_pass(first_run):
    updates, idle_calls = first_run[3], first_run[5]
    assert idle_calls > len(updates), "the GUI would freeze between progress lines"


def test_other_gates_are_imported_on_demand_from_the_childs_files(first_run):
    scene, volume, result, *_ = first_run
    if not result.found:
        pytest.skip("the tiny model found nothing on this CT")
    before = len(node_ids(scene))
    level3 = result.attention_node("level3")
    assert len(node_ids(scene)) == before + 2  # the volume and its display node
    assert level3.GetName() == "Small CT attention level3" and result.attention_node("level3") is level3
    assert level3.GetNodeReferenceID(mrml_bridge.INPUT_ROLE) == volume.GetID()
    assert image_data_voxels(level3.GetImageData()).max() > 0
    assert result.attention_node("level9") is None


def test_showing_another_gate_starts_no_process(first_run, monkeypatch):
    """Another gate is an import of the first run's file: no second run (which would also take the panel's
    current device and quality), no new work folder, the segmentation untouched, the map on the CT's grid."""
    _, volume, result, _, work_root, _ = first_run
    if not result.found:
        pytest.skip("the tiny model found nothing on this CT")
    segmentation = result.outputs.segmentation_node
    mask_time, folders = segmentation.GetMTime(), sorted(work_root.iterdir())
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(result.maps_on_disk["level4"])))

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started to show a gate: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    started = time.perf_counter()
    level4 = result.attention_node("level4")
    seconds = time.perf_counter() - started
    monkeypatch.undo()

    assert seconds < 1.0, f"showing a gate took {seconds:.2f} s"
    assert sorted(work_root.iterdir()) == folders
    assert segmentation.GetMTime() == mask_time
    assert level4.GetName() == "Small CT attention level4" and "level4" not in result.maps_on_disk
    assert level4.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(ijk_to_ras(level4), ijk_to_ras(volume), atol=1e-4)
    assert np.array_equal(image_data_voxels(level4.GetImageData()), written) and written.any()


def test_attention_is_zero_off_the_body(first_run):
    """The engine keeps the maps to the body; the display threshold keeps 0 transparent."""
    _, volume, result, *_ = first_run
    if not result.found:
        pytest.skip("the tiny model found nothing on this CT")
    attention = image_data_voxels(result.outputs.attention_nodes["combined"].GetImageData())
    ct = image_data_voxels(volume.GetImageData())
    body = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((ct > -500).astype(np.uint8)))) == 1
    near_body = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.BinaryFillhole(body), [3, 3, 3])) > 0
    assert (~near_body).any() and not attention[~near_body].any(), "attention over the air around the patient"
    display = result.outputs.attention_nodes["combined"].GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() > 0


def test_a_second_run_updates_the_same_nodes(first_run, tiny_model, tmp_path):
    scene, volume, first, *_ = first_run
    if not first.found:
        pytest.skip("the tiny model found nothing on this CT")
    first.discard_files()
    before = node_ids(scene)
    second = started_run(scene, volume, tiny_model, tmp_path, quality="fast").wait()
    assert node_ids(scene) == before
    assert second.outputs.segmentation_node is first.outputs.segmentation_node
    assert second.outputs.attention_nodes["combined"] is first.outputs.attention_nodes["combined"]
    assert first.attention_node("level2") is None, "discarded files cannot be imported"
    assert second.maps_on_disk["level2"].is_file()
    second.discard_files()  # what the panel does on scene close and before the next run
    assert list(tmp_path.iterdir()) == [] and second.attention_node("level2") is None


def test_a_chosen_segmentation_is_written_into(first_run, tiny_model, tmp_path):
    scene, volume, first, *_ = first_run
    if not first.found:
        pytest.skip("the tiny model found nothing on this CT")
    chosen = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(chosen)
    result = runner.SegmentationRun(scene, volume, chosen, device="cpu", weights=tiny_model, work_root=tmp_path)
    result.start()
    assert result.wait().outputs.segmentation_node is chosen


def test_a_scene_closed_before_the_import_cancels_it(small_ct, tiny_model, tmp_path):
    """The panel runs Slicer's events between the child's end and the import; Close Scene may be one of them."""
    scene = new_scene()
    volume = read_with_slicer(scene, small_ct)
    run = started_run(scene, volume, tiny_model, tmp_path)

    def close_the_scene_once_the_child_ended():
        if not run.running:
            scene.Clear(0)

    with pytest.raises(Cancelled, match="^the scene was closed during the import$"):
        run.wait(idle=close_the_scene_once_the_child_ended)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert list(tmp_path.iterdir()) == []


def test_only_a_known_gate_can_be_shown_first(first_run):
    with pytest.raises(ValueError, match="level9"):
        runner.SegmentationRun(first_run[0], first_run[1], shown_map="level9")


def test_no_pancreas_found_adds_nothing_to_the_scene(tmp_path):
    """A CT of air and water (a phantom): the bundled model finds nothing; an empty segment is no result."""
    scene = new_scene()
    phantom = np.full((40, 48, 48), -1000, np.int16)
    phantom[5:35, 8:40, 8:40] = 0
    image = sitk.GetImageFromArray(phantom)
    image.SetSpacing((3.0, 3.0, 3.0))
    volume = mrml_bridge.image_to_volume_node(image, scene, "Phantom")
    before = scene_state(scene)
    result = started_run(scene, volume, None, tmp_path).wait()
    assert not result.found and result.outputs is None
    assert result.summary().startswith("No pancreas found")
    assert scene_state(scene) == before
    assert list(tmp_path.iterdir()) == []


def test_the_result_line_shows_the_verdict():
    def result(qc, reason=""):
        report = protocol.ChildResult(42.06, 0.83, qc, reason, 5.0, "cpu", "model")
        return runner.RunResult(report, 5.0, None)

    assert result("ok").summary() == "Pancreas 42.1 mL; ok (confidence 0.83)"
    assert not result("ok").needs_checking
    checked = result("check", "reaches the edge of the scan")
    assert checked.summary() == "Pancreas 42.1 mL; check: reaches the edge of the scan (confidence 0.83)"
    assert checked.needs_checking
    assert result("not found", "nothing above 0.5").summary() == "No pancreas found"


# --- Cancel, through a launcher like Slicer's PythonSlicer ---------------------------------------------


@pytest.fixture()
def launcher(tmp_path):
    """A PythonSlicer like the application's (``slicer_app``) and where it writes its child's process ID."""
    pid_file = tmp_path / "python-real.pid"
    return slicer_app.write_launcher(tmp_path, pid_file=pid_file), pid_file


def reap_orphans_of(pgid: int) -> None:
    """Collect processes of the group that were re-parented to this process (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@pytest.fixture()
def subreaper():
    """Orphans of the child's tree come to this process, as to an init that reaps them: a killed process is then
    truly gone, not a zombie (this machine's init reaps nothing)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    yield
    libc.prctl(36, 0, 0, 0, 0)


@pytest.mark.skipif(not POSIX, reason="the launcher stand-in is a POSIX script")
def test_cancel_ends_the_launcher_and_the_real_python_at_once(abdomen_ct, tiny_model, tmp_path, launcher,
                                                               subreaper):
    scene = new_scene()
    volume = read_with_slicer(scene, abdomen_ct)
    before = scene_state(scene)
    script, pid_file = launcher
    work_root = tmp_path / "work"
    work_root.mkdir()
    run = started_run(scene, volume, tiny_model, work_root, python=str(script))
    wait_for_progress(run)
    assert run.running, "the child finished before it could be cancelled"
    real_python = int(pid_file.read_text())
    assert real_python != run.child.pid and os.getpgid(real_python) == run.child.pid
    assert run.child.tree_alive()

    started = time.monotonic()
    run.cancel()
    seconds = time.monotonic() - started

    assert seconds < CANCEL_LIMIT_SECONDS, f"Cancel took {seconds:.1f} s"
    assert not run.child.tree_alive(CANCEL_LIMIT_SECONDS)  # on Linux a zombie nobody reaped counts as gone
    reap_orphans_of(run.child.pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(run.child.pid, 0)  # no process of the tree is left
    with pytest.raises(ProcessLookupError):
        os.kill(real_python, 0)
    with pytest.raises(Cancelled):
        run.finish()
    assert list(work_root.iterdir()) == []
    assert scene_state(scene) == before


@pytest.mark.skipif(not POSIX, reason="process groups are POSIX")
def test_cancel_ends_a_tree_that_ignores_sigterm_everywhere(tmp_path, subreaper):
    """The worst case: every process of the tree ignores SIGTERM (the kill after the grace period ends it)."""
    stubborn = tmp_path / "stubborn"
    stubborn.write_text(f"#!{sys.executable}\nimport signal, subprocess, sys, time\n"
                        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        f"subprocess.Popen([{sys.executable!r}, '-c', 'import signal, time; "
                        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"PROGRESS 0.1 x\", flush=True); "
                        "time.sleep(60)'])\ntime.sleep(60)\n")
    stubborn.chmod(0o755)
    child = runner.ChildProcess([str(stubborn)])
    while not child.stdout_lines():
        time.sleep(0.02)
    started = time.monotonic()
    child.stop()
    assert time.monotonic() - started < CANCEL_LIMIT_SECONDS
    assert not child.tree_alive(CANCEL_LIMIT_SECONDS)  # a SIGKILL lands a moment later on a busy machine
    reap_orphans_of(child.pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(child.pid, 0)


def test_cancel_before_the_child_started_launches_nothing(small_ct, tiny_model, tmp_path):
    scene = new_scene()
    volume = read_with_slicer(scene, small_ct)
    run = started_run(scene, volume, tiny_model, tmp_path)
    run.cancel()  # at once: the input may still be being written
    assert not run.running
    assert run.child is None or not run.child.running
    with pytest.raises(Cancelled):
        run.finish()
    assert list(tmp_path.iterdir()) == []


# --- failures: one line, nothing changed ---------------------------------------------------------------


def test_a_bad_input_fails_with_the_childs_one_line_and_changes_nothing(tiny_model, tmp_path):
    scene = new_scene()
    flat = mrml_bridge.image_to_volume_node(sitk.Image(40, 40, 20, sitk.sitkInt16) + 40, scene, "Flat")
    before = scene_state(scene)
    run = started_run(scene, flat, tiny_model, tmp_path)
    with pytest.raises(UserError, match=r"^the input is constant \(40\); there is nothing to segment") as error:
        run.wait()
    assert "\n" not in str(error.value)
    assert scene_state(scene) == before
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_fail_with_the_childs_one_line(small_ct, tmp_path):
    scene = new_scene()
    volume = read_with_slicer(scene, small_ct)
    broken = tmp_path / "not-a-model.safetensors"
    broken.write_bytes(b"not a model")
    work = tmp_path / "work"
    work.mkdir()
    run = started_run(scene, volume, broken, work)
    with pytest.raises(UserError, match="not-a-model.safetensors") as error:
        run.wait()
    assert "\n" not in str(error.value)
    assert list(work.iterdir()) == []


@pytest.mark.skipif(not POSIX, reason="a POSIX shell script stands in for a crashing interpreter")
def test_a_crashing_child_is_reported_in_one_line_and_changes_nothing(small_ct, tmp_path):
    """What a segfaulting GPU driver looks like from the parent: killed by a signal, a last stderr line."""
    scene = new_scene()
    volume = read_with_slicer(scene, small_ct)
    crashing_python = tmp_path / "python"
    crashing_python.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault' >&2\nkill -SEGV $$\n")
    crashing_python.chmod(0o755)
    before = scene_state(scene)
    run = runner.SegmentationRun(scene, volume, python=str(crashing_python), work_root=tmp_path)
    run.start()
    with pytest.raises(UserError) as error:
        run.wait()
    message = str(error.value)
    assert message.startswith(f"the segmentation process stopped unexpectedly (exit status -{signal.SIGSEGV})")
    assert "Fatal Python error: Segmentation fault" in message and "\n" not in message
    assert scene_state(scene) == before
    assert [p.name for p in tmp_path.iterdir()] == ["python"]


def test_a_missing_interpreter_is_one_clear_line(small_ct, tmp_path):
    scene = new_scene()
    volume = read_with_slicer(scene, small_ct)
    run = runner.SegmentationRun(scene, volume, python=str(tmp_path / "PythonSlicer"), work_root=tmp_path)
    run.start()
    with pytest.raises(UserError, match="PythonSlicer.*was not found"):
        run.wait()
    assert list(tmp_path.iterdir()) == []


def test_what_is_no_ct_is_refused_before_any_child_starts(small_ct, tmp_path, first_run):
    scene = new_scene()
    empty = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(empty)
    run = runner.SegmentationRun(scene, empty, work_root=tmp_path)
    with pytest.raises(UserError, match="has no voxels"):
        run.start()
    assert run.child is None and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="no input CT"):
        runner.SegmentationRun(scene, None)

    labels = slicer.vtkMRMLLabelMapVolumeNode()
    labels.SetName("labels")
    scene.AddNode(labels)
    with pytest.raises(UserError, match="labels is a LabelMapVolumeNode"):
        runner.SegmentationRun(scene, labels)
    assert not runner.is_ct_candidate(labels)

    result = first_run[2]
    if result.found:
        attention = result.outputs.attention_nodes["combined"]
        with pytest.raises(UserError, match="is an attention map of this module"):
            runner.SegmentationRun(first_run[0], attention)
        assert not runner.is_ct_candidate(attention) and runner.is_ct_candidate(first_run[1])


def test_gpu_question_is_answered_by_a_child_process():
    from AttentionUNetSegLib.engine import describe_gpu

    query = runner.GpuQuery(sys.executable)
    assert query.answer() == describe_gpu()
    assert query.done


def test_the_parent_end_imports_no_simpleitk_or_torch():
    """What the Slicer module imports at start-up (runner and what it words results with, protocol, bridge,
    dependencies, user cases) loads neither."""
    import subprocess

    code = ("import sys; from AttentionUNetSegLib import dependencies, mrml_bridge, model_card, outputs, runner, "
            "user_cases; "
            "print(sorted(m for m in ('SimpleITK', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=protocol.child_environment(), check=True)
    assert done.stdout.strip() == "[]"
