"""Scene synthesis: captions say only what the layout shows, and the GPU compositor draws that layout."""

import random
import re

import numpy as np
import pytest
import torch

from ldmkit.data import scenes, words
from ldmkit.data.emoji import EmojiRecord
from ldmkit.train.compose import Compositor, SceneBatch, hue_rotate, paint_backgrounds

S = 32  # sprite size in these tests
# key, name, colour of an opaque disc (or None: a grey disc)
FAKE = [
    ("1f431", "cat face", (0.9, 0.6, 0.1)),
    ("1f34c", "banana", (1.0, 0.9, 0.1)),
    ("1f680", "rocket", None),
    ("1f34e", "red apple", (0.9, 0.05, 0.05)),
    ("1f576", "dark sunglasses", None),
    ("1f6df", "ring buoy", (1.0, 0.3, 0.2)),
]
STYLES = ("flat icon", "3d render")


def make_sprite(colour) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 12**2  # opaque box [5, 28) of 32
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[disc, :3] = np.array(colour or (0.5, 0.5, 0.5)) * 255
    rgba[disc, 3] = 255
    return rgba


@pytest.fixture(scope="module")
def catalogue():
    records = [EmojiRecord(key=k, name=n, style=s, package="test") for s in STYLES for k, n, _ in FAKE]
    sprites = np.stack([make_sprite(c) for _ in STYLES for _, _, c in FAKE])
    infos = scenes.measure_sprites(sprites, records, {"1f34c": ["bananas", "banana"]})
    return sprites, infos, scenes.SceneSampler(infos)


def test_words():
    assert words.with_article("otter") == "an otter" and words.with_article("unicorn") == "a unicorn"
    assert words.plural("red apple") == "red apples" and words.plural("cherry") == "cherries"
    assert words.plural("face with tears of joy") == "faces with tears of joy"
    assert words.plural("man cook") == "man cooks" and words.plural("mouse") == "mice"
    assert words.strip_colour("red apple") == "apple"
    assert words.nearest_colour(230.0) == "blue"


def test_measure_sprites_box_and_hue(catalogue):
    _, infos, _ = catalogue
    by_name = {i.record.name: i for i in infos}
    assert by_name["banana"].bbox == pytest.approx((5 / 32, 5 / 32, 28 / 32, 28 / 32))
    assert words.nearest_colour(by_name["banana"].hue) == "yellow"
    assert words.nearest_colour(by_name["red apple"].hue) == "red"
    assert by_name["rocket"].hue is None  # grey: never recoloured
    assert by_name["cat face"].head == by_name["cat face"].bbox  # a face: glasses go by the whole face
    assert by_name["banana"].keywords == ["bananas"]


def _scenes(sampler, kind, n=200, width=1.0, height=1.0):
    rng = random.Random(0)
    generator = getattr(sampler, kind)
    out = [generator(rng, width, height) for _ in range(n)]
    return [s for s in out if s is not None]


def test_single_positions_and_colours_match_the_caption(catalogue):
    _, infos, sampler = catalogue
    for scene in _scenes(sampler, "single", 400, width=1.5):
        (obj,) = scene.objects
        x0, y0, x1, y1 = sampler.box(obj)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert -1e-6 <= x0 and x1 <= 1.5 + 1e-6 and -1e-6 <= y0 and y1 <= 1 + 1e-6  # inside the canvas
        caption = scene.caption
        if re.search(r"\bleft\b", caption):
            assert cx < 0.5
        if re.search(r"\bright\b", caption):
            assert cx > 1.0
        if re.search(r"\btop\b", caption):
            assert cy < 0.35
        if re.search(r"\bbottom\b", caption):
            assert cy > 0.65
        if obj.hue:
            said = [c for c in words.COLOUR_HUES if re.search(rf"(^|\s){c}\s", caption)]
            new_hue = (infos[obj.sprite].hue + obj.hue) % 360
            assert any(words.hue_distance(new_hue, words.COLOUR_HUES[c]) < 1.0 for c in said), caption
        else:
            own, name = infos[obj.sprite].hue, infos[obj.sprite].record.name
            for c in words.BASIC_COLOURS:
                if f"{c} {name}" in caption and not name.startswith(c):
                    assert words.nearest_colour(own) == c, caption


def test_pairs_put_each_object_where_the_caption_says(catalogue):
    _, infos, sampler = catalogue
    checked = 0
    for scene in _scenes(sampler, "pair", 300):
        first, second = scene.objects
        name_a, name_b = infos[first.sprite].record.name, infos[second.sprite].record.name
        caption = scene.caption
        if " on the left and " in caption and name_a in caption and name_b in caption and name_a != name_b:
            left = caption.split(" on the left and ")[0]
            left_obj, right_obj = (first, second) if name_a in left else (second, first)
            assert sampler.box(left_obj)[2] <= sampler.box(right_obj)[0] + 1e-6  # wholly to its left
            checked += 1
        if " above " in caption:
            assert first.cy < second.cy
    assert checked > 5


def test_counts_have_that_many_objects(catalogue):
    _, _, sampler = catalogue
    numbers = {v: k for k, v in words.NUMBER_WORDS.items()} | {str(k): k for k in words.NUMBER_WORDS}
    for scene in _scenes(sampler, "count", 200):
        said = [numbers[w] for w in re.findall(r"[a-z0-9]+", scene.caption) if w in numbers]
        if said:
            assert said[0] == len(scene.objects), scene.caption
        else:
            assert re.search(r"\b(several|some)\b", scene.caption) and len(scene.objects) >= 3
        boxes = [sampler.box(o) for o in scene.objects]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] + 1e-6 or b[2] <= a[0] + 1e-6 or a[3] <= b[1] + 1e-6 or b[3] <= a[1] + 1e-6


def test_wearing_puts_the_glasses_on_the_eyes(catalogue):
    _, infos, sampler = catalogue
    seen = 0
    for scene in _scenes(sampler, "wearing", 100):
        wearer = next(o for o in scene.objects if infos[o.sprite].record.name == "cat face")
        glasses = next(o for o in scene.objects if infos[o.sprite].record.key == "1f576")
        said = "shades" if "shades" in scene.caption else "glasses"
        assert scene.caption.index("cat face") < scene.caption.index(said)  # wearer first, then what it wears
        x0, y0, x1, y1 = sampler.box(wearer)
        gx0, gy0, gx1, gy1 = sampler.box(glasses)
        assert (gx0 + gx1) / 2 == pytest.approx((x0 + x1) / 2, abs=1e-6)
        assert (gy0 + gy1) / 2 == pytest.approx(y0 + 0.42 * (y1 - y0), abs=1e-6)
        if any(infos[o.sprite].record.key == "1f6df" for o in scene.objects):
            assert scene.objects[0].sprite in {i for i, info in enumerate(infos) if info.record.key == "1f6df"}
        seen += 1
    assert seen > 50


def test_sample_draws_every_kind(catalogue):
    _, _, sampler = catalogue
    rng = random.Random(1)
    kinds = {sampler.sample(rng, 1.0, 1.0).kind for _ in range(300)}
    assert kinds == {"classic", "single", "pair", "count", "wearing", "float"}


@pytest.mark.parametrize("side", [S, 2 * S])  # sprites from `ldm data emoji --resolution`: the canvas is the same
def test_compositor_places_recolours_and_mirrors(side):
    red_left_half = np.zeros((side, side, 4), np.uint8)
    red_left_half[:, : side // 2] = (255, 0, 0, 255)  # opaque red on the sprite's left half only
    compositor = Compositor(torch.from_numpy(red_left_half[None]), "cpu")
    objects = [scenes.Placed(0, cx=0.5, cy=0.5, size=1.0)]
    gen = torch.Generator().manual_seed(0)
    image = compositor(SceneBatch([scenes.Scene(objects)], "cpu"), 64, 64, gen)[0]
    assert image[:, 32, 8].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=0.02)  # red on the left
    assert image[:, 32, 56].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.02)  # white background on the right
    mirrored = [scenes.Placed(0, cx=0.5, cy=0.5, size=1.0, flip=True, hue=120.0)]
    image = compositor(SceneBatch([scenes.Scene(mirrored)], "cpu"), 64, 64, gen)[0]
    assert image[:, 32, 56].tolist() == pytest.approx([-1.0, 1.0, -1.0], abs=0.05)  # mirrored and now green
    # a small object on a wide canvas: the layout unit is the shorter side
    small = [scenes.Placed(0, cx=1.25, cy=0.5, size=0.5)]
    image = compositor(SceneBatch([scenes.Scene(small)], "cpu"), 64, 128, gen)[0]
    red = (image[0] > 0.5) & (image[1] < -0.5)
    cols = red.any(0).nonzero().squeeze(1)
    assert cols.min().item() == 64 and cols.max().item() == 79  # x from 1.0 to 1.25 units: pixels 64..79
    # coverage: the same image, and the object's own pixels (its opaque half) and nothing else
    again, covered = compositor(SceneBatch([scenes.Scene(small)], "cpu"), 64, 128, gen, coverage=True)
    assert torch.equal(again[0], image) and covered.shape == (1, 1, 64, 128)
    assert torch.equal(covered[0, 0] > 0.5, red) and covered.min() == 0 and covered.max() == 1


def test_hue_rotation_and_backgrounds():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert hue_rotate(red, torch.tensor([120.0])).flatten().tolist() == pytest.approx([0, 1, 0], abs=1e-5)
    kinds = torch.arange(len(scenes.BACKGROUNDS))
    for height, width in ((32, 32), (32, 48)):
        painted = paint_backgrounds(kinds, height, width, torch.Generator().manual_seed(0))
        assert painted.shape == (len(kinds), 3, height, width) and torch.isfinite(painted).all()
        assert painted[0].eq(1).all()  # white
        assert painted[1:].std(dim=(2, 3)).sum(1).gt(0.01).all()  # the others are not flat


def test_scene_shares_choose_the_kinds_drawn(catalogue):
    _, infos, _ = catalogue
    only_classic = scenes.SceneSampler(infos, shares=(1, 0, 0, 0, 0, 0))
    rng = random.Random(0)
    assert {only_classic.sample(rng).kind for _ in range(100)} == {"classic"}
    with pytest.raises(ValueError, match="scene shares"):
        scenes.SceneSampler(infos, shares=(1, 0, 0))


def test_classic_size_sets_the_emoji_square(catalogue):
    _, infos, _ = catalogue
    half = scenes.SceneSampler(infos, shares=(1, 0, 0, 0, 0, 0), classic_size=(0.45, 0.6))
    rng = random.Random(0)
    drawn = [half.sample(rng, 1.5, 1.0) for _ in range(50)]
    assert all(0.45 <= s.objects[0].size <= 0.6 for s in drawn)
    assert all((s.objects[0].cx, s.objects[0].cy) == (0.75, 0.5) for s in drawn)  # centred on any canvas
    default = scenes.SceneSampler(infos, shares=(1, 0, 0, 0, 0, 0)).sample(rng)
    assert default.objects[0].size == 1.0  # the old data set: the emoji fills the frame
    with pytest.raises(ValueError, match="classic_size"):
        scenes.SceneSampler(infos, classic_size=(0.8, 0.5))


def test_classic_style_sets_the_share_of_styled_captions(catalogue):
    _, infos, _ = catalogue

    def styled_share(classic_style):
        sampler = scenes.SceneSampler(infos, shares=(1, 0, 0, 0, 0, 0), classic_style=classic_style)
        rng = random.Random(0)
        drawn = [sampler.sample(rng) for _ in range(1000)]
        return sum(any(style in s.caption for style in STYLES) for s in drawn) / len(drawn)

    assert styled_share(1.0) == 1.0
    assert styled_share(0.0) == 0.0
    assert 0.52 < styled_share(None) < 0.64  # the mix of earlier runs: half bare names (2 of 3 styled), half 50%
    assert 0.85 < styled_share(0.9) < 0.95
    with pytest.raises(ValueError, match="classic_style"):
        scenes.SceneSampler(infos, classic_style=1.5)
    with pytest.raises(ValueError, match="classic_style"):
        scenes.SceneSampler(infos, classic_style="most")


def test_close_up_batches_are_classic_emoji_filling_a_small_canvas(catalogue):
    from ldmkit.train.compose import CloseUp, SceneStream

    _, infos, _ = catalogue
    sampler = scenes.SceneSampler(infos, shares=(0, 1, 1, 1, 1, 1))  # no classic scene in the ordinary batches
    sizes = ((64, 64, 1.0),)
    close_up = CloseUp(0.5, 32, sampler.classic_only((0.9, 1.0)))
    batches = [next(b) for b in [iter(SceneStream(sampler, sizes, 8, 0, 0.0, close_up))] for _ in range(40)]
    small = [b for b in batches if b[:2] == (32, 32)]
    assert 8 < len(small) < 32 and all(b[:2] in ((32, 32), (64, 64)) for b in batches)
    for _, _, batch, tokens, canonical in small:
        assert len(tokens) == 32  # four times the batch: the same pixels a step
        assert canonical.shape == tokens.shape  # the captions as the 128 px model's data words them, for a teacher
        assert batch.rows[1].numel() == 0  # one object each
        assert ((batch.size[:, 0] >= 0.9) & (batch.size[:, 0] <= 1.0)).all()
        assert (batch.cx[:, 0] == 0.5).all() and (batch.background == scenes.BACKGROUND_IDS["white"]).all()
    for _, _, batch, _, canonical in [b for b in batches if b[:2] == (64, 64)]:
        assert len(batch.background) == 8 and canonical is None


def test_without_close_up_the_stream_draws_as_before(catalogue):
    from ldmkit.train.compose import CloseUp, SceneStream

    _, infos, sampler = catalogue
    sizes = ((64, 64, 0.5), (64, 96, 0.5))

    def draws(close_up):
        stream = iter(SceneStream(sampler, sizes, 4, 3, 0.0, close_up))
        return [(h, w, t.tolist()) for h, w, _, t, _ in (next(stream) for _ in range(6))]

    assert draws(None) == draws(CloseUp(0.0, 32, sampler.classic_only((1.0, 1.0))))
    assert draws(None) != draws(CloseUp(1.0, 32, sampler.classic_only((1.0, 1.0))))


def animal_sprite(eyes=((24, 20), (40, 20)), side=64) -> np.ndarray:
    """A light brown disc (a body) with dark 3x3 dots at the given (x, y) pixel centres."""
    yy, xx = np.mgrid[:side, :side]
    rgba = np.zeros((side, side, 4), np.uint8)
    body = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.45 * side) ** 2
    rgba[body] = (200, 150, 100, 255)
    for x, y in eyes:
        rgba[y - 1 : y + 2, x - 1 : x + 2, :3] = 20
    return rgba


def test_find_eyes_takes_a_level_pair_of_dark_dots_inside_the_body():
    from ldmkit.data.eyes import find_eyes

    x, y, span = find_eyes(animal_sprite())
    assert (x, y, span) == pytest.approx((32 / 64, 20 / 64, 16 / 64), abs=0.01)
    # a tilted head (the otters'): the pair is still found, its span the distance between the dots
    x, y, span = find_eyes(animal_sprite(((24, 16), (36, 26))))
    assert (x, y) == pytest.approx((30 / 64, 21 / 64), abs=0.01) and span == pytest.approx(np.hypot(12, 10) / 64, 0.05)
    # eyes over a nose: the level pair, not a pair with the nose
    x, y, _ = find_eyes(animal_sprite(((24, 20), (40, 20), (32, 30))))
    assert y == pytest.approx(20 / 64, abs=0.01)
    assert find_eyes(animal_sprite(())) is None  # no eyes
    assert find_eyes(animal_sprite(((24, 20),))) is None  # a side view: one eye, no pair
    assert find_eyes(animal_sprite(((24, 56), (40, 56)))) is None  # near the bottom: not eyes


def test_sunglasses_go_on_an_animals_found_eyes():
    records = [
        EmojiRecord(key="1f9a6", name="otter", style="flat icon", package="test"),
        EmojiRecord(key="1f576", name="dark sunglasses", style="flat icon", package="test"),
    ]
    glasses = np.zeros((64, 64, 4), np.uint8)
    glasses[28:36, 8:56] = (10, 10, 10, 255)  # opaque box x 8..56 of 64: 0.75 of the square wide
    sprites = np.stack([animal_sprite(((20, 22), (34, 22))), glasses])
    infos = scenes.measure_sprites(sprites, records, {}, eyes_for={"1f9a6"})
    assert infos[0].eyes is not None and infos[1].eyes is None  # only the animals are searched
    sampler = scenes.SceneSampler(infos, {"1f9a6"}, shares=(0, 0, 0, 0, 1, 0))
    rng = random.Random(0)
    for _ in range(20):
        scene = sampler.sample(rng)
        assert scene.kind == "wearing" and "otter" in scene.caption
        body, worn = scene.objects[-2:]
        eye_left, eye_y, eye_right, _ = sampler._map_box(body, (20 / 64, 22 / 64, 34 / 64, 22 / 64))
        gx0, gy0, gx1, gy1 = sampler.box(worn)
        assert (gx0 + gx1) / 2 == pytest.approx((eye_left + eye_right) / 2, abs=1e-6)  # centred on the eyes,
        assert (gy0 + gy1) / 2 == pytest.approx(eye_y, abs=1e-6)  # at their height,
        assert gx1 - gx0 == pytest.approx(2 * (eye_right - eye_left), rel=1e-6)  # twice as wide as they are apart
    without = scenes.measure_sprites(sprites, records, {})  # eyes not searched: no glasses for the otter
    assert scenes.SceneSampler(without, {"1f9a6"}, shares=(0, 0, 0, 0, 1, 0)).heads == {"flat icon": []}


def test_things_get_cartoon_eyes_and_the_caption_says_so():
    records = [
        EmojiRecord(key="1f699", name="sport utility vehicle", style="flat icon", package="test"),
        EmojiRecord(key="1f431", name="cat face", style="flat icon", package="test"),
        EmojiRecord(key="1f440", name="eyes", style="flat icon", package="test"),
    ]
    eyes = np.zeros((S, S, 4), np.uint8)
    eyes[12:20, 4:28] = 255  # opaque box: x 4..28, y 12..20 of 32
    sprites = np.stack([make_sprite((0.1, 0.4, 0.9)), make_sprite((0.9, 0.6, 0.1)), eyes])
    infos = scenes.measure_sprites(sprites, records, {"1f699": ["rover"]})
    sampler = scenes.SceneSampler(infos, shares=(0, 1, 0, 0, 0, 0))
    assert sampler.eyeless == {0}  # the face has its own; the eyes emoji is not given eyes
    rng = random.Random(1)
    drawn = [sampler.sample(rng) for _ in range(600)]
    with_eyes = [d for d in drawn if len(d.objects) == 2]
    assert 0.05 < len(with_eyes) / sum(d.objects[0].sprite == 0 for d in drawn) < 0.3
    for scene in drawn:
        has_eyes = len(scene.objects) == 2
        assert has_eyes == bool(re.search(r" with (\w+ )*eyes", scene.caption)), scene.caption
        if has_eyes:
            thing, worn = scene.objects
            assert thing.sprite == 0 and worn.sprite == 2 and worn.hue == 0
            tx0, ty0, tx1, ty1 = sampler.box(thing)
            ex0, ey0, ex1, ey1 = sampler.box(worn)
            assert (ex0 + ex1) / 2 == pytest.approx((tx0 + tx1) / 2) and ty0 < (ey0 + ey1) / 2 < (ty0 + ty1) / 2
            assert ex1 - ex0 <= 0.5 * (tx1 - tx0) + 1e-9  # on the upper half, at most half as wide
    assert any("rover" in d.caption and "eyes" in d.caption for d in with_eyes)
