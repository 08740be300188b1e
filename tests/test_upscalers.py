"""ldmkit.upscalers: upscaler model files by name, run through spandrel, checked against spandrel's own model."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support.esrgan import esrgan_state_dict

from ldmkit import upscalers
from ldmkit.errors import InvalidRequest, ModelLoadError
from ldmkit.upscalers import UpscalerLibrary, import_spandrel, to_uint8

if importlib.util.find_spec("spandrel") is None:
    pytest.skip("the upscale extra is not installed (spandrel)", allow_module_level=True)
spandrel = import_spandrel()


@pytest.fixture
def folder(tmp_path):
    """tiny2x.pth (Real-ESRGAN's .pth layout) and tiny4x.safetensors, with a file that is no model beside them."""
    torch.save(esrgan_state_dict(scale=2, seed=1), tmp_path / "tiny2x.pth")
    save_file(esrgan_state_dict(scale=4, seed=2), tmp_path / "tiny4x.safetensors")
    (tmp_path / "notes.txt").write_text("not a model")
    return tmp_path


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def spandrel_pass(path, image: Image.Image) -> Image.Image:
    """The reference: spandrel's model run on the whole image at once, rounded as ldmkit rounds."""
    model = spandrel.ModelLoader().load_from_file(path).eval()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return Image.fromarray(to_uint8(model(pixels)[0]).permute(1, 2, 0).numpy())


def test_the_folder_lists_its_models_after_the_resizes(folder):
    library = UpscalerLibrary(folder)
    assert library.names() == ["None", "Lanczos", "Nearest", "tiny2x", "tiny4x"]
    assert library.resolve("TINY2X").path == folder / "tiny2x.pth"  # any case, as ControlNet names
    assert [info.scale for info in library.entries()][-2:] == [None, None]  # not loaded yet
    library.upscale(random_image(8, 8), "tiny4x", (32, 32))
    assert [info.scale for info in library.entries()][-2:] == [None, 4]


def test_a_model_pass_equals_spandrels_model_on_the_image(folder):
    library = UpscalerLibrary(folder)
    image = random_image(20, 12)
    for name, path, scale in (("tiny2x", folder / "tiny2x.pth", 2), ("tiny4x", folder / "tiny4x.safetensors", 4)):
        result = library.upscale(image, name, (20 * scale, 12 * scale))
        assert result.size == (20 * scale, 12 * scale)
        assert np.array_equal(np.asarray(result), np.asarray(spandrel_pass(path, image)))


def test_a_model_of_a_larger_scale_is_resized_down_to_the_target(folder):
    image = random_image(20, 12)
    result = UpscalerLibrary(folder).upscale(image, "tiny4x", (30, 18))
    expected = spandrel_pass(folder / "tiny4x.safetensors", image).resize((30, 18), Image.Resampling.LANCZOS)
    assert result.size == (30, 18) and np.array_equal(np.asarray(result), np.asarray(expected))


def test_a_model_runs_again_until_the_target_is_covered(folder):
    image = random_image(10, 6)
    result = UpscalerLibrary(folder).upscale(image, "tiny2x", (40, 24))  # 4x: two passes of the 2x model
    twice = spandrel_pass(folder / "tiny2x.pth", spandrel_pass(folder / "tiny2x.pth", image))
    assert np.array_equal(np.asarray(result), np.asarray(twice))


def test_tiles_give_the_whole_images_result(folder, monkeypatch):
    # The tiny RRDB sees 17 pixels around each output pixel at the input size: an overlap of 20 covers it.
    monkeypatch.setattr(upscalers, "TILE", 16)
    monkeypatch.setattr(upscalers, "TILE_OVERLAP", 20)
    image = random_image(45, 37)
    result = UpscalerLibrary(folder).upscale(image, "tiny2x", (90, 74))
    whole = spandrel_pass(folder / "tiny2x.pth", image)
    difference = np.abs(np.asarray(result, dtype=int) - np.asarray(whole, dtype=int))
    assert difference.max() <= 1  # float sums in another order may round a value the other way


def test_the_resizes_are_pillows(folder):
    image = random_image(10, 6)
    library = UpscalerLibrary(folder)
    for name, method in (("None", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)):
        expected = image.resize((25, 15), method)
        assert np.array_equal(np.asarray(library.upscale(image, name, (25, 15))), np.asarray(expected))


def test_transparency_is_kept(folder):
    image = random_image(8, 8).convert("RGBA")
    image.putalpha(Image.new("L", (8, 8), 77))
    result = UpscalerLibrary(folder).upscale(image, "tiny2x", (16, 16))
    assert result.mode == "RGBA" and result.getchannel("A").getextrema() == (77, 77)


def test_unknown_names_are_refused_naming_what_there_is(folder):
    with pytest.raises(InvalidRequest, match=r"upscaler_1 'R-ESRGAN 4x\+' is not available; .*: None, .*tiny4x$"):
        UpscalerLibrary(folder).resolve("R-ESRGAN 4x+", "upscaler_1")
    with pytest.raises(InvalidRequest, match=r"no upscalers folder is set: --upscalers-dir"):
        UpscalerLibrary().resolve("tiny2x")
    with pytest.raises(ModelLoadError, match="does not exist"):
        UpscalerLibrary(folder / "missing")


def test_a_pass_too_large_is_refused_before_any_runs(folder, monkeypatch):
    monkeypatch.setattr(upscalers, "MAX_PASS_PIXELS", 30 * 30)
    library = UpscalerLibrary(folder)
    calls = []
    monkeypatch.setattr(upscalers, "run_model", lambda *args: calls.append(args))
    with pytest.raises(InvalidRequest, match=r"'tiny2x' \(2x\) would make a 40x40 image on the way to 36x36"):
        library.upscale(random_image(10, 10), "tiny2x", (36, 36))
    assert calls == []


def test_a_file_that_is_no_upscaler_is_refused_in_one_line(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "odd.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    library = UpscalerLibrary(tmp_path)
    with pytest.raises(ModelLoadError, match="upscaler odd.pth: not an architecture spandrel knows"):
        library.upscale(random_image(8, 8), "odd", (16, 16))
    with pytest.raises(ModelLoadError, match=r"upscaler broken.safetensors could not be read \("):
        library.upscale(random_image(8, 8), "broken", (16, 16))


def test_a_pickle_with_code_is_not_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"conv_first.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="upscaler evil.pth could not be read"):
        UpscalerLibrary(tmp_path).upscale(random_image(8, 8), "evil", (16, 16))


def test_without_spandrel_a_model_is_one_line_naming_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # as if not installed
    library = UpscalerLibrary(folder)
    assert library.upscale(random_image(8, 8), "Lanczos", (16, 16)).size == (16, 16)  # the resizes need nothing
    with pytest.raises(
        ModelLoadError, match=r"upscaler models need the spandrel package: pip install 'ldmkit\[upscale\]'"
    ):
        library.upscale(random_image(8, 8), "tiny2x", (16, 16))
