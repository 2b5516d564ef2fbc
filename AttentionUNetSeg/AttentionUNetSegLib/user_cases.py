"""The user's own corrected cases and the models fine-tuned on them, in a folder of theirs (Slicer's settings
folder for the panel): ``cases/<name>/ct.nrrd`` + ``label.nrrd`` (the fine-tune's naming rule) and
``models/<name>/model.safetensors`` + its ``.sha256`` + ``finetune.json``.

Qt-free and without torch: the panel's parent imports it at start-up; the fine-tune itself runs in the child
(:class:`runner.FinetuneRun`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import mrml_bridge, protocol
from .errors import UserError
from .outputs import safe_name

CT_FILE, LABEL_FILE = "ct.nrrd", "label.nrrd"
PANCREAS = "Pancreas"


@dataclass(frozen=True)
class FinetunedModel:
    name: str
    weights: Path
    card: dict

    def describe(self) -> str:
        """``2026-12-06 22:40: 5 cases, held-out Dice 0.41 -> 0.63`` (what the model choice shows)."""
        card = self.card
        score = (f", held-out Dice {card['dice_before']:.2f} -> {card['dice_after']:.2f}"
                 if card.get("held_out") else "")
        return f"{self.name}: {len(card.get('cases', []))} cases{score}"


class CaseLibrary:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.cases_dir = self.root / "cases"
        self.models_dir = self.root / "models"

    def case_names(self) -> list[str]:
        if not self.cases_dir.is_dir():
            return []
        return sorted(case.name for case in self.cases_dir.iterdir()
                      if (case / CT_FILE).is_file() and (case / LABEL_FILE).is_file())

    def add_case(self, volume_node, segmentation_node) -> str:
        """Save the CT and the segmentation's Pancreas segment (as corrected) on the CT's voxels as one case,
        named after the CT; returns its name. Written whole or not at all."""
        voxels, geometry = mrml_bridge.volume_node_voxels(volume_node)
        label = mrml_bridge.segment_voxels(segmentation_node, PANCREAS, volume_node)
        if not label.any():
            raise UserError(f"the {PANCREAS} segment of {segmentation_node.GetName()} is empty",
                            "a case teaches the model where the pancreas is", "correct the segment, then add it")
        name = self._new_case_name(volume_node.GetName() or "case")
        self.cases_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".adding-", dir=self.cases_dir))
        try:
            protocol.write_input(staging / CT_FILE, voxels, geometry)
            protocol.write_input(staging / LABEL_FILE, label, geometry)
            staging.rename(self.cases_dir / name)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"could not save the case in {self.cases_dir}", exc.strerror or str(exc),
                            "free disk space, or check that the folder is writable") from None
        return name

    def remove_case(self, name: str) -> None:
        if name not in self.case_names():  # a name from the list, never a path
            raise UserError(f"there is no case {name!r}", "", "pick one of the saved cases")
        shutil.rmtree(self.cases_dir / name)

    def new_model_dir(self) -> Path:
        """Where the next fine-tune writes: named by the time it started (never an existing folder)."""
        stamp = time.strftime("%Y-%m-%d %H%M%S")
        return self.models_dir / self._unique(stamp, self.models_dir)

    def models(self) -> list[FinetunedModel]:
        """The fine-tuned models whose weights, checksum and card are all there, newest first."""
        if not self.models_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.models_dir.iterdir(), reverse=True):
            weights = folder / protocol.FINETUNE_MODEL_FILE
            if weights.is_file() and weights.with_name(weights.name + ".sha256").is_file() and (
                    folder / protocol.FINETUNE_CARD_FILE).is_file():
                found.append(FinetunedModel(folder.name, weights, protocol.read_finetune_card(folder)))
        return found

    def _new_case_name(self, node_name: str) -> str:
        return self._unique(safe_name(node_name) or "case", self.cases_dir)

    @staticmethod
    def _unique(name: str, folder: Path) -> str:
        taken = {p.name.lower() for p in folder.iterdir()} if folder.is_dir() else set()
        candidates = (name if n == 1 else f"{name}-{n}" for n in range(1, len(taken) + 2))
        return next(c for c in candidates if c.lower() not in taken)
