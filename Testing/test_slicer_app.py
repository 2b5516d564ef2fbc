"""The Slicer application outside Slicer (``slicer_app``): each stand-in against what Slicer does, the module's
self-test run as Slicer's ctest runs it (with torch, without torch, and on the Slicer preview), and the shipped
code against the namespace and the oldest Slicer the README names.

The namespace is the one every test of this suite sees (``conftest`` installs it before anything imports
``slicer``).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import unittest
from pathlib import Path

import pytest
import slicer
import slicer_app

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "AttentionUNetSeg"
SHIPPED = [MODULE_DIR / "AttentionUNetSeg.py", *sorted((MODULE_DIR / "AttentionUNetSegLib").glob("*.py"))]
SELF_TEST = Path(__file__).resolve().parent / "run_slicer_selftest.py"
PREVIEW_PYTHON = REPO / ".venv-slicer-preview" / "bin" / "python"
SELF_TEST_SECONDS = 240
# vtkSegment's Get/Set/HasTerminology came with Slicer 5.10 (commit 49a251067d, 2025-03-05; v5.10.0
# Libs/vtkSegmentationCore/vtkSegment.h:58-59); 5.8 has only the tag (GetTerminologyEntryTagName, GetTag).
NEWER_THAN_OLDEST_SLICER = {"GetTerminology": "5.10", "SetTerminology": "5.10", "HasTerminology": "5.10"}


# --- the namespace --------------------------------------------------------------------------------------


def test_the_namespace_holds_slicers_kits_and_not_the_others():
    kits = slicer_app.slicer_core_kits()
    left_out = {kit for kit in kits if not slicer_app.in_application_namespace(kit)}
    assert left_out == {"vtkITK", "vtkRemoteIO", "vtkTeem"}  # imported as modules of their own in Slicer
    for name in ("vtkMRMLScene", "vtkMRMLScalarVolumeNode", "vtkSegment", "vtkOrientedImageData",
                 "vtkSlicerSegmentationsModuleLogic", "vtkMRMLColorLogic", "vtkMRMLSubjectHierarchyNode"):
        assert hasattr(slicer, name), name
    assert slicer.vtkMRMLScene is slicer_app.kit_module("MRMLCore").vtkMRMLScene  # the compiled class itself


def test_control_the_namespace_catches_what_slicer_cores_flat_package_hid():
    """N1: the bridge called slicer.vtkTeemNRRDReader, which slicer-core has and the application lacks."""
    flat = subprocess.run([sys.executable, "-c", "import slicer; slicer.vtkTeemNRRDReader(); slicer.arrayFromVolume"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert flat.returncode == 0, flat.stderr[-1000:]
    with pytest.raises(AttributeError, match="vtkTeemNRRDReader"):
        slicer.vtkTeemNRRDReader()
    with pytest.raises(AttributeError):
        slicer.vtkITKArchetypeImageSeriesScalarReader()
    assert not hasattr(slicer, "arrayFromVolume")  # slicer.util's functions stay in slicer.util
    import vtkITK
    import vtkTeem

    assert vtkTeem.vtkTeemNRRDReader is slicer_app.kit_module("vtkTeem").vtkTeemNRRDReader
    assert vtkITK.vtkITKArchetypeImageSeriesScalarReader is not None
    assert slicer.util.arrayFromVolume.__module__ == "slicer.util"


def slicer_attributes(source: str) -> set[str]:
    """The ``slicer.X`` names a source uses."""
    return {node.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer"}


def test_the_shipped_code_uses_only_what_the_applications_slicer_holds():
    missing = {f"{path.name}: slicer.{name}" for path in SHIPPED
               for name in slicer_attributes(path.read_text(encoding="utf-8")) if not hasattr(slicer, name)}
    assert not missing


def test_control_the_source_check_catches_a_flattened_name():
    source = "reader = slicer.vtkTeemNRRDReader()\nnode = slicer.vtkMRMLScalarVolumeNode()\n"
    assert [name for name in slicer_attributes(source) if not hasattr(slicer, name)] == ["vtkTeemNRRDReader"]


def newer_apis(source: str) -> list[str]:
    """The calls of methods newer than the oldest supported Slicer (comments may name them)."""
    called = {node.func.attr for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    return [f"{name} (Slicer {version})" for name, version in NEWER_THAN_OLDEST_SLICER.items() if name in called]


def test_no_shipped_code_uses_an_api_newer_than_the_oldest_supported_slicer():
    used = {path.name: newer_apis(path.read_text(encoding="utf-8")) for path in SHIPPED}
    assert not {name: apis for name, apis in used.items() if apis}


def test_control_the_api_check_catches_n2():
    old_line = "segmentation.GetSegment(segment_id).SetTag(name, segment.GetTerminology())"
    assert newer_apis(old_line) == ["GetTerminology (Slicer 5.10)"]


def test_slicer_packaging_is_imported_only_where_its_absence_is_handled():
    """``slicer.packaging`` arrived in Slicer 5.12: every import of it must fall back on ImportError."""
    for path in SHIPPED:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {id(node) for handler_try in ast.walk(tree) if isinstance(handler_try, ast.Try)
                   and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in handler_try.handlers)
                   for node in ast.walk(ast.Module(body=handler_try.body, type_ignores=[]))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "slicer.packaging":
                assert id(node) in guarded, f"{path.name}:{node.lineno}"


# --- the application's scene, events, launcher and sample data -----------------------------------------


def test_the_applications_slice_views_survive_a_scene_clear():
    """N3's ground: Slicer's slice composite nodes are singletons, so the self-test's ``mrmlScene.Clear()``
    keeps them, with no foreground; a bare slicer-core scene has none at all."""
    import slicer_core

    assert slicer_core.vtkMRMLScene().GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0
    scene, _ = slicer_app.application_scene()
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    composite.SetForegroundVolumeID("vtkMRMLScalarVolumeNode1")
    scene.Clear()
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    assert [c.GetLayoutName() for c in composites] == list(slicer_app.SLICE_VIEWS)
    assert all(c.GetForegroundVolumeID() is None for c in composites)
    assert scene.GetNodeByID("vtkMRMLPETProceduralColorNodePET-Heat") is not None  # the Colors module's


def test_qt_timers_fire_only_when_the_application_processes_events():
    import qt

    fired = []
    timer = qt.QTimer()
    timer.setInterval(0)
    timer.connect("timeout()", lambda: fired.append("repeating"))
    timer.start()
    qt.QTimer.singleShot(0, lambda: fired.append("once"))
    time.sleep(0.01)
    assert fired == []
    slicer.app.processEvents()
    slicer.app.processEvents()
    timer.stop()
    slicer.app.processEvents()
    assert fired == ["repeating", "once", "repeating"]
    with pytest.raises(ValueError, match="no signal"):
        timer.connect("clicked()", print)


@pytest.mark.skipif(os.name != "posix", reason="the launcher stand-in is a POSIX script")
def test_python_slicer_runs_the_real_python_as_its_child_in_its_process_group(tmp_path):
    launcher = slicer_app.write_launcher(tmp_path, pid_file=tmp_path / "pid")
    probe = "import os; print(os.getpid(), os.getpgid(0))"
    run = subprocess.run([str(launcher), "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                         start_new_session=True)
    pid, group = map(int, run.stdout.split())
    assert pid == int((tmp_path / "pid").read_text()) and group != os.getpgid(0)


def test_sample_data_reads_the_local_file_into_the_scene_and_refuses_unknown_names(small_ct, monkeypatch):
    import SampleData

    monkeypatch.setitem(slicer_app.SAMPLE_DATA, "CTAAbdomenPanoramix", small_ct)
    before = slicer.mrmlScene.GetNumberOfNodes()
    node = SampleData.SampleDataLogic().downloadSample("CTAAbdomenPanoramix")
    try:
        assert node.GetImageData().GetDimensions() == (122, 101, 30) and node.GetDisplayNode() is not None
        with pytest.raises(ValueError, match="unknown sample"):
            SampleData.SampleDataLogic().downloadSample("MRHead")
    finally:
        slicer.mrmlScene.Clear()
    assert slicer.mrmlScene.GetNumberOfNodes() <= before


def test_a_self_test_is_run_as_slicers_test_runner_runs_it():
    """``runTest`` runs every method with "test" in its name; ``runUnitTest`` raises on failure, passes a skip."""
    calls = []

    class Probe(slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest):
        def setUp(self):
            calls.append("setUp")

        def test_one(self):
            calls.append("one")

    Probe().runTest()
    assert calls == ["setUp", "one"]
    module = type(sys)("probe_module")
    module.ProbeTest = type("ProbeTest", (unittest.TestCase,), {"test_fails": lambda self: self.fail("x")})
    module.SkipTest = type("SkipTest", (unittest.TestCase,), {"test_skips": lambda self: self.skipTest("y")})
    sys.modules["probe_module"] = module
    try:
        with pytest.raises(Exception):  # noqa: B017 -- slicer.testing raises a bare Exception
            slicer.testing.runUnitTest([], "probe_module.ProbeTest")
        slicer.testing.runUnitTest([], "probe_module.SkipTest")
    finally:
        del sys.modules["probe_module"]


# --- the module's self-test, as the py_AttentionUNetSeg ctest runs it ------------------------------------


def run_self_test(abdomen_ct, python=sys.executable, module_dir=MODULE_DIR, without=""):
    command = [str(python), str(SELF_TEST), "--sample-ct", str(abdomen_ct), "--module-dir", str(module_dir)]
    if without:
        command += ["--without", without]
    return subprocess.run(command, capture_output=True, text=True, timeout=SELF_TEST_SECONDS, check=False,
                          cwd=REPO)


def test_the_self_test_segments_for_real_and_passes(abdomen_ct):
    run = run_self_test(abdomen_ct)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "test_SegmentPancreasOnSampleCT" in run.stderr and "... ok" in run.stderr and "skipped" not in run.stderr
    assert "slicer-core 5.12" in run.stdout


def test_the_self_test_skips_with_its_reason_where_torch_is_missing(abdomen_ct):
    """N4: the Extensions Index's build machines never install torch; ctest counts the skip as a pass."""
    run = run_self_test(abdomen_ct, without="torch")
    assert run.returncode == 0, run.stderr[-4000:]
    assert re.search(r"skipped .needs torch>=2\.1,<3 in Slicer's Python", run.stderr), run.stderr[-2000:]


def test_control_the_self_test_catches_an_attention_map_that_is_never_shown(abdomen_ct, tmp_path):
    """N3: without the showAttention call the slice views have no foreground; the self-test must fail there."""
    copy = tmp_path / "AttentionUNetSeg"
    copy.mkdir()
    for part in ("AttentionUNetSegLib", "Resources"):
        (copy / part).symlink_to(MODULE_DIR / part)
    source = (MODULE_DIR / "AttentionUNetSeg.py").read_text(encoding="utf-8")
    checked = '        self.assertResultOnTheInputGrid(volume, first, "combined")\n'
    shown = '        logic.showAttention("combined")\n' + checked
    assert shown in source
    (copy / "AttentionUNetSeg.py").write_text(source.replace(shown, checked, 1), encoding="utf-8")
    run = run_self_test(abdomen_ct, module_dir=copy)
    assert run.returncode != 0
    assert "the map is not shown" in run.stderr, run.stderr[-3000:]


@pytest.mark.skipif(not PREVIEW_PYTHON.is_file() and not os.environ.get("CI"),
                    reason="the preview's environment is missing: run 'bash .ci/setup test'")
def test_the_self_test_passes_on_the_slicer_preview(abdomen_ct):
    run = run_self_test(abdomen_ct, python=PREVIEW_PYTHON)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "slicer-core 5.13" in run.stdout and "... ok" in run.stderr and "skipped" not in run.stderr
