"""The runtime's command line: ``segment`` and ``info`` (the Slicer panel's child runs ``protocol`` instead).

The ``attention-unet-seg`` console script (``AttentionUNetSegTools.cli``) adds the tools' subcommands.

Every failure the user can fix ends as one ``error: ...`` line on stderr and exit status 2; Ctrl-C ends
with 130. Outputs are written only once everything else succeeded, all of them or none.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import SimpleITK as sitk

from . import __version__, imageio, outputs
from .errors import Cancelled, UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
LABEL_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii")
ATTENTION_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
PROGRESS_MODES = ("bar", "lines", "none")


def main(argv: list[str] | None = None, command_modules: dict[str, str] | None = None,
         segment_extras: tuple[str, ...] = ()) -> int:
    """Run one command. ``command_modules`` maps further subcommands to modules with
    ``add_arguments(parser)`` and ``run(args) -> int``, imported only when used. ``segment_extras``: modules
    adding outputs to ``segment`` (the tools' ``--dicom-seg``), with ``add_segment_arguments(parser)`` and
    ``segment_outputs(args) -> ((result, model_name) -> {path: writer})``, called before any work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_command_in(argv), command_modules or {}, segment_extras).parse_args(argv)
    except KeyboardInterrupt:  # while the parser imports the commands' modules (torch): nothing has started
        return interrupted()
    with _one_line_warnings(), _terminate_as_interrupt():
        try:
            return args.run(args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except (KeyboardInterrupt, Cancelled):
            return interrupted()
        except MemoryError:
            print("error: out of memory; close other programs, or crop or downsample the CT", file=sys.stderr)
            return EXIT_USER_ERROR
        except Exception as exc:  # a bug: still one line, the traceback only on request
            if args.debug:
                raise
            print(f"error: unexpected {type(exc).__name__}: {exc}; please report it (rerun with --debug "
                  "for the details)", file=sys.stderr)
            return 1


def interrupted() -> int:
    """Ctrl-C or SIGTERM: one line and the shell's status for an interrupted command."""
    print("error: interrupted; nothing half-written was left behind", file=sys.stderr)
    return EXIT_INTERRUPTED


def build_parser(command: str | None = None, command_modules: dict[str, str] | None = None,
                 segment_extras: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The full parser. Of the module subcommands only ``command`` is imported, or all for the overview."""
    parser = argparse.ArgumentParser(
        prog="attention-unet-seg",
        description="Pancreas segmentation in abdominal CT with a 3D Attention U-Net, with attention maps.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_segment(commands, segment_extras if command in (None, "segment") else ())
    _add_info(commands)
    for name, module_name in (command_modules or {}).items():
        if command not in (None, name):
            commands.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
        sub = commands.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def _add_segment(commands, extras: tuple[str, ...] = ()) -> None:
    from .engine import ATTENTION_MAP_NAMES

    parser = commands.add_parser(
        "segment", help="segment the pancreas in one CT",
        description="Segment the pancreas in a CT (NIfTI, NRRD, MHA file or DICOM series folder). "
        "The label map (1 = pancreas) and the attention maps are written on the input's own grid.",
    )
    parser.add_argument("input", type=Path, help="CT file or DICOM series folder")
    parser.add_argument("--series", metavar="UID",
                        help="the SeriesInstanceUID to read from a DICOM folder holding several (default: the "
                        "largest, named in a warning)")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help=f"label map to write ({', '.join(LABEL_SUFFIXES)})")
    parser.add_argument("--attention", type=Path, help="combined attention map to write (float32 in [0, 1])")
    parser.add_argument("--attention-maps", type=Path, metavar="DIR",
                        help="folder to write attention maps into as NAME.nrrd (all maps unless --map-names)")
    parser.add_argument("--map-names", metavar="NAMES",
                        help=f"comma-separated maps for --attention-maps, of {','.join(ATTENTION_MAP_NAMES)}")
    parser.add_argument("--report", type=Path, metavar="FILE.json",
                        help="write the volume, the verdict (ok / check / not found, reason, confidence), "
                        "the time, the device and the model as JSON")
    add_model_arguments(parser)
    modules = [importlib.import_module(name) for name in extras]
    for module in modules:
        module.add_segment_arguments(parser)
    parser.set_defaults(run=run_segment, segment_extras=modules)


def add_model_arguments(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """Options shared by every command that runs the network (and how it shows progress on a terminal)."""
    parser.add_argument("--weights", type=Path, help="model file (.safetensors); default: the bundled model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--fast", action="store_true", help="less tile overlap: faster, slightly less accurate")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="test-time augmentation (default): a second, shifted pass, averaged in, whose agreement "
                        "with the first informs the verdict; --no-tta halves the inference time, and the verdict "
                        "then says ok far less often")
    if progress:
        parser.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                            help="bar on stderr, 'PROGRESS <fraction> <text>' lines on stdout, or none")


def _add_info(commands) -> None:
    parser = commands.add_parser("info", help="show the bundled model and the compute devices")
    parser.add_argument("--weights", type=Path, help="describe this model file instead of the bundled one")
    parser.set_defaults(run=run_info)


def run_segment(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    imageio.input_is_folder(args.input)  # a missing input, a link loop, a FIFO: one line before anything uses it
    files = _result_files(args)
    outputs.refuse_clashes([args.input], files.paths())  # before any work; the extras' files are checked as written
    extra_outputs = [module.segment_outputs(args) for module in getattr(args, "segment_extras", ())]

    image = imageio.read_image(args.input, args.series)
    segmenter = load_segmenter(args)
    result = segment_with_progress(segmenter, image, args.progress, files.map_names)
    model = outputs.model_name(segmenter.model)
    extra = [pair for make in extra_outputs for pair in make(result, model).items()]
    seconds = time.perf_counter() - started
    outputs.write_result(result, files, seconds=seconds, model=model, inputs=[args.input], extra=extra)
    print(outputs.summary_line(result.volume_ml, result.verdict, seconds, result.device), flush=True)
    return 0


def _result_files(args: argparse.Namespace) -> outputs.ResultFiles:
    """The files asked for, each checked before any work: its extension, and a folder that takes files."""
    label = outputs.check_output_path(args.output, LABEL_SUFFIXES)
    maps = [(outputs.check_output_path(args.attention, ATTENTION_SUFFIXES), "combined")] if args.attention else []
    report = outputs.check_output_path(args.report, (".json",)) if args.report else None
    if args.attention_maps:
        folder = outputs.check_output_folder(args.attention_maps)
        maps += [(folder / f"{name}.nrrd", name) for name in _map_names(args.map_names)]
    return outputs.ResultFiles(label, tuple(maps), report)


def _map_names(requested: str | None) -> list[str]:
    from .engine import ATTENTION_MAP_NAMES

    names = [n.strip() for n in requested.split(",") if n.strip()] if requested else list(ATTENTION_MAP_NAMES)
    unknown = [n for n in names if n not in ATTENTION_MAP_NAMES]
    if unknown:
        raise UserError(f"no attention map named {', '.join(unknown)}",
                        f"the maps are {', '.join(ATTENTION_MAP_NAMES)}", "choose from those with --map-names")
    return names


def run_info(args: argparse.Namespace) -> int:
    from . import engine, model_card, weights

    model_path = args.weights or weights.bundled_model_path()
    if args.weights or model_path.is_file():
        print(describe_model(model_path))
        card = model_card.model_card_text() if not args.weights else ""
        if card:
            print()
            print(card.rstrip())
    else:
        print(f"No trained model is bundled with this copy of AttentionUNetSeg (looked for {model_path}).")
        print("Pass a model file to any command with --weights FILE, e.g.")
        print("  attention-unet-seg segment ct.nii.gz -o pancreas.nii.gz --weights model.safetensors")
    print()
    print(f"Devices: {engine.describe_gpu()}; --device auto uses {engine.resolve_device('auto')}; "
          f"{os.cpu_count()} CPU cores")
    return 0


def describe_model(path: Path) -> str:
    """A few lines on a verified model file: what it is and what it expects."""
    from .weights import read_spec

    spec = read_spec(path)
    net = spec.network
    filters = ", ".join(map(str, net.filters))
    supervision = "on" if net.deep_supervision else "off"
    spacing = " x ".join(f"{s:g}" for s in spec.spacing_mm)
    tiles = " x ".join(map(str, spec.roi_size))
    lines = [
        f"Model: {path}",
        f"  version {spec.version}; labels {', '.join(spec.label_names)}",
        f"  network: feature scale {net.feature_scale}, deep width {net.deep_width} (filters {filters}), "
        + f"{net.norm} norm, "
        + f"{net.gates_per_level} gate(s) per level, deep supervision {supervision}",
        f"  input: {spacing} mm voxels, HU {spec.hu_range[0]:g}..{spec.hu_range[1]:g}, tiles {tiles}",
    ]
    if spec.training:
        lines.append(f"  training: {spec.training}")
    return "\n".join(lines)


def load_segmenter(args: argparse.Namespace):
    """The verified weights on the device asked for."""
    from .engine import SegmentationOptions, Segmenter

    options = SegmentationOptions(device=args.device, quality="fast" if args.fast else "full",
                                  tta=args.tta)
    return Segmenter(args.weights, options)


def segment_with_progress(segmenter, image: sitk.Image, mode: str, maps: tuple[str, ...] = ("combined",)):
    with progress_reporter(mode) as report:
        return segmenter.segment(image, progress=report, maps=maps)


@contextlib.contextmanager
def progress_reporter(mode: str) -> Iterator[Callable[[float, str], None]]:
    """A ``(fraction, text)`` callback: a tqdm bar on stderr, ``PROGRESS`` lines on stdout, or silence."""
    if mode == "lines":
        yield lambda fraction, text: print(f"PROGRESS {fraction:.3f} {text}", flush=True)
        return
    if mode == "none":
        yield lambda fraction, text: None
        return
    from tqdm import tqdm

    bars = []  # made on the first report: input refused before any work gets no bar above its error line

    def report(fraction: float, text: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, file=sys.stderr, bar_format="{desc:<30.30} {percentage:3.0f}%|{bar}| {elapsed}"))
        bars[0].set_description_str(text, refresh=False)
        bars[0].update(max(round(fraction * 100) - bars[0].n, 0))

    try:
        yield report
    except BaseException:
        for bar in bars:
            bar.leave = False  # an error line follows; no half bar above it
        raise
    finally:
        for bar in bars:
            bar.close()


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Library warnings (e.g. the GPU-out-of-memory fallback) as single ``warning:`` lines."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler or a container stopping the command) cleans up like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
