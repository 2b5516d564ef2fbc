"""Shared fixtures: the real CT in ../shared/data, and small model files the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from AttentionUNetSegLib.locations import labelmaps_dir as shared_labelmaps_dir
from AttentionUNetSegLib.locations import shared_data_dir


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set ATTENTION_UNET_SEG_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(shared_data_dir())


@pytest.fixture(scope="session")
def labelmaps_dir() -> Path:
    return _require(shared_labelmaps_dir())


@pytest.fixture(scope="session")
def small_ct(data_dir) -> Path:
    """122x101x30 real abdominal CT at 3 mm with a TotalSegmentator pancreas label."""
    return data_dir / "ts-abdomen-3mm-crop" / "ct.nii.gz"


@pytest.fixture(scope="session")
def abdomen_ct(data_dir) -> Path:
    return data_dir / "ts-abdomen-3mm" / "ct.nii.gz"


@pytest.fixture(scope="session")
def dicom_dir(data_dir) -> Path:
    return data_dir / "ts-venous-dicom" / "dicom"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small, untrained but valid model file (seeded), with checksum, for engine/CLI/bridge tests."""
    import torch

    from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
    from AttentionUNetSegLib.weights import ModelSpec, save_model

    torch.manual_seed(0)
    spec = ModelSpec(network=NetworkConfig(feature_scale=16), spacing_mm=(4.0, 4.0, 4.0), roi_size=(64, 64, 64),
                     version="test")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(AttentionUNet3D(spec.network), spec, path)
    return path
