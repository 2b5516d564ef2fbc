"""The Slicer extension's packaging outside Slicer: what CMake installs, the catalog entry, the requirements.

No Slicer application runs here, so these tests catch the classic extension bugs before a user's Slicer
does: a file not installed because CMake does not list it, a tool shipped that should not be, an index entry
the catalog rejects, a requirement list that asks Slicer's Python for more than the child imports.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import tomllib
from PIL import Image

from AttentionUNetSegLib import dependencies

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
        "tier": {"type": "integer", "minimum": 1, "maximum": 5},
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
SLICER_PATH_MODULES = ("runner", "protocol", "mrml_bridge", "model_card", "segment_description", "dependencies")


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


# --- the Extensions Index's checks, offline ------------------------------------------------------------
#
# A pull request that adds AttentionUNetSeg.json to Slicer/ExtensionsIndex runs two workflows there:
# "Extension Validation" (scripts/check_description_files.py: it clones scm_url at scm_revision and checks the
# description file, the clone and the clone's top-level CMakeLists.txt) and "Lint" (pre-commit: prettier,
# whitespace hooks, check-jsonschema). Each check below restates one of theirs that needs no network, read at
# ExtensionsIndex commit 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c (branch main). The branch 5.12 (a8ca7774)
# runs the same script; 5.10 (13fc22ff) the same but check_repository_size; 5.8 (c6920ce8) only Lint and an
# older script (category present, "slicer" in the repository name, scm_url syntax), all implied by these.
# Each check_* function below has the name of the function of check_description_files.py it restates;
# lint restates the Lint workflow's hooks.
# Not restated, as they need the network: check_clone_repository (git clone and checkout), the download in
# validate_image_url, check_git_repository_topics (GitHub API: the topic 3d-slicer-extension) and the
# download of the $schema URL in check_json_schema (that schema is restated above).
INDEX_COMMIT = "07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c"
# A few names of the index's accepted categories (ACCEPTED_EXTENSION_CATEGORIES) that could describe us.
INDEX_CATEGORIES = ("Analysis", "Quantification", "Segmentation", "Utilities")
# Extensions we may build on: PyTorch.json is in the index on main, 5.12, 5.10 and 5.8 (its repository is
# SlicerPyTorch, its extension name PyTorch).
INDEX_EXTENSIONS = ("PyTorch",)
INDEX_SIZE_LIMIT_MB = 100
INDEX_LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
IMAGE_SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


class IndexCheckFailed(Exception):
    pass


def fail_unless(condition: object, message: str) -> None:
    if not condition:
        raise IndexCheckFailed(message)


@dataclasses.dataclass(frozen=True)
class Submission:
    """What the index's CI sees: the description file and the clone of scm_url at scm_revision."""

    name: str  # the description file's name less .json: the extension name
    description: bytes  # the description file as committed to the index
    cmakelists: str  # the clone's top-level CMakeLists.txt
    files: frozenset  # the clone's files, relative to its root, read from this repository
    clone_bytes: int  # what check_repository_size adds up: the checkout and its .git folder
    replaced: tuple = ()  # (path, bytes): files of the clone whose bytes differ from this repository's

    def read(self, path: str) -> bytes:
        return dict(self.replaced).get(path) or (REPO / path).read_bytes()


def prettier_layout(entry: dict, multiline_arrays: bool = True) -> str:
    """The description file as the index's Lint leaves it: 2-space indent, keys in their order, a non-empty list
    one item a line (main, 5.12, 5.10: prettier-plugin-multiline-arrays, threshold 0) or, on 5.8 (prettier
    alone), on one line where that fits 80 columns."""
    lines = []
    for number, (key, value) in enumerate(entry.items(), 1):
        head, comma = f"  {json.dumps(key)}: ", "," if number < len(entry) else ""
        if isinstance(value, list) and value:
            one_line = "[" + ", ".join(json.dumps(item) for item in value) + "]"
            if multiline_arrays or len(head + one_line + comma) > 80:
                items = ",\n".join(f"    {json.dumps(item)}" for item in value)
                lines.append(f"{head}[\n{items}\n  ]{comma}")
                continue
            lines.append(head + one_line + comma)
        else:
            lines.append(head + json.dumps(value) + comma)
    return "{\n" + "\n".join(lines) + "\n}\n"


def require_key(metadata: dict, key: str) -> None:
    """require_metadata_key: the key is there and not null."""
    fail_unless(key in metadata, f"{key} key is missing")
    fail_unless(metadata[key] is not None, f"{key} value is not set")


def scm_repository(metadata: dict) -> str:
    """owner/name of scm_url, as check_git_repository_name reads it (spaces, end slashes and .git dropped)."""
    path = urlsplit(metadata["scm_url"].strip().strip("/")).path.strip("/")
    return path.removesuffix(".git")


def check_json_file_format(s: Submission, metadata: dict) -> None:
    """check_json_file_format: JSON, with LF line ends only."""
    json.loads(s.description)
    fail_unless(b"\r" not in s.description, "CR or CRLF line ends")


def check_json_schema(s: Submission, metadata: dict) -> None:
    """check_json_schema, against the schema restated above; Lint's check-jsonschema uses v1.0.2 (main, 5.12),
    which only adds dicom_support_rule."""
    try:
        jsonschema.validate(metadata, CATALOG_ENTRY_SCHEMA)
    except jsonschema.ValidationError as exc:
        raise IndexCheckFailed(exc.message) from exc


def check_extension_name(s: Submission, metadata: dict) -> None:
    """check_extension_name (its exceptions are older extensions, not this one)."""
    fail_unless(not s.name.lower().startswith("slicer"), f"extension name {s.name} starts with Slicer")


def check_category(s: Submission, metadata: dict) -> None:
    require_key(metadata, "category")
    fail_unless(metadata["category"] in INDEX_CATEGORIES, f"category {metadata['category']!r} is unknown")


def check_git_repository_name(s: Submission, metadata: dict) -> None:
    """check_git_repository_name: its allowed prefixes (Slicer, Slicer-, SlicerExtension_ ...) all begin
    with Slicer; its exceptions are older repositories."""
    require_key(metadata, "scm_url")
    name = scm_repository(metadata).split("/")[-1]
    fail_unless(name.startswith("Slicer"), f"repository name {name!r} does not start with Slicer")


def check_scm_url_syntax(s: Submission, metadata: dict) -> None:
    require_key(metadata, "scm_url")
    fail_unless("://" in metadata["scm_url"], "scm_url does not match scheme://host/path")
    scheme = urlsplit(metadata["scm_url"]).scheme
    fail_unless(scheme in ("git", "https"), f"scm_url scheme is {scheme!r}, not git or https")


def image_url_offline(s: Submission, metadata: dict, url: str) -> None:
    """validate_image_url without the download: the URL starts with http; in place of the download, it is the
    raw URL of an image file of the clone at scm_revision, with an image file name extension (the script takes
    even an application/octet-stream answer for such a name) and that image's bytes."""
    fail_unless(url.startswith("http"), f"{url} does not start with http")
    prefix = f"https://raw.githubusercontent.com/{scm_repository(metadata)}/{metadata.get('scm_revision')}/"
    fail_unless(url.startswith(prefix), f"{url} is not a file of {metadata['scm_url']} at scm_revision")
    path = url[len(prefix):]
    fail_unless(path in s.files, f"{path} is not a committed file of this repository")
    signature = IMAGE_SIGNATURES.get(Path(path).suffix.lower())
    fail_unless(signature, f"{path} has no image file name extension")
    fail_unless(s.read(path).startswith(signature), f"{path} is not the image its name says")


def check_cmakelists_content(s: Submission, metadata: dict) -> None:
    """check_cmakelists_content: the first project() names the extension (else set(EXTENSION_NAME ...)), and
    the icon and screenshot set() lines have the forms its patterns accept: one quoted string each, spaces
    allowed before the icon line's ')', none before the screenshot line's."""
    text = s.cmakelists
    names = (re.findall(r"project\s*\(\s*([^\s)]+)", text, re.IGNORECASE)
             or re.findall(r"set\(EXTENSION_NAME\s+([^\s)]+)\)", text, re.IGNORECASE))
    fail_unless(names, "no project() in CMakeLists.txt")
    fail_unless(names[0].strip("\"'") == s.name, f"project {names[0]} is not the file name {s.name}")
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)" *\)', text, re.IGNORECASE)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text, re.IGNORECASE)
    fail_unless(icon, "no EXTENSION_ICONURL the index can read")
    fail_unless(screenshots, "no EXTENSION_SCREENSHOTURLS the index can read")
    for url in [icon[0].strip(), *screenshots[0].split()]:
        image_url_offline(s, metadata, url)


def check_license_file(s: Submission, metadata: dict) -> None:
    fail_unless(any(name in s.files for name in INDEX_LICENSE_NAMES), "no license file in the repository root")


def check_repository_size(s: Submission, metadata: dict) -> None:
    megabytes = s.clone_bytes / (1024 * 1024)
    fail_unless(megabytes <= INDEX_SIZE_LIMIT_MB, f"clone of {megabytes:.1f} MB over {INDEX_SIZE_LIMIT_MB} MB")


def check_dependencies(s: Submission, metadata: dict) -> None:
    """check_dependencies: every (non-empty) build dependency is the name of a description file of the index."""
    unknown = [name for name in metadata.get("build_dependencies", []) if name and name not in INDEX_EXTENSIONS]
    fail_unless(not unknown, f"no extension {unknown} in the index")


def lint(s: Submission, metadata: dict) -> None:
    """The Lint workflow's pre-commit hooks on the file: forbid-tabs, trailing-whitespace, end-of-file-fixer,
    prettier (the layout of main, 5.12 and 5.10; see prettier_layout for 5.8)."""
    text = s.description.decode("utf-8")
    fail_unless("\t" not in text, "a tab")
    fail_unless(all(line == line.rstrip() for line in text.split("\n")), "trailing whitespace")
    fail_unless(text.endswith("}\n"), "not one newline at the end")
    fail_unless(text == prettier_layout(metadata), "not as prettier writes it")


INDEX_CHECKS = (check_json_schema, check_json_file_format, check_extension_name, check_category,
                check_git_repository_name, check_scm_url_syntax, check_cmakelists_content, check_license_file,
                check_repository_size, check_dependencies, lint)


def failing_index_checks(s: Submission) -> dict[str, str]:
    """The checks that fail, by name; an unreadable file stops there (parse_json), as in the script."""
    try:
        metadata = json.loads(s.description)
    except json.JSONDecodeError as exc:
        return {"parse_json": str(exc)}
    failed = {}
    for check in INDEX_CHECKS:
        try:
            check(s, metadata)
        except IndexCheckFailed as exc:
            failed[check.__name__] = str(exc)
    return failed


def clone_size(repository: Path) -> int:
    """What a clone of this repository would hold, measured here: its committed files as they are in the work
    tree, plus this .git folder (all history, so no less than a clone's)."""
    git = ["git", "-C", str(repository)]
    files = subprocess.run([*git, "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    git_dir = Path(subprocess.run([*git, "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    return (sum((repository / f).stat().st_size for f in files if f and (repository / f).is_file())
            + sum(p.stat().st_size for p in git_dir.rglob("*") if p.is_file()))


@pytest.fixture(scope="module")
def submission() -> Submission:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: what a clone holds is unknown")
    return Submission(name=INDEX_ENTRY.stem, description=INDEX_ENTRY.read_bytes(), cmakelists=top_cmakelists(),
                      files=frozenset(f for f in listed.stdout.decode().split("\0") if f), clone_bytes=clone_size(REPO))


def test_the_extension_passes_the_index_checks_that_need_no_network(submission):
    assert failing_index_checks(submission) == {}


DROP = object()


def with_entry(s: Submission, **changes) -> Submission:
    """A copy whose description has these keys changed (DROP: removed), laid out as Lint wants it."""
    entry = {**json.loads(s.description), **changes}
    entry = {key: value for key, value in entry.items() if value is not DROP}
    return dataclasses.replace(s, description=prettier_layout(entry).encode())


def with_cmake(s: Submission, old: str, new: str) -> Submission:
    assert old in s.cmakelists, old
    return dataclasses.replace(s, cmakelists=s.cmakelists.replace(old, new, 1))


def icon_url(s: Submission) -> str:
    return cmake_set(s.cmakelists, "EXTENSION_ICONURL")[0]


def screenshot_url(s: Submission) -> str:
    return cmake_set(s.cmakelists, "EXTENSION_SCREENSHOTURLS")[0]


def icon_path(s: Submission) -> str:
    return RAW_URL.match(icon_url(s)).group("path")


def renamed(s: Submission, name: str) -> Submission:
    return dataclasses.replace(with_cmake(s, f"project({s.name})", f"project({name})"), name=name)


REPOSITORY = "https://github.com/attentionunetseg/SlicerAttentionUNetSeg"
BROKEN_COPIES = {  # a copy of what the index sees with one thing changed -> the checks that must fail
    "not JSON": (lambda s: dataclasses.replace(s, description=s.description[:-3]), {"parse_json"}),
    "CRLF line ends": (lambda s: dataclasses.replace(s, description=s.description.replace(b"\n", b"\r\n")),
                       {"check_json_file_format", "lint"}),
    "name Slicer...": (lambda s: renamed(s, "SlicerAttentionUNetSeg"), {"check_extension_name"}),
    "name slicer...": (lambda s: renamed(s, "slicerAttentionUNetSeg"), {"check_extension_name"}),
    "file name is not the project": (lambda s: dataclasses.replace(s, name="AttentionUNet"),
                                     {"check_cmakelists_content"}),
    "no project()": (lambda s: with_cmake(s, "project(AttentionUNetSeg)", ""), {"check_cmakelists_content"}),
    "unknown category": (lambda s: with_entry(s, category="Segmentations"), {"check_category"}),
    "no category": (lambda s: with_entry(s, category=DROP), {"check_category", "check_json_schema"}),
    "category null": (lambda s: with_entry(s, category=None), {"check_category", "check_json_schema"}),
    "scm_url without scheme": (lambda s: with_entry(s, scm_url=REPOSITORY.replace("https://", "")),
                               {"check_scm_url_syntax", "check_cmakelists_content"}),
    "scm_url over http": (lambda s: with_entry(s, scm_url=REPOSITORY.replace("https", "http")),
                          {"check_scm_url_syntax"}),
    "scm_url over ssh": (lambda s: with_entry(s, scm_url=REPOSITORY.replace("https://", "ssh://git@") + ".git"),
                         {"check_scm_url_syntax"}),
    "scm_url ending .git/ (passes)": (lambda s: with_entry(s, scm_url=REPOSITORY + ".git/"), set()),
    "repository not Slicer...": (lambda s: with_entry(s, scm_url=REPOSITORY.replace("/Slicer", "/")),
                                 {"check_git_repository_name", "check_cmakelists_content"}),
    "icon URL unquoted": (lambda s: with_cmake(s, f'"{icon_url(s)}"', icon_url(s)), {"check_cmakelists_content"}),
    "space before the screenshots' )": (lambda s: with_cmake(s, f'{screenshot_url(s)}")', f'{screenshot_url(s)}" )'),
                                        {"check_cmakelists_content"}),
    "space before the icon's ) (passes)": (lambda s: with_cmake(s, f'{icon_url(s)}")', f'{icon_url(s)}" )'),
                                           set()),
    "icon URL without scheme": (lambda s: with_cmake(s, icon_url(s), icon_url(s).replace("https://", "")),
                                {"check_cmakelists_content"}),
    "icon URL on another branch": (lambda s: with_cmake(s, icon_url(s), icon_url(s).replace("/main/", "/master/")),
                                   {"check_cmakelists_content"}),
    "icon not committed": (lambda s: dataclasses.replace(s, files=s.files - {icon_path(s)}),
                           {"check_cmakelists_content"}),
    "icon URL at a text file": (lambda s: with_cmake(s, icon_path(s), "LICENSE"), {"check_cmakelists_content"}),
    "icon committed as a Git LFS pointer": (lambda s: dataclasses.replace(s, replaced=(
        (icon_path(s), b"version https://git-lfs.github.com/spec/v1\n"),)), {"check_cmakelists_content"}),
    "no license file": (lambda s: dataclasses.replace(s, files=s.files - {"LICENSE"}), {"check_license_file"}),
    "license as LICENSE.md": (lambda s: dataclasses.replace(s, files=s.files - {"LICENSE"} | {"LICENSE.md"}),
                              {"check_license_file"}),
    "clone over 100 MB": (lambda s: dataclasses.replace(s, clone_bytes=100 * 1024 * 1024 + 1),
                          {"check_repository_size"}),
    "clone of 100 MB (passes)": (lambda s: dataclasses.replace(s, clone_bytes=100 * 1024 * 1024), set()),
    "depends on SlicerPyTorch": (lambda s: with_entry(s, build_dependencies=["SlicerPyTorch"]),
                                 {"check_dependencies"}),
    "tier 7": (lambda s: with_entry(s, tier=7), {"check_json_schema"}),
    "unknown key": (lambda s: with_entry(s, depends=["PyTorch"]), {"check_json_schema"}),
    "5.8's layout": (lambda s: dataclasses.replace(s, description=prettier_layout(
        json.loads(s.description), multiline_arrays=False).encode()), {"lint"}),
    "trailing space": (lambda s: dataclasses.replace(s, description=s.description.replace(b",\n", b", \n", 1)),
                       {"lint"}),
    "tab indent": (lambda s: dataclasses.replace(s, description=s.description.replace(b"\n  ", b"\n\t")), {"lint"}),
    "no final newline": (lambda s: dataclasses.replace(s, description=s.description.rstrip(b"\n")), {"lint"}),
}


@pytest.mark.parametrize("case", BROKEN_COPIES)
def test_each_index_check_fails_on_a_copy_broken_for_it(submission, case):
    """The controls: each check fails where the real one would, and only it (so none passes vacuously)."""
    breaks, failing = BROKEN_COPIES[case]
    assert set(failing_index_checks(breaks(submission))) == failing


def test_every_index_check_has_a_control():
    failing = set().union(*(checks for _, checks in BROKEN_COPIES.values()))
    assert failing == {check.__name__ for check in INDEX_CHECKS} | {"parse_json"}


def test_the_clone_size_counts_the_checkout_and_its_git_folder(submission, tmp_path):
    """clone_size on a repository whose one committed file is 101 MB (sparse: no disk used) is over the limit,
    and this repository's is at least its committed files."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with open(tmp_path / "volume.raw", "wb") as big:
        big.truncate(101 * 1024 * 1024)
    subprocess.run(["git", "-C", str(tmp_path), "add", "volume.raw"], check=True)
    big_clone = dataclasses.replace(submission, clone_bytes=clone_size(tmp_path))
    assert set(failing_index_checks(big_clone)) == {"check_repository_size"}
    committed = sum((REPO / f).stat().st_size for f in submission.files if (REPO / f).is_file())
    assert committed < submission.clone_bytes <= INDEX_SIZE_LIMIT_MB * 1024 * 1024


def test_the_extension_ships_no_tool_and_the_runtime_imports_none():
    scripts, _ = module_cmake_files()
    assert not [s for s in scripts if s.startswith(TOOLS_PACKAGE)]
    for path in (MODULE_DIR / "AttentionUNetSegLib").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(rf"^\s*(from|import)\s+{TOOLS_PACKAGE}", text, re.MULTILINE), path


def test_slicer_requirements_are_the_runtime_dependencies_without_torch():
    """What the panel installs into Slicer's Python is what the runtime needs (the child reports progress
    in lines, so no tqdm), never slicer-core or vtk."""
    runtime = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(dependencies.PIP_REQUIREMENTS) == {d for d in runtime if not d.startswith(("torch", "tqdm"))}
    assert dependencies.TORCH_REQUIREMENT in runtime
    assert not any(r.lower().startswith(("slicer", "vtk")) for r in dependencies.PIP_REQUIREMENTS)


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
    # vtkTeem: Slicer's Teem classes, a top-level module of Slicer's Python (Base/Python/vtkTeem.py)
    # PyTorchUtils: the PyTorch extension's module, which installs torch (dependencies.py, on first use)
    allowed = {"numpy", "SimpleITK", "safetensors", "torch", "slicer", "vtkmodules", "vtk", "vtkTeem", "qt", "tqdm",
               "psutil", "PyTorchUtils"}
    lib = [MODULE_DIR / s for s in scripts if s.startswith("AttentionUNetSegLib/")]
    third_party = set().union(*(imported_modules(path) for path in lib)) - set(sys.stdlib_module_names)
    assert third_party <= allowed, third_party - allowed


def test_runtime_and_tests_of_the_slicer_path_pass_ruff():
    lib = MODULE_DIR / "AttentionUNetSegLib"
    files = [MODULE_FILE, *(lib / f"{name}.py" for name in SLICER_PATH_MODULES),
             *(REPO / "Testing" / f"test_{name}.py" for name in ("packaging", "module_ui", "runner", "protocol",
                                                                  "slicer_app")),
             REPO / "Testing" / "slicer_app.py", REPO / "Testing" / "run_slicer_selftest.py"]
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


