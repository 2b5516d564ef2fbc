"""Bad inputs to ``attention-unet-seg segment``: exit 2, one ``error:`` line saying what, no traceback, no file.

Each bad input is made from the small real CT (or a real model file) with one thing wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import resource
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.uid import generate_uid
from safetensors.torch import save_file
from test_cli import CONSOLE_SCRIPT, run_cli

from AttentionUNetSegLib.imageio import read_image, validate_ct
from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
from AttentionUNetSegLib.weights import ModelSpec, save_model


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


def with_pixdim(ct_path: Path, path: Path, size_mm: float) -> Path:
    """The real CT as a NIfTI whose header states ``size_mm`` as the first voxel size (pixdim[1]), as a
    broken converter writes it; the sform keeps the true 3 mm."""
    plain = path.with_name("plain.nii")
    sitk.WriteImage(sitk.ReadImage(str(ct_path)), str(plain))
    header = bytearray(plain.read_bytes())
    header[80:84] = struct.pack("<f", size_mm)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as stream:
        stream.write(bytes(header))
    plain.unlink()
    return path


def mr_like(ct: sitk.Image) -> sitk.Image:
    """The CT's tissues with T1-MR-like intensities in 0..1000 (air black, fat bright, water and organs grey,
    bone dark), shifted by -1024 so that the range looks like HU (-1024..-24)."""
    hu = sitk.GetArrayFromImage(ct)
    mr = np.interp(hu, [-1024, -1000, -100, 0, 60, 300, 1500, 3100], [0, 0, 900, 400, 500, 600, 150, 100])
    noisy = np.clip(mr + np.random.default_rng(0).normal(0, 20, mr.shape), 0, 1000)
    image = sitk.GetImageFromArray((noisy - 1024).astype(np.float32))
    image.CopyInformation(ct)
    return image


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def link_loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def dicom_folder_with(dicom_dir: Path, folder: Path, extra) -> Path:
    """A copy of the real DICOM series with ``extra(folder)`` added beside its slices."""
    shutil.copytree(dicom_dir, folder)
    extra(folder / "extra")
    return folder


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
    "zero voxel size (.nii.gz)": (lambda ct, d: with_pixdim(ct, d / "zero.nii.gz", 0.0), "must be positive"),
    "negative voxel size (.nii)": (lambda ct, d: with_pixdim(ct, d / "negative.nii", -3.0), "must be positive"),
    "MR-like, shifted to look like HU": (lambda ct, d: write_variant(ct, d / "mr.nrrd", mr_like), "dense as water"),
    "symbolic link loop": (lambda ct, d: link_loop(d / "ct.nii.gz"), "symbolic link loop"),
}

# Inputs that used to block for ever: each must be refused before it is opened.
BLOCKING = {
    "named pipe": lambda dicom, d: fifo(d / "ct.nii.gz"),
    "named pipe in a DICOM folder": lambda dicom, d: dicom_folder_with(dicom, d / "series", fifo),
    "device": lambda dicom, d: Path("/dev/zero"),
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


@pytest.mark.parametrize("case", BLOCKING, ids=list(BLOCKING))
def test_input_that_would_block_is_refused_promptly(case, dicom_dir, tiny_model, tmp_path, out):
    source = BLOCKING[case](dicom_dir, tmp_path)
    result = subprocess.run([str(CONSOLE_SCRIPT), "segment", str(source), "-o", str(out / "pancreas.nii.gz"),
                             "--weights", str(tiny_model)], check=False, capture_output=True, text=True, timeout=60)
    assert_clean_failure(result, "not a regular file", out)


def test_link_loop_in_a_dicom_folder_is_one_line(dicom_dir, tiny_model, tmp_path, out):
    folder = dicom_folder_with(dicom_dir, tmp_path / "series", link_loop)
    result = run_cli("segment", folder, "-o", out / "pancreas.nii.gz", "--weights", tiny_model)
    assert_clean_failure(result, "symbolic link loop", out)
    assert "remove it from the dicom folder" in result.stderr.lower()


def test_every_real_ct_passes_the_ct_checks(data_dir, small_ct):
    """The checks that refuse the MR-like volume and odd voxel sizes let every real CT through, and a small
    crop of fat and muscle inside one."""
    cases = [c / "ct.nii.gz" if (c / "ct.nii.gz").is_file() else c / "dicom" for c in sorted(data_dir.iterdir())
             if c.is_dir()]
    assert len(cases) >= 3
    for path in cases:
        validate_ct(read_image(path), path.parent.name)
    validate_ct(read_image(small_ct)[40:52, 40:50, 10:13], "a crop")


def test_synthetic_ct_passes_the_ct_checks(labelmaps_dir):
    """Evaluation and calibration segment synthetic CT of every phase, random contrast included (tissues at
    -200..320 HU in any order): the check for an image in HU lets them through."""
    from AttentionUNetSegTools.synthesis.catalog import labelmap_catalog
    from AttentionUNetSegTools.synthesis.generator import SyntheticCTGenerator
    from AttentionUNetSegTools.synthesis.intensities import PHASES, RANDOM_CONTRAST

    generator = SyntheticCTGenerator(labelmap_catalog(labelmaps_dir), seed=1)
    rng = np.random.default_rng(1)
    for look in (*PHASES, RANDOM_CONTRAST, RANDOM_CONTRAST, RANDOM_CONTRAST):
        case = generator.sample_case(rng, phase=look)
        image = sitk.GetImageFromArray(case.image)
        image.SetSpacing(case.spacing_mm)
        validate_ct(image, f"a synthetic CT ({look})")


@pytest.fixture(scope="module")
def two_series(dicom_dir, tmp_path_factory) -> tuple[Path, str, str]:
    """The real 20-slice series, and beside it 12 of its slices as a second series (a new SeriesInstanceUID
    and SOPInstanceUIDs), in one folder: (folder, larger UID, smaller UID)."""
    folder = tmp_path_factory.mktemp("two_series")
    smaller_uid = generate_uid()
    for index, source in enumerate(sorted(dicom_dir.iterdir())):
        shutil.copy(source, folder / source.name)
        if 4 <= index < 16:
            dataset = pydicom.dcmread(source)
            dataset.SeriesInstanceUID = smaller_uid
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dataset.SeriesNumber = int(dataset.get("SeriesNumber") or 0) + 1
            dataset.save_as(folder / f"second-{index}.dcm")
    larger_uid = pydicom.dcmread(next(dicom_dir.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    return folder, larger_uid, smaller_uid


def slices_written(path: Path) -> int:
    return sitk.ReadImage(str(path)).GetSize()[2]


def test_a_folder_of_two_series_says_which_it_read(two_series, tiny_model, out):
    folder, larger, smaller = two_series
    result = run_cli("segment", folder, "-o", out / "pancreas.nii.gz", "--weights", tiny_model, "--progress", "none")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert f"reading the largest, {larger} (20 slices), not {smaller} (12 slices)" in warnings[0]
    assert "--series" in warnings[0]
    assert slices_written(out / "pancreas.nii.gz") == 20


def test_series_chooses_the_one_to_segment(two_series, tiny_model, out):
    folder, _, smaller = two_series
    result = run_cli("segment", folder, "--series", smaller, "-o", out / "pancreas.nii.gz", "--weights", tiny_model,
                     "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert slices_written(out / "pancreas.nii.gz") == 12


def test_an_unknown_series_is_refused_with_the_ones_there(two_series, tiny_model, out):
    folder, larger, smaller = two_series
    result = run_cli("segment", folder, "--series", "1.2.3", "-o", out / "pancreas.nii.gz", "--weights", tiny_model)
    assert_clean_failure(result, "no dicom series 1.2.3", out)
    assert f"{larger} (20 slices)" in result.stderr and f"{smaller} (12 slices)" in result.stderr


def test_series_with_a_file_is_refused(small_ct, tiny_model, out):
    result = run_cli("segment", small_ct, "--series", "1.2.3", "-o", out / "pancreas.nii.gz", "--weights", tiny_model)
    assert_clean_failure(result, "--series was given", out)


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3, 0.5, 0.8])
def test_ctrl_c_while_importing_ends_quietly(delay, small_ct, tiny_model, out):
    """Ctrl-C in the first second, while Python still loads SimpleITK and torch: 130, no traceback."""
    child = subprocess.Popen([str(CONSOLE_SCRIPT), "segment", str(small_ct), "-o", str(out / "pancreas.nii.gz"),
                              "--weights", str(tiny_model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert stderr.strip() in ("", "error: interrupted; nothing half-written was left behind"), stderr
    assert list(out.iterdir()) == []


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
    "named pipe": (lambda m, d: fifo(d / "pipe.safetensors"), "named pipe"),
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


def huge_network(folder: Path) -> Path:
    """A 500-byte file with a matching checksum whose metadata asks for a network of 31 G parameters."""
    path = folder / "huge.safetensors"
    spec = ModelSpec(network=NetworkConfig(feature_scale=1, deep_width=16, gates_per_level=8))
    save_file({"conv1.weight": torch.zeros(2)}, str(path), metadata={"attention_unet_seg": spec.to_json()})
    Path(f"{path}.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    return path


def test_a_small_file_asking_for_a_huge_network_is_refused_from_its_header(small_ct, tmp_path, out):
    """Run with 4 GiB of address space (a segmentation needs about 3): building the 125 GB network would fail
    there (or, without the limit, bring the machine to its knees), so the refusal must come before it."""
    weights = huge_network(tmp_path)
    assert weights.stat().st_size < 1000

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    result = subprocess.run([str(CONSOLE_SCRIPT), "segment", str(small_ct), "-o", str(out / "pancreas.nii.gz"),
                             "--weights", str(weights)], check=False, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_memory)
    assert_clean_failure(result, "do not fit the architecture", out)


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
