"""The page: a control panel beside Slicer's four-up layout (axial, 3D, coronal, sagittal)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_slicer.app.ui import (
    FlexContainer,
    LoadVolumeUI,
    create_vertical_slice_view_gutter_ui,
    create_vertical_view_gutter_ui,
)
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

if TYPE_CHECKING:
    from .app import PancreasWebApp

# Slicer's view names and colours, so the views read as they do in Slicer.
VIEW_COLOURS = {"Axial": "#F34A33", "Coronal": "#6DAD4A", "Sagittal": "#EFD64D", "3D": "#8C8CD9"}
DOWNLOAD = "utils.download(`{name}`, trigger('{trigger}'), 'application/octet-stream')"


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
        with html.Div(classes="d-flex align-center ga-2"):
            v.VBtn("Load", click=app.load_server_path, loading=("loading",), disabled=("segmenting",))
            html.Span("or upload", classes="text-caption")
            LoadVolumeUI().on_load_volume.connect(app.load_uploaded_files)
        v.VSelect(
            v_model=("window_level_preset",),
            items=("window_level_presets",),
            label="Window/level",
            density="compact",
            hide_details=True,
        )


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
