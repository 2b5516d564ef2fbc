"""The synthetic site of the model card's fine-tuning experiment: a fixed scanner and protocol, deterministic,
other than the generator's default draw; and its patients, held out from the bundled model's training."""

from __future__ import annotations

import numpy as np
import pytest

from AttentionUNetSegTools.site_experiment import FINETUNE_PATIENTS, SITE, make_plan
from AttentionUNetSegTools.synthesis.catalog import labelmap_catalog, split_by_patient
from AttentionUNetSegTools.synthesis.generator import SyntheticCTGenerator
from AttentionUNetSegTools.synthesis.intensities import KEPT_DARK, RANDOM_CONTRAST, RANDOMISED_TISSUES
from AttentionUNetSegTools.synthesis.site import SiteProtocol
from AttentionUNetSegTools.synthesis.vocabulary import TISSUE


@pytest.fixture(scope="module")
def abdomens(labelmaps_dir):
    by_name = {e.path.name: e for e in labelmap_catalog(labelmaps_dir)}
    return [by_name[name] for name in ("label0001.nii.gz", "word_0014.nii.gz")]


def test_a_site_fixes_the_scanner_and_lets_only_the_patient_vary():
    site = SiteProtocol("test", contrast_seed=10, patient_jitter_hu=8.0)
    first, again = site.appearance(np.random.default_rng(1)), site.appearance(np.random.default_rng(1))
    other = site.appearance(np.random.default_rng(2))
    assert np.array_equal(first.mean_hu, again.mean_hu)  # deterministic in the rng
    assert first.phase == RANDOM_CONTRAST and not first.oral_contrast and first.pancreas_fat_fraction == 0
    for look in (first, other):  # the protocol is the site's, whoever the patient
        assert look.slice_thickness_mm == 5.0 and look.noise_hu == 20.0 and look.bias_hu == 8.0
        assert look.blur_mm == (2.1, 1.2, 1.2)
        assert np.array_equal(look.texture_hu, first.texture_hu)
    randomised = [TISSUE[name] for name in RANDOMISED_TISSUES]
    moved = other.mean_hu[randomised] - first.mean_hu[randomised]
    assert 0 < np.abs(moved).max() < 60  # the patient's enhancement, a few HU around the site's
    dark = [TISSUE[name] for name in KEPT_DARK]
    assert np.array_equal(other.mean_hu[dark], first.mean_hu[dark])
    another_site = SiteProtocol("test", contrast_seed=11).contrast()
    assert np.abs(another_site.mean_hu[randomised] - site.contrast().mean_hu[randomised]).mean() > 50


def test_site_scans_are_deterministic_on_the_sites_grid(abdomens):
    site = SiteProtocol("test", contrast_seed=10, field_of_view_mm=300.0)
    cases = [site.generator(abdomens, cut_pancreas_probability=0.0).sample_case(np.random.default_rng(5),
                                                                                 view="abdomen") for _ in range(2)]
    assert np.array_equal(cases[0].image, cases[1].image)
    assert cases[0].spacing_mm == (3.0, 3.0, 5.0)
    assert cases[0].image.shape[1:] == (100, 100)  # the site's square field of view at 3 mm
    assert cases[0].pancreas.any() and cases[0].look.slice_thickness_mm == 5.0


def test_the_default_field_of_view_draw_is_unchanged(abdomens):
    """The site's fixed field consumes the draws the default makes, and the default draws as it always did."""
    default, fixed = SyntheticCTGenerator(abdomens), SyntheticCTGenerator(abdomens, field_of_view_mm=400.0)
    rngs = [np.random.default_rng(3) for _ in range(3)]
    as_before = rngs[0].uniform(300, 460) * np.array([rngs[0].uniform(0.85, 1.0), 1.0])
    assert np.array_equal(default._field_mm(rngs[1]), as_before)
    assert np.array_equal(fixed._field_mm(rngs[2]), [400.0, 400.0])
    assert rngs[0].random() == rngs[1].random() == rngs[2].random()


def test_the_experiment_uses_held_out_patients_only(labelmaps_dir):
    plan = make_plan(12)
    assert plan == make_plan(12)  # seeded
    train, held_out = split_by_patient(labelmap_catalog(labelmaps_dir))
    trained = {e.patient for e in train}
    finetune = [p["host"] for p in plan["finetune"]]
    test_hosts = {p["host"] for p in plan["test"]}
    glands = [p["gland"] for p in plan["test"]]
    used = set(finetune) | test_hosts | set(glands)
    assert used <= {e.patient for e in held_out} and not used & trained
    assert len(finetune) == FINETUNE_PATIENTS and not set(finetune) & test_hosts
    assert len(glands) == 12 and len(set(glands)) == 12 and not set(glands) & set(finetune)
    assert plan["site"]["contrast_seed"] == SITE.contrast_seed
