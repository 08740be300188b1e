"""Scene descriptions built from emoji sprites, and the captions that describe them.

A `Scene` says what to draw (which sprites, where, how big, recoloured or not, on which background, graded or
not); `ldmkit.train.compose` draws it on the GPU. The caption is written from the scene, never the other way
round, so it cannot say what the picture does not show: "a cat on the left" has the cat's centre in the left
third, "a blue banana" is the banana hue-rotated to blue, "three apples" has three, "a cat wearing sunglasses"
has the glasses over the cat's eyes. Words the picture cannot contradict ("cute", "emoji", articles) vary freely.

Layout units: the canvas is (width, height) with its shorter side 1, so a scene means the same at any size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from ldmkit.data import emoji, keywords, words
from ldmkit.data.emoji import EmojiRecord
from ldmkit.data.eyes import find_eyes

MAX_OBJECTS = 6

# Backgrounds the compositor paints (index = id), with the phrases that describe each.
BACKGROUNDS = {
    "white": ["on a white background", "on white", "isolated on white", "white background"],
    "sky": ["in the sky", "against a blue sky", "on a sunny day", "under a sunny sky", "in a blue sky with the sun"],
    "night": ["at night", "in the night sky", "under a starry sky", "on a starry night", "night sky background"],
    "pool": ["in a swimming pool", "in the pool", "in a pool", "in swimming pool water", "in a sunny swimming pool"],
    "sea": ["in the sea", "on the ocean", "at sea", "on the water", "on the sea"],
    "beach": ["on the beach", "on a sandy beach", "at the beach", "on a beach by the sea"],
    "grass": ["on the grass", "in a grassy field", "on a lawn", "in a meadow", "on green grass"],
    "snow": ["in the snow", "on snow", "in a snowy landscape", "on a snowy field"],
    "desert": ["in the desert", "on desert sand", "among sand dunes", "in a sandy desert"],
    "planet": [
        "on a strange planet",
        "lost on a strange planet",
        "on an alien planet",
        "on the surface of a strange planet",
        "on a strange alien world",
    ],
    "room": ["in a room", "indoors", "against a wall", "in front of a wall", "inside a room"],
}
BACKGROUND_IDS = {name: i for i, name in enumerate(BACKGROUNDS)}
# Sunlit backgrounds may also say so ("in a swimming pool, on a sunny day").
SUNNY = {"sky", "pool", "beach", "sea", "desert", "grass"}
SUNNY_PHRASES = ["on a sunny day", "in the sunshine", "sunny day"]

# Whole-picture colour grades (index = id; 0 = none) and their phrases.
GRADES = {
    "none": [],
    "earth": ["cool earth tones", "earth tones", "in earth tones", "warm earth tones", "earthy colors"],
    "pastel": ["pastel colors", "in pastel tones", "soft pastel colors", "pastel palette"],
}
GRADE_IDS = {name: i for i, name in enumerate(GRADES)}

STYLE_TEMPLATES = ("{x}, {s}", "{s} of {x}", "{x}, {s} style", "{x} in {s} style", "{s}: {x}")
FRAMES = ("{x}", "{x}", "{x}", "{x} emoji", "an emoji of {x}", "{x} icon", "a picture of {x}", "a drawing of {x}")
ADJECTIVES = ("cute", "nice", "cool", "lovely", "adorable")

# Things not to put in scenes (flags, keycaps, signs): they keep their single-image captions only.
SYMBOL_WORDS = {
    "flag", "keycap", "button", "sign", "symbol", "arrow", "letter", "squared", "circled", "regional",
    "indicator", "zodiac", "mark", "ideograph", "digit", "number", "clock", "o'clock", "thirty", "aries",
    "taurus", "gemini", "cancer", "leo", "virgo", "libra", "scorpio", "sagittarius", "capricorn", "aquarius",
    "pisces", "ophiuchus", "prohibited", "entry", "restroom", "toilet", "circle", "square", "triangle",
    "diamond", "heart", "suit", "exclamation", "question", "hundred", "id", "vs", "sos", "atm", "wc",
}  # fmt: skip
PEOPLE_HEADS = {"man", "woman", "person", "boy", "girl", "baby", "older man", "older woman", "older person"}
# Words that make an emoji a person or a creature (with eyes of its own: never given cartoon eyes), a face-like
# thing, a hand or another body part, or an eye itself (animals are excluded by their keywords too).
HAS_EYES_WORDS = {
    "person", "people", "man", "woman", "men", "women", "boy", "girl", "baby", "child", "adult", "santa", "claus",
    "mx", "mage", "fairy", "vampire", "merperson", "merman", "mermaid", "elf", "genie", "zombie", "troll", "prince",
    "princess", "ninja", "superhero", "supervillain", "detective", "guard", "worker", "cook", "farmer", "astronaut",
    "pilot", "firefighter", "judge", "scientist", "teacher", "student", "singer", "artist", "technologist",
    "mechanic", "officer", "family", "couple", "bride", "groom", "skier", "snowboarder", "golfer", "surfer",
    "juggler", "pregnant", "eye", "eyes", "skull", "ghost", "alien", "robot", "clown", "ogre", "goblin", "snowman",
    "struck", "head", "dancer", "dolls", "jack", "wedding", "hands", "hand", "fist", "fingers", "finger",
    "bison", "bird", "cat", "beetle", "cockroach", "donkey", "goose", "jellyfish", "mammoth", "moose", "phoenix",
    "butterfly", "fly", "creature", "microbe", "bust", "busts", "moai", "joker", "arts", "kiss", "selfie", "gesture",
    "salute", "thumbs", "handshake", "mouth", "nose", "ear", "tongue", "tooth", "leg", "foot", "lungs", "brain", "lip",
    "biceps", "feeding", "palms", "index", "liberty", "poo", "teddy", "pinata", "hamsa", "nazar",
}  # fmt: skip

# Accessories by code point key: where they go on the wearer's head box and how wide they are, relative to it.
#   anchor "eyes": centred at 42% of the head's height; "head": its bottom edge at `y` of the head's height;
#   "neck": its top edge just under the head.
ACCESSORIES = {
    "1f576": ("eyes", 0.80, 0.42, ["sunglasses", "dark sunglasses", "shades", "cool sunglasses"]),
    "1f453": ("eyes", 0.75, 0.42, ["glasses", "eyeglasses", "spectacles"]),
    "1f97d": ("eyes", 0.80, 0.40, ["goggles", "swimming goggles"]),
    "1f451": ("head", 0.60, 0.16, ["a crown", "a golden crown", "a king's crown"]),
    "1f3a9": ("head", 0.70, 0.22, ["a top hat", "a black top hat", "a hat"]),
    "1f9e2": ("head", 0.75, 0.24, ["a cap", "a baseball cap", "a billed cap"]),
    "1f452": ("head", 0.85, 0.24, ["a sun hat", "a woman's hat", "a hat"]),
    "1f393": ("head", 0.80, 0.20, ["a graduation cap", "a mortarboard"]),
    "26d1": ("head", 0.75, 0.24, ["a helmet", "a rescue helmet"]),
    "1f380": ("head", 0.45, 0.12, ["a ribbon", "a bow", "a pink bow"]),
    "1f454": ("neck", 0.30, 0.0, ["a necktie", "a tie"]),
    "1f9e3": ("neck", 0.70, 0.0, ["a scarf", "a warm scarf"]),
}
RING_BUOY = "1f6df"
RING_WORDS = [
    "a ring buoy", "a floating tube", "a float", "an inflatable ring", "a swim ring", "a pool float",
    "a life ring", "a rubber ring", "a lifebuoy", "a pool ring",
]  # fmt: skip
FLOAT_VERBS = ["floating on", "relaxing on", "lounging on", "resting on", "chilling on", "on"]
# Cartoon eyes (the "eyes" emoji) on a thing that has none: "a rover with cute eyes"; in this share of single scenes
# of such things, on the upper part of the thing, about half as wide.
GOOGLY_EYES = "1f440"
GOOGLY_SHARE = 0.15
EYE_PHRASES = ["eyes", "cute eyes", "big eyes", "googly eyes", "cartoon eyes", "big cute eyes", "two eyes"]
WEAR_TEMPLATES = ("{w} wearing {a}", "{w} with {a}", "{w} in {a}", "{w} who is wearing {a}", "{w} that wears {a}")


@dataclass
class Placed:
    """One sprite on the canvas: its square's centre and side in layout units, recolour, mirror."""

    sprite: int
    cx: float
    cy: float
    size: float
    hue: float = 0.0  # degrees to rotate the hue by (0: as drawn)
    flip: bool = False


@dataclass
class Scene:
    objects: list[Placed]
    background: str = "white"
    grade: str = "none"
    caption: str = ""
    kind: str = ""  # which generator made it (for tests and statistics)
    # classic scenes: the caption of the 128 px model's data with the same meaning (the name, with the style phrase
    # when the caption has one), which that model understands: what a teacher is asked (train.scene close_up_teacher)
    canonical: str = ""


@dataclass
class SpriteInfo:
    """What captions and placement need to know about one sprite, measured from its pixels."""

    record: EmojiRecord
    bbox: tuple[float, float, float, float]  # opaque pixels, (x0, y0, x1, y1) in [0, 1] of the sprite square
    head: tuple[float, float, float, float]  # where a hat or glasses go: the face, or the top of a body
    hue: float | None  # dominant hue in degrees if the sprite is mostly one saturated colour, else None
    keywords: list[str] = field(default_factory=list)
    eyes: tuple[float, float, float] | None = None  # an animal's eyes: (x, y, span) in the sprite square (find_eyes)


def measure_sprites(
    sprites: np.ndarray,
    records: list[EmojiRecord],
    keywords: dict[str, list[str]],
    eyes_for: frozenset[str] | set[str] = frozenset(),
) -> list[SpriteInfo]:
    """Per sprite: opaque box, head box and dominant hue, from (N, S, S, 4) uint8 RGBA; the eyes of the sprites
    whose key is in `eyes_for` (animals; faces have theirs at a fixed place)."""
    infos = []
    for i in range(0, len(sprites), 512):
        chunk = np.asarray(sprites[i : i + 512])
        n, s = chunk.shape[0], chunk.shape[1]
        small = chunk.reshape(n, 32, s // 32, 32, s // 32, 4).astype(np.float32).mean(axis=(2, 4)) / 255.0
        for j in range(n):
            record = records[i + j]
            bbox = _opaque_box(chunk[j, :, :, 3] > 127)
            infos.append(
                SpriteInfo(
                    record=record,
                    bbox=bbox,
                    head=bbox if is_head(record.name) else _top_box(small[j, :, :, 3] > 0.5, bbox),
                    hue=_dominant_hue(small[j]),
                    keywords=[k for k in keywords.get(record.key, []) if k != record.name],
                    eyes=find_eyes(chunk[j]) if record.key in eyes_for and not is_head(record.name) else None,
                )
            )
    return infos


def _opaque_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return (0.0, 0.0, 1.0, 1.0)
    s = mask.shape[0]
    return (float(cols[0] / s), float(rows[0] / s), float((cols[-1] + 1) / s), float((rows[-1] + 1) / s))


def _top_box(mask: np.ndarray, bbox) -> tuple[float, float, float, float]:
    """A body's head, guessed: the opaque columns of the top band of its box, as tall as it is wide (at most)."""
    _x0, y0, _x1, y1 = bbox
    s = mask.shape[0]
    band = mask[int(y0 * s) : max(int(y0 * s) + 1, int((y0 + 0.35 * (y1 - y0)) * s))]
    cols = np.flatnonzero(band.any(0))
    if len(cols) == 0:
        return bbox
    hx0, hx1 = float(cols[0] / s), float((cols[-1] + 1) / s)
    height = min(hx1 - hx0, 0.5 * (y1 - y0))
    return (hx0, y0, hx1, y0 + height)


def _dominant_hue(rgba: np.ndarray) -> float | None:
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = (high - low) / np.maximum(high, 1e-6)
    opaque = alpha > 0.5
    colourful = opaque & (saturation > 0.35) & (high > 0.25)
    if opaque.sum() == 0 or colourful.sum() < 0.5 * opaque.sum():
        return None
    r, g, b = (rgb[..., k][colourful] for k in range(3))
    # hue angle from the opponent-colour plane (close to HSV hue, and averages well on a circle)
    angle = np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)
    resultant = np.hypot(np.cos(angle).mean(), np.sin(angle).mean())
    if resultant < 0.8:
        return None
    return float(np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360.0)


def is_head(name: str) -> bool:
    """Emoji that are a face or a head (glasses and hats go by the whole sprite)."""
    parts = name.split()
    return ("face" in parts and "clock" not in parts) or name in PEOPLE_HEADS


def is_scene_object(name: str) -> bool:
    parts = set(name.replace("-", " ").split())
    return not (parts & SYMBOL_WORDS) and len(parts) <= 4 and name.isascii()


class SceneSampler:
    """Draws random scenes with their captions from the sprite catalogue (one `random.Random` per stream)."""

    # Shares of the scene kinds: classic, single, pair, count, wearing, floating
    DEFAULT_SHARES = (0.22, 0.22, 0.20, 0.12, 0.18, 0.06)

    def __init__(
        self,
        infos: list[SpriteInfo],
        animal_keys: set[str] | None = None,
        shares=DEFAULT_SHARES,
        classic_size: tuple[float, float] = (1.0, 1.0),
        classic_style: float | None = None,
    ):
        """classic_size: the side of a classic emoji's square, drawn uniformly from this range (1.0 fills the
        shorter side; 0.5 on a 256 px canvas is 128 px, the sprites' own resolution). classic_style: the share of
        classic captions that carry the style phrase (None: the mix below, about 58%)."""
        if not 0 < classic_size[0] <= classic_size[1] <= 1:
            raise ValueError(f"classic_size: expected 0 < low <= high <= 1, got {classic_size}")
        if classic_style is not None and not (isinstance(classic_style, (int, float)) and 0 <= classic_style <= 1):
            raise ValueError(f"classic_style: expected a share from 0 to 1, got {classic_style}")
        self.infos = infos
        self.classic_size = tuple(classic_size)
        self.classic_style = classic_style
        self.styles = sorted({i.record.style for i in infos})
        self.by_style: dict[str, list[int]] = {s: [] for s in self.styles}
        self.objects: dict[str, list[int]] = {s: [] for s in self.styles}
        self.wearers: dict[str, list[int]] = {s: [] for s in self.styles}  # faces, heads and animals
        self.heads: dict[str, list[int]] = {s: [] for s in self.styles}  # where eyes are known: glasses can go
        self.accessories: dict[str, list[int]] = {s: [] for s in self.styles}
        self.rings: dict[str, int] = {}
        self.googly: dict[str, int] = {}  # each style's eyes emoji
        self.eyeless: set[int] = set()  # things, not faces, heads or animals: they may be given eyes
        animal_keys = animal_keys or set()
        for index, info in enumerate(infos):
            style, name, key = info.record.style, info.record.name, info.record.key
            self.by_style[style].append(index)
            if key == GOOGLY_EYES:
                self.googly[style] = index
            if key in ACCESSORIES:
                self.accessories[style].append(index)
            elif key == RING_BUOY:
                self.rings[style] = index
            elif is_scene_object(name):
                self.objects[style].append(index)
                if is_head(name) or key in animal_keys:
                    self.wearers[style].append(index)
                elif not set(name.replace("-", " ").split()) & HAS_EYES_WORDS:
                    self.eyeless.add(index)
                if is_head(name) or info.eyes is not None:
                    self.heads[style].append(index)
        kinds = (self.classic, self.single, self.pair, self.count, self.wearing, self.floating)
        if len(shares) != len(kinds) or min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"scene shares: expected {len(kinds)} non-negative numbers, got {shares}")
        self.generators = tuple(zip(shares, kinds))

    def classic_only(self, classic_size: tuple[float, float]) -> SceneSampler:
        """A sampler over the same sprites that draws only classic scenes, at this size and the same style share."""
        return SceneSampler(self.infos, None, (1, 0, 0, 0, 0, 0), classic_size, self.classic_style)

    def sample(self, rng: random.Random, width: float = 1.0, height: float = 1.0) -> Scene:
        """A random scene for a canvas of (width, height) layout units (shorter side 1)."""
        pick = rng.random() * sum(p for p, _ in self.generators)
        for p, generator in self.generators:  # noqa: B007 (the generator picked is used after the loop)
            pick -= p
            if pick <= 0:
                break
        scene = generator(rng, width, height)
        if scene is None:  # the style lacks what the generator needs (no accessories, say)
            scene = self.single(rng, width, height)
        return scene

    # --- generators -------------------------------------------------------------------------------------------

    def classic(self, rng, width, height) -> Scene:
        """One emoji centred on white (its square `classic_size` of the canvas): the old data set, with its captions
        and typed ones."""
        style = rng.choice(self.styles)
        index = rng.choice(self.by_style[style])
        info = self.infos[index]
        low, high = self.classic_size
        placed = Placed(index, width / 2, height / 2, rng.uniform(low, high) if high > low else high)
        styled = None if self.classic_style is None else rng.random() < self.classic_style
        if rng.random() < 0.5:
            name = info.record.name
            with_style = [f"{name}, {style}", f"{style} of {name}"]
            caption = rng.choice([name, *with_style] if styled is None else with_style if styled else [name])
        else:
            noun = self._noun(rng, info, allow_keyword=True)
            caption = self._finish(rng, noun, style, "white", "none", rng.random(), styled)
        forms = info.record.captions()  # "otter", "otter, 3d render", "3d render of otter"
        canonical = caption if caption in forms else forms[1] if style in caption else forms[0]
        return Scene([placed], "white", "none", caption, "classic", canonical)

    def caption_pair(self, rng) -> tuple[str, str]:
        """A single emoji's caption as `classic` draws it, and its canonical form (Scene.canonical)."""
        scene = self.classic(rng, 1.0, 1.0)
        return scene.caption, scene.canonical

    def single(self, rng, width, height) -> Scene:
        style = rng.choice(self.styles)
        index = rng.choice(self.objects[style] or self.by_style[style])
        info = self.infos[index]
        hue_shift, colour = self._recolour(rng, info)
        region = rng.choice(["center", "center", "left", "right", "top", "bottom", "top left", "top right",
                             "bottom left", "bottom right"])  # fmt: skip
        size = rng.uniform(0.3, 0.8) if region == "center" else rng.uniform(0.25, 0.45)
        cx, cy = _region_point(rng, region, size, width, height)
        placed = self._place(rng, index, cx, cy, size, hue_shift)
        size_word = (
            "small " if size < 0.35 and rng.random() < 0.5 else "big " if size > 0.65 and rng.random() < 0.5 else ""
        )
        noun = self._noun(rng, info, colour=colour, prefix=size_word)
        objects = [placed]
        if index in self.eyeless and style in self.googly and rng.random() < GOOGLY_SHARE:
            objects.append(self._eyes_on(placed, self.googly[style]))
            noun = f"{noun} with {rng.choice(EYE_PHRASES)}"
        if region != "center" and rng.random() < 0.9:
            noun = _with_position(rng, noun, region)
        background, grade = self._background(rng), self._grade(rng)
        caption = self._finish(rng, noun, style, background, grade, rng.random())
        return Scene(objects, background, grade, caption, "single")

    def pair(self, rng, width, height) -> Scene:
        style = rng.choice(self.styles)
        pool = self.objects[style]
        if len(pool) < 2:
            return None
        a, b = rng.sample(pool, 2)
        relation = rng.choice(["left-right", "left-right", "above-below", "next-to", "on"])
        na = self._noun(rng, self.infos[a])
        nb = self._noun(rng, self.infos[b])
        if relation == "on":
            size_b = rng.uniform(0.45, 0.65)
            bottom = self._place(rng, b, width / 2 + rng.uniform(-0.15, 0.15), height - 0.05 - size_b / 2, size_b)
            bx0, by0, bx1, _ = self.box(bottom)
            size_a = size_b * rng.uniform(0.45, 0.7)
            top = self._place_box(
                rng, a, (bx0 + bx1) / 2 + rng.uniform(-0.1, 0.1) * size_b, by0 + 0.12 * size_b, size_a
            )
            objects = [bottom, top]
            text = rng.choice(["{a} on {b}", "{a} on top of {b}", "{a} sitting on {b}", "{a} standing on {b}"])
        elif relation == "above-below":
            size = rng.uniform(0.28, min(0.45, height / 2 - 0.04))
            x = width / 2 + rng.uniform(-0.2, 0.2)
            upper = self._place(
                rng, a, x + rng.uniform(-0.1, 0.1), rng.uniform(size / 2 + 0.02, height / 2 - size / 2), size
            )
            lower = self._place(
                rng, b, x + rng.uniform(-0.1, 0.1), rng.uniform(height / 2 + size / 2, height - size / 2 - 0.02), size
            )
            objects = [upper, lower]
            text = rng.choice(["{a} above {b}", "{b} below {a}", "{a} at the top and {b} at the bottom",
                               "{b} at the bottom and {a} at the top", "{b} under {a}"])  # fmt: skip
        else:
            size = rng.uniform(0.28, min(0.45, width / 2 - 0.04))
            y = height / 2 + rng.uniform(-0.15, 0.15)
            left = self._place(
                rng, a, rng.uniform(size / 2 + 0.02, width / 2 - size / 2), y + rng.uniform(-0.05, 0.05), size
            )
            right = self._place(
                rng, b, rng.uniform(width / 2 + size / 2, width - size / 2 - 0.02), y + rng.uniform(-0.05, 0.05), size
            )
            objects = [left, right]
            if relation == "next-to":
                text = rng.choice(["{a} next to {b}", "{b} next to {a}", "{a} beside {b}", "{a} and {b} side by side",
                                   "{a} and {b}"])  # fmt: skip
            else:
                text = rng.choice(["{a} on the left and {b} on the right", "{b} on the right and {a} on the left",
                                   "{a} to the left of {b}", "{b} to the right of {a}",
                                   "on the left {a}, on the right {b}", "{a} left, {b} right"])  # fmt: skip
        noun = text.format(a=na, b=nb)
        background, grade = self._background(rng), self._grade(rng)
        return Scene(
            objects, background, grade, self._finish(rng, noun, style, background, grade, rng.random()), "pair"
        )

    def count(self, rng, width, height) -> Scene:
        style = rng.choice(self.styles)
        candidates = [i for i in self.objects[style] if len(self.infos[i].record.name.split()) <= 3]
        if not candidates:
            return None
        index = rng.choice(candidates)
        n = rng.choice([2, 2, 3, 3, 4, 5])
        columns = rng.choice({2: [2], 3: [3, 2], 4: [2, 4], 5: [3]}[n]) if width <= height * 1.2 else n
        rows = -(-n // columns)
        cell_w, cell_h = width / columns, height / rows
        size = min(cell_w, cell_h) * rng.uniform(0.6, 0.85)
        cells = rng.sample(range(rows * columns), n)
        hue_shift, colour = self._recolour(rng, self.infos[index])
        objects = []
        for cell in cells:
            r, c = divmod(cell, columns)
            slack_x, slack_y = (cell_w - size) / 2, (cell_h - size) / 2
            cx = (c + 0.5) * cell_w + rng.uniform(-slack_x, slack_x) * 0.8
            cy = (r + 0.5) * cell_h + rng.uniform(-slack_y, slack_y) * 0.8
            objects.append(self._place(rng, index, cx, cy, size, hue_shift))
        name = self._name(rng, self.infos[index])
        if colour:
            name = f"{colour} {words.strip_colour(name)}"
        number = rng.choice([words.NUMBER_WORDS[n], words.NUMBER_WORDS[n], str(n)])
        if n >= 3 and rng.random() < 0.1:
            number = rng.choice(["several", "some"])
        noun = f"{number} {words.plural(name)}"
        background, grade = self._background(rng), self._grade(rng)
        return Scene(
            objects, background, grade, self._finish(rng, noun, style, background, grade, rng.random()), "count"
        )

    def wearing(self, rng, width, height, ring: bool | None = None) -> Scene:
        style = rng.choice(self.styles)
        if not self.wearers[style] or not self.accessories[style]:
            return None
        accessory = rng.choice(self.accessories[style])
        # glasses need eyes: only on faces; a hat sits on any head, guessed from the top of a body
        wearers = (
            self.heads[style] if ACCESSORIES[self.infos[accessory].record.key][0] == "eyes" else self.wearers[style]
        )
        if not wearers:
            return None
        wearer = rng.choice(wearers)
        with_ring = (rng.random() < 0.3 if ring is None else ring) and style in self.rings
        size = rng.uniform(0.4, 0.7) if with_ring else rng.uniform(0.45, 0.85)
        cx = width / 2 + rng.uniform(-0.15, 0.15) * width
        cy = height / 2 + rng.uniform(-0.1, 0.1) - (0.1 if with_ring else 0.0)
        body = self._place(rng, wearer, cx, cy, size, hue_shift=0.0)
        objects = [body, self._accessory_on(body, accessory)]
        noun = rng.choice(WEAR_TEMPLATES).format(
            w=self._noun(rng, self.infos[wearer]), a=rng.choice(ACCESSORIES[self.infos[accessory].record.key][3])
        )
        background = self._background(rng)
        if with_ring:
            objects.insert(0, self._ring_under(rng, body, style))
            noun = f"{noun} {rng.choice(FLOAT_VERBS)} {rng.choice(RING_WORDS)}"
            background = rng.choice(["pool", "pool", "sea", "white"])
        grade = self._grade(rng)
        return Scene(
            objects, background, grade, self._finish(rng, noun, style, background, grade, rng.random()), "wearing"
        )

    def floating(self, rng, width, height) -> Scene:
        style = rng.choice([s for s in self.styles if s in self.rings] or self.styles)
        if style not in self.rings or not self.objects[style]:
            return None
        index = rng.choice(self.wearers[style] or self.objects[style])
        size = rng.uniform(0.35, 0.65)
        body = self._place(rng, index, width / 2 + rng.uniform(-0.2, 0.2), height / 2 - 0.05, size)
        noun = f"{self._noun(rng, self.infos[index])} {rng.choice(FLOAT_VERBS)} {rng.choice(RING_WORDS)}"
        background = rng.choice(["pool", "pool", "sea", "white"])
        grade = self._grade(rng)
        objects = [self._ring_under(rng, body, style), body]
        return Scene(
            objects, background, grade, self._finish(rng, noun, style, background, grade, rng.random()), "float"
        )

    # --- placement ---------------------------------------------------------------------------------------------

    def box(self, placed: Placed) -> tuple[float, float, float, float]:
        """The placed sprite's opaque box in layout units."""
        return self._map_box(placed, self.infos[placed.sprite].bbox)

    def _map_box(self, placed: Placed, box) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        if placed.flip:
            x0, x1 = 1 - x1, 1 - x0
        left, top = placed.cx - placed.size / 2, placed.cy - placed.size / 2
        return (left + x0 * placed.size, top + y0 * placed.size, left + x1 * placed.size, top + y1 * placed.size)

    def _place(self, rng, index, cx, cy, extent, hue_shift=0.0) -> Placed:
        """The sprite whose opaque box is `extent` on its longer side, centred at (cx, cy)."""
        x0, y0, x1, y1 = self.infos[index].bbox
        side = extent / max(x1 - x0, y1 - y0, 1e-3)
        flip = rng.random() < 0.5
        bx = 1 - (x0 + x1) / 2 if flip else (x0 + x1) / 2
        return Placed(index, cx - (bx - 0.5) * side, cy - ((y0 + y1) / 2 - 0.5) * side, side, hue_shift, flip)

    def _place_box(self, rng, index, cx, bottom, extent) -> Placed:
        """The sprite with its opaque box centred on cx and its bottom edge at `bottom`."""
        x0, y0, x1, y1 = self.infos[index].bbox
        side = extent / max(x1 - x0, y1 - y0, 1e-3)
        return self._place(rng, index, cx, bottom - (y1 - y0) * side / 2, extent)

    def _accessory_on(self, body: Placed, accessory: int) -> Placed:
        anchor, width, y, _ = ACCESSORIES[self.infos[accessory].record.key]
        eyes = self.infos[body.sprite].eyes
        ax0, ay0, ax1, ay1 = self.infos[accessory].bbox
        if anchor == "eyes" and eyes is not None:  # an animal's found eyes: glasses twice as wide as they are apart
            ex, ey, span = eyes
            left, centre_y, right, _ = self._map_box(body, (ex - span / 2, ey, ex + span / 2, ey))
            bx0, _, bx1, _ = self.box(body)
            side = min(2.0 * (right - left), 0.85 * (bx1 - bx0)) / max(ax1 - ax0, 1e-3)  # never wider than the body
            return self._box_centred(accessory, (left + right) / 2, centre_y, side)
        hx0, hy0, hx1, hy1 = self._map_box(body, self.infos[body.sprite].head)
        side = width * (hx1 - hx0) / max(ax1 - ax0, 1e-3)  # its opaque width is `width` of the head's
        half_h = (ay1 - ay0) * side / 2
        if anchor == "eyes":
            centre_y = hy0 + y * (hy1 - hy0)
        elif anchor == "head":
            centre_y = hy0 + y * (hy1 - hy0) - half_h
        else:
            centre_y = hy1 + half_h * 0.9
        return self._box_centred(accessory, (hx0 + hx1) / 2, centre_y, side)

    def _eyes_on(self, thing: Placed, eyes: int) -> Placed:
        """The eyes emoji on the upper part of a thing's box, half as wide (at most 0.7 of its height)."""
        x0, y0, x1, y1 = self.box(thing)
        ex0, ey0, ex1, ey1 = self.infos[eyes].bbox
        width = min(0.5 * (x1 - x0), 0.7 * (y1 - y0) * (ex1 - ex0) / max(ey1 - ey0, 1e-3))
        return self._box_centred(eyes, (x0 + x1) / 2, y0 + 0.38 * (y1 - y0), width / max(ex1 - ex0, 1e-3))

    def _box_centred(self, index: int, cx: float, cy: float, side: float) -> Placed:
        """The sprite as a square of `side`, unmirrored, with its opaque box's centre at (cx, cy)."""
        x0, y0, x1, y1 = self.infos[index].bbox
        return Placed(index, cx - ((x0 + x1) / 2 - 0.5) * side, cy - ((y0 + y1) / 2 - 0.5) * side, side)

    def _ring_under(self, rng, body: Placed, style: str) -> Placed:
        ring = self.rings[style]
        x0, y0, x1, y1 = self.box(body)
        extent = (x1 - x0) * rng.uniform(1.0, 1.3)
        return self._place(rng, ring, (x0 + x1) / 2, y1 - 0.1 * (y1 - y0), extent)

    # --- words -------------------------------------------------------------------------------------------------

    def _recolour(self, rng, info: SpriteInfo) -> tuple[float, str | None]:
        """Sometimes: (hue rotation, colour word) for a one-colour sprite; else (0, None)."""
        if info.hue is None or rng.random() > 0.3:
            return 0.0, None
        choices = [c for c in words.COLOUR_HUES if words.hue_distance(words.COLOUR_HUES[c], info.hue) > 45]
        if not choices:
            return 0.0, None
        colour = rng.choice(choices)
        return (words.COLOUR_HUES[colour] - info.hue) % 360.0, colour

    def _name(self, rng, info: SpriteInfo, allow_keyword: bool = True) -> str:
        if allow_keyword and info.keywords and rng.random() < 0.3:
            return rng.choice(info.keywords)
        return info.record.name

    def _noun(self, rng, info: SpriteInfo, colour: str | None = None, prefix: str = "", allow_keyword=True) -> str:
        """A noun phrase for one object: article, maybe an adjective, colour, the name or a keyword."""
        name = self._name(rng, info, allow_keyword)
        if colour:
            name = f"{colour} {words.strip_colour(name)}"
        elif info.hue is not None and rng.random() < 0.1 and not (set(name.split()) & words.COLOUR_WORDS):
            name = f"{words.nearest_colour(info.hue)} {name}"  # its own colour, said out loud
        name = prefix + name
        if rng.random() < 0.12:
            name = f"{rng.choice(ADJECTIVES)} {name}"
        r = rng.random()
        if r < 0.5:
            return words.with_article(name)
        if r < 0.65:
            return f"the {name}"
        return name

    def _background(self, rng) -> str:
        return "white" if rng.random() < 0.3 else rng.choice(list(BACKGROUNDS)[1:])

    def _grade(self, rng) -> str:
        r = rng.random()
        return "earth" if r < 0.06 else "pastel" if r < 0.1 else "none"

    def _finish(
        self, rng, noun: str, style: str, background: str, grade: str, order: float, styled: bool | None = None
    ) -> str:
        """Frame, style phrase (in half the captions, or as `styled` says), background and grade phrases around the
        subject, in a random order."""
        text = rng.choice(FRAMES).format(x=noun)
        if rng.random() < 0.5 if styled is None else styled:
            text = rng.choice(STYLE_TEMPLATES).format(x=text, s=style)
        extras = []
        if background != "white" and rng.random() < 0.9:
            extras.append(rng.choice(BACKGROUNDS[background]))
            if background in SUNNY and rng.random() < 0.25:
                extras.append(rng.choice(SUNNY_PHRASES))
        elif background == "white" and rng.random() < 0.15:
            extras.append(rng.choice(BACKGROUNDS["white"]))
        if grade != "none" and rng.random() < 0.9:
            extras.append(rng.choice(GRADES[grade]))
        for extra in extras:
            joiner = rng.choice([", ", " ", ", "])
            if order < 0.15 and background != "white":
                text = f"{extra}, {text}"
            else:
                text = f"{text}{joiner}{extra}"
        if rng.random() < 0.08:  # word dropout: people leave the articles out
            text = " ".join(w for w in text.split() if w not in ("a", "an", "the"))
        return text


def _region_point(rng, region: str, size: float, width: float, height: float) -> tuple[float, float]:
    """A centre for an object of `size` whose position the region's words describe truthfully."""

    def along(part: str, extent: float) -> float:
        lo, hi = size / 2 + 0.02, extent - size / 2 - 0.02
        if part == "low":
            return rng.uniform(lo, max(lo, extent * 0.3))
        if part == "high":
            return rng.uniform(min(hi, extent * 0.7), hi)
        return rng.uniform(extent * 0.45, extent * 0.55)

    x_part = "low" if "left" in region else "high" if "right" in region else "mid"
    y_part = "low" if "top" in region else "high" if "bottom" in region else "mid"
    return along(x_part, width), along(y_part, height)


def _with_position(rng, noun: str, region: str) -> str:
    if " " in region:
        phrase = rng.choice([f"in the {region} corner", f"at the {region}", f"in the {region}"])
    elif region in ("left", "right"):
        phrase = rng.choice([f"on the {region}", f"on the {region} side", f"at the {region}"])
    else:
        phrase = rng.choice([f"at the {region}", f"at the {region} of the picture", f"near the {region}"])
    return f"{noun} {phrase}" if rng.random() < 0.8 else f"{phrase}, {noun}"


def load_sampler(
    data_dir, limit: int | None = None, shares=SceneSampler.DEFAULT_SHARES, classic_size=(1.0, 1.0), classic_style=None
) -> tuple[np.ndarray, SceneSampler]:
    """The data set's sprites (N, S, S, 4) uint8 (in memory) and a scene sampler over them."""
    sprites, records = emoji.load_sprites(data_dir)
    if limit is not None:
        sprites, records = sprites[:limit], records[:limit]
    sprites = np.ascontiguousarray(sprites)
    raw = keywords.load_keywords(data_dir)
    animals = {k for k, tags in raw.items() if "animal" in tags}
    return sprites, SceneSampler(
        measure_sprites(sprites, records, keywords.specific(raw), animals), animals, shares, classic_size, classic_style
    )
