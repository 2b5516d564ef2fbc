"""The Slicer panel's segmentation run, without Qt: a child process speaking :mod:`protocol`, and its import.

Inference runs in a separate Python process (Slicer's own ``PythonSlicer``) so that Slicer stays responsive,
Cancel can stop it at once, and a crashing GPU driver takes down only the child. ``PythonSlicer`` is not
Python but CTK's application launcher: it runs the real interpreter as *its* child and passes our pipes
straight through. So the child is started in a process group (a session on POSIX) and Cancel ends that whole
group, never waiting on a pipe for longer than a moment.

The child computes every attention map: the shown one is imported with the segmentation, the others stay in
its work folder until shown (an import of a fraction of a second), so another gate never costs a second run
and always comes from the device and quality that made the segmentation.

The result is imported with :func:`mrml_bridge.import_volumes`, which changes the scene only once
everything is built, so a failed or cancelled run leaves the scene as it was.

This module imports neither torch, SimpleITK nor Qt, so the Slicer module can import it at start-up.
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import mrml_bridge, protocol
from .errors import Cancelled, UserError
from .outputs import safe_name, summary_line
from .verdict import NOT_FOUND, OK, Verdict

TERMINATE_GRACE_SECONDS = 0.5  # after SIGTERM, before SIGKILL
STOP_WAIT_SECONDS = 1.0  # for the killed process and for its pipes to close
STDERR_LINES_KEPT = 200


class ChildProcess:
    """A child process tree whose stdout and stderr are read by threads, so that nothing ever blocks."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.command = command
        windows = sys.platform == "win32"
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
            start_new_session=not windows,  # its own process group: the launcher and the real Python in it
            creationflags=(subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP) if windows else 0,
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
    def pid(self) -> int:
        """Also the process group ID on POSIX."""
        return self._process.pid

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

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit, then briefly for the last lines: a grandchild may still hold the pipes."""
        returncode = self._process.wait(timeout)
        for reader in self._readers:
            reader.join(STOP_WAIT_SECONDS)
        return returncode

    def stop(self) -> None:
        """End the whole process tree: the launcher, the interpreter it started and anything they started."""
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.pid)], capture_output=True, check=False,
                           timeout=STOP_WAIT_SECONDS * 5, creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self._process.wait(TERMINATE_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            # The launcher installs no handler, so SIGTERM's default action ends it. The kill is for what
            # outlives the grace period: the real interpreter it started (still cleaning up, or ignoring
            # SIGTERM) and anything that one started.
            _signal_group(self.pid, signal.SIGKILL)
        try:
            self.wait(STOP_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            pass


    def tree_alive(self, wait_seconds: float = 0.0) -> bool:
        """Whether a process of the tree still runs after up to ``wait_seconds``. On Linux a killed process
        that its parent (init, in a container often nobody) has not reaped yet counts as gone; on another
        POSIX system the process group must have vanished; on Windows ``taskkill /T`` ended the tree."""
        deadline = time.monotonic() + wait_seconds
        while _living_group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(_living_group_members(self.pid))


def _living_group_members(pgid: int) -> list[int]:
    if sys.platform == "win32":
        return []
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry))
    return members


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _pump(stream, sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line.rstrip("\r\n"))
    stream.close()


@dataclass
class RunResult:
    """What a finished run measured and put in the scene (nothing when no pancreas was found)."""

    report: protocol.ChildResult
    seconds: float  # wall time of the whole run, import included
    outputs: object | None  # mrml_bridge.SegmentationOutputs; None when no pancreas was found
    maps_on_disk: dict[str, Path] = field(default_factory=dict)  # the child's maps not imported yet
    _work_dir: Path | None = None
    _scene: object = None
    _volume_node: object = None

    @property
    def found(self) -> bool:
        return self.report.qc != NOT_FOUND

    @property
    def volume_ml(self) -> float:
        return self.report.volume_ml

    @property
    def device(self) -> str:
        return self.report.device

    @property
    def needs_checking(self) -> bool:
        return self.report.qc != OK

    def summary(self) -> str:
        """The one wording of every front end (:func:`outputs.summary_line`), without the time."""
        report = self.report
        return summary_line(report.volume_ml, Verdict(report.qc, report.confidence, report.reason))

    def attention_node(self, name: str):
        """The node of attention map ``name``, imported from the child's file on first use (no process is started;
        None when nothing was found, for an unknown name, or once the files were discarded)."""
        if self.outputs is None:
            return None
        nodes = self.outputs.attention_nodes
        if name not in nodes and name in self.maps_on_disk:
            volume = mrml_bridge.read_volume_file(self.maps_on_disk.pop(name))
            nodes[name] = mrml_bridge.add_attention_map(self._scene, self._volume_node, name, volume)
        return nodes.get(name)

    def discard_files(self) -> None:
        """Remove the child's files (the maps not imported can then no longer be shown)."""
        self.maps_on_disk.clear()
        _remove(self._work_dir)
        self._work_dir = None


class ChildRun:
    """What the panel's runs share: a child process tree, its progress lines, waiting and the error it left.

    Subclasses start ``self.child`` and implement ``running``, ``cancel`` and ``finish``. Callbacks a front end
    attaches (``on_progress``, ``on_complete``) travel with the run.
    """

    what = "process"  # named in an unexpected failure's message

    def __init__(self, python: str | None):
        self.python = python or sys.executable
        self.command: list[str] = []
        self.child: ChildProcess | None = None
        self.last_progress = protocol.Progress(0.0, "")
        self.on_progress: Callable[[protocol.Progress], None] | None = None
        self.on_complete: Callable[[object, BaseException | None], None] | None = None

    def poll(self) -> list[protocol.Progress]:
        """Progress reported since the last call (never blocks)."""
        if self.child is None:
            return []
        updates = [u for u in map(protocol.parse_progress, self.child.stdout_lines()) if u is not None]
        if updates:
            self.last_progress = updates[-1]
        return updates

    def wait(self, progress: Callable[[protocol.Progress], None] | None = None, interval: float = 0.05,
             idle: Callable[[], None] | None = None):
        """Block until the child ends, reporting progress and calling ``idle()`` on every pass (a GUI's
        event processing), then :meth:`finish`."""
        while True:
            running = self.running
            for update in self.poll():
                if progress is not None:
                    progress(update)
            if idle is not None:
                idle()
            if not running:
                return self.finish()
            time.sleep(interval)

    def _child_error(self, returncode: int) -> UserError:
        line = protocol.user_error_line(self.child.stderr_lines)
        if returncode == protocol.EXIT_USER_ERROR and line:
            return UserError(line)
        last = line or next((text for text in reversed(self.child.stderr_lines) if text.strip()), "")
        return UserError(
            f"the {self.what} stopped unexpectedly (exit status {returncode})",
            last.strip() or "it printed no error",
            "try again with device CPU; the Python console shows the full log",
        )


class SegmentationRun(ChildRun):
    """One segmentation of a volume node in a child process: ``start``, ``poll``, then ``finish`` or ``cancel``.

    ``scene`` is a vtkMRMLScene (Slicer's or slicer-core's); nothing in it changes before ``finish``.
    The child computes every map of ``protocol.ATTENTION_MAP_NAMES``; ``shown_map`` is imported with the
    segmentation (None: no map), the others on demand (:meth:`RunResult.attention_node`) from the child's
    files, kept until :meth:`RunResult.discard_files`.
    """

    what = "segmentation process"

    def __init__(self, scene, volume_node, segmentation_node=None, *, device: str = "auto", quality: str = "full",
                 shown_map: str | None = protocol.ATTENTION_MAP_NAMES[0], weights: Path | None = None,
                 python: str | None = None, work_root: str | Path | None = None):
        refuse_as_input(volume_node)
        if quality not in protocol.QUALITY_CHOICES:
            raise ValueError(f"quality must be one of {protocol.QUALITY_CHOICES}, not {quality!r}")
        if shown_map is not None and shown_map not in protocol.ATTENTION_MAP_NAMES:
            raise ValueError(f"shown_map must be one of {protocol.ATTENTION_MAP_NAMES} or None, not {shown_map!r}")
        super().__init__(python)
        self.scene, self.volume_node, self.segmentation_node = scene, volume_node, segmentation_node
        self.device, self.quality, self.weights, self.shown_map = device, quality, weights, shown_map
        self.work_root = work_root
        self._work_dir: Path | None = None
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._lock = threading.Lock()
        self._started = 0.0
        self._cancelled = False

    def start(self) -> None:
        """Check the input, then write it and start the child in a worker thread (the caller never waits)."""
        self._started = time.perf_counter()
        voxels, geometry = mrml_bridge.volume_node_voxels(self.volume_node)  # a clear UserError for an empty node
        self._work_dir = Path(tempfile.mkdtemp(prefix="AttentionUNetSeg-", dir=self.work_root))
        # named after the node, so that the child's messages name the volume the user knows
        input_path = self._work_dir / "input" / f"{safe_name(self.volume_node.GetName() or '') or 'input'}.nrrd"
        self.command = protocol.segment_command(self.python, input_path, self._work_dir, self.device, self.quality,
                                                self.weights)
        self._starter = threading.Thread(target=self._write_and_launch, args=(voxels, geometry, input_path),
                                         daemon=True)
        self._starter.start()

    @property
    def running(self) -> bool:
        starting = self._starter is not None and self._starter.is_alive()
        return starting or (self.child is not None and self.child.running)

    def cancel(self) -> None:
        """Stop the child's whole process tree and remove its files; the scene is untouched."""
        with self._lock:
            self._cancelled = True  # the starter launches nothing from now on
        if self._starter is not None:
            self._starter.join(STOP_WAIT_SECONDS)
        if self.child is not None:
            self.child.stop()
        _remove(self._work_dir)
        self._work_dir = None

    def finish(self) -> RunResult:
        """Wait for the child, then import its result into the scene (raises ``UserError`` or ``Cancelled``)."""
        try:
            if self._cancelled:
                raise Cancelled("segmentation cancelled")
            if self._starter is None:
                raise RuntimeError("the run was not started")
            self._starter.join()
            if self._start_error is not None:
                raise self._start_error
            returncode = self.child.wait()
            self.poll()
            _remove(self._work_dir / "input")
            if returncode != 0:
                raise self._child_error(returncode)
            result = self._import(protocol.read_result(self._work_dir))
        except BaseException:
            _remove(self._work_dir)
            self._work_dir = None
            raise
        if not result.maps_on_disk:
            result.discard_files()
        return result

    # --- internals ------------------------------------------------------------------------------------

    def _write_and_launch(self, voxels, geometry, input_path: Path) -> None:
        try:
            input_path.parent.mkdir()
            protocol.write_input(input_path, voxels, geometry)
            with self._lock:
                if not self._cancelled:
                    self.child = ChildProcess(self.command, env=protocol.child_environment())
        except BaseException as exc:  # noqa: BLE001 -- handed to finish(), in the caller's thread
            self._start_error = _start_error(exc, self.python)

    def _import(self, report: protocol.ChildResult) -> RunResult:
        on_disk = {name: protocol.map_path(self._work_dir, name) for name in protocol.ATTENTION_MAP_NAMES}
        result = RunResult(report, 0.0, None, on_disk, self._work_dir, self.scene, self.volume_node)
        if result.found:  # an empty segment is no result: the scene stays as it was
            mask = mrml_bridge.read_volume_file(self._work_dir / protocol.SEGMENTATION_FILE)
            shown = [] if self.shown_map is None else [self.shown_map]
            maps = {name: mrml_bridge.read_volume_file(on_disk.pop(name)) for name in shown}
            result.outputs = mrml_bridge.import_volumes(self.scene, self.volume_node, mask, maps,
                                                        self.segmentation_node)
        else:
            on_disk.clear()
        result.seconds = time.perf_counter() - self._started
        return result


class FinetuneRun(ChildRun):
    """A fine-tune of the model on the cases in ``cases_dir`` into ``output_dir``, in a child process: ``start``,
    ``poll``, then ``finish`` (the card of the new weights) or ``cancel``.

    Cancel ends the process tree: the best weights so far stay in ``output_dir`` (the child publishes each
    version whole), and the same run started again resumes from its last checkpoint.
    """

    what = "fine-tuning process"

    def __init__(self, cases_dir: Path, output_dir: Path, *, minutes: float = 10.0, device: str = "auto",
                 weights: Path | None = None, steps: int | None = None, python: str | None = None):
        super().__init__(python)
        self.output_dir = Path(output_dir)
        self.command = protocol.finetune_command(self.python, Path(cases_dir), self.output_dir, minutes, device,
                                                 weights, steps)
        self._cancelled = False

    def start(self) -> None:
        try:
            self.child = ChildProcess(self.command, env=protocol.child_environment())
        except FileNotFoundError as exc:
            raise _start_error(exc, self.python) from None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def cancel(self) -> None:
        self._cancelled = True
        if self.child is not None:
            self.child.stop()

    def finish(self) -> dict:
        """Wait for the child; the card of the weights it wrote (raises ``UserError`` or ``Cancelled``)."""
        if self._cancelled:
            raise Cancelled("fine-tuning cancelled")
        returncode = self.child.wait()
        self.poll()
        if returncode != 0:
            raise self._child_error(returncode)
        return protocol.read_finetune_card(self.output_dir)


def refuse_as_input(volume_node) -> None:
    """Only a plain scalar volume can be a CT: not nothing, a label map, or one of this module's outputs."""
    if volume_node is None:
        raise UserError("no input CT is selected", "", "select a CT volume")
    name = volume_node.GetName() or volume_node.GetID()
    if volume_node.GetAttribute(mrml_bridge.OUTPUT_ATTRIBUTE):
        raise UserError(f"{name} is an attention map of this module", "it is not a CT", "select the CT itself")
    if volume_node.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise UserError(f"{name} is a {volume_node.GetClassName()[len('vtkMRML'):]}", "a CT is a scalar volume",
                        "select a CT volume")


def is_ct_candidate(volume_node) -> bool:
    """Whether a node may be offered as input CT (the test :func:`refuse_as_input` makes, without raising)."""
    try:
        refuse_as_input(volume_node)
    except UserError:
        return False
    return True


class GpuQuery:
    """Which GPU torch sees, asked through the protocol in a child, so Slicer itself never imports torch."""

    def __init__(self, python: str | None = None):
        self.child = ChildProcess(protocol.gpu_command(python or sys.executable), env=protocol.child_environment())

    @property
    def done(self) -> bool:
        return not self.child.running

    def answer(self) -> str:
        """The description (waits for the child if it still runs)."""
        returncode = self.child.wait()
        answer = protocol.read_gpu_answer(self.child.stdout_lines())
        if returncode == 0 and answer:
            return answer
        problem = next((line for line in reversed(self.child.stderr_lines) if line.strip()), f"exit {returncode}")
        return f"could not check the GPU ({problem.strip()})"

    def stop(self) -> None:
        self.child.stop()


def _start_error(exc: BaseException, python: str) -> BaseException:
    if isinstance(exc, FileNotFoundError) and exc.filename == python:
        return UserError(f"the Python to run the network ({python}) was not found", "",
                         "reinstall Slicer, or check that PythonSlicer is beside the Slicer executable")
    if isinstance(exc, OSError):
        return UserError("could not write the CT for the segmentation process", str(exc),
                         "free disk space in Slicer's temporary folder (Application Settings > General)")
    return exc


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
