"""The Slicer panel's segmentation run, without Qt: a child process running the CLI, its progress, its import.

Inference runs in a separate Python process (Slicer's own ``PythonSlicer``) so that Slicer stays responsive,
Cancel can stop it at once, and a crashing GPU driver takes down only the child. The protocol is the CLI's:

    python -m AttentionUNetSegLib.cli segment INPUT.nrrd -o OUTPUT.nrrd --attention-maps DIR --progress lines

The child prints ``PROGRESS <fraction> <text>`` lines and finally ``Pancreas <mL> mL; <s> s on <device>`` on
stdout; a problem the user can fix ends as one ``error: ...`` line on stderr (exit 2); SIGTERM stops it
cleanly (exit 130). The result is imported with :func:`mrml_bridge.import_result`, which changes the scene
only once everything is built, so a failed or cancelled run leaves the scene as it was.

This module imports neither torch nor Qt, so the Slicer module can import it at start-up.
"""

from __future__ import annotations

import collections
import html
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import Cancelled, UserError

PROGRESS_PREFIX = "PROGRESS "
SUMMARY_PATTERN = re.compile(r"^Pancreas (?P<ml>[\d.]+) mL; (?P<seconds>[\d.]+) s on (?P<device>\S+)$")
DEVICE_CHOICES = {"Auto": "auto", "GPU": "cuda", "CPU": "cpu"}  # panel label -> CLI --device
QUALITY_CHOICES = ("full", "fast")
ATTENTION_MAP_CHOICES = ("combined", "level2", "level3", "level4")  # the maps the panel imports and offers
# Panel label -> (colour node kind, type constant); the first matches the bridge's default heat map.
ATTENTION_COLOUR_MAPS = {
    "Heat": ("PET", "PETheat"),
    "Rainbow": ("PET", "PETrainbow"),
    "Hot metal blue": ("PET", "PEThotMetalBlue"),
    "Iron": ("table", "Iron"),
}
# What the child imports in Slicer's Python besides torch, which comes from the PyTorch extension: the
# runtime's dependencies in pyproject.toml (a test checks it). Slicer bundles numpy and SimpleITK, so a
# first run installs only safetensors; never slicer-core or vtk: Slicer has its own.
TORCH_REQUIREMENT = ">=2.1,<3"
SLICER_REQUIREMENTS = (
    "numpy>=1.24",
    "SimpleITK>=2.3",
    "safetensors>=0.4",
)
TERMINATE_GRACE_SECONDS = 5.0
STDERR_LINES_KEPT = 200


@dataclass(frozen=True)
class Progress:
    fraction: float
    text: str


@dataclass
class RunResult:
    """What a finished run put in the scene and what it measured."""

    outputs: object  # mrml_bridge.SegmentationOutputs
    volume_ml: float
    seconds: float  # wall time of the whole run, import included
    device: str  # the device the child used ("cpu", "cuda:0", ...)


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


def segment_command(python: str, input_path: Path, output_path: Path, maps_dir: Path, device: str = "auto",
                    quality: str = "full", weights: Path | None = None) -> list[str]:
    """The child's command line (the CLI's ``segment`` with progress lines)."""
    if quality not in QUALITY_CHOICES:
        raise ValueError(f"quality must be one of {QUALITY_CHOICES}, not {quality!r}")
    command = [python, "-m", "AttentionUNetSegLib.cli", "segment", str(input_path), "-o", str(output_path),
               "--attention-maps", str(maps_dir), "--map-names", ",".join(ATTENTION_MAP_CHOICES),
               "--progress", "lines", "--device", device]
    if quality == "fast":
        command.append("--fast")
    if weights is not None:
        command += ["--weights", str(weights)]
    return command


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child imports this copy of the Lib (source tree or Slicer's install folder), output unbuffered."""
    env = dict(os.environ if base is None else base)
    lib_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def missing_requirements(requirements: tuple[str, ...] = SLICER_REQUIREMENTS) -> list[str]:
    """The requirements whose distribution is not installed (versions are left to pip)."""
    missing = []
    for requirement in requirements:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


class ChildProcess:
    """A child process whose stdout and stderr are read by threads, so that polling it never blocks."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.command = command
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
        )
        self._stdout: queue.Queue[str] = queue.Queue()
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._readers = [
            threading.Thread(target=_pump, args=(self._process.stdout, self._stdout.put), daemon=True),
            threading.Thread(target=_pump, args=(self._process.stderr, self.stderr_lines.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stdout_lines(self) -> list[str]:
        """The stdout lines that arrived since the last call."""
        lines = []
        while True:
            try:
                lines.append(self._stdout.get_nowait())
            except queue.Empty:
                return lines

    def wait(self) -> int:
        """Wait for the exit and for the last lines to be read; the exit status."""
        returncode = self._process.wait()
        for reader in self._readers:
            reader.join()
        return returncode

    def stop(self) -> None:
        """SIGTERM (the CLI cleans up and exits 130), then kill if it does not exit in time."""
        if self.running:
            self._process.terminate()
            try:
                self._process.wait(TERMINATE_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self.wait()


def _pump(stream, sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line.rstrip("\r\n"))
    stream.close()


class SegmentationRun:
    """One segmentation of a volume node in a child process: ``start``, ``poll``, then ``finish`` or ``cancel``.

    ``scene`` is a vtkMRMLScene (Slicer's or slicer-core's); nothing in it changes before ``finish``.
    """

    def __init__(self, scene, volume_node, segmentation_node=None, *, device: str = "auto", quality: str = "full",
                 weights: Path | None = None, python: str | None = None, work_root: str | Path | None = None):
        if volume_node is None:
            raise UserError("no input CT is selected", "", "select a CT volume")
        if quality not in QUALITY_CHOICES:
            raise ValueError(f"quality must be one of {QUALITY_CHOICES}, not {quality!r}")
        self.scene, self.volume_node, self.segmentation_node = scene, volume_node, segmentation_node
        self.device, self.quality, self.weights = device, quality, weights
        self.python = python or sys.executable
        self.work_root = work_root
        self.child: ChildProcess | None = None
        self.summary: re.Match | None = None
        self.last_progress = Progress(0.0, "")
        self._work_dir: Path | None = None
        self._started = 0.0
        self._cancelled = False

    def start(self) -> None:
        """Write the input as NRRD into a fresh work folder and start the child."""
        from . import imageio, mrml_bridge

        self._started = time.perf_counter()
        image = mrml_bridge.volume_node_to_image(self.volume_node)  # a clear UserError for an empty node
        self._work_dir = Path(tempfile.mkdtemp(prefix="AttentionUNetSeg-", dir=self.work_root))
        try:
            self._input_path.parent.mkdir()
            imageio.write_image(image, self._input_path, compress=False)
            command = segment_command(self.python, self._input_path, self._output_path, self._maps_dir,
                                      self.device, self.quality, self.weights)
            self.child = ChildProcess(command, env=child_environment())
        except BaseException:
            self._remove_work_dir()
            raise

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def poll(self) -> list[Progress]:
        """Progress reported since the last call (never blocks)."""
        return self._read_stdout() if self.child is not None else []

    def cancel(self) -> None:
        """Stop the child and remove its files; the scene is untouched."""
        self._cancelled = True
        if self.child is not None:
            self.child.stop()
        self._remove_work_dir()

    def finish(self) -> RunResult:
        """Wait for the child, then import its result into the scene (raises ``UserError`` or ``Cancelled``)."""
        if self.child is None:
            raise RuntimeError("the run was not started")
        try:
            returncode = self.child.wait()
            self._read_stdout()
            if self._cancelled:
                raise Cancelled("segmentation cancelled")
            if returncode != 0:
                raise self._child_error(returncode)
            return self._import()
        finally:
            self._remove_work_dir()

    def wait(self, progress: Callable[[Progress], None] | None = None, interval: float = 0.1) -> RunResult:
        """Block until the child ends, reporting progress, and import the result."""
        while self.running:
            for update in self.poll():
                if progress is not None:
                    progress(update)
            time.sleep(interval)
        for update in self.poll():
            if progress is not None:
                progress(update)
        return self.finish()

    # --- internals ------------------------------------------------------------------------------------

    @property
    def _input_path(self) -> Path:
        """Named after the node, so that the child's messages name the volume the user knows."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.volume_node.GetName() or "").strip("._") or "input"
        return self._work_dir / "input" / f"{name}.nrrd"

    @property
    def _output_path(self) -> Path:
        return self._work_dir / "pancreas.nrrd"

    @property
    def _maps_dir(self) -> Path:
        return self._work_dir / "attention"

    def _read_stdout(self) -> list[Progress]:
        updates = []
        for line in self.child.stdout_lines():
            update = parse_progress(line)
            if update is not None:
                self.last_progress = update
                updates.append(update)
            elif SUMMARY_PATTERN.match(line):
                self.summary = SUMMARY_PATTERN.match(line)
        return updates

    def _child_error(self, returncode: int) -> UserError:
        errors = [line for line in self.child.stderr_lines if line.startswith("error: ")]
        if returncode == 2 and errors:
            return UserError(errors[-1][len("error: "):])
        last = errors[-1] if errors else next((line for line in reversed(self.child.stderr_lines) if line.strip()), "")
        return UserError(
            f"the segmentation process stopped unexpectedly (exit status {returncode})",
            last.strip() or "it printed no error",
            "try again with device CPU; the Python console shows the full log",
        )

    def _import(self) -> RunResult:
        import SimpleITK as sitk

        from . import mrml_bridge

        mask = sitk.ReadImage(str(self._output_path))
        # A model with fewer gate levels writes fewer maps; "combined" is always there.
        files = {name: self._maps_dir / f"{name}.nrrd" for name in ATTENTION_MAP_CHOICES}
        maps = {name: sitk.ReadImage(str(path)) for name, path in files.items() if path.is_file()}
        outputs = mrml_bridge.import_result(self.scene, self.volume_node, mask, maps, self.segmentation_node)
        device = self.summary.group("device") if self.summary else self.device
        return RunResult(outputs, _volume_ml(mask), time.perf_counter() - self._started, device)

    def _remove_work_dir(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None


def _volume_ml(mask) -> float:
    import SimpleITK as sitk

    statistics = sitk.StatisticsImageFilter()
    statistics.Execute(sitk.Cast(mask != 0, sitk.sitkUInt8))
    voxel_ml = 1.0
    for spacing in mask.GetSpacing():
        voxel_ml *= spacing
    return statistics.GetSum() * voxel_ml / 1000.0


class GpuQuery:
    """Which GPU torch sees (``engine.describe_gpu``), asked in a child so Slicer itself never imports torch."""

    CODE = "from AttentionUNetSegLib.engine import describe_gpu; print(describe_gpu())"

    def __init__(self, python: str | None = None):
        self.child = ChildProcess([python or sys.executable, "-c", self.CODE], env=child_environment())

    @property
    def done(self) -> bool:
        return not self.child.running

    def answer(self) -> str:
        """The description (waits for the child if it still runs)."""
        returncode = self.child.wait()
        lines = [line for line in self.child.stdout_lines() if line.strip()]
        if returncode == 0 and lines:
            return lines[-1]
        problem = next((line for line in reversed(self.child.stderr_lines) if line.strip()), f"exit {returncode}")
        return f"could not check the GPU ({problem.strip()})"


def set_attention_colour_map(scene, attention_node, label: str) -> None:
    """Colour an attention volume with one of :data:`ATTENTION_COLOUR_MAPS`, adding the colour node if missing."""
    import slicer

    kind, type_name = ATTENTION_COLOUR_MAPS[label]
    if kind == "PET":
        node_class = slicer.vtkMRMLPETProceduralColorNode
        node_id = slicer.vtkMRMLColorLogic.GetPETColorNodeID(getattr(node_class, type_name))
    else:
        node_class = slicer.vtkMRMLColorTableNode
        node_id = slicer.vtkMRMLColorLogic.GetColorTableNodeID(getattr(node_class, type_name))
    if scene.GetNodeByID(node_id) is None:  # Slicer makes them all at start-up; a slicer-core scene has none
        colour = node_class()
        colour.SetType(getattr(node_class, type_name))
        colour.SetName(colour.GetTypeAsString())
        colour.SetSingletonTag(colour.GetTypeAsString())  # the ID Slicer gives it
        colour.SaveWithSceneOff()
        scene.AddNode(colour)
    attention_node.GetDisplayNode().SetAndObserveColorNodeID(node_id)


def model_card_summary(card: str) -> tuple[str, str]:
    """The card's first paragraph and its limitations section (the parts every front end shows)."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in card.splitlines():
        if line.startswith("#"):
            sections.append((line.lstrip("#").strip(), []))
        else:
            sections[-1][1].append(line)
    paragraphs = [p.strip() for title, lines in sections if not title.lower().startswith("limit")
                  for p in "\n".join(lines).split("\n\n") if p.strip()]
    limits = [("\n".join(lines)).strip() for title, lines in sections if title.lower().startswith("limit")]
    return (paragraphs[0] if paragraphs else ""), "\n".join(text for text in limits if text)


def model_card_summary_html(card: str) -> str:
    """The card's summary as HTML for the Slicer module's help text."""
    summary, limits = model_card_summary(card)
    parts = [f"<p>{_html_lines(summary)}</p>"] if summary else []
    parts += [f"<p><b>Limitations:</b><br>{_html_lines(limits)}</p>"] if limits else []
    return "\n".join(parts)


def _html_lines(text: str) -> str:
    return "<br>".join(html.escape(line.strip()) for line in text.strip().splitlines())
