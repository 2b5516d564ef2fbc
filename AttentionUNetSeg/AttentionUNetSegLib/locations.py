"""Where the project's data lives on disk; environment variables override each place."""

from __future__ import annotations

import os
from pathlib import Path

# The repository root in a clone (the Lib sits in AttentionUNetSeg/AttentionUNetSegLib/).
REPOSITORY = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared folder beside the repository: real CT in data/, label maps in labelmaps/."""
    return Path(os.environ.get("ATTENTION_UNET_SEG_SHARED", REPOSITORY.parent / "shared"))


def shared_data_dir() -> Path:
    return Path(os.environ.get("ATTENTION_UNET_SEG_DATA", shared_dir() / "data"))


def labelmaps_dir() -> Path:
    return Path(os.environ.get("ATTENTION_UNET_SEG_LABELMAPS", shared_dir() / "labelmaps"))


def models_dir() -> Path:
    """Bundled models: ``Resources/Models`` beside the Lib, in a clone and in a Slicer install alike."""
    override = os.environ.get("ATTENTION_UNET_SEG_MODELS")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "Resources" / "Models"


MODEL_CARD_NAME = "MODEL_CARD.md"


def model_card_path() -> Path:
    return models_dir() / MODEL_CARD_NAME
