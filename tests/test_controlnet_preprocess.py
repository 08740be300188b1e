"""Model-free ControlNet preprocessors and fitting maps to the generation size (ldmkit.control_preprocess)."""

import cv2
import numpy as np
import pytest
from PIL import Image

from ldmkit.control_preprocess import PREPROCESSORS, detect, fit_to_size, get_preprocessor, pixel_perfect_resolution
from ldmkit.errors import InvalidRequest


def drawing(size=(128, 128), line_width=3) -> Image.Image:
    """A black cross on white paper: what a user sketches."""
    pixels = np.full((size[1], size[0], 3), 255, np.uint8)
    cy, cx = size[1] // 2, size[0] // 2
    pixels[cy - line_width // 2 : cy + line_width // 2 + 1, 16:-16] = 0
    pixels[16:-16, cx - line_width // 2 : cx + line_width // 2 + 1] = 0
    return Image.fromarray(pixels)


def square(size=64) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 200
    return Image.fromarray(pixels)


def test_none_passes_the_map_through_unchanged():
    image = drawing((100, 60))
    assert np.array_equal(detect(image, "none", processor_res=64), np.asarray(image))


def test_canny_is_opencv_canny_at_the_processor_resolution_with_the_unit_thresholds():
    image = square(64)
    control = detect(image, "canny", processor_res=128, threshold_a=50, threshold_b=150)
    upscaled = cv2.resize(np.asarray(image), (128, 128), interpolation=cv2.INTER_LANCZOS4)
    expected = cv2.Canny(upscaled, 50, 150)
    assert control.shape == (128, 128, 3)
    assert np.array_equal(control[:, :, 0], expected) and np.array_equal(control[:, :, 2], expected)
    # edges on the square's outline only: inside and outside stay black
    assert control[64, 64].max() == 0 and control[5, 5].max() == 0 and control[:, :, 0].max() == 255


def test_canny_defaults_are_the_extensions_100_and_200():
    image = square(64)
    assert np.array_equal(detect(image, "canny", 64), detect(image, "canny", 64, threshold_a=100, threshold_b=200))
    defaults = detect(image, "canny", 512)
    assert np.array_equal(defaults, detect(image, "canny", -1, threshold_a=-1, threshold_b=-1))
    assert np.array_equal(defaults, detect(image, "canny", None, threshold_a=100, threshold_b=200))


def test_invert_turns_a_black_on_white_sketch_into_white_lines_on_black():
    image = drawing()
    assert np.array_equal(detect(image, "invert"), 255 - np.asarray(image))
    assert get_preprocessor("invert (from white bg & black line)").name == "invert"


def test_threshold_binarises_at_the_level():
    pixels = np.array([[[10, 10, 10], [126, 126, 126], [128, 128, 128], [250, 250, 250]]], np.uint8)
    pixels = np.repeat(np.repeat(pixels, 64, axis=0), 16, axis=1)  # 64 x 64: stays 64 at processor_res 64
    control = detect(Image.fromarray(pixels), "threshold", processor_res=64, threshold_a=127)
    assert control[0, ::16, 0].tolist() == [0, 0, 255, 255]


def test_scribble_xdog_draws_the_sketch_lines_and_nothing_else():
    control = detect(drawing((128, 128)), "scribble_xdog", processor_res=128, threshold_a=32)
    assert set(np.unique(control)) == {0, 255}
    assert control[64, 40, 0] == 255 and control[40, 64, 0] == 255  # on the lines
    assert control[30, 30].max() == 0 and control[100, 100].max() == 0  # the paper
    fainter = detect(drawing((128, 128)), "scribble_xdog", processor_res=128, threshold_a=64)
    assert (fainter > 0).sum() <= (control > 0).sum()  # a higher threshold keeps fewer line pixels


def test_lineart_standard_is_bright_on_lines_and_black_on_paper():
    control = detect(drawing((128, 128)), "lineart_standard", processor_res=128)
    assert control[64, 40, 0] >= 100 and control[40, 64, 0] >= 100  # a typical line maps to mid grey (127)
    assert control[30, 30].max() == 0


@pytest.mark.parametrize(
    ("module", "kwargs", "field"),
    [
        ("canny", {"threshold_a": 0}, "threshold_a"),
        ("canny", {"threshold_b": 300}, "threshold_b"),
        ("canny", {"processor_res": 32}, "processor_res"),
        ("scribble_xdog", {"threshold_a": 65}, "threshold_a"),
        ("threshold", {"threshold_a": float("nan")}, "threshold_a"),
    ],
)
def test_out_of_range_parameters_are_refused_naming_the_field(module, kwargs, field):
    with pytest.raises(InvalidRequest, match=field):
        detect(square(), module, **kwargs)


def test_model_preprocessors_are_refused_as_unavailable_not_faked():
    with pytest.raises(InvalidRequest, match="depth_midas.*needs a preprocessor model.*module 'none'"):
        get_preprocessor("depth_midas")
    with pytest.raises(InvalidRequest, match="unknown module"):
        get_preprocessor("sobel")
    assert "depth_midas" not in PREPROCESSORS


def quadrants(width=100, height=50) -> np.ndarray:
    """Left half red, right half blue, a one-pixel green border (its median colour is green)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    pixels[0, :] = pixels[-1, :] = pixels[:, 0] = pixels[:, -1] = (0, 255, 0)
    return pixels


def test_just_resize_stretches_to_the_size():
    fitted = fit_to_size(quadrants(), 64, 64, "Just Resize")
    assert fitted.shape == (64, 64, 3)
    assert tuple(fitted[32, 10]) == (255, 0, 0) and tuple(fitted[32, 54]) == (0, 0, 255)


def test_crop_and_resize_covers_the_size_and_crops_the_middle():
    fitted = fit_to_size(quadrants(100, 50), 50, 50, "Crop and Resize")  # scale 1: the middle 50 columns
    assert np.array_equal(fitted, quadrants(100, 50)[:, 25:75])


def test_resize_and_fill_fits_inside_and_pads_with_the_border_median():
    fitted = fit_to_size(quadrants(100, 50), 100, 100, "Resize and Fill")  # scale 1: bands of 25 above and below
    assert fitted.shape == (100, 100, 3)
    assert np.array_equal(fitted[25:75], quadrants(100, 50))
    assert (fitted[:25] == (0, 255, 0)).all() and (fitted[75:] == (0, 255, 0)).all()


def test_a_black_and_white_map_stays_black_and_white_when_scaled():
    edges = detect(square(64), "canny", processor_res=64)
    for size in (37, 150):
        fitted = fit_to_size(edges, size, size, "Just Resize")
        assert set(np.unique(fitted)) <= {0, 255}
        assert fitted.max() == 255


def test_pixel_perfect_resolution_is_the_scaled_short_side():
    assert pixel_perfect_resolution((1000, 500), 512, 512, "Crop and Resize") == 512  # cover: x1.024 -> 500 * 1.024
    assert pixel_perfect_resolution((1000, 500), 512, 512, "Resize and Fill") == 256  # fit: x0.512
    assert pixel_perfect_resolution((1000, 500), 512, 512, "Just Resize") == 512
