"""Model files: safetensors weights (no pickle) whose metadata says how to use them, checked by SHA-256.

A model file ``NAME.safetensors`` carries one JSON metadata entry, ``attention_unet_seg``, holding a
:class:`ModelSpec`; ``NAME.safetensors.sha256`` beside it holds the file's digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from .errors import WeightsError
from .imageio import input_is_folder
from .locations import models_dir
from .network import AttentionUNet3D, NetworkConfig
from .outputs import replacing

METADATA_KEY = "attention_unet_seg"
FORMAT_VERSION = 1
BUNDLED_MODEL_NAME = "pancreas_attention_unet.safetensors"
HASH_CHUNK_BYTES = 2**20
CHECKSUM_FILE_BYTES = 4096  # a digest line, with room for a long file name
# sha256sum: "HEX  NAME" (or "HEX *NAME"); sha256sum --tag and BSD tools: "SHA256 (NAME) = HEX"; or HEX alone
DIGEST_LINE = re.compile(r"^\s*(?:SHA256 \(.*\) = )?(?P<digest>[0-9a-fA-F]{64})(?:\s|$)", re.MULTILINE)
# Far above any network trained here (the bundled one: 1.6 M parameters in 6.5 MB; feature scale 1 with deep
# width 2 is 400 M parameters, 1.6 GB), far below what takes minutes and gigabytes to build and fail.
MAX_MODEL_BYTES = 2 * 2**30
NETWORK_LIMITS = {"in_channels": 16, "num_classes": 64, "feature_scale": 64, "gates_per_level": 8, "deep_width": 16}


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


def file_sha256(path: Path) -> str:
    """The file's digest, read in chunks: memory stays flat whatever the file's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(network: AttentionUNet3D, spec: ModelSpec, path: str | Path) -> str:
    """Write weights + checksum atomically; returns the SHA-256."""
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in network.state_dict().items()}
    _write_atomically(path, save_safetensors_bytes(tensors, metadata={METADATA_KEY: spec.to_json()}))
    digest = file_sha256(path)
    _write_atomically(_checksum_path(path), f"{digest}  {path.name}\n".encode())
    return digest


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def read_spec(path: str | Path) -> ModelSpec:
    """The spec of a verified model file, without building the network or reading its tensors."""
    path = Path(path)
    _verify_file(path)
    return _checked_spec(path)


def load_model(path: str | Path | None = None) -> LoadedModel:
    """Load and verify a model; ``None`` means the bundled one. Raises :class:`WeightsError`.

    Every size is checked before anything is allocated: the file's (:data:`MAX_MODEL_BYTES`), the network's
    settings (:data:`NETWORK_LIMITS`), and each tensor's shape against the network the metadata describes.
    """
    path = Path(path) if path is not None else bundled_model_path()
    digest = _verify_file(path)
    spec = _checked_spec(path)
    network = AttentionUNet3D(spec.network)
    network.load_state_dict(load_safetensors_file(str(path)), strict=True)
    return LoadedModel(spec=spec, network=network.eval(), path=path, sha256=digest)


def _verify_file(path: Path) -> str:
    """The file's SHA-256, once it is known to be a regular file of a sane size whose digest is the one
    beside it."""
    if not path.exists() and not path.is_symlink():
        if path == bundled_model_path():
            raise WeightsError(
                "no trained model is bundled with this copy of AttentionUNetSeg",
                f"{path} does not exist",
                "pass a model file with --weights FILE",
            )
        raise WeightsError(f"weights file {path} not found", "", "check the path given with --weights")
    if input_is_folder(path):
        raise WeightsError(f"weights {path} is a folder", "", "pass the .safetensors file itself")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise WeightsError(f"weights {path.name} hold {size / 2**20:,.0f} MiB",
                           f"an AttentionUNetSeg model is far below {MAX_MODEL_BYTES / 2**20:,.0f} MiB",
                           "check that --weights names the model file")
    digest = file_sha256(path)
    if digest != _expected_digest(path):
        raise WeightsError(
            f"weights {path.name} failed their SHA-256 check",
            "the file is corrupt or was changed after it was saved",
            "restore the file or save the model again",
        )
    return digest


def _expected_digest(path: Path) -> str:
    """The digest in ``NAME.sha256``, in any of the :data:`DIGEST_LINE` formats, in either case."""
    checksum = _checksum_path(path)
    if not checksum.is_file():
        raise WeightsError(
            f"no checksum beside weights {path.name}",
            f"{checksum.name} is missing, so the file cannot be verified",
            "keep the .sha256 file next to the weights",
        )
    with open(checksum, encoding="utf-8", errors="replace") as stream:
        text = stream.read(CHECKSUM_FILE_BYTES)
    match = DIGEST_LINE.search(text)
    if match is None:
        raise WeightsError(f"{checksum.name} holds no SHA-256 digest", "expected 64 hex digits, as sha256sum writes",
                           f"write it again: sha256sum {path.name} > {checksum.name}")
    return match.group("digest").lower()


def _checked_spec(path: Path) -> ModelSpec:
    """The spec in the metadata, once the network it describes is of a sane size and has exactly the
    tensors the file declares, shape for shape (read from the header: nothing is allocated)."""
    try:
        with safe_open(str(path), framework="pt") as model_file:
            text = model_file.metadata()[METADATA_KEY]
            _check_network_size(json.loads(text)["network"])
            spec = ModelSpec.from_json(text)
            names = model_file.keys()  # a safe_open is not iterable itself
            declared = {name: tuple(model_file.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise WeightsError(
            f"weights {path.name} are not an AttentionUNetSeg model", str(exc).splitlines()[0],
            "use a .safetensors file written by attention-unet-seg",
        ) from None
    mismatch = _first_mismatch(declared, _expected_shapes(spec.network))
    if mismatch:
        raise WeightsError(
            f"weights {path.name} do not fit the architecture in their metadata", mismatch,
            "re-export the model with 'attention-unet-seg train' or use another --weights file",
        )
    return spec


def _check_network_size(settings: dict) -> None:
    """Each size setting within :data:`NETWORK_LIMITS` (a ValueError), before NetworkConfig computes with it."""
    if not isinstance(settings, dict):
        raise TypeError("the network settings are not a JSON object")
    for name, limit in NETWORK_LIMITS.items():
        value = settings.get(name, 1)  # an absent one takes NetworkConfig's default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"the network's {name} is {value!r}, beyond 1..{limit}")


def _expected_shapes(config: NetworkConfig) -> dict[str, tuple[int, ...]]:
    """The tensors the network of ``config`` has, built on the meta device: shapes without memory."""
    with torch.device("meta"):
        network = AttentionUNet3D(config)
    return {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}


def _first_mismatch(declared: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    if missing or unexpected:
        names = [*(f"{n} missing" for n in missing[:2]), *(f"{n} unexpected" for n in unexpected[:2])]
        return f"{len(missing)} tensor(s) missing, {len(unexpected)} unexpected ({', '.join(names)})"
    for name, shape in expected.items():
        if declared[name] != shape:
            return f"{name} is {list(declared[name])} in the file, {list(shape)} in the network"
    return ""
