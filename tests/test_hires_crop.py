"""Hires fix with a cut (A1111's hr_resize_x/y of another aspect ratio): upscale to cover, then the middle."""

import pytest
import torch

from ldmkit.errors import InvalidRequest
from ldmkit.hires import centre_crop, upscale
from ldmkit.params import HiresFix


def test_the_middle_is_kept_and_an_odd_extra_row_comes_off_the_bottom():
    latents = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    cut = centre_crop(latents, (4, 2), vae_scale_factor=1)  # drop 3 rows (1 top, 2 bottom), 3 columns (1, 2)
    assert torch.equal(cut, latents[..., 1:3, 1:5])
    assert centre_crop(latents, None, 1) is latents


def test_the_target_is_the_cut_and_the_upscale_covers_it():
    hires = HiresFix(2.5, crop_to=(40, 24))
    assert hires.upscaled_size(16, 16) == (40, 40) and hires.target_size(16, 16) == (40, 24)
    assert hires.infotext_params(10)["Hires resize"] == "40x24" and "Hires upscale" not in hires.infotext_params(10)
    latents = torch.randn(1, 4, 8, 8)  # 16x16 pixels at a scale factor of 2
    out = upscale(hires, latents, 2, None, None, None)
    expected = torch.nn.functional.interpolate(latents, size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.equal(out, expected[..., 4:16, :])  # 20 latent rows, the middle 12


@pytest.mark.parametrize(
    ("crop", "reason"),
    [
        ((48, 24), "hires crop 48x24 must be multiples of 8 within the upscaled 40x40"),
        ((36, 24), "width must be a multiple of 8 from 8 to 8192, got 36"),
    ],
)
def test_a_cut_outside_the_upscaled_image_is_refused(crop, reason):
    with pytest.raises(InvalidRequest, match=reason):
        HiresFix(2.5, crop_to=crop).check(10, 16, 16)
