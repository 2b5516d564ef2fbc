"""Writing a run's outputs: all of them or none, each on the input's grid, and the run's report.

One staging mechanism: every output is written into a hidden file beside its target, and the targets are
replaced only once all were written; a failure or Ctrl-C at any point removes what the run wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import imageio
from .errors import UserError

Writer = Callable[[Path], None]
REPORT_KEYS = ("volume_ml", "confidence", "qc", "reason", "seconds", "device", "model")


def label_writer(mask: sitk.Image, path: Path) -> Writer:
    """``.seg.nrrd`` gets the segment metadata Slicer reads; other formats a plain label map."""
    return image_writer(imageio.with_segment_metadata(mask) if path.name.endswith(".seg.nrrd") else mask)


def image_writer(image: sitk.Image, compress: bool = True) -> Writer:
    return lambda path: imageio.write_file(image, path, compress)


def attention_writer(attention: sitk.Image) -> Writer:
    """An engine map (8-bit) written as float32 gate coefficients in [0, 1]."""
    return lambda path: imageio.write_file(attention_coefficients(attention), path)


def attention_coefficients(attention: sitk.Image) -> sitk.Image:
    """An engine map (8-bit) as float32 gate coefficients in [0, 1], on the same grid."""
    from .engine import ATTENTION_SCALE

    values = sitk.GetArrayViewFromImage(attention).astype(np.float32) / np.float32(ATTENTION_SCALE)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(attention)
    return image


def json_writer(values: dict) -> Writer:
    def write(path: Path) -> None:
        path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")

    return write


def report(result, seconds: float, model: str) -> dict:
    """What ``segment --report`` writes: the volume, the verdict, the time, the device and the model."""
    verdict = result.verdict
    return {"volume_ml": round(result.volume_ml, 2), "confidence": round(verdict.confidence, 3), "qc": verdict.qc,
            "reason": verdict.reason, "seconds": round(seconds, 2), "device": result.device, "model": model}


def model_name(model) -> str:
    """A loaded model as a report names it: its file and version."""
    return f"{model.path.name} ({model.spec.version})"


def summary_line(result, seconds: float) -> str:
    """``Pancreas 72.4 mL; ok (confidence 0.83); 3.1 s on cpu``, or ``No pancreas found; 2.0 s on cpu``."""
    verdict = result.verdict.describe()
    found = f"Pancreas {result.volume_ml:.1f} mL; {verdict}" if result.found else verdict.capitalize()
    return f"{found}; {seconds:.1f} s on {result.device}"


def check_output_folder(folder: Path) -> Path:
    """A folder that exists and takes files, or one that can be created."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not imageio.folder_takes_files(existing):
        raise UserError(f"cannot write into {folder}", f"{existing} is not a writable folder", "choose another")
    return folder


def refuse_clashes(inputs: list[Path], outputs: list[Path]) -> None:
    """No output may be an input or another output."""
    resolved = [output.resolve() for output in outputs]
    for path in inputs:
        if path.resolve() in resolved:
            raise UserError(f"output {outputs[resolved.index(path.resolve())]} is the input",
                            "it would be overwritten", "choose another output")
    if len(set(resolved)) != len(resolved):
        raise UserError("two outputs name the same file", "", "give each output its own name")


def write_outputs(writers: dict[Path, Writer]) -> None:
    """Write all outputs or none; files the user already had are replaced only in the last step."""
    targets = [Path(p) for p in writers]
    refuse_clashes([], targets)
    created_folders = [p.parent for p in targets if not p.parent.exists()]
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for folder in dict.fromkeys(created_folders):
            folder.mkdir(parents=True)
        for target, write in writers.items():
            staged.append((imageio.hidden_twin(Path(target)), Path(target)))
            write(staged[-1][0])
            imageio.give_default_permissions(staged[-1][0])
        for temporary, target in staged:
            os.replace(temporary, target)
            placed.append(target)
    except BaseException:
        for path in [*placed, *(temporary for temporary, _ in staged)]:
            path.unlink(missing_ok=True)
        for folder in reversed(list(dict.fromkeys(created_folders))):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
