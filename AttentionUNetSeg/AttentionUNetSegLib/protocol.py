"""The one protocol between the Slicer panel and its child process, both ends in one place.

The parent writes the CT into a fresh work folder and starts

    python -m AttentionUNetSegLib.protocol segment INPUT.nrrd --work-dir DIR --maps combined,level2,level3,level4
                                          [--device cpu] [--quality fast] [--weights FILE]

The child reads the CT, calls the engine's one use case (``Segmenter.segment``) and writes into DIR:

- ``pancreas.nrrd``: the mask, UInt8 label map (1 = pancreas) on the input grid;
- ``attention/<name>.nrrd``: each map asked for (the parent asks for all four, so that showing another gate
  is an import, not a second run), UInt8 (value / ATTENTION_SCALE = gate coefficient);
- ``result.json`` last (``outputs.report``: volume_ml, confidence, qc, reason, seconds, device, model).

While it works it prints ``PROGRESS <fraction> <text>`` lines on stdout. A problem the user can fix ends as
one ``error: what; why; what to do`` line on stderr and exit status 2. ``python -m AttentionUNetSegLib.protocol
gpu`` prints one JSON line saying which GPU torch sees. Everything in the work folder is uncompressed: it
lives for seconds on a local disk, where compressing costs more than it saves.

The parent's half (command lines, progress lines, reading the result, writing the input) imports only the
standard library and numpy, so the Slicer module can import it at start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODULE = "AttentionUNetSegLib.protocol"
PROGRESS_PREFIX = "PROGRESS "
ERROR_PREFIX = "error: "
EXIT_USER_ERROR = 2
QUALITY_CHOICES = ("full", "fast")
# = engine.ATTENTION_MAP_NAMES (a test checks): the parent cannot import the engine, which imports torch.
ATTENTION_MAP_NAMES = ("combined", "level2", "level3", "level4")
SEGMENTATION_FILE = "pancreas.nrrd"
MAPS_FOLDER = "attention"
RESULT_FILE = "result.json"
# numpy dtype -> NRRD type name (the input is written in its own pixel type)
NRRD_TYPES = {
    "int8": "signed char", "uint8": "uchar", "int16": "short", "uint16": "ushort", "int32": "int",
    "uint32": "uint", "int64": "longlong", "uint64": "ulonglong", "float32": "float", "float64": "double",
}


@dataclass(frozen=True)
class Progress:
    fraction: float
    text: str


@dataclass(frozen=True)
class ChildResult:
    """What the child measured (its result.json)."""

    volume_ml: float
    confidence: float
    qc: str  # ok | check | not found
    reason: str
    seconds: float
    device: str
    model: str


@dataclass(frozen=True)
class Geometry:
    """Where voxels sit, in LPS as ITK and NRRD files place them."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major; column i is the direction of index axis i


# --- the parent's end ----------------------------------------------------------------------------------


def segment_command(python: str, input_path: Path, work_dir: Path, device: str = "auto", quality: str = "full",
                    weights: Path | None = None) -> list[str]:
    """The child's command line: every attention map, so that the device and quality that made the
    segmentation also made each gate the user shows later."""
    if quality not in QUALITY_CHOICES:
        raise ValueError(f"quality must be one of {QUALITY_CHOICES}, not {quality!r}")
    command = [python, "-m", MODULE, "segment", str(input_path), "--work-dir", str(work_dir),
               "--maps", ",".join(ATTENTION_MAP_NAMES), "--device", device, "--quality", quality]
    if weights is not None:
        command += ["--weights", str(weights)]
    return command


def gpu_command(python: str) -> list[str]:
    return [python, "-m", MODULE, "gpu"]


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child imports this copy of the Lib (source tree or Slicer's install folder), output unbuffered and
    in UTF-8, which the parent decodes (piped, Windows would write the ANSI code page: paths and names garbled)."""
    env = dict(os.environ if base is None else base)
    lib_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def parse_progress(line: str) -> Progress | None:
    """``PROGRESS 0.420 Tile 3 of 8`` -> ``Progress(0.42, "Tile 3 of 8")``; any other line -> None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    fraction, _, text = line[len(PROGRESS_PREFIX):].strip().partition(" ")
    try:
        value = float(fraction)
    except ValueError:
        return None
    return Progress(min(max(value, 0.0), 1.0), text.strip())


def user_error_line(stderr_lines) -> str | None:
    """The child's last ``error:`` line without its prefix (None when it printed none)."""
    errors = [line[len(ERROR_PREFIX):] for line in stderr_lines if line.startswith(ERROR_PREFIX)]
    return errors[-1] if errors else None


def read_result(work_dir: Path) -> ChildResult:
    values = json.loads((Path(work_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    return ChildResult(**{name: values[name] for name in ChildResult.__dataclass_fields__})


def read_gpu_answer(stdout_lines) -> str | None:
    for line in reversed(stdout_lines):
        try:
            return json.loads(line)["gpu"]
        except (ValueError, KeyError, TypeError):
            continue
    return None


def map_path(work_dir: Path, name: str) -> Path:
    return Path(work_dir) / MAPS_FOLDER / f"{name}.nrrd"


def write_input(path: Path, voxels: np.ndarray, geometry: Geometry) -> None:
    """Write a (k, j, i) voxel array as an uncompressed NRRD in its own pixel type (no copy of the voxels).

    Safe to run in a worker thread: it touches only numpy memory and the file.
    """
    dtype = voxels.dtype.newbyteorder("<") if voxels.dtype.byteorder == ">" else voxels.dtype
    if dtype.name not in NRRD_TYPES or voxels.ndim != 3:
        raise ValueError(f"cannot write a {voxels.ndim}D {voxels.dtype} volume as NRRD")
    axes = np.array(geometry.direction, dtype=float).reshape(3, 3) * np.array(geometry.spacing, dtype=float)
    vectors = " ".join("(" + ",".join(f"{v:.17g}" for v in axes[:, axis]) + ")" for axis in range(3))
    header = (
        "NRRD0004\n"
        f"type: {NRRD_TYPES[dtype.name]}\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {' '.join(str(n) for n in voxels.shape[::-1])}\n"
        f"space directions: {vectors}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: raw\n"
        f"space origin: ({','.join(f'{v:.17g}' for v in geometry.origin)})\n\n"
    )
    with open(path, "wb") as file:
        file.write(header.encode("ascii"))
        np.ascontiguousarray(voxels, dtype=dtype).tofile(file)


# --- the child's end -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import UserError

    try:
        return args.run(args)
    except UserError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except MemoryError:
        print(f"{ERROR_PREFIX}out of memory; close other programs, or crop or downsample the CT", file=sys.stderr)
        return EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="The Slicer panel's child process.")
    commands = parser.add_subparsers(required=True)
    segment = commands.add_parser("segment", help="segment a CT into a work folder")
    segment.add_argument("input", type=Path)
    segment.add_argument("--work-dir", type=Path, required=True)
    segment.add_argument("--maps", default=",".join(ATTENTION_MAP_NAMES), help="comma-separated attention map names")
    segment.add_argument("--device", default="auto")
    segment.add_argument("--quality", choices=QUALITY_CHOICES, default="full")
    segment.add_argument("--weights", type=Path)
    segment.set_defaults(run=_run_segment)
    gpu = commands.add_parser("gpu", help="print which GPU torch sees, as one JSON line")
    gpu.set_defaults(run=_run_gpu)
    return parser


def _run_segment(args: argparse.Namespace) -> int:
    from . import imageio, outputs
    from .engine import SegmentationOptions, Segmenter

    started = time.perf_counter()
    image = imageio.read_image(args.input)
    segmenter = Segmenter(args.weights, SegmentationOptions(device=args.device, quality=args.quality))
    names = tuple(name.strip() for name in args.maps.split(",") if name.strip())
    result = segmenter.segment(image, progress=_print_progress, maps=names)
    writers = {args.work_dir / SEGMENTATION_FILE: outputs.image_writer(result.mask, compress=False)}
    for name, attention in result.attention_maps.items():
        writers[map_path(args.work_dir, name)] = outputs.image_writer(attention, compress=False)
    report = outputs.report(result, time.perf_counter() - started, outputs.model_name(segmenter.model))
    writers[args.work_dir / RESULT_FILE] = outputs.json_writer(report)
    outputs.write_outputs(writers)  # result.json appears only with every file it speaks of
    return 0


def _run_gpu(args: argparse.Namespace) -> int:
    from .engine import describe_gpu

    print(json.dumps({"gpu": describe_gpu()}), flush=True)
    return 0


def _print_progress(fraction: float, text: str) -> None:
    print(f"{PROGRESS_PREFIX}{fraction:.3f} {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
