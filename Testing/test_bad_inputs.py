"""Bad inputs to ``attention-unet-seg segment``: exit 2, one ``error:`` line saying what, no traceback, no file.

Each bad input is made from the small real CT (or a real model file) with one thing wrong.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
from AttentionUNetSegLib.weights import ModelSpec, save_model
from safetensors.torch import save_file
from test_cli import run_cli


def write_variant(ct_path: Path, path: Path, change) -> Path:
    """The real CT changed by ``change(image)``, written to ``path``."""
    ct = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
    image = change(ct)
    sitk.WriteImage(image, str(path))
    return path


def with_nan(ct: sitk.Image) -> sitk.Image:
    values = sitk.GetArrayFromImage(ct)
    values[values.shape[0] // 2, 40:50, 40:50] = np.nan
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(ct)
    return image


def constant(ct: sitk.Image) -> sitk.Image:
    image = sitk.Image(ct.GetSize(), sitk.sitkFloat32) - 1000.0
    image.CopyInformation(ct)
    return image


def with_spacing_of_one_metre(ct: sitk.Image) -> sitk.Image:
    ct.SetSpacing((1000.0, 1000.0, 1000.0))
    return ct


def rgb(ct: sitk.Image) -> sitk.Image:
    grey = sitk.Cast(sitk.RescaleIntensity(ct), sitk.sitkUInt8)
    return sitk.Compose(grey, grey, grey)


def huge_header(folder: Path) -> Path:
    """A valid MetaImage header claiming 5000^3 voxels (250 GB of shorts), with no data behind it."""
    path = folder / "huge.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 5000 5000 5000\nElementSpacing = 0.8 0.8 0.8\n"
                    "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    return path


def cut_short(source: Path, path: Path, kept_bytes: int = 5000) -> Path:
    """The first bytes of a real compressed CT, as an interrupted copy or download leaves it."""
    path.write_bytes(source.read_bytes()[:kept_bytes])
    return path


def gzip_nrrd(ct: sitk.Image, path: Path) -> Path:
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.Execute(ct)
    return path


INPUTS = {
    "missing file": (lambda ct, d: d / "absent.nii.gz", "does not exist"),
    "truncated .nii.gz": (lambda ct, d: cut_short(ct, d / "cut.nii.gz"), "is incomplete"),
    "truncated .nii": (lambda ct, d: cut_short(write_variant(ct, d / "full.nii", lambda i: i), d / "cut.nii", 300000),
                       "is incomplete"),
    "truncated gzip .nrrd": (lambda ct, d: cut_short(gzip_nrrd(sitk.ReadImage(str(ct)), d / "full.nrrd"),
                                                     d / "cut.nrrd", 40000), "is incomplete"),
    "text file": (lambda ct, d: _text(d / "notes.txt"), "not an image"),
    "text file named like NIfTI": (lambda ct, d: _text(d / "ct.nii.gz"), "not an image"),
    "empty folder": (lambda ct, d: _folder(d / "empty"), "no dicom series"),
    "2D image": (lambda ct, d: write_variant(ct, d / "slice.nrrd", lambda i: i[:, :, 10]), "is 2d"),
    "4D image": (lambda ct, d: write_variant(ct, d / "4d.nii.gz", lambda i: sitk.JoinSeries([i, i])), "is 4d"),
    "RGB image": (lambda ct, d: write_variant(ct, d / "rgb.nrrd", rgb), "3 components"),
    "NaN voxels": (lambda ct, d: write_variant(ct, d / "nan.nrrd", with_nan), "nan"),
    "constant volume": (lambda ct, d: write_variant(ct, d / "flat.nrrd", constant), "constant"),
    "1 m voxels": (lambda ct, d: write_variant(ct, d / "big_voxels.nrrd", with_spacing_of_one_metre), "spacing"),
    "beyond memory": (lambda ct, d: huge_header(d), "gib of memory"),
}


def _text(path: Path) -> Path:
    path.write_text("Not a CT: notes about a CT.\n")
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def assert_clean_failure(result, expected: str, out: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0].lower()
    assert list(out.iterdir()) == []  # no output, no temporary file


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("case", INPUTS, ids=list(INPUTS))
def test_bad_input_image(case, small_ct, tiny_model, tmp_path, out):
    make, expected = INPUTS[case]
    source = make(small_ct, tmp_path)
    result = run_cli("segment", source, "-o", out / "pancreas.nii.gz", "--attention", out / "attention.nii.gz",
                     "--weights", tiny_model)
    assert_clean_failure(result, expected, out)


def test_failed_run_keeps_the_users_existing_output(small_ct, tiny_model, tmp_path, out):
    existing = out / "pancreas.nii.gz"
    existing.write_bytes(b"yesterday's segmentation")
    nan_ct = write_variant(small_ct, tmp_path / "nan.nrrd", with_nan)
    result = run_cli("segment", nan_ct, "-o", existing, "--weights", tiny_model)
    assert result.returncode == 2
    assert existing.read_bytes() == b"yesterday's segmentation"
    assert list(out.iterdir()) == [existing]


def copy_model(model: Path, folder: Path, checksum: bool = True) -> Path:
    copy = Path(shutil.copy(model, folder / model.name))
    if checksum:
        shutil.copy(f"{model}.sha256", f"{copy}.sha256")
    return copy


def corrupt(model: Path, folder: Path) -> Path:
    copy = copy_model(model, folder)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
    copy.write_bytes(bytes(data))
    return copy


def other_architecture(model: Path, folder: Path) -> Path:
    """Weights of a one-gate network in a file whose metadata promises the two-gate one."""
    spec = ModelSpec(network=NetworkConfig(feature_scale=16), spacing_mm=(4.0, 4.0, 4.0), roi_size=(64, 64, 64))
    path = folder / "one_gate.safetensors"
    save_model(AttentionUNet3D(NetworkConfig(feature_scale=16, gates_per_level=1)), spec, path)
    return path


def foreign_model(model: Path, folder: Path) -> Path:
    """A checksummed safetensors file of some other model, without AttentionUNetSeg metadata."""
    path = folder / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(8, 4), "head.bias": torch.zeros(2)}, str(path))
    Path(f"{path}.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  other\n")
    return path


WEIGHTS = {
    "corrupt": (corrupt, "sha-256 check"),
    "missing checksum": (lambda m, d: copy_model(m, d, checksum=False), "no checksum"),
    "missing file": (lambda m, d: d / "absent.safetensors", "not found"),
    "other architecture": (other_architecture, "do not fit"),
    "not an AttentionUNetSeg model": (foreign_model, "not an attentionunetseg model"),
}


@pytest.mark.parametrize("case", WEIGHTS, ids=list(WEIGHTS))
def test_bad_weights(case, small_ct, tiny_model, tmp_path, out):
    make, expected = WEIGHTS[case]
    (tmp_path / "models").mkdir()
    weights = make(tiny_model, tmp_path / "models")
    result = run_cli("segment", small_ct, "-o", out / "pancreas.nii.gz", "--weights", weights)
    assert_clean_failure(result, expected, out)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu"])
def test_unavailable_device(device, small_ct, tiny_model, out):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a usable CUDA GPU")
    result = run_cli("segment", small_ct, "-o", out / "pancreas.nii.gz", "--weights", tiny_model, "--device", device)
    assert_clean_failure(result, device, out)


def read_only_folder(tmp_path: Path) -> Path:
    """Root may write anywhere chmod allows nothing; /sys refuses new files to everyone."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


def test_unwritable_output_folder(small_ct, tiny_model, tmp_path, out):
    folder = read_only_folder(tmp_path)
    result = run_cli("segment", small_ct, "-o", folder / "pancreas.nii.gz", "--weights", tiny_model)
    assert_clean_failure(result, "not writable", out)
    assert not (folder / "pancreas.nii.gz").exists()


OUTPUTS = {
    "missing folder": (lambda d, o: ["-o", d / "no" / "such" / "pancreas.nii.gz"], "missing or not writable"),
    "unsupported extension": (lambda d, o: ["-o", o / "pancreas.png"], "unsupported extension"),
    "attention extension": (lambda d, o: ["-o", o / "p.nii.gz", "--attention", o / "a.txt"], "unsupported extension"),
    "maps under a file": (lambda d, o: ["-o", o / "p.nii.gz", "--attention-maps", _text(d / "f") / "maps"],
                          "not a writable folder"),
    "same file twice": (lambda d, o: ["-o", o / "p.nii.gz", "--attention", o / "p.nii.gz"], "same file"),
}


@pytest.mark.parametrize("case", OUTPUTS, ids=list(OUTPUTS))
def test_bad_output(case, small_ct, tiny_model, tmp_path, out):
    arguments, expected = OUTPUTS[case]
    result = run_cli("segment", small_ct, *arguments(tmp_path, out), "--weights", tiny_model)
    assert_clean_failure(result, expected, out)


def test_output_that_is_the_input_is_refused(small_ct, tiny_model, tmp_path, out):
    ct = Path(shutil.copy(small_ct, out / "ct.nii.gz"))
    before = ct.read_bytes()
    result = run_cli("segment", ct, "-o", ct, "--weights", tiny_model)
    assert result.returncode == 2 and result.stderr.startswith(f"error: output {ct} is the input")
    assert ct.read_bytes() == before and list(out.iterdir()) == [ct]
