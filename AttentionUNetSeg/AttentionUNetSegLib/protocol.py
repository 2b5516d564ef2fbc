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
# What a fine-tune writes into its output folder (finetune.py), named here for the parent, which cannot import
# torch: the weights (with their .sha256) and the card as data.
FINETUNE_MODEL_FILE, FINETUNE_CARD_FILE = "model.safetensors", "finetune.json"
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


def finetune_command(python: str, cases_dir: Path, output_dir: Path, minutes: float, device: str = "auto",
                     weights: Path | None = None, steps: int | None = None) -> list[str]:
    command = [python, "-m", MODULE, "finetune", str(cases_dir), "--output-dir", str(output_dir),
               "--minutes", f"{minutes:g}", "--device", device]
    if weights is not None:
        command += ["--weights", str(weights)]
    if steps is not None:
        command += ["--steps", str(steps)]
    return command


def read_finetune_card(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / FINETUNE_CARD_FILE).read_text(encoding="utf-8"))


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
    finetune = commands.add_parser("finetune", help="fine-tune on labelled cases into an output folder (the "
                                   "finetune module describes what it writes)")
    finetune.add_argument("folders", nargs="*", type=Path, help="folders of cases, by the naming rule of finetune_data")
    finetune.add_argument("--case", nargs=2, action="append", default=[], type=Path, metavar=("CT", "LABEL"),
                          help="one case; repeatable")
    finetune.add_argument("--output-dir", type=Path, required=True)
    finetune.add_argument("--weights", type=Path, help="start from these weights (default: the bundled model)")
    finetune.add_argument("--minutes", type=float, default=10.0)
    finetune.add_argument("--steps", type=int, help="at most this many steps")
    finetune.add_argument("--device", default="auto")
    finetune.set_defaults(run=_run_finetune)
    return parser


def _run_segment(args: argparse.Namespace) -> int:
    from . import imageio, outputs
    from .engine import SegmentationOptions, Segmenter

    started = time.perf_counter()
    image = imageio.read_image(args.input)
    segmenter = Segmenter(args.weights, SegmentationOptions(device=args.device, quality=args.quality))
    names = tuple(name.strip() for name in args.maps.split(",") if name.strip())
    result = segmenter.segment(image, progress=_print_progress, maps=names)
    files = outputs.ResultFiles(args.work_dir / SEGMENTATION_FILE,
                                tuple((map_path(args.work_dir, name), name) for name in result.attention_maps),
                                args.work_dir / RESULT_FILE, coefficients=False, compress=False)
    # result.json is written last: it appears only with every file it speaks of
    outputs.write_result(result, files, seconds=time.perf_counter() - started,
                         model=outputs.model_name(segmenter.model), inputs=[args.input])
    return 0


def _run_finetune(args: argparse.Namespace) -> int:
    """PROGRESS lines while it runs, one summary line at the end. Cancel ends the process: the best weights so
    far are already in the output folder, and the same command resumes from its last checkpoint."""
    from .finetune import FinetuneOptions, finetune, process_start
    from .finetune_data import FinetuneCase, case_name, find_cases, unique_names

    cases = [case for folder in args.folders for case in find_cases(folder)]
    cases += [FinetuneCase(case_name(ct), ct, label) for ct, label in args.case]
    options = FinetuneOptions(minutes=args.minutes, device=args.device, weights=args.weights, max_steps=args.steps,
                              started=process_start())
    result = finetune(unique_names(cases), args.output_dir, options, progress=_print_progress)
    print(result.summary(), flush=True)
    return 0


def _run_gpu(args: argparse.Namespace) -> int:
    from .engine import describe_gpu

    print(json.dumps({"gpu": describe_gpu()}), flush=True)
    return 0


def _print_progress(fraction: float, text: str) -> None:
    print(f"{PROGRESS_PREFIX}{fraction:.3f} {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
