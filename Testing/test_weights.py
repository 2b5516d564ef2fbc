"""Model files: safetensors with their spec in the metadata, verified by SHA-256 before use."""

import json

import pytest
import torch

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
                              f"{weights._sha256(fake.read_bytes())}  fake.safetensors\n".encode())
    with pytest.raises(WeightsError, match="not an AttentionUNetSeg model"):
        load_model(fake)


def test_no_pickle_in_the_format(tiny_model):
    header = json.loads(tiny_model.read_bytes()[8:8 + int.from_bytes(tiny_model.read_bytes()[:8], "little")])
    assert json.loads(header["__metadata__"][weights.METADATA_KEY])["format_version"] == weights.FORMAT_VERSION


def test_missing_bundled_model_says_how_to_pass_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_UNET_SEG_MODELS", str(tmp_path))
    with pytest.raises(WeightsError, match="--weights"):
        load_model(None)
