"""The web app's behaviour: one CT in trame-slicer's scene, one Segmenter, and the page state they drive.

All tabs share one session (trame's state and trame-slicer's scene and views belong to the process). What the
server decides (busy flags, status, result) it keeps itself and only shows in the state: a client that writes
one of those keys is answered with the server's value. What a client may choose (window/level, gate, ...) is
checked before it is used, and a refused choice is undone with one line saying what is allowed.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from pathlib import Path

import SimpleITK as sitk
from trame.app import TrameApp
from trame_slicer.core import LayoutManager, SlicerApp, VolumeWindowLevel
from trame_slicer.rca_view import register_rca_factories

from AttentionUNetSegLib import imageio, mrml_bridge, outputs
from AttentionUNetSegLib.engine import ATTENTION_MAP_NAMES, Segmenter
from AttentionUNetSegLib.errors import Cancelled, UserError
from AttentionUNetSegLib.model_card import model_card_summary, model_card_text
from AttentionUNetSegLib.outputs import summary_line

from . import guard, ui, upload

logger = logging.getLogger(__name__)
# Slicer's CT window/level presets (window, level) in HU; the first is the default.
WINDOW_LEVEL_PRESETS = {
    "Abdomen (soft tissue)": (350.0, 40.0),
    "Bone": (1000.0, 400.0),
    "Lung": (1400.0, -500.0),
    "Brain": (100.0, 50.0),
}
SEGMENTATION_FORMATS = (".seg.nrrd", ".nii.gz")
MAX_PATH_CHARS = 4096
# The page's calls, under fixed names: what a client (the page, or any other) can ask the server to do.
TRIGGERS = ("load_server_path", "segment_or_cancel", "upload_begin", "upload_part", "upload_end",
            "segmentation_file", "attention_file")


def _one_of(options):
    return lambda value: isinstance(value, str) and value in options


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


# What a client may choose: the check a request must pass, and what the refusal says is allowed.
CHOICES = {
    "window_level_preset": (_one_of(WINDOW_LEVEL_PRESETS), "one of " + ", ".join(WINDOW_LEVEL_PRESETS)),
    "attention_gate": (_one_of(ATTENTION_MAP_NAMES), "one of " + ", ".join(ATTENTION_MAP_NAMES)),
    "attention_opacity": (_is_fraction, "a number from 0 to 1"),
    "attention_visible": (lambda value: isinstance(value, bool), "true or false"),
    "segmentation_format": (_one_of(SEGMENTATION_FORMATS), "one of " + ", ".join(SEGMENTATION_FORMATS)),
}
CLEARABLE = ("error_message",)  # server-owned, but the page's close button may empty it


class PancreasWebApp(TrameApp):
    """Loads a CT, segments it in a worker thread, and shows the result in Slicer's views."""

    def __init__(self, segmenter: Segmenter, server=None, *, data_dir: Path | None = None,
                 max_upload_bytes: int = upload.DEFAULT_MAX_UPLOAD_MB * 2**20):
        super().__init__(server=server)
        self.segmenter = segmenter
        self.data_dir = (data_dir or Path.cwd()).resolve()  # loading by path reads only inside it
        self.max_upload_bytes = max_upload_bytes
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        self.ct_image: sitk.Image | None = None
        self.ct_node = None
        self.outputs: mrml_bridge.SegmentationOutputs | None = None
        self.attention_maps: dict[str, sitk.Image] = {}
        self.mask: sitk.Image | None = None
        self._cancel = threading.Event()
        self.background_task: asyncio.Task | None = None  # the running load or segmentation; held so it is not lost
        self._upload: upload.Upload | None = None
        self._upload_owner: str | None = None  # the websocket client sending it
        self.clients = guard.Clients(on_change=self._count_tabs, on_close=self._client_closed)
        self.clients.bind(self.server)
        for name in TRIGGERS:
            self.server.trigger(name)(getattr(self, name))

        register_rca_factories(
            self.slicer.view_manager,
            self.server,
            slice_view_ui_f=ui.slice_view_overlay,
            three_d_view_ui_f=ui.view_overlay,
        )
        self.layout_manager = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout("Four-Up", ui.four_up_layout())
        self.layout_manager.set_layout("Four-Up")
        self._initialise_state()
        self.ui = ui.build_page(self)
        self._bind_state_changes()

    # ---- state ------------------------------------------------------------------------------------------
    def _initialise_state(self) -> None:
        summary, limits = model_card_summary(model_card_text())
        self._owned = {  # the server's own values; the state only shows them
            "model_version": f"Model {self.segmenter.model.path.name} ({self.segmenter.model.spec.version})",
            "model_summary": summary,
            "model_limits": limits,
            "data_dir": str(self.data_dir),
            "max_upload_mb": self.max_upload_bytes // 2**20,
            "tabs_open": 0,
            "ct_name": "",
            "loading": False,
            "uploading": False,
            "window_level_presets": list(WINDOW_LEVEL_PRESETS),
            "segmenting": False,
            "progress": 0,
            "status": "Load a CT to begin.",
            "error_message": "",
            "has_result": False,
            "result_volume": "",
            "result_verdict": "",
            "result_verdict_ok": False,
            "result_time": "",
            "result_device": "",
            "attention_gates": list(ATTENTION_MAP_NAMES),
            "segmentation_formats": list(SEGMENTATION_FORMATS),
        }
        self._choices = {
            "window_level_preset": next(iter(WINDOW_LEVEL_PRESETS)),
            "attention_visible": True,
            "attention_gate": ATTENTION_MAP_NAMES[0],
            "attention_opacity": 0.5,
            "segmentation_format": SEGMENTATION_FORMATS[0],
        }
        self.state.update({"trame__title": "AttentionUNetSeg", "server_path": "", **self._owned, **self._choices})

    def _bind_state_changes(self) -> None:
        # Callbacks take the whole state as keyword arguments, keys a client may invent included: they take **_.
        self.state.change(*self._owned)(lambda **_: self._undo_client_writes())
        for key in CHOICES:
            self.state.change(key)(self._choice_callback(key))

    def _choice_callback(self, key: str):
        return lambda **_: self._on_choice(key)

    def _publish(self, **values) -> None:
        """The server's own values, kept and shown."""
        self._owned.update(values)
        with self.state:
            self.state.update(values)

    def _undo_client_writes(self) -> None:
        for key, value in self._owned.items():
            shown = self.state[key]
            if shown == value:
                continue
            if key in CLEARABLE and shown == "":
                self._owned[key] = ""
            else:
                with self.state:
                    self.state[key] = value

    def _on_choice(self, key: str) -> None:
        value = self.state[key]
        if value == self._choices[key]:
            return
        check, allowed = CHOICES[key]
        if not check(value):
            with self.state:
                self.state[key] = self._choices[key]
            self._show_error(UserError(f"refused the {key.replace('_', ' ')} {repr(value)[:80]}",
                                       f"it must be {allowed}", "choose with the page's controls"))
            return
        self._choices[key] = value
        if key == "window_level_preset":
            self._apply_window_level()
        elif key.startswith("attention_"):
            self._show_attention()

    def _count_tabs(self) -> None:
        self._publish(tabs_open=len(self.clients.authenticated))

    def _client_closed(self, client_id: str) -> None:
        """A tab closed mid-upload: its upload goes, and the other tabs get their upload buttons back."""
        if self._upload is not None and self._upload_owner == client_id:
            self._drop_upload()

    # ---- loading ----------------------------------------------------------------------------------------
    def show_initial_ct(self, image: sitk.Image, name: str) -> None:
        """Put a CT read before the server started into the scene once the views exist."""
        self.server.controller.on_server_ready.add(lambda **_: self._replace_ct(image, name))

    # Handlers only start background tasks: wslink handles one message of a page at a time, so a handler
    # that awaited the work would freeze the page (views and Cancel included) until the work ended.
    def load_server_path(self) -> None:
        typed = self.state.server_path
        if not (isinstance(typed, str) and typed.strip() and len(typed) <= MAX_PATH_CHARS):
            self._show_error(UserError("no path given", f"a path is text of 1 to {MAX_PATH_CHARS} characters",
                                       "type the path of a CT file or DICOM folder on the server"))
            return
        typed = typed.strip()
        self._start_loading(lambda: imageio.read_image(self._inside_data_dir(typed)), display_name(Path(typed)))

    def _inside_data_dir(self, typed: str) -> Path:
        """The typed path in the data folder (a relative one is taken from it). A path outside the folder and a
        missing one get the same answer, so the page cannot learn which of the server's paths exist."""
        try:
            path = (self.data_dir / typed).resolve()  # links resolved: one pointing outside is outside
            inside = path.is_relative_to(self.data_dir) and path.exists()
        except (OSError, ValueError, RuntimeError):  # a NUL in the text, a loop of links
            inside = False
        if not inside:
            raise UserError("no CT at that path", f"the page reads only inside {self.data_dir}, and the path is "
                            "outside it or does not exist", "give the path of a CT file or DICOM folder inside it")
        if not (path.is_file() or path.is_dir()):  # a pipe would block the reading, and the page with it
            raise UserError(f"{path.name} is not a file or a folder", "it is a pipe, socket or device",
                            "give the path of a CT file or DICOM folder")
        return path

    def _start_loading(self, read, name: str, discard=lambda: None) -> None:
        if self._owned["segmenting"] or self._owned["loading"]:
            discard()
            self._show_error(UserError(f"cannot load {name} now", "a segmentation or another load is running",
                                       "wait for it to end, or cancel it"))
            return
        self._publish(loading=True, error_message="")
        self.background_task = asyncio.get_running_loop().create_task(self._load(read, name))

    async def _load(self, read, name: str) -> None:
        try:
            self._replace_ct(await asyncio.to_thread(_read_ct, read, name), name)
        except UserError as error:
            self._show_error(error)
        except Exception as error:  # noqa: BLE001 (the page must say something whatever failed; details go to the log)
            self._show_unexpected_error(f"cannot load {name}", error)
        finally:
            self._publish(loading=False)  # after the CT or the error is shown

    def _replace_ct(self, image: sitk.Image, name: str) -> None:
        """Swap the CT (and drop the previous CT's results) only once the new one is in the scene."""
        node = mrml_bridge.image_to_volume_node(image, self.scene, name)
        self._remove_previous_nodes()
        self.ct_image, self.ct_node = image, node
        display = self.slicer.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(None)
        self._apply_window_level()
        display.reset_views()
        self._publish(ct_name=name, has_result=False, progress=0,
                      status=f"Loaded {name} ({'x'.join(map(str, image.GetSize()))} voxels).")

    def _remove_previous_nodes(self) -> None:
        nodes = [self.ct_node]
        if self.outputs is not None:
            nodes += [self.outputs.segmentation_node, *self.outputs.attention_nodes.values()]
        for node in nodes:
            if node is not None:
                _remove_with_display_nodes(self.scene, node)
        self.outputs, self.mask, self.attention_maps = None, None, {}

    def _apply_window_level(self) -> None:
        if self.ct_node is not None:
            window, level = WINDOW_LEVEL_PRESETS[self._choices["window_level_preset"]]
            VolumeWindowLevel.set_volume_node_window_level(self.ct_node, window, level)

    # ---- upload -----------------------------------------------------------------------------------------
    # The page announces the upload, sends each file in slices, then ends it (ui.UPLOAD_JS); a False answer
    # stops it. One upload at a time: the session is shared.
    def upload_begin(self, files=None, total_bytes=None) -> bool:
        if self._upload is not None and self._upload_owner != self.clients.current:
            self._show_error(UserError("cannot upload now", "another tab is uploading", "wait until its upload ends"))
            return False
        self._drop_upload()  # this tab's own upload, left unfinished
        try:
            self._upload = upload.Upload(files, total_bytes, self.max_upload_bytes)
        except UserError as error:
            self._show_error(error)
            return False
        self._upload_owner = self.clients.current
        self._publish(uploading=True, error_message="")
        return True

    def upload_part(self, name=None, start=None, size=None, data=None) -> bool:
        if not self._owns_upload():
            self._show_error(UserError("refused an upload slice", "no upload was announced", upload.AGAIN))
            return False
        try:
            self._upload.add(name, start, size, data)
        except UserError as error:
            self._drop_upload()
            self._show_error(error)
            return False
        return True

    def upload_end(self) -> None:
        if not self._owns_upload():
            return
        received, self._upload = self._upload, None
        self._publish(uploading=False)
        try:
            received.finish()
        except UserError as error:
            received.discard()
            self._show_error(error)
            return
        self._start_loading(lambda: _read_uploaded(received), _uploaded_name(received.names), received.discard)

    def _owns_upload(self) -> bool:
        return self._upload is not None and self._upload_owner == self.clients.current

    def _drop_upload(self) -> None:
        if self._upload is not None:
            self._upload.discard()
            self._upload = None
            self._publish(uploading=False)

    # ---- segmentation -----------------------------------------------------------------------------------
    def segment_or_cancel(self) -> None:
        if self._owned["segmenting"]:
            self._cancel.set()
            self._publish(status="Cancelling...")
            return
        if self.ct_image is None or self._owned["loading"]:
            return
        self._cancel = threading.Event()
        self._publish(segmenting=True, progress=0, error_message="", status="Starting...")
        self.background_task = asyncio.get_running_loop().create_task(self._segment(self.ct_image))

    async def _segment(self, image: sitk.Image) -> None:
        report = _thread_safe_reporter(asyncio.get_running_loop(), self._show_progress)
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(self._run_engine, image, report, self._cancel.is_set)
            if not result.found:
                self._show_not_found(result)
                return
            outputs = mrml_bridge.import_result(self.scene, self.ct_node, result.mask, result.attention_maps)
        except Cancelled:
            self._finish("Cancelled: nothing was changed.", progress=0)
            return
        except UserError as error:
            self._finish("Segmentation failed.", progress=0)
            self._show_error(error)
            return
        except Exception as error:  # noqa: BLE001 (the page must say something whatever failed; details go to the log)
            self._finish("Segmentation failed.", progress=0)
            self._show_unexpected_error("segmentation failed", error)
            return
        seconds = time.perf_counter() - started
        self.outputs, self.mask, self.attention_maps = outputs, result.mask, result.attention_maps
        self._show_surface_in_3d()
        self._show_attention()
        verdict = result.verdict
        self._publish(has_result=True, result_volume=f"{result.volume_ml:.1f} mL", result_verdict=verdict.describe(),
                      result_verdict_ok=verdict.qc == "ok", result_time=f"{seconds:.1f} s",
                      result_device=result.device)
        self._finish(summary_line(result.volume_ml, verdict, seconds, result.device), progress=100)

    def _run_engine(self, image, report, is_cancelled):
        """Worker thread: inference and every attention map on the input grid; no scene access here."""
        return self.segmenter.segment(image, progress=report, cancel=is_cancelled, maps=ATTENTION_MAP_NAMES)

    def _show_not_found(self, result) -> None:
        """Nothing is put in the scene, and a previous result for this CT is hidden: it no longer holds."""
        if self.outputs is not None:
            self.outputs.segmentation_node.GetDisplayNode().SetVisibility(False)
            mrml_bridge.show_attention(self.scene, self.outputs.attention_nodes["combined"], visible=False)
        self.outputs, self.mask, self.attention_maps = None, None, {}
        self._publish(has_result=False)
        self._finish(summary_line(result.volume_ml, result.verdict), progress=100)

    def _show_progress(self, fraction: float, text: str) -> None:
        if self._owned["segmenting"]:
            self._publish(progress=round(100 * fraction), status=text)

    def _finish(self, status: str, progress: int) -> None:
        self._publish(segmenting=False, progress=progress, status=status)

    def _show_surface_in_3d(self) -> None:
        """The bridge made the closed surface; frame it in the 3D view."""
        self.outputs.segmentation_node.GetDisplayNode().SetVisibility3D(True)
        for view in self.slicer.view_manager.get_threed_views():
            view.reset_view()

    def _show_attention(self) -> None:
        if self.outputs is None:
            return
        node = self.outputs.attention_nodes[self._choices["attention_gate"]]
        mrml_bridge.show_attention(self.scene, node, opacity=float(self._choices["attention_opacity"]),
                                   visible=self._choices["attention_visible"])
        for view in self.slicer.view_manager.get_slice_views():
            view.schedule_render()  # an opacity change alone does not make the slice views render again

    # ---- downloads --------------------------------------------------------------------------------------
    def segmentation_file(self) -> bytes:
        if self.mask is None:
            return b""
        segmentation_format = self._choices["segmentation_format"]
        mask = imageio.with_segment_metadata(self.mask) if segmentation_format == ".seg.nrrd" else self.mask
        return _encoded(mask, f"segmentation{segmentation_format}")

    def attention_file(self) -> bytes:
        attention = self.attention_maps.get(self._choices["attention_gate"])
        if attention is None:
            return b""
        return _encoded(outputs.attention_coefficients(attention), "attention.nii.gz")

    # ---- messages ---------------------------------------------------------------------------------------
    def _show_error(self, error: UserError) -> None:
        self._publish(error_message=str(error))

    def _show_unexpected_error(self, what: str, error: Exception) -> None:
        """The exception's own text may name server paths: it goes to the log, the page gets its type."""
        logger.exception(what)
        self._show_error(UserError(what, f"unexpected {type(error).__name__}", "see the server's log for details"))


def read_ct(path: Path) -> sitk.Image:
    """A CT read and checked when it is loaded, so a bad file is refused before anyone clicks Segment."""
    return _read_ct(lambda: imageio.read_image(path), path.name)


def _read_ct(read, name: str) -> sitk.Image:
    image = read()
    imageio.validate_ct(image, name)
    return image


def _read_uploaded(received: upload.Upload) -> sitk.Image:
    """Read the upload, then remove its folder; messages speak of the upload, not of that folder."""
    folder = str(received.folder)
    try:
        return imageio.read_image(received.paths[0] if len(received.paths) == 1 else received.folder)
    except UserError as error:
        what = error.what.replace(f"in folder {folder}", "in the uploaded files").replace(folder, "the upload")
        raise UserError(what, error.why.replace(folder, "the upload"), error.todo) from None
    finally:
        received.discard()


def _uploaded_name(names: list[str]) -> str:
    return display_name(Path(names[0])) if len(names) == 1 else "uploaded DICOM series"


def display_name(path: Path) -> str:
    """The CT's name in the page and in download file names: the file name without its image suffix."""
    name = path.name
    for suffix in (*imageio.IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def _thread_safe_reporter(loop: asyncio.AbstractEventLoop, show):
    """A progress callback for the worker thread that hands each report to the event loop."""

    def report(fraction: float, text: str) -> None:
        loop.call_soon_threadsafe(show, fraction, text)

    return report


def _remove_with_display_nodes(scene, node) -> None:
    """Removing a node leaves its display nodes behind; remove them too."""
    for index in reversed(range(node.GetNumberOfDisplayNodes())):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


def _encoded(image: sitk.Image, file_name: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / file_name
        imageio.write_image(image, path)
        return path.read_bytes()
