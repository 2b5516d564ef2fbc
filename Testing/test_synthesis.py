"""Synthetic CT from the real label maps: vocabulary, catalog and split, generator, the ``synth`` command."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegTools.cli import main
from AttentionUNetSegTools.synthesis.calibration import MEASURED_HU, measure_tissue_hu
from AttentionUNetSegTools.synthesis.catalog import DUPLICATES, labelmap_catalog, split_by_patient
from AttentionUNetSegTools.synthesis.generator import NEGATIVE_MARGIN_MM, SyntheticCTGenerator
from AttentionUNetSegTools.synthesis.intensities import (
    FAT_FRACTION,
    FAT_HU,
    KEPT_DARK,
    PHASE_HU,
    PHASES,
    RANDOM_CONTRAST,
    RANDOM_TISSUE_HU,
    RANDOMISED_TISSUES,
    draw_appearance,
    render,
)
from AttentionUNetSegTools.synthesis.shapes import back_in_front, load_tissue_map
from AttentionUNetSegTools.synthesis.vocabulary import (
    SYNTHETIC_TISSUES,
    TISSUE,
    TISSUES,
    label_table_path,
    read_label_table,
    tissue_lookup,
)


@pytest.fixture(scope="module")
def catalog(labelmaps_dir):
    return labelmap_catalog(labelmaps_dir)


@pytest.fixture(scope="module")
def small_catalog(catalog):
    """Two whole abdomens (BTCV: aorta, no bowel; WORD: bowel, no aorta) and two pancreas-only shapes."""
    by_name = {e.path.name: e for e in catalog}
    return [by_name[name] for name in ("label0001.nii.gz", "word_0014.nii.gz", "021.nii.gz", "138.nii.gz")]


@pytest.fixture(scope="module")
def cases(small_catalog):
    generator = SyntheticCTGenerator(small_catalog, seed=0, fatty_pancreas_probability=0.0,
                                     random_contrast_probability=0.0, cut_pancreas_probability=0.0)
    return [generator.sample_case() for _ in range(4)]


def test_vocabulary_maps_every_label_table_and_finds_the_pancreas(labelmaps_dir, data_dir):
    folders = [p for p in sorted(labelmaps_dir.iterdir()) if p.is_dir()]
    folders += [p for p in sorted(data_dir.iterdir()) if (p / "organs.json").is_file()]
    assert len(folders) >= 12
    for folder in folders:
        table = read_label_table(label_table_path(folder))
        lookup = tissue_lookup(table, folder.name)
        assert all(lookup[value] > 0 for value in table), folder.name
        assert TISSUE["pancreas"] in lookup, folder.name


def test_vocabulary_refuses_an_unknown_structure_with_one_line():
    with pytest.raises(UserError, match="structure 'tumour_blob' in x.json has no tissue"):
        tissue_lookup({1: "pancreas", 2: "tumour_blob"}, "x.json")


def test_every_tissue_has_an_intensity_in_every_phase():
    assert set(PHASE_HU) == set(TISSUES) - {"unlabelled"}
    assert all(len(ranges) == len(PHASES) and all(low <= high for low, high in ranges) for ranges in PHASE_HU.values())


def test_catalog_leaves_out_the_listed_duplicates(labelmaps_dir, catalog):
    files = list(labelmaps_dir.glob("*/*.nii.gz"))
    listed = [p for p in files if (p.parent.name, p.name[: -len(".nii.gz")]) in DUPLICATES]
    assert len(listed) == len(DUPLICATES)  # every duplicate the README names is in the folder
    assert len(catalog) == len(files) - len(listed)
    assert not {(e.source, e.path.name[: -len(".nii.gz")]) for e in catalog} & set(DUPLICATES)
    patients = [e.patient for e in catalog]
    assert len(set(patients)) == len(patients)  # one map per patient is left
    assert {"btcv-0002", "btcv-0007", "gibson-18", "gibson-11"} <= set(patients)  # the kept copies
    assert sum(not e.manual for e in catalog) == 1  # the one TotalSegmentator prediction left


def test_split_never_puts_a_patient_on_both_sides(catalog):
    # A second map for some patients (as when two sources publish one patient).
    doubled = catalog + [dataclasses.replace(e, path=e.path.with_name("copy.nii.gz")) for e in catalog[::5]]
    train, validation = split_by_patient(doubled, validation_fraction=0.2, seed=3)
    assert len(train) + len(validation) == len(doubled)
    assert not {e.patient for e in train} & {e.patient for e in validation}
    assert any(not e.pancreas_only for e in validation)  # whole abdomens to synthesise validation cases from
    assert 0.1 < len({e.patient for e in validation}) / len({e.patient for e in doubled}) < 0.3
    assert split_by_patient(doubled, 0.2, seed=3) == (train, validation)
    assert split_by_patient(doubled, 0.2, seed=4) != (train, validation)


def test_front_and_back_are_right_in_every_loaded_map(catalog):
    # The BTCV maps have front and back swapped in world space; the loader turns them round.
    btcv = next(e for e in catalog if e.source == "btcv-leisurelak")
    tissues = load_tissue_map(btcv, (3.0, 3.0, 3.0))
    assert not back_in_front(tissues)
    assert back_in_front(tissues[:, ::-1])


def test_generated_case_shapes_label_and_grid(cases):
    for case in cases:
        assert case.image.dtype == np.float32 and case.pancreas.dtype == np.uint8
        assert case.image.shape == case.pancreas.shape == case.tissues.shape
        assert min(case.image.shape) >= 30
        assert set(np.unique(case.pancreas)) == {0, 1}
        volume_ml = case.pancreas.sum() * 27 / 1000
        assert 15 < volume_ml < 300
        assert np.array_equal(case.pancreas, case.tissues == TISSUE["pancreas"])
        assert -1024 <= case.image.min() and case.image.max() <= 3071


def test_background_is_a_body_not_a_flat_value(cases):
    synthetic = np.isin(np.arange(256), [TISSUE[t] for t in SYNTHETIC_TISSUES])
    for case in cases:
        filled = synthetic[case.tissues]  # everything the label map did not label
        air = case.tissues == TISSUE["air"]
        body = filled & ~air & ~(np.isin(case.tissues, [TISSUE["table"], TISSUE["table_foam"]]))
        values = case.image[body]
        assert len(np.unique(np.round(values))) > 300
        assert np.mean(values < -50) > 0.2  # fat
        assert np.mean((values > 0) & (values < 120)) > 0.1  # muscle, bowel, vessels
        assert np.mean(values > 150) > 0.005  # bone
        assert case.image[air].mean() < -900 < values.mean() - 700  # air around a body


def test_pancreas_intensity_follows_the_phase(cases):
    phases = set()
    for case in cases:
        low, high = PHASE_HU["pancreas"][PHASES.index(case.look.phase)]
        assert low <= case.look.pancreas_hu <= high
        core = ndimage.binary_erosion(case.pancreas)
        if core.sum() > 20:
            assert abs(np.median(case.image[core]) - case.look.pancreas_hu) < 25
        phases.add(case.look.phase)
    assert len(phases) >= 2


def test_same_seed_same_case(small_catalog):
    first = SyntheticCTGenerator(small_catalog, seed=5).sample(np.random.default_rng(11))
    second = SyntheticCTGenerator(small_catalog, seed=5).sample(np.random.default_rng(11))
    other = SyntheticCTGenerator(small_catalog, seed=5).sample(np.random.default_rng(12))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


def test_pancreas_shapes_from_other_maps_are_swapped_in(small_catalog):
    generator = SyntheticCTGenerator(small_catalog, seed=1, swap_probability=1.0)
    sources = [generator.sample_case() for _ in range(4)]
    swapped = [c for c in sources if c.pancreas_source is not c.host]
    assert swapped and all(c.pancreas.any() for c in swapped)


def test_generator_needs_a_whole_abdomen(catalog):
    with pytest.raises(UserError, match="no whole-abdomen label map"):
        SyntheticCTGenerator([e for e in catalog if e.pancreas_only][:3])


def test_synth_command_writes_nifti_and_montage(labelmaps_dir, tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["synth", "--labelmaps", str(labelmaps_dir), "--count", "2", "--output-dir", str(out)]) == 0
    for index in range(2):
        ct = sitk.ReadImage(str(out / f"synthetic_{index:03d}_ct.nii.gz"))
        label = sitk.ReadImage(str(out / f"synthetic_{index:03d}_pancreas.nii.gz"))
        assert ct.GetSize() == label.GetSize() and ct.GetSpacing() == (3.0, 3.0, 3.0)
        assert sitk.GetArrayViewFromImage(label).any()
        assert sitk.GetArrayViewFromImage(ct).min() < -900
    montage = (out / "montage.png").read_bytes()
    assert montage.startswith(b"\x89PNG") and len(montage) > 50_000
    assert len((out / "cases.csv").read_text().splitlines()) == 3
    assert "written: 2 cases" in capsys.readouterr().out

    before = (out / "montage.png").stat().st_mtime_ns
    assert main(["synth", "--labelmaps", str(labelmaps_dir), "--count", "1", "--output-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "montage.png").stat().st_mtime_ns == before


@pytest.mark.parametrize("phase", sorted(MEASURED_HU))
def test_phase_ranges_hold_the_intensities_measured_on_real_ct(data_dir, phase):
    """The anchors are what the real CT measures (re-measured here), and each phase range holds its anchor."""
    case, anchors = MEASURED_HU[phase]
    measured = measure_tissue_hu(data_dir / case)
    assert set(anchors) <= set(measured)
    for tissue, hu in anchors.items():
        assert measured[tissue] == pytest.approx(hu, abs=1.0), tissue
        low, high = PHASE_HU[tissue][PHASES.index(phase)]
        if tissue == "pancreas" and phase == "non-contrast":  # the real gland is fatty: drawn as such
            low = (1 - FAT_FRACTION[1]) * low + FAT_FRACTION[1] * FAT_HU
        assert low <= hu <= high, (tissue, hu, (low, high))


def test_non_contrast_gland_is_drawn_normal_and_fatty():
    """A normal non-contrast gland (30-50 HU, the case that found nothing) and a fatty one both occur."""
    rng = np.random.default_rng(0)
    glands = [draw_appearance(rng, 0.3, 0.0, "non-contrast").pancreas_hu for _ in range(200)]
    assert sum(30 <= hu <= 50 for hu in glands) > 100 and sum(hu < 15 for hu in glands) > 20


def test_random_contrast_randomises_every_tissue_of_the_body():
    rng = np.random.default_rng(0)
    looks = [draw_appearance(rng, phase=RANDOM_CONTRAST) for _ in range(30)]
    assert all(look.phase == RANDOM_CONTRAST for look in looks)
    for name in ("pancreas", "liver", "visceral_fat", "muscle", "aorta", "vertebra"):
        means = [look.mean_hu[TISSUE[name]] for look in looks]
        assert RANDOM_TISSUE_HU[0] <= min(means) and max(means) <= RANDOM_TISSUE_HU[1]
        assert np.std(means) > 80, name  # spread over the window, not one tissue's usual value
    assert all(look.mean_hu[TISSUE[name]] < -500 for look in looks for name in KEPT_DARK)
    assert "pancreas" in RANDOMISED_TISSUES and "lung" not in RANDOMISED_TISSUES


def test_fat_muscle_and_bowel_have_texture_without_scanner_noise(cases):
    case = cases[0]
    look = dataclasses.replace(case.look, noise_hu=0.0, bias_hu=0.0)
    image = render(case.tissues, look, np.random.default_rng(0), np.array(case.spacing_mm[::-1]))
    for names in (("visceral_fat", "subcutaneous_fat"), ("muscle", "wall_muscle"), ("bowel_wall",)):
        tissue = np.isin(case.tissues, [TISSUE[n] for n in names]) & ndimage.binary_erosion(case.tissues > 0)
        assert tissue.sum() > 500 and image[tissue].std() > 5.0, names


@pytest.mark.parametrize("view", ["above-pancreas", "below-pancreas"])
def test_negative_views_hold_no_pancreas_and_stay_on_their_side(small_catalog, view):
    generator = SyntheticCTGenerator(small_catalog, seed=2)
    rng = np.random.default_rng(3)
    for _ in range(3):
        case = generator.sample_case(rng, view=view)
        assert case.view == view and not case.pancreas.any() and not (case.tissues == TISSUE["pancreas"]).any()
        assert case.image.shape[0] * 3.0 >= 60 and case.image.std() > 100  # a scan, not an empty box
        body = ~np.isin(case.tissues, [TISSUE[n] for n in ("air", "table", "table_foam")])
        lung = (case.tissues == TISSUE["lung"]).sum() / body.sum()
        kidney_or_below = np.isin(case.tissues, [TISSUE[n] for n in ("urinary_bladder", "colon", "small_bowel")])
        if view == "below-pancreas":
            assert lung < 0.01 and kidney_or_below.any()  # lower abdomen, pelvis: no lung
    assert NEGATIVE_MARGIN_MM >= 20


def test_negatives_come_at_their_rate(small_catalog):
    generator = SyntheticCTGenerator(small_catalog, seed=4, negative_probability=0.5)
    rng = np.random.default_rng(4)
    views = [generator.sample_case(rng).view for _ in range(12)]
    assert 2 <= views.count("abdomen") <= 10
    assert all(v in ("abdomen", "above-pancreas", "below-pancreas") for v in views)


def test_the_phase_can_be_asked_for(small_catalog):
    generator = SyntheticCTGenerator(small_catalog, seed=6)
    for phase in (*PHASES, RANDOM_CONTRAST):
        case = generator.sample_case(np.random.default_rng(7), phase=phase)
        assert case.look.phase == phase and case.pancreas.any()
