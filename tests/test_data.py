"""Emoji data set builder on tiny fake npm packages: names, captions, rendering, the files it writes."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import emoji
from ldmkit.data.codepoints import normalize_key

RED_SQUARE = '<rect x="4" y="4" width="8" height="8" fill="#ff0000"/>'
FAKE_SOURCES = (
    emoji.EmojiSource("@iconify-json/fake", "flat icon", "iconify", "MIT", "Test"),
    emoji.EmojiSource("@fake/emoji-3d", "3d render", "webp", "MIT", "Test"),
)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_iconify(path, icons, chars, aliases=None):
    with tarfile.open(path, "w:gz") as tar:
        _add(
            tar,
            "package/icons.json",
            json.dumps(
                {"prefix": "fake", "icons": icons, "aliases": aliases or {}, "width": 16, "height": 16}
            ).encode(),
        )
        _add(tar, "package/chars.json", json.dumps(chars).encode())


def write_webp_package(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, color in files.items():
            buffer = io.BytesIO()
            Image.new("RGBA", (256, 256), color).save(buffer, "WEBP")
            _add(tar, f"package/assets/{name}.webp", buffer.getvalue())


@pytest.fixture
def packages(tmp_path):
    cache = tmp_path / "packages"
    cache.mkdir()
    write_iconify(
        cache / "iconify-json-fake-1.0.0.tgz",
        icons={
            "otter": {"body": RED_SQUARE},
            "red-heart": {"body": RED_SQUARE},
            "gone": {"body": RED_SQUARE, "hidden": True},
            "man-cook": {"body": RED_SQUARE},
            "man-cook-dark-skin-tone": {"body": RED_SQUARE},
        },
        chars={
            "1f9a6": "otter",
            "2764-fe0f": "red-heart",
            "1f47b": "gone",
            "1f468-200d-1f373": "man-cook",
            "1f468-1f3ff-200d-1f373": "man-cook-dark-skin-tone",
            "1f600": "flipped",
        },
        aliases={"flipped": {"parent": "otter", "hFlip": True}},
    )
    # emojilib: "coffee" names one emoji (a synonym), "animal" names three (a category, dropped by `specific`)
    with tarfile.open(cache / "emojilib-4.0.3.tgz", "w:gz") as tar:
        table = {
            "\U0001f9a6": ["otter", "animal", "playful"],
            "\u2764\ufe0f": ["red_heart", "animal", "love"],
            "\u2615": ["hot_beverage", "coffee", "animal"],
            "\U0001f436": ["dog_face", "animal", "puppy"],
        }
        _add(tar, "package/dist/emoji-en-US.json", json.dumps(table).encode())
    # transparent pixels must come out white; 2764 has no name in the iconify set but unicodedata knows it
    write_webp_package(
        cache / "fake-emoji-3d-2.0.0.tgz",
        {"1f9a6": (0, 0, 255, 255), "2764-fe0f": (0, 0, 0, 0), "1f9d1-200d-1f9af": (0, 255, 0, 255)},
    )
    return cache


def test_normalize_key_drops_presentation_selectors_and_zeros():
    assert normalize_key("2764-FE0F") == "2764"
    assert normalize_key("0023-fe0f-20e3") == "23-20e3"
    assert normalize_key("1f468-200d-1f373") == "1f468-200d-1f373"


def test_names_come_from_iconify_then_unicodedata():
    names = {"1f468-200d-1f373": "man-cook"}
    assert emoji.emoji_name("1f468-200d-1f373", names) == "man cook"
    assert emoji.emoji_name("1f9a6", {}) == "otter"
    assert emoji.emoji_name("1f60e", {}) == "smiling face with sunglasses"
    assert emoji.emoji_name("1f9d1-200d-1f9af", {}) is None  # a sequence without a known name is skipped


def test_captions_with_and_without_style():
    record = emoji.EmojiRecord(key="1f9a6", name="otter", style="3d render", package="x")
    assert record.captions() == ["otter", "otter, 3d render", "3d render of otter"]


def test_collect_skips_hidden_transformed_skin_tones_and_unnamed(packages):
    tarballs = emoji.fetch_packages(packages, FAKE_SOURCES)  # found in the cache: npm is not called
    records, jobs = emoji.collect(tarballs, FAKE_SOURCES)
    got = sorted((r.name, r.style) for r in records)
    assert got == [
        ("man cook", "flat icon"),
        ("otter", "3d render"),
        ("otter", "flat icon"),
        ("red heart", "3d render"),
        ("red heart", "flat icon"),
    ]
    assert len(jobs) == len(records)


def test_build_renders_on_white_and_writes_files(packages, tmp_path):
    out = tmp_path / "data"
    records = emoji.build(out, cache_dir=packages, workers=1, sources=FAKE_SOURCES)
    images, loaded = emoji.load(out)
    assert images.shape == (len(records), 128, 128, 3) and images.dtype == np.uint8
    assert [r.name for r in loaded] == [r.name for r in records]
    by_key = {(r.key, r.style): images[i] for i, r in enumerate(loaded)}
    square = by_key[("1f9a6", "flat icon")]
    assert tuple(square[64, 64]) == (255, 0, 0)  # the SVG's red square, scaled from 16 to 128 px
    assert tuple(square[2, 2]) == (255, 255, 255)  # transparent -> white
    assert tuple(by_key[("1f9a6", "3d render")][64, 64]) == (0, 0, 255)
    assert (by_key[("2764", "3d render")] == 255).all()
    assert "MIT" in (out / "LICENSES.md").read_text()
    sprites, _ = emoji.load_sprites(out)
    assert sprites.shape == (len(records), 128, 128, 4)
    alpha = {(r.key, r.style): sprites[i, :, :, 3] for i, r in enumerate(loaded)}
    assert alpha[("1f9a6", "flat icon")][64, 64] == 255 and alpha[("1f9a6", "flat icon")][2, 2] == 0  # alpha kept
    from ldmkit.data import keywords

    raw = keywords.load_keywords(out)
    assert raw["2764"] == ["red heart", "animal", "love"]  # keyed like the sprites: presentation selector dropped
    assert keywords.specific(raw)["2615"] == ["coffee", "hot beverage"]  # "animal" names 4 emoji: not a synonym
    assert "rover" in keywords.specific(raw)["1f699"]  # a word emojilib lacks, for its nearest emoji


def test_larger_sprites_for_scenes_and_the_same_128_px_images(packages, tmp_path):
    """--resolution 256 renders the sprites at 256 px (scenes draw big objects from them); the single-emoji
    stages still read 128 px images, the block means of the 256 px ones."""
    small, large = tmp_path / "128", tmp_path / "256"
    emoji.build(small, cache_dir=packages, workers=1, sources=FAKE_SOURCES)
    emoji.build(large, cache_dir=packages, workers=1, sources=FAKE_SOURCES, resolution=256)
    sprites, _ = emoji.load_sprites(large)
    assert sprites.shape[1:] == (256, 256, 4)
    images_128, _ = emoji.load(small)
    images_256, _ = emoji.load(large)
    assert images_256.shape == images_128.shape
    # the same pictures; they differ only where edges were antialiased at a different scale
    diff = np.abs(images_256.astype(int) - images_128.astype(int))
    assert np.median(diff) == 0 and diff.mean() < 2.0, diff.mean()
    expected = emoji.on_white(sprites[:1]).reshape(1, 128, 2, 128, 2, 3).mean(axis=(2, 4))
    assert np.abs(images_256[:1] - expected).max() <= 0.5


def test_a_resolution_that_is_no_multiple_of_128_is_refused_before_any_work(tmp_path):
    from ldmkit.errors import LdmError

    with pytest.raises(LdmError, match="--resolution: expected one of 128, 256, 384, 512 px, got 200"):
        emoji.build(tmp_path / "out", cache_dir=tmp_path / "none", resolution=200)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_a_one_line_error(tmp_path):
    from ldmkit.errors import LdmError

    with pytest.raises(LdmError, match="ldm data emoji"):
        emoji.load(tmp_path)


def test_a_set_without_code_points_is_matched_by_icon_name(packages):
    # like @iconify-json/fxemoji or streamline-emojis: an empty chars.json, names hyphenated, squashed or numbered
    write_iconify(
        packages / "iconify-json-named-1.0.0.tgz",
        icons={
            "otter-1": {"body": RED_SQUARE},
            "otter-2": {"body": RED_SQUARE},
            "redheart": {"body": RED_SQUARE},
            "mancook": {"body": RED_SQUARE, "hidden": True},
            "unknown-thing": {"body": RED_SQUARE},
        },
        chars={},
    )
    sources = FAKE_SOURCES + (emoji.EmojiSource("@iconify-json/named", "doodle icon", "iconify", "CC-BY-4.0", "T"),)
    records, _ = emoji.collect(emoji.fetch_packages(packages, sources), sources)
    named = sorted((r.key, r.name) for r in records if r.style == "doodle icon")
    assert named == [("1f9a6", "otter"), ("2764", "red heart")]  # one otter; hidden and unmatched icons left out
    svgs, names = emoji.read_iconify(packages / "iconify-json-named-1.0.0.tgz", {"otter": "1f9a6"})
    assert names == {"1f9a6": "otter-1"} and "<rect" in svgs["1f9a6"]


def test_extra_sets_match_most_of_their_icons():
    by_package = {s.package: s for s in emoji.EXTRA_SOURCES}
    assert set(by_package) == {
        "@iconify-json/noto-v1",
        "@iconify-json/emojione",
        "@iconify-json/fxemoji",
        "@iconify-json/streamline-emojis",
        "@iconify-json/fluent-emoji",
    }
    assert {s.license for s in emoji.EXTRA_SOURCES} <= {"Apache-2.0", "CC-BY-4.0", "MIT"}  # none share-alike
    assert len({s.style for s in emoji.SOURCES + emoji.EXTRA_SOURCES}) == 9  # each set its own style phrase
