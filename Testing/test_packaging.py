"""The Slicer extension's packaging outside Slicer: what CMake installs, the catalog entry, the requirements.

No Slicer application runs here, so these tests catch the classic extension bugs before a user's Slicer
does: a file not installed because CMake does not list it, a tool shipped that should not be, an index entry
the catalog rejects, a requirement list that asks Slicer's Python for more than the child imports.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import tomllib
from PIL import Image

from AttentionUNetSegLib import runner

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
SLICER_PATH_MODULES = ("runner", "protocol", "mrml_bridge", "model_card", "segment_description")


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


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_child_imports_nothing_slicer_does_not_install():
    """Every third-party import of the shipped runtime is bundled with Slicer, installed from the requirement
    list, or torch (the PyTorch extension)."""
    scripts, _ = module_cmake_files()
    # psutil: used when present (imageio.available_memory), never required
    allowed = {"numpy", "SimpleITK", "safetensors", "torch", "slicer", "vtkmodules", "vtk", "qt", "tqdm", "psutil"}
    lib = [MODULE_DIR / s for s in scripts if s.startswith("AttentionUNetSegLib/")]
    third_party = set().union(*(imported_modules(path) for path in lib)) - set(sys.stdlib_module_names)
    assert third_party <= allowed, third_party - allowed


def test_runtime_and_tests_of_the_slicer_path_pass_ruff():
    lib = MODULE_DIR / "AttentionUNetSegLib"
    files = [MODULE_FILE, *(lib / f"{name}.py" for name in SLICER_PATH_MODULES),
             *(REPO / "Testing" / f"test_{name}.py" for name in ("packaging", "module_ui", "runner", "protocol"))]
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", *map(str, files)],
                          capture_output=True, text=True, check=False, cwd=REPO)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_python_file_of_the_extension_parses_as_python_3_9():
    """Slicer 5.8 runs Python 3.9: no match statements, parenthesised context managers or newer syntax."""
    scripts, _ = module_cmake_files()
    for script in scripts:
        ast.parse((MODULE_DIR / script).read_text(encoding="utf-8"), filename=script, feature_version=(3, 9))


def test_the_build_time_ctests_run_the_protocol_the_panel_uses():
    text = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()
    assert "-m ${MODULE_NAME}Lib.protocol segment --help" in text


