"""The cases of a batch: CT files, every DICOM series under a folder, or the rows of a CSV with a ``path`` column.

Each case gets a name that is unique in the batch and the same on every run over the same inputs: its path
relative to the folder it was found in (``patient7/ct.nii.gz`` -> ``patient7_ct``), or the file's stem,
with parent folders prepended only where two cases would otherwise share a name. A name is a plain folder
name (``outputs.safe_name``), whatever a CSV's ``case`` column says: never ``..``, ``.``, a path or empty.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from AttentionUNetSegLib import imageio, outputs
from AttentionUNetSegLib.errors import UserError

from .summary import COLUMNS as SUMMARY_COLUMNS
from .summary import SUMMARY_NAME


@dataclass(frozen=True)
class Case:
    name: str
    input: Path  # a CT file or a DICOM series folder, absolute
    series: str | None = None  # the DICOM series ID where the folder holds several
    carried: dict[str, str] = field(default_factory=dict, hash=False)  # the CSV row's other columns

    def __post_init__(self):
        if not self.name or self.name != outputs.safe_name(self.name):  # it becomes OUT/<name>, replaced whole
            raise ValueError(f"a case name must be a plain folder name, not {self.name!r}")

    @property
    def is_dicom(self) -> bool:
        return self.input.is_dir()

    def describe_input(self) -> str:
        return f"{self.input} [series {self.series}]" if self.series else str(self.input)


@dataclass(frozen=True)
class _Found:
    input: Path
    series: str | None
    parts: tuple[str, ...]  # name parts, most specific first: stem, parent folder, its parent...
    depth: int  # how many parts name it at first
    name: str | None = None  # given by the CSV's ``case`` column
    carried: dict[str, str] = field(default_factory=dict, hash=False)


def discover(inputs: Sequence[Path], exclude: Path | None = None) -> tuple[list[Case], list[str]]:
    """The cases under ``inputs`` in the order given (each once), and the CSV columns carried into the summary.

    ``exclude``: a folder not to search (the batch's output folder, when it lies under an input folder).
    """
    found: list[_Found] = []
    columns: list[str] = []
    for path in inputs:
        path = Path(path)
        if not path.exists():
            raise UserError(f"input {path} does not exist", "", "check the path")
        if path.is_dir():
            found.extend(_walk(path, exclude))
        elif path.name.lower().endswith(".csv"):
            rows, row_columns = _read_csv(path)
            found.extend(rows)
            columns.extend(c for c in row_columns if c not in columns)
        else:
            found.append(_found(path, None, depth=1))
    found = _first_of_each(found)
    if not found:
        raise UserError(f"no CT found in {', '.join(map(str, inputs))}",
                        f"expected {', '.join(imageio.IMAGE_SUFFIXES)} files or DICOM series", "check the inputs")
    names = _unique_names(found)
    # Absolute: Ray workers run in folders of their own.
    return [Case(name, Path(os.path.abspath(f.input)), f.series, f.carried) for name, f in zip(names, found)], columns


def _first_of_each(found: list[_Found]) -> list[_Found]:
    """Each CT once (a folder and a file in it may both be given), where it first appears."""
    seen: set[tuple[str, str | None]] = set()
    unique = []
    for item in found:
        key = (os.path.abspath(item.input), item.series)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _walk(root: Path, exclude: Path | None) -> Iterator[_Found]:
    """Every image file and every DICOM series under ``root``, in sorted order; hidden entries skipped."""
    skip = {exclude.resolve()} if exclude else set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        here = Path(folder)
        skip.add(here.resolve())  # a link back up the tree is walked once
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and (here / d).resolve() not in skip)
        visible = sorted(f for f in files if not f.startswith("."))
        images = [f for f in visible if f.lower().endswith(imageio.IMAGE_SUFFIXES)]
        below_root = len(here.relative_to(root).parts)
        yield from (_found(here / f, None, below_root + 1) for f in images)
        if len(images) < len(visible):  # other files: perhaps DICOM slices
            series = imageio.dicom_series_ids(here)
            for uid in series:
                yield _found(here, uid if len(series) > 1 else None, max(below_root, 1))


def _read_csv(path: Path) -> tuple[list[_Found], list[str]]:
    """One case per row; relative paths are relative to the CSV's folder; a ``case`` column names the cases."""
    with open(path, newline="", encoding="utf-8-sig") as stream:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(stream)
        columns = [c for c in (reader.fieldnames or []) if c not in ("path", "case")]
        if "path" not in (reader.fieldnames or []):
            raise UserError(f"{path.name} has no 'path' column", "a batch CSV lists one CT per row in 'path'",
                            "add the column (other columns are carried into the summary)")
        clashes = [c for c in columns if c in SUMMARY_COLUMNS]
        if clashes:
            raise UserError(f"{path.name} has column(s) {', '.join(clashes)}", "the summary writes those itself",
                            "rename them")
        rows = []
        for number, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip():
                raise UserError(f"row {number} of {path.name} has no path", "", "fill it in or remove the row")
            ct = Path(row["path"].strip())
            ct = ct if ct.is_absolute() else path.parent / ct
            carried = {c: row.get(c) or "" for c in columns}
            rows.append(_found(ct, None, 1, outputs.safe_name(row.get("case") or "") or None, carried))
    return rows, columns


def _found(path: Path, series: str | None, depth: int, name: str | None = None,
           carried: dict[str, str] | None = None) -> _Found:
    absolute = path.absolute()
    stem = outputs.image_stem(absolute)
    parts = (f"{stem}_{series.split('.')[-1]}" if series else stem, *(p.name for p in absolute.parents if p.name))
    return _Found(path, series, parts, min(depth, len(parts)), name, carried or {})


def _unique_names(found: list[_Found]) -> list[str]:
    """Grow colliding names by their parent folders where those differ; number the rest (same stem, other suffix,
    or a CSV naming two cases alike)."""
    depths = [f.depth for f in found]
    while True:
        names = [f.name or _join(f.parts[:d]) for f, d in zip(found, depths)]
        grow = [i for i, f in enumerate(found) if not f.name and depths[i] < len(f.parts)
                and any(names[j].lower() == names[i].lower() and found[j].parts != f.parts for j in range(len(found)))]
        if not grow:
            return _numbered(names)
        for i in grow:
            depths[i] += 1


def _numbered(names: list[str]) -> list[str]:
    """Each name once, later ones numbered; compared without letter case, as case-insensitive disks see them, and
    never the summary's name."""
    taken = {SUMMARY_NAME.lower()}
    unique = []
    for name in names:
        candidate, number = name, 1
        while candidate.lower() in taken:
            number += 1
            candidate = f"{name}-{number}"
        taken.add(candidate.lower())
        unique.append(candidate)
    return unique


def _join(parts: tuple[str, ...]) -> str:
    """Most general first, as a plain folder name."""
    return outputs.safe_name("_".join(reversed(parts))) or "case"
