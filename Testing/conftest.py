"""Shared fixtures: the application's ``slicer``, the real CT in ../shared/data, and small model files the tests
make themselves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import slicer_app

# Before any test module imports ``slicer``: every test sees the namespace of the Slicer application (the kits
# Slicer puts in ``slicer``, vtkTeem and vtkITK as modules of their own), never slicer-core's flat package.
if importlib.util.find_spec("slicer_core") is not None:
    slicer_app.install()

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


def save_tiny_model(path: Path, patch: int) -> Path:
    """A small, untrained but valid model file (seeded), with checksum, tiling ``patch``-voxel cubes."""
    import torch

    from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
    from AttentionUNetSegLib.weights import ModelSpec, save_model

    torch.manual_seed(0)
    spec = ModelSpec(network=NetworkConfig(feature_scale=16), spacing_mm=(4.0, 4.0, 4.0), roi_size=(patch,) * 3,
                     version="test")
    save_model(AttentionUNet3D(spec.network), spec, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """For engine, CLI and bridge tests."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", 64)


@pytest.fixture(scope="session")
def tiny_patch_model(tmp_path_factory) -> Path:
    """32-voxel patches: a fine-tuning step takes a fraction of a second."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-patches.safetensors", 32)


# --- shared helpers (import them with ``from conftest import ...``) ------------------------------------

GRID_TOLERANCE_MM = 1e-4  # origins and spacings that agree this closely are the same grid


def same_grid(a, b, atol: float = GRID_TOLERANCE_MM) -> bool:
    """Two SimpleITK images on the same voxel grid: size, spacing, origin and direction."""
    import numpy as np

    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=atol)
    )


def ijk_to_ras(node):
    """The IJK-to-RAS matrix of a volume node as a 4x4 numpy array."""
    import numpy as np
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def image_data_voxels(image_data):
    """The (k, j, i) array of a vtkImageData (a view, no copy)."""
    from vtkmodules.util import numpy_support

    return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(image_data.GetDimensions()[::-1])


def node_ids(scene) -> list:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def new_scene(views=("Red", "Yellow", "Green")):
    """A bare slicer-core scene with slice composite nodes standing for the slice views of an application."""
    import slicer

    scene = slicer.vtkMRMLScene()
    for view in views:
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        scene.AddNode(composite)
    return scene


def read_with_slicer(scene, paths, name="CT"):
    """A volume node read by Slicer's own reader, in the file's own pixel type (the reference for IJK-to-RAS)."""
    import slicer

    paths = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(paths[0])
    if len(paths) > 1:  # a series: the list holds every file, the archetype included
        for path in paths:
            storage.AddFileName(path)
    assert storage.ReadData(node) == 1
    return node
