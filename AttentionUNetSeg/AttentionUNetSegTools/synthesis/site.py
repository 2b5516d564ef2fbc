"""A synthetic "site": one scanner and one protocol, fixed, that every case it makes shares.

The generator's default draws a new phase, kernel, slice thickness, noise level and field of view for every
case (domain randomisation). A site fixes them, as one hospital's scanner and protocol would: one contrast
(every body tissue's mean HU drawn once from ``contrast_seed``, as the generator's "random contrast" draws
them), one reconstruction kernel, thick slices stored as they are (the grid's z spacing is the slice
thickness), one noise level and one square field of view. Only the patient changes from case to case: the
anatomy, and each tissue's enhancement by a few HU (``patient_jitter_hu``).

``SiteProtocol.generator(entries)`` makes a ``SyntheticCTGenerator`` for the site; ``appearance(rng)`` is the
look it gives each case. The same protocol and rng state give the same look.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .intensities import RANDOM_CONTRAST, RANDOMISED_TISSUES, Appearance, draw_appearance
from .vocabulary import TISSUE


@dataclass(frozen=True)
class SiteProtocol:
    name: str
    contrast_seed: int  # the site's one random contrast (intensities.draw_appearance, "random contrast")
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 5.0)  # (x, y, z): z = the slice thickness, stored as is
    in_plane_blur_mm: float = 1.2  # Gaussian sigma of the reconstruction kernel (the generator draws 0.8-2.0)
    noise_hu: float = 20.0  # the generator draws 3-22, now and then 22-45
    bias_hu: float = 8.0  # smooth offset across the field (the generator draws 0-15)
    field_of_view_mm: float = 400.0  # square (the generator draws 300-460 x 85-100% of it)
    patient_jitter_hu: float = 8.0  # each patient's tissue means scatter this much (sd) around the site's

    @property
    def slice_thickness_mm(self) -> float:
        return float(self.spacing_mm[2])

    def contrast(self) -> Appearance:
        """The site's look before any patient: the random contrast of ``contrast_seed``, no fatty gland, no oral
        contrast, and the site's kernel, slices, noise and bias."""
        base = draw_appearance(np.random.default_rng(self.contrast_seed), fatty_pancreas_probability=0.0,
                               phase=RANDOM_CONTRAST)
        thickness = self.slice_thickness_mm
        return dataclasses.replace(
            base, oral_contrast=False, pancreas_fat_fraction=0.0,
            blur_mm=(max(self.in_plane_blur_mm, 0.42 * thickness), self.in_plane_blur_mm, self.in_plane_blur_mm),
            slice_thickness_mm=thickness, noise_hu=float(self.noise_hu), bias_hu=float(self.bias_hu))

    def appearance(self, rng: np.random.Generator) -> Appearance:
        """One patient's look at this site: the site's, each randomised tissue's mean moved by the jitter."""
        look = self.contrast()
        mean = look.mean_hu.copy()
        ids = [TISSUE[name] for name in RANDOMISED_TISSUES]
        mean[ids] += rng.normal(0.0, self.patient_jitter_hu, len(ids)).astype(np.float32)
        return dataclasses.replace(look, mean_hu=mean, pancreas_hu=float(mean[TISSUE["pancreas"]]))

    def tissue_hu(self) -> dict[str, float]:
        """The site's mean HU of each randomised tissue (before the patient jitter), to describe it."""
        mean = self.contrast().mean_hu
        return {name: round(float(mean[TISSUE[name]]), 1) for name in RANDOMISED_TISSUES}

    def describe(self) -> str:
        hu = self.tissue_hu()
        organs = ", ".join(f"{name} {hu[name]:.0f}" for name in ("pancreas", "liver", "spleen", "duodenum",
                                                                   "small_bowel", "stomach", "visceral_fat",
                                                                   "aorta", "kidney_left"))
        return (f"site '{self.name}': random contrast of seed {self.contrast_seed} (mean HU: {organs}; each patient "
                f"+/- {self.patient_jitter_hu:g} HU sd), {self.slice_thickness_mm:g} mm slices stored at "
                f"{self.spacing_mm[0]:g} x {self.spacing_mm[1]:g} x {self.spacing_mm[2]:g} mm, kernel sigma "
                f"{self.in_plane_blur_mm:g} mm, noise {self.noise_hu:g} HU, bias {self.bias_hu:g} HU, field of view "
                f"{self.field_of_view_mm:g} mm square")

    def generator(self, entries, seed: int = 0, **options):
        """A generator of this site's cases from ``entries`` (label maps; ``options`` as SyntheticCTGenerator's)."""
        from .generator import SyntheticCTGenerator

        return SyntheticCTGenerator(entries, spacing_mm=self.spacing_mm, seed=seed, appearance=self.appearance,
                                    field_of_view_mm=self.field_of_view_mm, **options)
