"""The label maps available for synthesis: who the patient is, where the labels come from, and the split.

Patient ids are what the train/validation split groups by, so a patient that two sources published
(listed in the label maps' README) gets one id, and its second copy is left out of the catalog.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from AttentionUNetSegLib.errors import UserError

from .vocabulary import TISSUE, label_table_path, read_label_table, tissue_lookup

# Folder -> whether people drew (or revised by hand) the pancreas label, from the label maps' README.
MANUAL_SOURCES = {
    "word-labelsTs": True,
    "btcv-leisurelak": True,
    "evalseg-multiorgan": True,
    "evalseg-pancreas": True,
    "ts-gt-s0327-scottassen": True,  # model-assisted, refined by hand
    "abdomenatlas-serena": True,  # AI labels revised by people
    "amos-samed3d": True,
    "ts-pred-scottassen": False,
    "ts-pred-ivankuchin": False,
    "ts-abdomen-3mm": False,  # real CT case: TotalSegmentator predictions
}
# (folder, file stem) of a second copy -> the patient id of the copy that is kept (README "Caveats").
DUPLICATES = {
    ("evalseg-multiorgan", "45"): "btcv-0002",
    ("evalseg-multiorgan", "48"): "btcv-0005",
    ("evalseg-multiorgan", "53"): "btcv-0010",
    ("evalseg-multiorgan", "55"): "btcv-0022",
    ("evalseg-multiorgan", "66"): "btcv-0033",
    ("evalseg-multiorgan", "50"): "btcv-0007",
    ("evalseg-pancreas", "441"): "gibson-18",
    ("ts-pred-ivankuchin", "ivan_case_run1"): "gibson-11",
    ("ts-pred-ivankuchin", "ivan_case_run2"): "gibson-11",
}
# Real CT cases whose label maps may join the catalog. The crop repeats ts-abdomen-3mm, and the venous
# case's pancreas is only a tail tip cut by its field of view, so neither is a useful label map.
REAL_CASE_MAPS = {"ts-abdomen-3mm": "organs.nii.gz"}
# The split the training settings use by default (training.config takes these), so evaluation can name the
# patients training never saw.
VALIDATION_FRACTION = 0.15
SPLIT_SEED = 0


@dataclass(frozen=True)
class LabelMapEntry:
    path: Path
    source: str
    patient: str
    manual: bool
    table_path: Path = field(repr=False)

    @property
    def pancreas_only(self) -> bool:
        """True for maps that label nothing but the pancreas: pancreas shapes, not whole abdomens."""
        return _labels_only_pancreas(self.table_path)


@cache
def _labels_only_pancreas(table_path: Path) -> bool:
    lookup = tissue_lookup(read_label_table(table_path), str(table_path))
    return set(lookup[lookup > 0].tolist()) == {TISSUE["pancreas"]}


def labelmap_catalog(labelmaps_dir: str | Path, data_dir: str | Path | None = None) -> list[LabelMapEntry]:
    """Every label map under ``labelmaps_dir`` (one folder per source), duplicates left out, sorted.

    With ``data_dir`` the label maps of the real CT cases join too; leave them out when those cases are
    used for validation, or the validation patient is in the training data.
    """
    labelmaps_dir = Path(labelmaps_dir)
    if not labelmaps_dir.is_dir():
        raise UserError(f"label map folder {labelmaps_dir} does not exist", "", "pass the folder of label maps")
    entries = []
    for folder in sorted(p for p in labelmaps_dir.iterdir() if p.is_dir()):
        table = label_table_path(folder)
        for path in sorted(folder.glob("*.nii.gz")):
            stem = path.name[: -len(".nii.gz")]
            if (folder.name, stem) in DUPLICATES:
                continue
            entries.append(
                LabelMapEntry(path, folder.name, patient_id(folder.name, stem), MANUAL_SOURCES.get(folder.name, False),
                              table)
            )
    if data_dir is not None:
        for case, name in REAL_CASE_MAPS.items():
            folder = Path(data_dir) / case
            if (folder / name).is_file():
                entries.append(LabelMapEntry(folder / name, case, case, MANUAL_SOURCES[case], label_table_path(folder)))
    if not entries:
        raise UserError(f"no label maps (*.nii.gz) under {labelmaps_dir}", "", "pass the folder of label maps")
    return entries


def patient_id(source: str, stem: str) -> str:
    """One id per patient across sources (BTCV and Gibson share patients, see ``DUPLICATES``)."""
    if (source, stem) in DUPLICATES:
        return DUPLICATES[(source, stem)]
    if source == "btcv-leisurelak":
        return "btcv-" + stem.replace("label", "")
    if source == "word-labelsTs":
        return "word-" + stem.replace("word_", "")
    if source == "evalseg-multiorgan":
        return "gibson-" + stem
    if source == "evalseg-pancreas":
        return "pancreas-" + stem
    return f"{source}-{stem}"


def split_by_patient(
    entries: list[LabelMapEntry], validation_fraction: float = VALIDATION_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[LabelMapEntry], list[LabelMapEntry]]:
    """(train, validation): every map of one patient lands on the same side.

    Whole-abdomen patients and pancreas-only patients are split separately, so the validation side also
    has whole abdomens to synthesise from.
    """
    if not 0 <= validation_fraction < 1:
        raise UserError(f"validation fraction {validation_fraction} is outside [0, 1)", "", "pass e.g. 0.15")
    by_patient: dict[str, list[LabelMapEntry]] = {}
    for entry in entries:
        by_patient.setdefault(entry.patient, []).append(entry)
    rng = random.Random(seed)
    validation_patients = set()
    for pancreas_only in (False, True):
        group = sorted(p for p, maps in by_patient.items() if all(e.pancreas_only for e in maps) == pancreas_only)
        rng.shuffle(group)
        count = round(len(group) * validation_fraction)
        if validation_fraction > 0 and len(group) >= 2:
            count = max(count, 1)
        validation_patients.update(group[:count])
    train = [e for e in entries if e.patient not in validation_patients]
    validation = [e for e in entries if e.patient in validation_patients]
    return train, validation


def held_out_label_maps(labelmaps_dir: str | Path | None = None) -> list[LabelMapEntry]:
    """Label maps of the patients that training with the default split holds out."""
    from AttentionUNetSegLib.locations import labelmaps_dir as shared_labelmaps

    return split_by_patient(labelmap_catalog(labelmaps_dir or shared_labelmaps()))[1]
