"""The web app's behaviour: one CT in trame-slicer's scene, one Segmenter, and the page state they drive."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from pathlib import Path

import SimpleITK as sitk
from trame.app import TrameApp
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp, VolumeWindowLevel
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.utils import write_client_files_to_dir

from AttentionUNetSegLib import imageio, mrml_bridge, outputs
from AttentionUNetSegLib.engine import ATTENTION_MAP_NAMES, Segmenter
from AttentionUNetSegLib.errors import Cancelled, UserError
from AttentionUNetSegLib.model_card import model_card_summary, model_card_text

from . import ui

logger = logging.getLogger(__name__)
# Slicer's CT window/level presets (window, level) in HU; the first is the default.
WINDOW_LEVEL_PRESETS = {
    "Abdomen (soft tissue)": (350.0, 40.0),
    "Bone": (1000.0, 400.0),
    "Lung": (1400.0, -500.0),
    "Brain": (100.0, 50.0),
}
SEGMENTATION_FORMATS = (".seg.nrrd", ".nii.gz")


class PancreasWebApp(TrameApp):
    """Loads a CT, segments it in a worker thread, and shows the result in Slicer's views."""

    def __init__(self, segmenter: Segmenter, server=None):
        super().__init__(server=server)
        self.segmenter = segmenter
        self.state.model_version = f"Model {segmenter.model.path.name} ({segmenter.model.spec.version})"
        self.state.model_summary, self.state.model_limits = model_card_summary(model_card_text())
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        self.ct_image: sitk.Image | None = None
        self.ct_node = None
        self.outputs: mrml_bridge.SegmentationOutputs | None = None
        self.attention_maps: dict[str, sitk.Image] = {}
        self.mask: sitk.Image | None = None
        self._cancel = threading.Event()
        self.background_task: asyncio.Task | None = None  # the running load or segmentation; held so it is not lost

        self.server.enable_module(trame_slicer_module)  # chunked upload script used by the upload buttons
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
        self.state.update(
            {
                "trame__title": "AttentionUNetSeg",
                "ct_name": "",
                "server_path": "",
                "loading": False,
                "window_level_preset": next(iter(WINDOW_LEVEL_PRESETS)),
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
                "attention_visible": True,
                "attention_gate": ATTENTION_MAP_NAMES[0],
                "attention_gates": list(ATTENTION_MAP_NAMES),
                "attention_opacity": 0.5,
                "segmentation_format": SEGMENTATION_FORMATS[0],
                "segmentation_formats": list(SEGMENTATION_FORMATS),
            }
        )

    def _bind_state_changes(self) -> None:
        self.state.change("window_level_preset")(lambda **_: self._apply_window_level())
        self.state.change("attention_gate", "attention_opacity", "attention_visible")(
            lambda **_: self._show_attention()
        )

    # ---- loading ----------------------------------------------------------------------------------------
    def show_initial_ct(self, image: sitk.Image, name: str) -> None:
        """Put a CT read before the server started into the scene once the views exist."""
        self.server.controller.on_server_ready.add(lambda **_: self._replace_ct(image, name))

    # Handlers only start background tasks: wslink handles one message of a page at a time, so a handler
    # that awaited the work would freeze the page (views and Cancel included) until the work ended.
    def load_server_path(self) -> None:
        path = (self.state.server_path or "").strip()
        if not path:
            self._show_error(UserError("no path given", "", "type the path of a CT file or DICOM folder on the server"))
            return
        self._start_loading(lambda: imageio.read_image(path), display_name(Path(path)))

    def load_uploaded_files(self, files: list[dict]) -> None:
        """One file is read as an image; several as the DICOM series of one folder."""
        if files:
            self._start_loading(lambda: _read_uploaded(files), _uploaded_name(files))

    def _start_loading(self, read, name: str) -> None:
        if self.state.segmenting or self.state.loading:
            return
        with self.state:
            self.state.loading, self.state.error_message = True, ""
        self.background_task = asyncio.get_running_loop().create_task(self._load(read, name))

    async def _load(self, read, name: str) -> None:
        try:
            image = await asyncio.to_thread(_read_ct, read, name)
        except UserError as error:
            self._show_error(error)
            return
        except Exception as error:  # noqa: BLE001 (the page must say something whatever failed; details go to the log)
            self._show_unexpected_error(f"cannot load {name}", error)
            return
        finally:
            with self.state:
                self.state.loading = False
        self._replace_ct(image, name)

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
        with self.state:
            self.state.ct_name = name
            self.state.has_result = False
            self.state.progress = 0
            self.state.status = f"Loaded {name} ({'x'.join(map(str, image.GetSize()))} voxels)."

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
            window, level = WINDOW_LEVEL_PRESETS[self.state.window_level_preset]
            VolumeWindowLevel.set_volume_node_window_level(self.ct_node, window, level)

    # ---- segmentation -----------------------------------------------------------------------------------
    def segment_or_cancel(self) -> None:
        if self.state.segmenting:
            self._cancel.set()
            with self.state:
                self.state.status = "Cancelling..."
            return
        if self.ct_image is None or self.state.loading:
            return
        self._cancel = threading.Event()
        with self.state:
            self.state.segmenting, self.state.progress, self.state.error_message = True, 0, ""
            self.state.status = "Starting..."
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
        with self.state:
            self.state.has_result = True
            self.state.result_volume = f"{result.volume_ml:.1f} mL"
            self.state.result_verdict = verdict.describe()
            self.state.result_verdict_ok = verdict.qc == "ok"
            self.state.result_time = f"{seconds:.1f} s"
            self.state.result_device = result.device
        self._finish(f"Pancreas: {result.volume_ml:.1f} mL, {verdict.describe()} ({seconds:.1f} s on {result.device}).",
                     progress=100)

    def _run_engine(self, image, report, is_cancelled):
        """Worker thread: inference and every attention map on the input grid; no scene access here."""
        return self.segmenter.segment(image, progress=report, cancel=is_cancelled, maps=ATTENTION_MAP_NAMES)

    def _show_not_found(self, result) -> None:
        """Nothing is put in the scene, and a previous result for this CT is hidden: it no longer holds."""
        if self.outputs is not None:
            self.outputs.segmentation_node.GetDisplayNode().SetVisibility(False)
            mrml_bridge.show_attention(self.scene, self.outputs.attention_nodes["combined"], visible=False)
        self.outputs, self.mask, self.attention_maps = None, None, {}
        with self.state:
            self.state.has_result = False
        self._finish(f"No pancreas found: {result.verdict.reason}.", progress=100)

    def _show_progress(self, fraction: float, text: str) -> None:
        if self.state.segmenting:
            with self.state:
                self.state.progress = round(100 * fraction)
                self.state.status = text

    def _finish(self, status: str, progress: int) -> None:
        with self.state:
            self.state.segmenting, self.state.progress, self.state.status = False, progress, status

    def _show_surface_in_3d(self) -> None:
        """The bridge made the closed surface; frame it in the 3D view."""
        self.outputs.segmentation_node.GetDisplayNode().SetVisibility3D(True)
        for view in self.slicer.view_manager.get_threed_views():
            view.reset_view()

    def _show_attention(self) -> None:
        if self.outputs is None:
            return
        node = self.outputs.attention_nodes[self.state.attention_gate]
        mrml_bridge.show_attention(
            self.scene, node, opacity=float(self.state.attention_opacity), visible=bool(self.state.attention_visible)
        )
        for view in self.slicer.view_manager.get_slice_views():
            view.schedule_render()  # an opacity change alone does not make the slice views render again

    # ---- downloads --------------------------------------------------------------------------------------
    def segmentation_file(self) -> bytes:
        if self.mask is None:
            return b""
        segmentation_format = self.state.segmentation_format
        mask = imageio.with_segment_metadata(self.mask) if segmentation_format == ".seg.nrrd" else self.mask
        return _encoded(mask, f"segmentation{segmentation_format}")

    def attention_file(self) -> bytes:
        attention = self.attention_maps.get(self.state.attention_gate)
        if attention is None:
            return b""
        return _encoded(outputs.attention_coefficients(attention), "attention.nii.gz")

    # ---- messages ---------------------------------------------------------------------------------------
    def _show_error(self, error: UserError) -> None:
        with self.state:
            self.state.error_message = str(error)

    def _show_unexpected_error(self, what: str, error: Exception) -> None:
        logger.exception(what)
        self._show_error(UserError(what, f"{type(error).__name__}: {error}", "see the server's log for details"))


def read_ct(path: Path) -> sitk.Image:
    """A CT read and checked when it is loaded, so a bad file is refused before anyone clicks Segment."""
    return _read_ct(lambda: imageio.read_image(path), path.name)


def _read_ct(read, name: str) -> sitk.Image:
    image = read()
    imageio.validate_ct(image, name)
    return image


def _read_uploaded(files: list[dict]) -> sitk.Image:
    """Read the upload from a temporary folder; messages speak of the upload, not of that folder."""
    with tempfile.TemporaryDirectory() as folder:
        paths = write_client_files_to_dir(files, folder)
        try:
            return imageio.read_image(paths[0] if len(paths) == 1 else folder)
        except UserError as error:
            what = error.what.replace(f"in folder {folder}", "in the uploaded files").replace(folder, "the upload")
            raise UserError(what, error.why, error.todo) from None


def _uploaded_name(files: list[dict]) -> str:
    return display_name(Path(files[0]["name"])) if len(files) == 1 else "uploaded DICOM series"


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
