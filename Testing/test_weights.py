"""Model files: safetensors with their spec in the metadata, verified by SHA-256 before use."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from AttentionUNetSegLib import weights
from AttentionUNetSegLib.errors import WeightsError
from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
from AttentionUNetSegLib.weights import ModelSpec, load_model, save_model


def test_round_trip_keeps_tensors_and_spec(tmp_path):
    spec = ModelSpec(network=NetworkConfig(feature_scale=16), spacing_mm=(2.5, 2.5, 3.0), version="t",
                     training={"steps": 3})
    network = AttentionUNet3D(spec.network)
    digest = save_model(network, spec, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.spec == spec and loaded.sha256 == digest
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[name], tensor)
    assert (tmp_path / "m.safetensors.sha256").read_text().split()[0] == digest
    assert not loaded.network.training


def test_changed_bytes_fail_the_checksum(tiny_model, tmp_path):
    copy = tmp_path / tiny_model.name
    data = bytearray(tiny_model.read_bytes())
    data[-5] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / (tiny_model.name + ".sha256")).write_text((tiny_model.parent / (tiny_model.name + ".sha256")).read_text())
    with pytest.raises(WeightsError, match="SHA-256"):
        load_model(copy)


def test_missing_checksum_is_refused(tiny_model, tmp_path):
    copy = tmp_path / tiny_model.name
    copy.write_bytes(tiny_model.read_bytes())
    with pytest.raises(WeightsError, match="no checksum"):
        load_model(copy)


def test_weights_that_do_not_fit_their_architecture(tmp_path):
    small = AttentionUNet3D(NetworkConfig(feature_scale=16))
    save_model(small, ModelSpec(network=NetworkConfig(feature_scale=8)), tmp_path / "wrong.safetensors")
    with pytest.raises(WeightsError, match="do not fit"):
        load_model(tmp_path / "wrong.safetensors")


def test_a_file_that_is_not_a_model(tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a model at all")
    weights._write_atomically(tmp_path / "fake.safetensors.sha256",
                              f"{weights.file_sha256(fake)}  fake.safetensors\n".encode())
    with pytest.raises(WeightsError, match="not an AttentionUNetSeg model"):
        load_model(fake)


def test_no_pickle_in_the_format(tiny_model):
    header = json.loads(tiny_model.read_bytes()[8:8 + int.from_bytes(tiny_model.read_bytes()[:8], "little")])
    assert json.loads(header["__metadata__"][weights.METADATA_KEY])["format_version"] == weights.FORMAT_VERSION


def test_missing_bundled_model_says_how_to_pass_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_UNET_SEG_MODELS", str(tmp_path))
    with pytest.raises(WeightsError, match="--weights"):
        load_model(None)


def model_file(path: Path, network: dict, tensors: dict | None = None) -> Path:
    """A safetensors file with a matching checksum whose metadata asks for the network ``network`` (settings
    written as they are, even ones NetworkConfig would refuse), holding ``tensors`` (default: two numbers)."""
    metadata = json.loads(ModelSpec().to_json())
    metadata["network"].update(network)
    save_file(tensors or {"conv1.weight": torch.zeros(2)}, str(path),
              metadata={weights.METADATA_KEY: json.dumps(metadata)})
    Path(f"{path}.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    return path


@pytest.fixture
def nothing_built_for_real(monkeypatch):
    """Fails any attempt to build the network outside the meta device (where it takes no memory)."""
    real = weights.AttentionUNet3D

    def build(config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError(f"a network was built for real: {config}")
        return real(config)

    monkeypatch.setattr(weights, "AttentionUNet3D", build)


def test_a_small_file_asking_for_a_huge_network_is_refused_before_building(tmp_path, nothing_built_for_real):
    """The metadata asks for 31 G parameters (125 GB); the file holds 8 bytes of tensors."""
    path = model_file(tmp_path / "huge.safetensors", {"feature_scale": 1, "deep_width": 16, "gates_per_level": 8})
    assert path.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        load_model(path)
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        weights.read_spec(path)
    assert time.perf_counter() - started < 5


def test_tensor_shapes_are_compared_with_the_metadata_before_building(tiny_model, tmp_path, nothing_built_for_real):
    """Every tensor the network needs, under the right name, but one of another shape: named in the error."""
    tensors = load_file(str(tiny_model))
    name = min(tensors)
    shape = list(tensors[name].shape)
    tensors[name] = torch.zeros(shape[0] + 1, *shape[1:])
    network = json.loads(safe_metadata(tiny_model))["network"]
    path = model_file(tmp_path / "reshaped.safetensors", network, tensors)
    with pytest.raises(WeightsError, match=re.escape(f"{name} is {[shape[0] + 1, *shape[1:]]} in the file, {shape}")):
        load_model(path)


def safe_metadata(path: Path) -> str:
    with safe_open(str(path), framework="pt") as model_file:
        return model_file.metadata()[weights.METADATA_KEY]


@pytest.mark.parametrize(("network", "named"), [
    ({"gates_per_level": 100000}, "gates_per_level is 100000, beyond 1..8"),
    ({"deep_width": 10**6}, "deep_width is 1000000"),
    ({"in_channels": 4096}, "in_channels is 4096"),
    ({"feature_scale": 0}, "feature_scale is 0"),
    ({"num_classes": 2.5}, "num_classes is 2.5"),
], ids=["gates", "deep width", "channels", "zero scale", "fractional classes"])
def test_network_settings_beyond_the_limits_are_refused(network, named, tmp_path, nothing_built_for_real):
    with pytest.raises(WeightsError, match=named):
        load_model(model_file(tmp_path / "odd.safetensors", network))


def test_a_file_beyond_the_size_limit_is_refused_before_hashing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "MAX_MODEL_BYTES", 2**20)
    monkeypatch.setattr(weights, "file_sha256", lambda path: pytest.fail("hashed a file beyond the limit"))
    with pytest.raises(WeightsError, match="far below 1 MiB"):
        load_model(tiny_model)


def test_hashing_streams_the_file(tiny_model, tmp_path):
    """A 48 MB file (the tiny model plus one large tensor it does not use) is hashed and refused with
    little memory: never read whole."""
    tensors = {**load_file(str(tiny_model)), "padding": torch.zeros(12 * 2**20)}
    path = model_file(tmp_path / "padded.safetensors", json.loads(safe_metadata(tiny_model))["network"], tensors)
    assert path.stat().st_size > 48 * 10**6
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match="1 unexpected"):
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def digest_file(model: Path, tmp_path: Path, line) -> Path:
    """A copy of the model with its digest written by ``line(hex_digest, file_name)``."""
    copy = Path(shutil.copy(model, tmp_path / model.name))
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    Path(f"{copy}.sha256").write_bytes(line(digest, copy.name).encode())
    return copy


DIGEST_FORMATS = {
    "sha256sum": lambda hex, name: f"{hex}  {name}\n",
    "sha256sum --binary": lambda hex, name: f"{hex} *{name}\n",
    "sha256sum --tag (BSD)": lambda hex, name: f"SHA256 ({name}) = {hex}\n",
    "upper case": lambda hex, name: f"{hex.upper()}  {name}\n",
    "bare digest": lambda hex, name: f"{hex}\n",
    "bare upper case, no newline": lambda hex, name: hex.upper(),
    "Windows line end": lambda hex, name: f"{hex}  {name}\r\n",
    "BSD, upper case": lambda hex, name: f"SHA256 ({name}) = {hex.upper()}\n",
}


@pytest.mark.parametrize("case", DIGEST_FORMATS, ids=list(DIGEST_FORMATS))
def test_common_digest_formats_are_accepted(case, tiny_model, tmp_path):
    copy = digest_file(tiny_model, tmp_path, DIGEST_FORMATS[case])
    assert load_model(copy).sha256 == hashlib.sha256(copy.read_bytes()).hexdigest()


@pytest.mark.parametrize(("line", "expected"), [
    (lambda hex, name: f"SHA256 ({name}) = {'0' * 64}\n", "failed their SHA-256 check"),
    (lambda hex, name: f"{hex[:-1]}  {name}\n", "holds no SHA-256 digest"),
    (lambda hex, name: f"MD5 ({name}) = {hex[:32]}\n", "holds no SHA-256 digest"),
    (lambda hex, name: "", "holds no SHA-256 digest"),
], ids=["wrong digest, BSD format", "63 digits", "another algorithm", "empty"])
def test_a_wrong_or_missing_digest_is_refused(line, expected, tiny_model, tmp_path):
    with pytest.raises(WeightsError, match=expected):
        load_model(digest_file(tiny_model, tmp_path, line))
