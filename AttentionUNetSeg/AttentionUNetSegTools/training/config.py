"""Training configuration: one YAML/JSON file holds every choice (the bundled model's file is committed)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.locations import REPOSITORY, shared_dir
from AttentionUNetSegLib.network import NetworkConfig

from ..synthesis.catalog import SPLIT_SEED, VALIDATION_FRACTION


@dataclass
class DataSource:
    """One source of (CT, pancreas) pairs, drawn with probability proportional to ``weight``.

    kind: ``msd`` (Decathlon Task07: imagesTr/labelsTr, 1 pancreas + 2 tumour), ``nih`` (NIH Pancreas-CT
    converted to NIfTI: an images folder and a labels folder), ``pairs`` (explicit image/label files),
    ``crops`` (negatives: the parts of the ``pairs`` CT above and below their pancreas), ``synthetic`` (CT
    synthesised from the label maps under ``path``).
    """

    kind: str
    weight: float = 1.0
    path: str = ""  # folder for msd/nih/synthetic
    images: str = ""  # nih: images folder
    labels: str = ""  # nih: labels folder
    pairs: list[list[str]] = field(default_factory=list)  # pairs: [[image, label], ...]
    label_values: list[int] = field(default_factory=lambda: [1])  # label values that count as pancreas


@dataclass
class TrainingConfig:
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(feature_scale=8))
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_range: tuple[float, float] = (-250.0, 350.0)
    patch_size: tuple[int, int, int] = (96, 96, 96)  # x, y, z voxels
    batch_size: int = 2
    steps: int = 10000
    optimizer: str = "adamw"  # adamw | sgd
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    foreground_fraction: float = 0.67  # patches centred on pancreas
    validate_every: int = 250
    checkpoint_every: int = 250
    seed: int = SPLIT_SEED  # also seeds the patient split
    threads: int = 0  # 0 = all cores
    init_weights: str = ""  # warm start from a model file
    synthetic_pool: int = 24  # synthetic cases kept in memory, refreshed in the background
    patches_per_case: float = 2.0  # patches drawn per new synthetic case (a new one replaces a random one)
    data_workers: int = 0  # processes making synthetic cases; 0 = one thread (CPU training)
    negative_fraction: float = 0.0  # synthetic cases with no pancreas in view (above or below the gland)
    random_contrast_fraction: float = 0.1  # synthetic cases with every tissue's mean HU random (SynthSeg)
    batch_dice: bool = False  # Dice over the whole batch, so that a patch without pancreas has a defined loss
    # The background's Dice (about 1 everywhere) in the Dice term halves the pancreas's weight against the
    # cross-entropy; nnU-Net leaves it out. The bundled recipe keeps it (its weights were trained so).
    dice_background: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    validation_synthetic: int = 4  # held-out synthetic cases validated, the phases in turn
    validation_negatives: int = 0  # held-out synthetic cases with no pancreas in view, validated
    time_limit_minutes: float = 0.0  # stop (validated and checkpointed) after this much training time; 0 = none
    keep_checkpoints: bool = False  # also keep every checkpoint as step-N.safetensors
    # > 0: validate and save an exponential moving average of the weights (this decay a step) instead of the
    # latest ones, whose scores swing from checkpoint to checkpoint; 0.998 averages over about 500 steps.
    weight_average_decay: float = 0.0
    validation_fraction: float = VALIDATION_FRACTION  # of label-map patients, held out by patient
    sources: list[DataSource] = field(default_factory=list)
    validation_pairs: list[list[str]] = field(default_factory=list)  # real CT for validation Dice
    output_dir: str = "runs/pancreas"

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"training config {path} not found", "", "pass a YAML or JSON config file")
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(values, dict):
            raise UserError(f"training config {path} is not a mapping", "", "see the bundled config for the layout")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown training settings {sorted(unknown)}", f"known: {sorted(known)}", "")
        values = dict(values)
        if "network" in values:
            values["network"] = NetworkConfig.from_dict(values["network"])
        values["sources"] = [DataSource(**s) for s in values.get("sources", [])]
        for key in ("spacing_mm", "hu_range", "patch_size"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["network"] = self.network.to_dict()
        return values


def resolve_path(text: str) -> Path:
    """Paths may start with ``{shared}`` (the shared data folder) or be relative to the repository root."""
    path = Path(text.replace("{shared}", str(shared_dir()))).expanduser()
    return path if path.is_absolute() else REPOSITORY / path
