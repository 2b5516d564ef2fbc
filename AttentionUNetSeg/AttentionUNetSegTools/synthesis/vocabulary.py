"""One internal tissue vocabulary for every label table (WORD, BTCV, AMOS, Gibson, TotalSegmentator v1/v2, ...).

Label maps from different sources number their structures differently; the generator only ever sees
tissue ids from this vocabulary. A tissue is what decides the intensity and the anatomy rules (a rib and a
vertebra are both bone but play different roles), so left/right kidneys stay apart (the body midline is
found from them) while all ribs become one tissue.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from AttentionUNetSegLib.errors import UserError

# Tissues that label maps name. Id 0 is "nothing labelled here".
LABELLED_TISSUES = (
    "unlabelled",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "kidney_cyst",
    "gallbladder",
    "stomach",
    "pancreas",
    "duodenum",
    "small_bowel",
    "colon",
    "rectum",
    "esophagus",
    "adrenal",
    "aorta",
    "inferior_vena_cava",
    "portal_vein",
    "artery",
    "vein",
    "heart",
    "lung",
    "airway",
    "urinary_bladder",
    "prostate_uterus",
    "thyroid",
    "vertebra",
    "rib",
    "bone",
    "spinal_cord",
    "muscle",
    "brain",
    "face",
)
# Tissues the generator adds where a map is silent (body wall, fat, bowel contents, spine parts, air, table).
SYNTHETIC_TISSUES = (
    "visceral_fat",
    "subcutaneous_fat",
    "wall_muscle",
    "bone_cortex",
    "bone_marrow",
    "disc",
    "csf",
    "bowel_wall",
    "bowel_fluid",
    "bowel_gas",
    "feces",
    "soft_nodule",
    "distractor",
    "air",
    "table",
    "table_foam",
)
TISSUES = LABELLED_TISSUES + SYNTHETIC_TISSUES
TISSUE = {name: index for index, name in enumerate(TISSUES)}

# Structure names of the label tables, spelled as the sources spell them, that are not a tissue name.
_SYNONYMS = {
    "left_kidney": "kidney_left",
    "right_kidney": "kidney_right",
    "intestine": "small_bowel",
    "portal_vein_and_splenic_vein": "portal_vein",
    "trachea": "airway",
    "thyroid_gland": "thyroid",
    "prostate": "prostate_uterus",
    "sacrum": "vertebra",
    "costal_cartilages": "rib",
    "skull": "bone",
    "sternum": "bone",
}
# Families of names (TotalSegmentator numbers ribs, vertebrae, lobes and muscles one by one).
_PREFIXES = (
    ("vertebrae_", "vertebra"),
    ("rib_", "rib"),
    ("lung_", "lung"),
    ("heart", "heart"),
    ("atrial_appendage", "heart"),
    ("kidney_cyst", "kidney_cyst"),
    ("adrenal_gland", "adrenal"),
    ("autochthon", "muscle"),
    ("iliopsoas", "muscle"),
    ("gluteus", "muscle"),
    ("iliac_artery", "artery"),
    ("common_carotid_artery", "artery"),
    ("subclavian_artery", "artery"),
    ("brachiocephalic_trunk", "artery"),
    ("pulmonary_artery", "artery"),
    ("iliac_vena", "vein"),
    ("brachiocephalic_vein", "vein"),
    ("superior_vena_cava", "vein"),
    ("pulmonary_vein", "vein"),
    ("femur", "bone"),
    ("head_of_femur", "bone"),
    ("hip_", "bone"),
    ("humerus", "bone"),
    ("scapula", "bone"),
    ("clavicula", "bone"),
)


def tissue_for_structure(name: str) -> str:
    """The tissue of one structure name from a label table; KeyError when the vocabulary does not know it."""
    key = name.strip().lower().replace(" ", "_")
    if key in TISSUE and key not in SYNTHETIC_TISSUES:
        return key
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    for prefix, tissue in _PREFIXES:
        if key.startswith(prefix):
            return tissue
    raise KeyError(name)


def label_table_path(folder: Path) -> Path:
    """The label table of a folder of label maps: ``labels.json``, ``organs.json`` or the one other json."""
    for name in ("labels.json", "organs.json"):
        if (folder / name).is_file():
            return folder / name
    candidates = [p for p in sorted(folder.glob("*.json")) if p.name != "verify.json"]
    if len(candidates) != 1:
        raise UserError(
            f"no label table in {folder}",
            "expected labels.json (label value -> structure name) next to the label maps",
            "add one",
        )
    return candidates[0]


def read_label_table(path: Path) -> dict[int, str]:
    """Label value -> structure name, from a json object such as {"1": "spleen", ...}."""
    try:
        table = {int(value): str(name) for value, name in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"cannot read label table {path}", str(exc).splitlines()[0], "fix the json file") from None
    return table


def tissue_lookup(table: dict[int, str], source: str = "label table") -> np.ndarray:
    """A 256-entry array that turns label values of ``table`` into tissue ids (values not listed -> unlabelled)."""
    lookup = np.zeros(256, dtype=np.uint8)
    for value, name in table.items():
        if not 0 < value < 256:
            raise UserError(f"label value {value} ({name}) in {source} is outside 1..255", "", "renumber the labels")
        try:
            lookup[value] = TISSUE[tissue_for_structure(name)]
        except KeyError:
            raise UserError(
                f"structure '{name}' in {source} has no tissue in the synthesis vocabulary",
                "every labelled structure must get a realistic intensity",
                "add it to synthesis/vocabulary.py",
            ) from None
    return lookup
