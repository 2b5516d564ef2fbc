"""Segment a cohort: every CT under the inputs, through one loaded model, into OUT/<case>/ with OUT/summary.csv.

INPUT is a folder (every CT file and every DICOM series under it is one case), a CSV with a 'path' column
(its other columns are carried into the summary; relative paths are relative to the CSV), or a CT file.
Each case gets OUT/<case>/ with the segmentation, the combined attention map and report.json (the report of
'segment --report'); a case that fails is one status=error row and the batch goes on. Running the same
command again skips the cases already done and redoes any that were cut off.

Exit status: 0 when every case succeeded, 1 when some failed (the summary says which), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from AttentionUNetSegLib import cli, outputs
from AttentionUNetSegLib.errors import UserError

from . import inputs, steps
from .summary import SUMMARY_NAME, Summary

ENGINES = ("local", "ray")
LOCK_NAME = ".batch.lock"
EXIT_SOME_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="folder of CT files and DICOM series, CSV with a 'path' column, or CT file")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, metavar="OUT",
                        help="folder for OUT/<case>/ and OUT/summary.csv (created if missing)")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process holds the model (default); ray: Ray actors, here or on a cluster")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="join this Ray cluster (e.g. HEAD:6379 or auto); default: a local Ray instance")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="ray: model workers (default: one per GPU, else one per node)")
    parser.add_argument("--label-format", choices=outputs.LABEL_FORMATS, default="seg.nrrd",
                        help="segmentation file: seg.nrrd (Slicer segment) or nii.gz (default: seg.nrrd)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write pancreas.dcm, a DICOM SEG, for each DICOM series (needs the dicom extra)")
    parser.add_argument("--progress", choices=("bar", "none"), default="bar", help="bar on stderr, or none")
    cli.add_model_arguments(parser, progress=False)


def run(args: argparse.Namespace) -> int:
    out_dir = _check_usage(args)
    cases, carried = inputs.discover(args.inputs, exclude=out_dir)
    # Case folders are replaced whole: none may be an input or hold one; nor may OUT (a rerun would take its files
    # for CTs).
    outputs.refuse_clashes([*args.inputs, *(case.input for case in cases)],
                           [out_dir, *(out_dir / case.name for case in cases)])
    layout = steps.Layout(args.label_format, args.dicom_seg)
    if args.dicom_seg:
        _check_dicom_seg(cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _sole_writer(out_dir):
        return _run_locked(args, cases, carried, out_dir, layout)


@contextlib.contextmanager
def _sole_writer(out_dir: Path):
    """Hold OUT's lock: a second batch into the same folder would remove this one's staging and summary rows."""
    from filelock import FileLock, Timeout

    lock = FileLock(out_dir / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another batch is writing into {out_dir}", "two batches in one folder would overwrite "
                        "each other's cases and summary", "wait for it to finish, or pass another -o") from None
    try:
        yield
    finally:
        lock.release()


def _run_locked(args, cases, carried, out_dir: Path, layout: steps.Layout) -> int:
    steps.remove_staging(out_dir)
    summary = Summary(out_dir / SUMMARY_NAME, cases, carried)
    todo = _resume(cases, out_dir, layout, summary)
    with _Progress(len(cases), len(cases) - len(todo), args.progress) as progress:
        def on_ok(case, report):
            summary.record_ok(case.name, report)
            progress.advance()

        def on_error(case, reason, seconds):
            summary.record_error(case.name, reason, seconds)
            progress.advance(failed=True)
            progress.log(f"{case.name}: error: {reason}")

        try:
            _run_engine(args, todo, out_dir, layout, on_ok, on_error, progress.log)
        except KeyboardInterrupt:
            summary.write()
            progress.close()
            print(f"error: interrupted; the {summary.count('ok')} finished case(s) in {out_dir} are kept; "
                  "run the same command again to do the rest", file=sys.stderr)
            return cli.EXIT_INTERRUPTED
    print(_closing_line(summary, len(cases) - len(todo), out_dir), flush=True)
    if summary.unwritten:
        print(f"error: {summary.unwritten}, then run the same command again (finished cases are kept)",
              file=sys.stderr)
        return cli.EXIT_USER_ERROR
    return EXIT_SOME_FAILED if summary.failed() else 0


def _check_usage(args: argparse.Namespace) -> Path:
    if args.ray_address and args.engine != "ray":
        raise UserError("--ray-address is for --engine ray", "", "add --engine ray")
    if args.workers is not None and args.engine != "ray":
        raise UserError("--workers is for --engine ray", "the local engine runs one model on all CPU cores or the GPU",
                        "add --engine ray to run several")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}", "a batch needs at least one worker", "pass 1 or more")
    if args.weights and not Path(args.weights).is_file():
        raise UserError(f"model file {args.weights} does not exist", "", "check the path")
    return outputs.check_output_folder(args.output_dir.absolute())


def _check_dicom_seg(cases: list[inputs.Case]) -> None:
    from .. import dicom_seg

    others = [case for case in cases if not case.is_dicom]
    if len(others) == len(cases):
        dicom_seg.require_dicom_input(cases[0].input)
    dicom_seg.require_highdicom()  # before any work, not in every case
    if others:
        print(f"warning: --dicom-seg: {len(others)} of {len(cases)} cases are not DICOM series and get no DICOM SEG",
              file=sys.stderr)


def _resume(cases, out_dir: Path, layout: steps.Layout, summary: Summary) -> list:
    """The cases still to do; the others' rows filled in from their reports."""
    todo = []
    for case in cases:
        report = steps.finished_report(out_dir, case, layout)
        if report is None:
            todo.append(case)
        else:
            summary.record_ok(case.name, report, save=False)
    summary.write()
    return todo


def _run_engine(args, cases, out_dir, layout, on_ok, on_error, log) -> None:
    if not cases:
        return
    if args.engine == "ray":
        from . import ray_engine

        ray_engine.run(cases, out_dir, layout, args, on_ok, on_error, log)
    else:
        from . import local

        local.run(cases, out_dir, layout, cli.load_segmenter(args), on_ok, on_error)


def _closing_line(summary: Summary, skipped: int, out_dir: Path) -> str:
    failed = summary.failed()
    line = f"{len(summary.rows)} case(s): {summary.count('ok')} ok, {len(failed)} failed"
    if skipped:
        line += f" ({skipped} already done)"
    if failed:
        line += f": {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}"
    return f"{line}; summary in {out_dir / SUMMARY_NAME}"


class _Progress:
    """A tqdm bar: cases done of all, failed, rate and time left; lines printed above it."""

    def __init__(self, total: int, done: int, mode: str):
        from tqdm import tqdm

        self.failed = 0
        self.bar = tqdm(total=total, initial=done, unit="case", file=sys.stderr, disable=mode == "none",
                        dynamic_ncols=True, postfix={"failed": 0})
        self._tqdm = tqdm

    def advance(self, failed: bool = False) -> None:
        if failed:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def log(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
