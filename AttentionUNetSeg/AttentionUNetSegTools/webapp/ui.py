"""The page: a control panel beside Slicer's four-up layout (axial, 3D, coronal, sagittal)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_slicer.app.ui import (
    FlexContainer,
    create_vertical_slice_view_gutter_ui,
    create_vertical_view_gutter_ui,
)
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from .upload import UPLOAD_SLICE_BYTES

if TYPE_CHECKING:
    from .app import PancreasWebApp

# Slicer's view names and colours, so the views read as they do in Slicer.
VIEW_COLOURS = {"Axial": "#F34A33", "Coronal": "#6DAD4A", "Sagittal": "#EFD64D", "3D": "#8C8CD9"}
DOWNLOAD = "utils.download(`{name}`, trigger('{trigger}'), 'application/octet-stream')"
# The page announces the upload, then reads each file slice by slice and sends one slice at a time, so neither
# the page nor the server holds a whole upload in memory; a false answer (refused, over the limit) stops it.
# The input is emptied so that choosing the same file again uploads it again. ("void": Vue would take a handler
# that starts as a function expression for the function itself, and call it while drawing the page.)
UPLOAD_JS = """void (async (input) => {{
  const files = [...input.files];
  input.value = '';
  const total = files.reduce((sum, file) => sum + file.size, 0);
  if (!files.length || !(await trame.trigger('{begin}', [files.length, total]))) return;
  for (const file of files) {{
    for (let start = 0; start === 0 || start < file.size; start += {slice}) {{
      const data = await file.slice(start, start + {slice}).arrayBuffer();
      if (!(await trame.trigger('{part}', [file.name, start, file.size, data]))) return;
    }}
  }}
  await trame.trigger('{end}', []);
}})($event.target)"""


def four_up_layout() -> Layout:
    """Slicer's "Four-Up": axial top left, 3D top right, coronal bottom left, sagittal bottom right."""
    return Layout(
        LayoutDirection.Horizontal,
        [
            Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()]),
            Layout(
                LayoutDirection.Vertical, [ViewLayoutDefinition.threed_view(), ViewLayoutDefinition.sagittal_view()]
            ),
        ],
    )


def slice_view_overlay(server, view_id, view) -> None:
    """trame-slicer's slice gutter (reset, show in 3D, slice slider) plus the view's name."""
    create_vertical_slice_view_gutter_ui(server, view_id, view)
    _view_name(view.get_orientation())


def view_overlay(server, view_id, view) -> None:
    create_vertical_view_gutter_ui(server, view_id, view)
    _view_name("3D")


def _view_name(name: str) -> None:
    html.Div(
        name,
        classes="view-name text-caption font-weight-bold px-2",
        style=f"position: absolute; top: 4px; right: 8px; color: {VIEW_COLOURS[name]}; pointer-events: none;",
    )


def build_page(app: PancreasWebApp) -> VAppLayout:
    with VAppLayout(app.server, full_height=True) as page:
        page.root.theme = "dark"
        with v.VAppBar(density="compact"):
            v.VAppBarTitle("AttentionUNetSeg: pancreas segmentation")
            v.VChip("Research use only, not for clinical decisions", size="small", classes="mr-4")
        with v.VNavigationDrawer(permanent=True, width=360), html.Div(classes="pa-3 d-flex flex-column ga-3"):
            _error_panel()
            _shared_session_note()
            _ct_panel(app)
            _segment_panel(app)
            _result_panel(app)
            _model_panel()
        with v.VMain(), FlexContainer(row=True, fill_height=True):
            app.layout_manager.initialize_layout_grid(page)
    return page


def _model_panel() -> None:
    """The model card's summary and limits, so the page is honest about what the model can do."""
    with v.VCard(title="Model", variant="outlined"), v.VCardText(classes="d-flex flex-column ga-2"):
        html.Div("{{ model_version }}", classes="model-version text-caption")
        html.Div("{{ model_summary }}", classes="model-summary text-body-2", style="white-space: pre-line")
        html.Div("{{ model_limits }}", classes="model-limits text-caption", style="white-space: pre-line")


def _error_panel() -> None:
    v.VAlert(
        v_if="error_message",
        text=("error_message",),
        type="error",
        variant="tonal",
        density="compact",
        closable=True,
        click_close="error_message = ''",
        classes="error-message",
    )


def _ct_panel(app: PancreasWebApp) -> None:
    with v.VCard(title="CT", variant="outlined"), v.VCardText(classes="d-flex flex-column ga-2"):
        html.Div("{{ ct_name ? 'Loaded: ' + ct_name : 'No CT loaded' }}", classes="ct-name")
        v.VTextField(
            v_model=("server_path",),
            label="Path on the server (file or DICOM folder)",
            density="compact",
            hide_details=True,
            disabled=("segmenting",),
        )
        html.Div("read only inside {{ data_dir }}", classes="data-dir text-caption")
        with html.Div(classes="d-flex align-center ga-2"):
            v.VBtn("Load", click=app.load_server_path, loading=("loading",), disabled=("segmenting",))
            html.Span("or upload (at most {{ max_upload_mb }} MB)", classes="text-caption")
            _upload_buttons(app)
        v.VSelect(
            v_model=("window_level_preset",),
            items=("window_level_presets",),
            label="Window/level",
            density="compact",
            hide_details=True,
        )


def _upload_buttons(app: PancreasWebApp) -> None:
    """A file button (an image file, or the files of a DICOM series) and a folder button; while any tab uploads,
    a spinner instead (the session is shared: one upload at a time)."""
    trigger = app.server.controller.trigger_name
    upload_js = UPLOAD_JS.format(begin=trigger(app.upload_begin), part=trigger(app.upload_part),
                                 end=trigger(app.upload_end), slice=UPLOAD_SLICE_BYTES)
    with html.Div(v_if="!uploading", classes="d-flex"):
        for icon, tip, folder in (("mdi-file-upload", "Upload files", False), ("mdi-folder-upload", "Upload a folder", True)):
            with v.VFileInput(change=upload_js, prepend_icon=icon, multiple=not folder, hide_input=True,
                              hide_details=True, density="compact", style="width: 40px; flex: none;",
                              raw_attrs=["webkitdirectory"] if folder else []):
                v.VTooltip(text=tip, activator="parent", location="bottom")
    v.VProgressCircular(v_else=True, indeterminate=True, size=24, classes="upload-busy")


def _shared_session_note() -> None:
    """trame's state and Slicer's scene belong to the server process: every tab shows the same session."""
    html.Div("One shared session: every open tab ({{ tabs_open }} now) sees and changes the same CT, result "
             "and progress.", classes="shared-session text-caption")


def _segment_panel(app: PancreasWebApp) -> None:
    with v.VCard(title="Segment", variant="outlined"), v.VCardText(classes="d-flex flex-column ga-2"):
        v.VBtn(
            "{{ segmenting ? 'Cancel' : 'Segment Pancreas' }}",
            click=app.segment_or_cancel,
            color=("segmenting ? 'error' : 'primary'",),
            disabled=("!ct_name || loading",),
            block=True,
        )
        v.VProgressLinear(model_value=("progress",), height=8, rounded=True, color="primary")
        html.Div("{{ status }}", classes="status-text text-body-2")


def _result_panel(app: PancreasWebApp) -> None:
    with v.VCard(v_if="has_result", title="Result", variant="outlined"), v.VCardText(classes="d-flex flex-column ga-2"):
        v.VAlert(text=("result_verdict",), type=("result_verdict_ok ? 'success' : 'warning'",), density="compact",
                 variant="tonal", classes="verdict-text")
        with v.VTable(density="compact"), html.Tbody():
            for label, key in (
                ("Pancreas volume", "result_volume"),
                ("Time", "result_time"),
                ("Device", "result_device"),
            ):
                with html.Tr():
                    html.Td(label)
                    html.Td(f"{{{{ {key} }}}}")
        _attention_controls()
        _downloads(app)


def _attention_controls() -> None:
    v.VSwitch(
        v_model=("attention_visible",),
        label="Show attention map",
        color="primary",
        density="compact",
        hide_details=True,
    )
    v.VSelect(
        v_model=("attention_gate",),
        items=("attention_gates",),
        label="Attention gate",
        density="compact",
        hide_details=True,
    )
    v.VSlider(
        v_model=("attention_opacity",), label="Opacity", min=0, max=1, step=0.05, hide_details=True, thumb_label=True
    )


def _downloads(app: PancreasWebApp) -> None:
    v.VSelect(
        v_model=("segmentation_format",),
        items=("segmentation_formats",),
        label="Segmentation file format",
        density="compact",
        hide_details=True,
    )
    with html.Div(classes="d-flex ga-2"):
        _download_button("Segmentation", "${ct_name}_pancreas${segmentation_format}", app.segmentation_file, app)
        _download_button("Attention map", "${ct_name}_attention_${attention_gate}.nii.gz", app.attention_file, app)


def _download_button(label: str, file_name: str, make_file, app: PancreasWebApp) -> None:
    v.VBtn(
        label,
        prepend_icon="mdi-download",
        size="small",
        classes="flex-grow-1",
        click=DOWNLOAD.format(name=file_name, trigger=app.server.controller.trigger_name(make_file)),
    )
