"""The Slicer extension outside Slicer: its packaging, its panel file, and the module's child-process run.

No Slicer application runs here, so these tests catch the classic extension bugs before a user's Slicer
does: a file not installed because CMake does not list it, a widget renamed in the .ui but not in the code,
a parameter bound to a widget of the wrong class, an index entry the catalog rejects. The run itself (the
CLI in a child process, its PROGRESS lines, the import into a real MRML scene) is tested for real with
slicer-core.
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import tomllib
from AttentionUNetSegLib import mrml_bridge, runner
from AttentionUNetSegLib.errors import Cancelled, UserError
from AttentionUNetSegLib.imageio import read_image
from PIL import Image
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonMath import vtkMatrix4x4

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "AttentionUNetSeg"
MODULE_FILE = MODULE_DIR / "AttentionUNetSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AttentionUNetSeg.ui"
INDEX_ENTRY = REPO / "Resources" / "AttentionUNetSeg.json"
RAW_URL = re.compile(r"^https://raw\.githubusercontent\.com/attentionunetseg/SlicerAttentionUNetSeg/main/(?P<path>\S+)$")

# The catalog-entry schema v1.0.1 (Slicer/Slicer, Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json),
# restated: three required keys, no others than these, and the value rules of each.
CATALOG_ENTRY_SCHEMA = {
    "type": "object",
    "required": ["$schema", "category", "scm_url"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"},
        "category": {"type": "string"},
        "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"},
        "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"},
        "tier": {"type": "integer", "enum": [1, 3, 5]},
    },
}
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"


# --- packaging -----------------------------------------------------------------------------------------


def cmake_set(text: str, variable: str) -> list[str]:
    """The words of ``set(VARIABLE ...)`` (quoted strings kept whole, comments dropped)."""
    match = re.search(rf"^\s*set\(\s*{variable}\b(?P<body>.*?)\)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no set({variable} ...)"
    body = re.sub(r"#[^\n]*", "", match.group("body"))
    return [word.strip('"') for word in re.findall(r'"[^"]*"|\S+', body)]


TOOLS_PACKAGE = "AttentionUNetSegTools"


def module_folder_files() -> set[str]:
    """What the extension must install: the module folder but its tests, the tools and build leftovers."""
    files = set()
    for path in MODULE_DIR.rglob("*"):
        relative = path.relative_to(MODULE_DIR)
        skipped = (relative.parts[0] in ("Testing", TOOLS_PACKAGE) or path.name == "CMakeLists.txt"
                   or path.suffix == ".pyc"
                   or any(part == "__pycache__" or part.endswith(".egg-info") for part in relative.parts))
        if path.is_file() and not skipped:
            files.add(relative.as_posix())
    return files


def module_cmake_files() -> tuple[list[str], list[str]]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    name = cmake_set(text, "MODULE_NAME")[0]
    expand = lambda words: [w.replace("${MODULE_NAME}", name) for w in words]
    return expand(cmake_set(text, "MODULE_PYTHON_SCRIPTS")), expand(cmake_set(text, "MODULE_PYTHON_RESOURCES"))


def test_module_cmakelists_lists_every_file_of_the_module_folder():
    scripts, resources = module_cmake_files()
    listed = set(scripts) | set(resources)
    unlisted = sorted(module_folder_files() - listed)
    assert not unlisted, f"not installed with the extension, add to AttentionUNetSeg/CMakeLists.txt: {unlisted}"
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)


def test_every_file_the_module_cmakelists_lists_exists():
    scripts, resources = module_cmake_files()
    missing = [f for f in scripts + resources if not (MODULE_DIR / f).is_file()]
    assert not missing, f"listed in AttentionUNetSeg/CMakeLists.txt but missing: {missing}"
    assert len(set(scripts + resources)) == len(scripts + resources), "a file is listed twice"


def test_module_cmakelists_builds_the_module_with_generic_tests_and_its_self_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert cmake_set(text, "MODULE_NAME") == ["AttentionUNetSeg"]
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*?\)", text, re.DOTALL)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing)" in text
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()


def top_cmakelists() -> str:
    return (REPO / "CMakeLists.txt").read_text()


def test_extension_metadata_is_complete_and_points_at_real_files():
    text = top_cmakelists()
    project = re.search(r"^project\((\w+)\)", text, re.MULTILINE).group(1)
    assert project == INDEX_ENTRY.stem == "AttentionUNetSeg"
    assert not project.startswith("Slicer"), "the catalog rejects extension names starting with 'Slicer'"
    homepage = cmake_set(text, "EXTENSION_HOMEPAGE")
    assert homepage == ["https://github.com/attentionunetseg/SlicerAttentionUNetSeg"]
    assert cmake_set(text, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert cmake_set(text, "EXTENSION_DEPENDS") == ["PyTorch"]
    for variable in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert len(" ".join(cmake_set(text, variable))) > 20, f"{variable} is empty"
    urls = cmake_set(text, "EXTENSION_ICONURL") + cmake_set(text, "EXTENSION_SCREENSHOTURLS")
    assert len(urls) >= 2
    for url in urls:  # raw URLs of files in this repository: the files must be committed there
        match = RAW_URL.match(url)
        assert match, f"{url} is not a raw URL of this repository"
        image = Image.open(REPO / match.group("path"))
        assert image.format == "PNG"
    icon = Image.open(REPO / RAW_URL.match(cmake_set(text, "EXTENSION_ICONURL")[0]).group("path"))
    assert icon.size == (128, 128)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(AttentionUNetSeg)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_module_icon_is_a_128_pixel_png():
    image = Image.open(MODULE_DIR / "Resources" / "Icons" / "AttentionUNetSeg.png")
    assert (image.format, image.size) == ("PNG", (128, 128))


def test_index_entry_follows_the_catalog_schema_and_agrees_with_cmake():
    entry = json.loads(INDEX_ENTRY.read_text())
    jsonschema.validate(entry, CATALOG_ENTRY_SCHEMA)
    assert entry["$schema"] == SCHEMA_URL
    text = top_cmakelists()
    assert entry["category"] == cmake_set(text, "EXTENSION_CATEGORY")[0]
    assert entry["scm_url"] == cmake_set(text, "EXTENSION_HOMEPAGE")[0]
    assert entry["build_dependencies"] == cmake_set(text, "EXTENSION_DEPENDS")
    assert entry["scm_url"].rsplit("/", 1)[1].startswith("Slicer"), "the repository name must start with Slicer"


def test_the_extension_ships_no_tool_and_the_runtime_imports_none():
    scripts, _ = module_cmake_files()
    assert not [s for s in scripts if s.startswith(TOOLS_PACKAGE)]
    for path in (MODULE_DIR / "AttentionUNetSegLib").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(rf"^\s*(from|import)\s+{TOOLS_PACKAGE}", text, re.MULTILINE), path


def test_slicer_requirements_are_the_runtime_dependencies_without_torch():
    """What the panel installs into Slicer's Python is what the runtime needs (the child reports progress
    in lines, so no tqdm), never slicer-core or vtk."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(runner.SLICER_REQUIREMENTS) == {d for d in dependencies if not d.startswith(("torch", "tqdm"))}
    assert f"torch{runner.TORCH_REQUIREMENT}" in dependencies
    assert not any(r.lower().startswith(("slicer", "vtk")) for r in runner.SLICER_REQUIREMENTS)


# --- the module file and its panel ---------------------------------------------------------------------


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def slicer_parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def widget_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return next(iter(prop)).text
    return None


# Widgets the module code drives directly, and the class each must have for that code to work.
EXPECTED_WIDGET_CLASSES = {
    "applyButton": "QPushButton",
    "loadSampleButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "resultLabel": "QLabel",
    "gpuLabel": "QLabel",
    "settingsCollapsibleButton": "ctkCollapsibleButton",
    "attentionMapComboBox": "QComboBox",
    "attentionOpacitySlider": "ctkSliderWidget",
    "attentionColorMapComboBox": "QComboBox",
}


def test_every_widget_the_module_uses_exists_in_the_ui_with_the_expected_class():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module uses no widget?"
    missing = sorted(used - set(widgets))
    assert not missing, f"the module uses widgets the .ui lacks: {missing}"
    assert used <= set(EXPECTED_WIDGET_CLASSES), f"add the new widgets to EXPECTED_WIDGET_CLASSES: {used}"
    for name in used:
        assert widgets[name].get("class") == EXPECTED_WIDGET_CLASSES[name], name


def parameter_annotations() -> dict[str, str]:
    """Parameter name -> its annotation's source text, from the module's parameterNodeWrapper class."""
    tree = ast.parse(MODULE_FILE.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AttentionUNetSegParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}


def widget_class_for(annotation: str) -> set[str]:
    """The widget classes Slicer's parameterNodeWrapper connects to a parameter of this type."""
    if annotation.startswith("vtkMRML"):
        return {"qMRMLNodeComboBox"}
    if annotation == "bool":
        return {"QCheckBox", "QPushButton"}
    if annotation.startswith("Annotated[float") and "WithinRange" in annotation:
        return {"ctkSliderWidget", "QDoubleSpinBox"}
    if annotation.startswith("Annotated[str") and "Choice(" in annotation:
        return {"QComboBox"}
    raise AssertionError(f"no known widget for a parameter of type {annotation}")


def test_every_parameter_is_bound_to_one_widget_of_a_class_that_can_show_it():
    parameters = parameter_annotations()
    bound = {}
    for widget in ui_widgets().values():
        parameter = slicer_parameter_name(widget)
        if parameter:
            assert parameter not in bound, f"{parameter} is bound to two widgets"
            bound[parameter] = widget
    assert set(bound) == set(parameters)
    for parameter, widget in bound.items():
        assert widget.get("class") in widget_class_for(parameters[parameter]), (parameter, widget.get("class"))
        if widget.get("class") == "QPushButton":
            assert widget_property(widget, "checkable") == "true", f"{parameter}: a bool needs a checkable button"


def test_node_selectors_offer_the_node_types_of_their_parameters():
    parameters = parameter_annotations()
    for widget in ui_widgets().values():
        parameter = slicer_parameter_name(widget)
        if widget.get("class") == "qMRMLNodeComboBox":
            types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert types == [parameters[parameter]]


def test_output_selector_creates_a_new_segmentation_by_default():
    selector = ui_widgets()["outputSegmentationSelector"]
    assert widget_property(selector, "noneEnabled") == "true"
    assert widget_property(selector, "noneDisplay") == "Create new segmentation"


def test_module_file_compiles_for_python_3_9_and_passes_ruff():
    py_compile.compile(str(MODULE_FILE), cfile=str(REPO / ".pytest_cache" / "AttentionUNetSeg.pyc"), doraise=True)
    ast.parse(MODULE_FILE.read_text(), feature_version=(3, 9))
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", str(MODULE_FILE)], capture_output=True, text=True,
                          check=False, cwd=REPO)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_python_file_of_the_extension_parses_as_python_3_9():
    """Slicer 5.8 runs Python 3.9: no match statements, parenthesised context managers or newer syntax."""
    scripts, _ = module_cmake_files()
    for script in scripts:
        ast.parse((MODULE_DIR / script).read_text(encoding="utf-8"), filename=script, feature_version=(3, 9))


def test_module_title_category_and_self_test():
    text = MODULE_FILE.read_text()
    assert 'self.parent.title = "Pancreas Attention U-Net"' in text
    assert 'self.parent.categories = ["Segmentation"]' in text
    assert "Oktay" in text and "Research use only" in text
    tree = ast.parse(text)
    test = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AttentionUNetSegTest")
    assert [ast.unparse(b) for b in test.bases] == ["ScriptedLoadableModuleTest"]
    assert "CTAAbdomenPanoramix" in text
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
    switches = [name for name in names if re.search(r"skip|environ|getenv", name, re.IGNORECASE)]
    assert not switches, f"the self-test must not have a switch that turns inference off: {switches}"


def test_only_the_module_file_touches_qt_ctk_or_the_slicer_application():
    offenders = []
    for path in (MODULE_DIR / "AttentionUNetSegLib").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import|from)\s+(qt|ctk)\b|\bslicer\.app\b", text, re.MULTILINE):
            offenders.append(path.relative_to(REPO).as_posix())
    assert not offenders


def test_help_text_shows_the_model_card_summary_escaped():
    card = ("# Pancreas model\n\nA 3D Attention U-Net trained on 3 CTs <small>.\n\n## Training\n\nDetails.\n\n"
            "## Limitations\n\n- adults only\n- contrast-enhanced CT\n")
    html = runner.model_card_summary_html(card)
    assert "A 3D Attention U-Net trained on 3 CTs &lt;small&gt;." in html
    assert "<b>Limitations:</b><br>- adults only<br>- contrast-enhanced CT" in html
    assert "Details" not in html


# --- the child-process protocol ------------------------------------------------------------------------


def test_progress_lines_are_parsed_and_other_lines_ignored():
    assert runner.parse_progress("PROGRESS 0.420 Tile 3 of 8") == runner.Progress(0.42, "Tile 3 of 8")
    assert runner.parse_progress("PROGRESS 1.000 Done") == runner.Progress(1.0, "Done")
    assert runner.parse_progress("PROGRESS 0.5") == runner.Progress(0.5, "")
    assert runner.parse_progress("PROGRESS 1.7 x") == runner.Progress(1.0, "x")
    for other in ("Pancreas 12.0 mL; 3.1 s on cpu", "PROGRESS soon", "progress 0.5 x", ""):
        assert runner.parse_progress(other) is None


def test_segment_command_is_the_cli_with_progress_lines(tmp_path):
    command = runner.segment_command("py", tmp_path / "in.nrrd", tmp_path / "out.nrrd", tmp_path / "maps",
                                     device="cuda", quality="fast", weights=tmp_path / "m.safetensors")
    assert command[:4] == ["py", "-m", "AttentionUNetSegLib.cli", "segment"]
    assert command[command.index("--progress") + 1] == "lines"
    assert command[command.index("--device") + 1] == "cuda"
    assert "--fast" in command and command[-2:] == ["--weights", str(tmp_path / "m.safetensors")]
    assert "--fast" not in runner.segment_command("py", tmp_path, tmp_path, tmp_path, quality="full")
    with pytest.raises(ValueError):
        runner.segment_command("py", tmp_path, tmp_path, tmp_path, quality="best")


def new_scene_with_ct(small_ct):
    scene = slicer.vtkMRMLScene()
    for _ in range(3):  # slice views, as Slicer has them
        scene.AddNode(slicer.vtkMRMLSliceCompositeNode())
    volume = mrml_bridge.image_to_volume_node(read_image(small_ct), scene, "Small CT")
    return scene, volume


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def voxels(node) -> np.ndarray:
    return sitk.GetArrayFromImage(mrml_bridge.volume_node_to_image(node))


def segment_ml(segmentation_node) -> float:
    """The Pancreas segment's volume as the scene holds it."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    return int(np.count_nonzero(values)) * float(np.prod(labelmap.GetSpacing())) / 1000.0


def scene_state(scene, result) -> tuple:
    """Node IDs and the voxels of a result: what a cancelled or failed run must not change."""
    maps = {name: float(voxels(node).sum()) for name, node in result.outputs.attention_nodes.items()}
    return node_ids(scene), segment_ml(result.outputs.segmentation_node), maps


def started_run(scene, volume, tiny_model, work_root, **options) -> runner.SegmentationRun:
    run = runner.SegmentationRun(scene, volume, device="cpu", weights=tiny_model, work_root=work_root, **options)
    run.start()
    return run


@pytest.fixture()
def scene_with_ct(small_ct):
    return new_scene_with_ct(small_ct)


@pytest.fixture(scope="module")
def first_run(small_ct, tiny_model, tmp_path_factory):
    """One real run, shared: the tests after it check that later runs and cancels keep the scene consistent."""
    scene, volume = new_scene_with_ct(small_ct)
    work_root = tmp_path_factory.mktemp("first_run")
    updates: list[runner.Progress] = []
    result = started_run(scene, volume, tiny_model, work_root).wait(updates.append)
    return scene, volume, result, updates, work_root


def test_a_run_segments_in_a_child_process_and_imports_into_the_scene(first_run):
    scene, volume, result, updates, work_root = first_run
    fractions = [u.fraction for u in updates]
    assert len(updates) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(u.text for u in updates)
    assert result.device == "cpu" and result.seconds > 0

    segmentation = result.outputs.segmentation_node
    assert scene.IsNodePresent(segmentation)
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
    assert result.volume_ml == pytest.approx(segment_ml(segmentation), rel=1e-6)
    assert set(result.outputs.attention_nodes) == set(runner.ATTENTION_MAP_CHOICES)
    for node in result.outputs.attention_nodes.values():
        values = voxels(node)
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > values.min()
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(volume), atol=1e-4)
    assert list(work_root.iterdir()) == [], "the run left its temporary files behind"


def test_a_second_run_updates_the_same_nodes(first_run, tiny_model, tmp_path):
    scene, volume, first, *_ = first_run
    before = node_ids(scene)
    second = started_run(scene, volume, tiny_model, tmp_path, quality="fast").wait()
    assert node_ids(scene) == before
    assert second.outputs.segmentation_node is first.outputs.segmentation_node
    assert {k: n.GetID() for k, n in second.outputs.attention_nodes.items()} == {
        k: n.GetID() for k, n in first.outputs.attention_nodes.items()}


def test_cancel_stops_the_child_and_leaves_the_scene_unchanged(first_run, tiny_model, tmp_path):
    scene, volume, first, *_ = first_run
    before = scene_state(scene, first)
    run = started_run(scene, volume, tiny_model, tmp_path)
    while run.running and not run.poll():  # cancel once the child reports it is working
        time.sleep(0.05)
    assert run.running, "the child finished before it could be cancelled"
    run.cancel()
    assert not run.running
    with pytest.raises(Cancelled):
        run.finish()
    assert scene_state(scene, first) == before
    assert list(tmp_path.iterdir()) == []


def test_a_bad_input_fails_with_the_childs_one_line_and_changes_nothing(scene_with_ct, tiny_model, tmp_path):
    scene, volume = scene_with_ct
    constant = sitk.Image(volume.GetImageData().GetDimensions(), sitk.sitkFloat32) + 40.0  # no air, no structure
    flat = mrml_bridge.image_to_volume_node(constant, scene, "Flat")
    before = node_ids(scene)
    run = started_run(scene, flat, tiny_model, tmp_path)
    with pytest.raises(UserError, match=r"^Flat\.nrrd is constant \(40\); there is nothing to segment") as error:
        run.wait()
    assert "\n" not in str(error.value)
    assert node_ids(scene) == before
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_fail_with_the_childs_one_line(scene_with_ct, tmp_path):
    scene, volume = scene_with_ct
    broken = tmp_path / "not-a-model.safetensors"
    broken.write_bytes(b"not a model")
    work = tmp_path / "work"
    work.mkdir()
    run = runner.SegmentationRun(scene, volume, device="cpu", weights=broken, work_root=work)
    run.start()
    with pytest.raises(UserError, match="not-a-model.safetensors") as error:
        run.wait()
    assert "\n" not in str(error.value)
    assert list(work.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell script stands in for a crashing interpreter")
def test_a_crashing_child_is_reported_in_one_line_and_changes_nothing(scene_with_ct, tmp_path):
    """What a segfaulting GPU driver looks like from the parent: killed by a signal, a last stderr line."""
    scene, volume = scene_with_ct
    crashing_python = tmp_path / "python"
    crashing_python.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault' >&2\nkill -SEGV $$\n")
    crashing_python.chmod(0o755)
    before = node_ids(scene)
    run = runner.SegmentationRun(scene, volume, python=str(crashing_python), work_root=tmp_path)
    run.start()
    with pytest.raises(UserError) as error:
        run.wait()
    message = str(error.value)
    assert message.startswith("the segmentation process stopped unexpectedly (exit status -11)")
    assert "Fatal Python error: Segmentation fault" in message and "\n" not in message
    assert node_ids(scene) == before
    assert [p.name for p in tmp_path.iterdir()] == ["python"]


def test_an_empty_volume_node_is_refused_before_any_child_starts(tmp_path):
    scene = slicer.vtkMRMLScene()
    empty = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(empty)
    run = runner.SegmentationRun(scene, empty, work_root=tmp_path)
    with pytest.raises(UserError, match="has no voxels"):
        run.start()
    assert run.child is None and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="no input CT"):
        runner.SegmentationRun(scene, None)


def test_gpu_question_is_answered_by_a_child_process():
    from AttentionUNetSegLib.engine import describe_gpu

    query = runner.GpuQuery(sys.executable)
    assert query.answer() == describe_gpu()
    assert query.done


@pytest.mark.parametrize("label", list(runner.ATTENTION_COLOUR_MAPS))
def test_attention_colour_maps_exist_in_a_bare_scene(first_run, label):
    scene, _, result, *_ = first_run
    node = result.outputs.attention_nodes["combined"]
    runner.set_attention_colour_map(scene, node, label)
    colour = scene.GetNodeByID(node.GetDisplayNode().GetColorNodeID())
    assert colour is not None and colour.GetNumberOfColors() > 1
    runner.set_attention_colour_map(scene, node, label)  # twice: the colour node is not added again
    assert len([i for i in node_ids(scene) if i == colour.GetID()]) == 1


def test_the_default_colour_map_is_the_bridges_heat_map(first_run):
    scene, _, result, *_ = first_run
    node = result.outputs.attention_nodes["level3"]
    bridge_default = node.GetDisplayNode().GetColorNodeID()
    runner.set_attention_colour_map(scene, node, next(iter(runner.ATTENTION_COLOUR_MAPS)))
    assert node.GetDisplayNode().GetColorNodeID() == bridge_default


def test_missing_requirements_names_what_is_not_installed():
    assert runner.missing_requirements() == []
    assert runner.missing_requirements(("numpy>=1", "surely-not-installed-package>=1.0")) == [
        "surely-not-installed-package>=1.0"]


def test_the_child_imports_this_copy_of_the_lib():
    env = runner.child_environment({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(MODULE_DIR), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"
