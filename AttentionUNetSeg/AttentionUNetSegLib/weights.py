"""Model files: safetensors weights (no pickle) whose metadata says how to use them, checked by SHA-256.

A model file ``NAME.safetensors`` carries one JSON metadata entry, ``attention_unet_seg``, holding a
:class:`ModelSpec`; ``NAME.safetensors.sha256`` beside it holds the file's digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import WeightsError
from .imageio import replacing
from .locations import models_dir
from .network import AttentionUNet3D, NetworkConfig

METADATA_KEY = "attention_unet_seg"
FORMAT_VERSION = 1
BUNDLED_MODEL_NAME = "pancreas_attention_unet.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    """Everything inference needs besides the tensors."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_range: tuple[float, float] = (-250.0, 350.0)  # clipped, then scaled to [0, 1]
    roi_size: tuple[int, int, int] = (96, 96, 96)  # sliding-window tile, in model voxels (x, y, z)
    label_names: tuple[str, ...] = ("background", "pancreas")
    version: str = "untrained"
    training: dict = field(default_factory=dict)  # data summary: sources, label kinds, steps

    def to_json(self) -> str:
        values = asdict(self)
        values["network"] = self.network.to_dict()
        values["format_version"] = FORMAT_VERSION
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        values = json.loads(text)
        if values.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"model format is not version {FORMAT_VERSION}")
        return cls(
            network=NetworkConfig.from_dict(values.pop("network")),
            spacing_mm=tuple(float(s) for s in values.pop("spacing_mm")),
            hu_range=tuple(float(h) for h in values.pop("hu_range")),
            roi_size=tuple(int(r) for r in values.pop("roi_size")),
            label_names=tuple(values.pop("label_names")),
            **values,
        )


@dataclass
class LoadedModel:
    spec: ModelSpec
    network: AttentionUNet3D
    path: Path
    sha256: str


def bundled_model_path() -> Path:
    return models_dir() / BUNDLED_MODEL_NAME


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_model(network: AttentionUNet3D, spec: ModelSpec, path: str | Path) -> str:
    """Write weights + checksum atomically; returns the SHA-256."""
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in network.state_dict().items()}
    data = save_safetensors_bytes(tensors, metadata={METADATA_KEY: spec.to_json()})
    digest = _sha256(data)
    _write_atomically(path, data)
    _write_atomically(_checksum_path(path), f"{digest}  {path.name}\n".encode())
    return digest


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def read_spec(path: str | Path) -> ModelSpec:
    """The spec of a verified model file, without building the network."""
    return _verified_contents(Path(path))[1]


def load_model(path: str | Path | None = None) -> LoadedModel:
    """Load and verify a model; ``None`` means the bundled one. Raises :class:`WeightsError`."""
    path = Path(path) if path is not None else bundled_model_path()
    tensors, spec, digest = _verified_contents(path)
    network = AttentionUNet3D(spec.network)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise WeightsError(
            f"weights {path.name} do not fit the architecture in their metadata",
            first,
            "re-export the model with 'attention-unet-seg train' or use another --weights file",
        ) from None
    return LoadedModel(spec=spec, network=network.eval(), path=path, sha256=digest)


def _verified_contents(path: Path) -> tuple[dict[str, torch.Tensor], ModelSpec, str]:
    if not path.is_file():
        if path == bundled_model_path():
            raise WeightsError(
                "no trained model is bundled with this copy of AttentionUNetSeg",
                f"{path} does not exist",
                "pass a model file with --weights FILE",
            )
        raise WeightsError(f"weights file {path} not found", "", "check the path given with --weights")
    data = path.read_bytes()
    digest = _sha256(data)
    expected = _expected_digest(path)
    if digest != expected:
        raise WeightsError(
            f"weights {path.name} failed their SHA-256 check",
            "the file is corrupt or was changed after it was saved",
            "restore the file or save the model again",
        )
    try:
        tensors = load_safetensors_bytes(data)
        metadata = _safetensors_metadata(data)
        spec = ModelSpec.from_json(metadata[METADATA_KEY])
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise WeightsError(
            f"weights {path.name} are not an AttentionUNetSeg model", str(exc).splitlines()[0],
            "use a .safetensors file written by attention-unet-seg",
        ) from None
    return tensors, spec, digest


def _expected_digest(path: Path) -> str:
    checksum = _checksum_path(path)
    if not checksum.is_file():
        raise WeightsError(
            f"no checksum beside weights {path.name}",
            f"{checksum.name} is missing, so the file cannot be verified",
            "keep the .sha256 file next to the weights",
        )
    words = checksum.read_text().split()
    return words[0] if words else ""


def _safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__") or {}
