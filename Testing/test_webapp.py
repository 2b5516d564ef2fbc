"""The web app as a person uses it: ``attention-unet-seg serve`` on real CT, driven by Debian's chromium.

What is asserted is what the page shows: texts, and the colours in the pixels of the views.

The model: an untrained model's mask is empty or arbitrary, so nothing reliable would appear on screen.
``bone_model`` is a valid model file whose weights are set so that the network computes a known function:
the level-1 encoder and decoder pass the normalised CT through identity kernels, the first deep-supervision
head turns it into a pancreas logit 20 * (intensity - threshold), and the fusion layer forwards that head.
It labels the voxels above 120 HU, which in these non-contrast CTs is bone: a deterministic, non-empty
mask that goes through the whole engine (resampling, tiles, largest component, resampling back) and whose
place on the CT can be checked. Its attention gates are the seeded untrained ones (about 0.5 everywhere).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import same_grid

from AttentionUNetSegLib.imageio import PANCREAS_SEGMENT, read_image

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright")

# The web app runs in an environment of its own (trame-slicer holds slicer-core below 5.12, while the tests'
# own environment has Slicer 5.12's): `bash .ci/setup web` makes it.
WEB_PYTHON = Path(os.environ.get("ATTENTION_UNET_SEG_WEB_PYTHON",
                                 Path(__file__).resolve().parent.parent / ".venv-web" / "bin" / "python"))
if not WEB_PYTHON.is_file():
    pytest.skip(f"the web app's environment is missing ({WEB_PYTHON}): run 'bash .ci/setup web'",
                allow_module_level=True)
CONSOLE_SCRIPT = WEB_PYTHON.with_name("attention-unet-seg")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
BONE_HU = 120.0
SEGMENT_RGB = np.array(PANCREAS_SEGMENT["color"], dtype=float)
SERVER_START_S = 120
RESULT_WAIT_MS = 120_000
STATUS_WITH_VOLUME = re.compile(
    r"Pancreas ([0-9.]+) mL; (ok|check: .+?) \(confidence [0-9.]+\); ([0-9.]+) s on (\w+)")  # JS-compatible


# ---- model, server, browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bone_model(tmp_path_factory) -> Path:
    """See the module docstring: a model file that segments the voxels above 120 HU."""
    return threshold_model(tmp_path_factory.mktemp("model") / "bone.safetensors", BONE_HU)


@pytest.fixture(scope="module")
def nothing_model(tmp_path_factory) -> Path:
    """The same network with a threshold above the HU window: it finds nothing anywhere."""
    return threshold_model(tmp_path_factory.mktemp("model") / "nothing.safetensors", 5000.0)


def threshold_model(path: Path, threshold_hu: float) -> Path:
    import torch

    from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
    from AttentionUNetSegLib.weights import ModelSpec, save_model

    torch.manual_seed(0)
    spec = ModelSpec(
        network=NetworkConfig(feature_scale=16), spacing_mm=(4.0, 4.0, 4.0), roi_size=(64, 64, 64), version="test"
    )
    network = AttentionUNet3D(spec.network)
    low, high = spec.hu_range
    threshold = (threshold_hu - low) / (high - low)  # on the engine's [0, 1] intensity scale
    with torch.no_grad():
        for conv in (network.encoders[0][0][0], network.encoders[0][1][0]):
            _identity_kernel(conv)
        for conv in (network.decoders[0].conv[0][0], network.decoders[0].conv[1][0]):
            _identity_kernel(conv)  # input channel 0 is the level-1 skip (concatenated first)
        head = network.heads[0]
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 0] = 20.0
        head.bias[1] = -20.0 * threshold
        network.final.weight.zero_()
        network.final.bias.zero_()
        network.final.weight[1, 1] = 1.0  # the pancreas logit of head 0
    save_model(network, spec, path)
    return path


def _identity_kernel(conv) -> None:
    conv.weight.zero_()
    conv.weight[0, 0, 1, 1, 1] = 1.0


@dataclass
class Server:
    url: str  # the address serve printed, with this start's token (?secret=...)
    process: subprocess.Popen
    stderr: Path


@contextmanager
def serve(*args, log_dir: Path, env: dict | None = None):
    """``attention-unet-seg serve`` on a free loopback port."""
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: run 'bash .ci/setup web'"
    port = _free_port()
    stdout, stderr = log_dir / "stdout.txt", log_dir / "stderr.txt"
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow", **(env or {})}
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "serve", *map(str, args), "--port", str(port), "--device", "cpu"],
            stdout=out,
            stderr=err,
            env=env,
        )
    try:
        yield Server(_wait_for_address(process, stdout, stderr), process, stderr)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_address(process: subprocess.Popen, stdout: Path, stderr: Path) -> str:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        found = re.search(r"AttentionUNetSeg web app: (http://\S+)", stdout.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}: {stderr.read_text()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"serve printed no address within {SERVER_START_S} s: {stderr.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; '.ci/setup test' does it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory) -> Path:
    """The server's --data-dir: the page loads by path only inside it."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def page_with_ct(browser, small_ct, bone_model, served_dir, tmp_path_factory):
    """The page of a server started with the small real CT as INPUT."""
    with serve(small_ct, "--weights", bone_model, "--data-dir", served_dir,
               log_dir=tmp_path_factory.mktemp("serve_ct")) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        page.goto(server.url)
        page.get_by_text("Loaded: ct").wait_for()
        yield page
        page.close()


@pytest.fixture(scope="module")
def result(page_with_ct, tmp_path_factory):
    """Click Segment Pancreas once; what the views showed before, the time to the result, a page screenshot."""
    page = page_with_ct
    axial_before = wait_for_view(page, "Axial", lambda rgb: ct_visible(rgb))
    started = time.perf_counter()
    page.get_by_role("button", name="Segment Pancreas").click()
    status = page.locator(".status-text").filter(has_text=STATUS_WITH_VOLUME)
    status.wait_for(timeout=RESULT_WAIT_MS)
    seconds_to_result = time.perf_counter() - started
    wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) > 0.1)
    screenshot = _screenshot_dir(tmp_path_factory) / "webapp_result.png"
    page.screenshot(path=str(screenshot))
    print(f"\nclick to result: {seconds_to_result:.1f} s; page screenshot: {screenshot}")
    return {"axial_before": axial_before, "status": status.inner_text(), "seconds": seconds_to_result}


def _screenshot_dir(tmp_path_factory) -> Path:
    chosen = os.environ.get("ATTENTION_UNET_SEG_SCREENSHOTS")
    if not chosen:
        return tmp_path_factory.mktemp("screenshots")
    Path(chosen).mkdir(parents=True, exist_ok=True)
    return Path(chosen)


# ---- what the views show -------------------------------------------------------------------------------


def view_pixels(page, name: str) -> np.ndarray:
    """RGB pixels of one view (Axial, Coronal, Sagittal, 3D) as the page shows it."""
    from PIL import Image

    view = page.locator(".layout-grid-item", has=page.locator(".view-name", has_text=name))
    png = view.locator("img").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)


def wait_for_view(page, name: str, shows, timeout_s: float = 20.0) -> np.ndarray:
    """The view's pixels once ``shows(pixels)`` holds (views are streamed images that update a moment after
    the state); the last pixels if it never does, for the caller's assert to report."""
    deadline = time.monotonic() + timeout_s
    while True:
        rgb = view_pixels(page, name)
        if shows(rgb) or time.monotonic() > deadline:
            return rgb
        time.sleep(0.3)


def segment_pixels(rgb: np.ndarray) -> int:
    """Pixels near the pancreas colour (249, 180, 111): the segment's outline and fill over bright voxels."""
    return int((np.linalg.norm(rgb - SEGMENT_RGB, axis=-1) < 50).sum())


def heat_fraction(rgb: np.ndarray) -> float:
    """Share of pixels in yellow heat colours: Slicer's PET heat map at attention about 0.5 (hue 40-75
    degrees). Grey CT has no colour, the segment is orange (hue 30), the view names red, green and yellow
    text on few pixels."""
    from matplotlib.colors import rgb_to_hsv

    hue = rgb_to_hsv(rgb / 255.0)[..., 0] * 360
    colourful = rgb.max(axis=-1) - rgb.min(axis=-1) > 30
    return float((colourful & (hue > 40) & (hue < 75)).mean())


def surface_pixels(rgb: np.ndarray) -> int:
    """Pixels of a shaded orange surface (hue 20-40 degrees) in the 3D view's grey background."""
    from matplotlib.colors import rgb_to_hsv

    hue = rgb_to_hsv(rgb / 255.0)[..., 0] * 360
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1) > 40) & (hue > 20) & (hue < 40)).sum())


def ct_visible(rgb: np.ndarray) -> bool:
    """Grey CT: many mid-grey pixels (soft tissue in the abdomen window)."""
    grey = (rgb.max(axis=-1) - rgb.min(axis=-1) < 10) & (rgb.mean(axis=-1) > 60) & (rgb.mean(axis=-1) < 200)
    return grey.mean() > 0.1


def toggle_attention(page) -> None:
    page.get_by_label("Show attention map").click()


def choose(page, label: str, option: str) -> None:
    page.locator(".v-select").filter(has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def download(page, button: str, folder: Path) -> Path:
    with page.expect_download() as pending:
        page.get_by_role("button", name=button, exact=True).click()
    path = folder / pending.value.suggested_filename
    pending.value.save_as(path)
    return path


# ---- tests ---------------------------------------------------------------------------------------------


def test_serve_help_says_it_listens_on_loopback():
    help_text = subprocess.run(
        [str(CONSOLE_SCRIPT), "serve", "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "default: 127.0.0.1, loopback" in help_text
    assert "--port" in help_text and "--weights" in help_text
    assert "--data-dir" in help_text and "--max-upload-mb" in help_text


def test_page_shows_the_ct_in_slicer_views_with_the_abdomen_window(page_with_ct):
    page = page_with_ct
    for name in ("Axial", "Coronal", "Sagittal", "3D"):
        assert page.locator(".view-name", has_text=name).is_visible()
    assert "Abdomen (soft tissue)" in page.locator(".v-field", has_text="Window/level").inner_text()
    axial = wait_for_view(page, "Axial", ct_visible)
    assert ct_visible(axial)
    bone = axial.mean(axis=-1) > 240  # white in the abdomen window: the spine, at the bottom (posterior) as in Slicer
    rows = axial.shape[0]
    assert bone[rows // 2 :].sum() > 2 * bone[: rows // 2].sum()  # a flipped view would put it on top
    assert "bone.safetensors" in page.locator(".model-version").inner_text()  # which model answers, said plainly


def test_segment_pancreas_shows_the_segment_in_2d_and_3d_with_volume_time_and_device(page_with_ct, result):
    page = page_with_ct
    assert segment_pixels(result["axial_before"]) == 0  # grey CT only, before the run
    volume_ml, verdict, seconds, device = STATUS_WITH_VOLUME.search(result["status"]).groups()
    verdict = verdict.strip()
    assert float(volume_ml) > 50 and device == "cpu"  # the bone of the small CT is about 138 mL
    assert page.get_by_role("cell", name=f"{volume_ml} mL").is_visible()
    assert page.get_by_role("cell", name=f"{seconds} s").is_visible()
    shown = page.locator(".verdict-text")  # the verdict beside the volume, in a warning colour when in doubt
    assert verdict in shown.inner_text()
    assert ("warning" in shown.get_attribute("class")) == verdict.startswith("check")
    assert page.get_by_role("button", name="Segment Pancreas").is_enabled()  # not "Cancel" any more
    assert page.get_by_role("progressbar").get_attribute("aria-valuenow") == "100"

    surface = wait_for_view(page, "3D", lambda rgb: surface_pixels(rgb) > 2000)
    assert surface_pixels(surface) > 2000

    toggle_attention(page)  # the segment's colour is checked without the heatmap over it
    axial = wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) < 0.005)
    assert segment_pixels(axial) > 200
    toggle_attention(page)
    wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) > 0.1)


def test_attention_heatmap_shows_hides_and_follows_the_gate_selector(page_with_ct, result):
    page = page_with_ct
    shown = wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) > 0.1)
    assert heat_fraction(shown) > 0.1  # the body box is covered in heat colours
    toggle_attention(page)
    hidden = wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) < 0.005)
    assert heat_fraction(hidden) < 0.005
    toggle_attention(page)
    opacity = page.locator(".v-slider").filter(has_text="Opacity").locator(".v-slider-thumb")
    opacity.press("Home")  # opacity 0: the CT alone again
    assert heat_fraction(wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) < 0.005)) < 0.005
    for _ in range(10):
        opacity.press("ArrowRight")  # back to 0.5 in steps of 0.05
    wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) > 0.1)
    choose(page, "Attention gate", "level3")
    assert heat_fraction(wait_for_view(page, "Axial", lambda rgb: heat_fraction(rgb) > 0.1)) > 0.1
    choose(page, "Attention gate", "combined")


def test_downloads_are_valid_files_on_the_input_grid(page_with_ct, result, small_ct, tmp_path):
    page = page_with_ct
    ct = read_image(small_ct)
    hu = sitk.GetArrayFromImage(ct)

    seg_nrrd = download(page, "Segmentation", tmp_path)
    assert seg_nrrd.name == "ct_pancreas.seg.nrrd"
    segmentation = sitk.ReadImage(str(seg_nrrd))
    assert same_grid(segmentation, ct)
    assert segmentation.GetMetaData("Segment0_Name") == "Pancreas"
    mask = sitk.GetArrayFromImage(segmentation) > 0
    volume_ml = mask.sum() * np.prod(ct.GetSpacing()) / 1000
    assert f"{volume_ml:.1f}" == STATUS_WITH_VOLUME.search(result["status"]).group(1)
    assert np.median(hu[mask]) > BONE_HU  # the mask lies on the bone it was computed from: geometry kept

    choose(page, "Segmentation file format", ".nii.gz")
    nifti = download(page, "Segmentation", tmp_path)
    assert nifti.name == "ct_pancreas.nii.gz"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(nifti))) > 0, mask)
    choose(page, "Segmentation file format", ".seg.nrrd")

    attention_file = download(page, "Attention map", tmp_path)
    assert attention_file.name == "ct_attention_combined.nii.gz"
    attention = sitk.ReadImage(str(attention_file))
    assert same_grid(attention, ct)
    values = sitk.GetArrayFromImage(attention)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0.2


def test_bad_input_shows_a_message_and_keeps_the_loaded_ct(page_with_ct, result, data_dir, served_dir):
    page = page_with_ct
    (served_dir / "broken.nii.gz").write_bytes(b"not an image at all")
    shutil.copy(data_dir / "ts-abdomen-3mm-crop" / "pancreas.nii.gz", served_dir / "labels.nii.gz")
    cases = {
        "missing.nii.gz": "no CT at that path",
        str(served_dir / "broken.nii.gz"): "is not an image SimpleITK can read",  # absolute paths inside work too
        "labels.nii.gz": "has no voxel below 0",  # a label map is not a CT in HU
    }
    axial_before = view_pixels(page, "Axial")
    for path, message in cases.items():
        page.get_by_label("Path on the server (file or DICOM folder)").fill(path)
        page.get_by_role("button", name="Load", exact=True).click()
        alert = page.locator(".error-message")
        alert.filter(has_text=message).wait_for()
        assert "\n" not in alert.inner_text().strip()  # one line: what, why, what to do
        assert page.get_by_text("Loaded: ct").is_visible()
        assert STATUS_WITH_VOLUME.search(page.locator(".status-text").inner_text())  # the result is kept
    assert np.abs(view_pixels(page, "Axial") - axial_before).mean() < 2  # the views show what they showed


def test_window_level_presets_and_scrolling_change_the_axial_view(page_with_ct):
    page = page_with_ct
    axial = page.locator(".layout-grid-item", has=page.locator(".view-name", has_text="Axial"))
    abdomen = view_pixels(page, "Axial")
    choose(page, "Window/level", "Bone")  # a wide window: soft tissue turns dark grey
    bone = wait_for_view(page, "Axial", lambda rgb: rgb.mean() < abdomen.mean() - 10)
    assert bone.mean() < abdomen.mean() - 10
    choose(page, "Window/level", "Abdomen (soft tissue)")
    wait_for_view(page, "Axial", lambda rgb: np.abs(rgb - abdomen).mean() < 2)

    position = axial.locator(".slice-slider input")
    before = float(position.input_value())
    axial.locator("img").hover()
    page.mouse.wheel(0, 300)  # the mouse wheel moves through the slices, as in Slicer
    page.wait_for_function(
        "([input, before]) => parseFloat(input.value) !== before", arg=[position.element_handle(), before]
    )
    assert float(position.input_value()) != before
    moved = wait_for_view(page, "Axial", lambda rgb: np.abs(rgb - abdomen).mean() > 1)
    assert np.abs(moved - abdomen).mean() > 1  # another slice


# The app's own handlers, called as the page calls them, in a process of its own (the app needs an event loop
# and offscreen views of its own). With "cancel", Cancel comes straight after Segment, before the first tile.
SCENARIO = """
import asyncio, json, sys
from pathlib import Path
from AttentionUNetSegLib.engine import Segmenter
from AttentionUNetSegTools.webapp.app import PancreasWebApp

async def segment(ct, model, then):
    app = PancreasWebApp(Segmenter(model), data_dir=Path(ct).parent)
    app.state.server_path = ct
    app.load_server_path()
    await app.background_task
    nodes_before = app.scene.GetNumberOfNodes()
    app.segment_or_cancel()  # Segment Pancreas ...
    if then == "cancel":
        app.segment_or_cancel()  # ... and Cancel
    await app.background_task
    state = {key: app.state[key] for key in ("status", "segmenting", "has_result", "error_message", "ct_name")}
    return {**state, "nodes_before": nodes_before, "nodes_after": app.scene.GetNumberOfNodes(),
            "segmentations": app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")}

print(json.dumps(asyncio.run(segment(*sys.argv[1:]))))
"""


def run_scenario(ct: Path, model: Path, then: str) -> dict:
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    run = subprocess.run([str(WEB_PYTHON), "-c", SCENARIO, str(ct), str(model), then], capture_output=True,
                         text=True, timeout=240, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_no_pancreas_found_is_said_and_no_empty_segment_is_shown(small_ct, nothing_model):
    seen = run_scenario(small_ct, nothing_model, "wait")
    assert seen["status"] == "No pancreas found"  # the one wording of every front end
    assert not seen["segmenting"] and not seen["has_result"] and not seen["error_message"]
    assert seen["segmentations"] == 0


def test_cancel_leaves_the_scene_and_the_page_as_they_were(small_ct, bone_model):
    seen = run_scenario(small_ct, bone_model, "cancel")
    assert seen["status"] == "Cancelled: nothing was changed."
    assert not seen["segmenting"] and not seen["has_result"] and not seen["error_message"]
    assert seen["ct_name"] == "ct"
    assert seen["nodes_after"] == seen["nodes_before"] and seen["segmentations"] == 0


def test_upload_of_a_dicom_series_loads_it(browser, bone_model, dicom_dir, tmp_path):
    """A server started without INPUT: nothing to segment until a CT is uploaded."""
    with serve("--weights", bone_model, log_dir=tmp_path) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url)
        page.get_by_text("No CT loaded").wait_for()
        assert page.get_by_role("button", name="Segment Pancreas").is_disabled()
        files = page.locator("input[type=file]:not([webkitdirectory])")
        files.set_input_files([tmp_path / "stdout.txt", tmp_path / "stderr.txt"])  # two files, no DICOM among them
        page.locator(".error-message").filter(has_text="no DICOM series in the uploaded files").wait_for()
        files.set_input_files(sorted(dicom_dir.iterdir()))
        page.get_by_text("Loaded: uploaded DICOM series").wait_for()
        assert page.get_by_text("(512x512x20 voxels)").is_visible()
        assert page.get_by_role("button", name="Segment Pancreas").is_enabled()
        assert ct_visible(wait_for_view(page, "Axial", ct_visible))
        page.close()
