"""Small English helpers for captions: articles, plurals, number words, colour names and their hues."""

from __future__ import annotations

# Hue (degrees, HSV) each colour word asks for; a recoloured object is hue-rotated to it.
COLOUR_HUES = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 55.0,
    "green": 120.0,
    "blue-green": 165.0,
    "teal": 175.0,
    "cyan": 190.0,
    "blue": 220.0,
    "purple": 275.0,
    "violet": 270.0,
    "magenta": 300.0,
    "pink": 330.0,
}
# The words a sprite's own dominant hue is described with (the coarse ones, so "a yellow banana" is safe).
BASIC_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
COLOUR_WORDS = set(COLOUR_HUES) | {"black", "white", "brown", "grey", "gray", "light", "dark"}

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
IRREGULAR = {
    "man": "men",
    "woman": "women",
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "loaf": "loaves",
}
UNCHANGED = {"sheep", "fish", "deer", "moose", "bison", "shrimp", "squid", "sushi", "rice", "popcorn", "broccoli"}
# A noun phrase's head comes before these ("face with tears of joy" -> "faces with tears of joy").
_POSTMODIFIERS = (" with ", " of ", " in ", " on ", " for ")


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase, by how its first word sounds (good enough for emoji names)."""
    word = phrase.split()[0].lower() if phrase.split() else ""
    if word.startswith(("uni", "use", "eu", "one", "ufo")):
        return "a"
    if word.startswith(("hour", "honest", "herb")) or word[:1] in "aeiou" and word:
        return "an"
    return "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def plural_word(word: str) -> str:
    lower = word.lower()
    if lower in UNCHANGED:
        return word
    if lower in IRREGULAR:
        return IRREGULAR[lower]
    for end in ("man", "woman"):
        if lower.endswith(end) and len(lower) > len(end):
            return word[: -len(end)] + IRREGULAR[end]
    if lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        return word[:-1] + "ies"
    if lower.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def plural(phrase: str) -> str:
    """'red apple' -> 'red apples', 'face with tears of joy' -> 'faces with tears of joy'."""
    for marker in _POSTMODIFIERS:
        head, sep, tail = phrase.partition(marker)
        if sep and head:
            return f"{plural(head)}{sep}{tail}"
    words = phrase.split()
    return " ".join(words[:-1] + [plural_word(words[-1])]) if words else phrase


def strip_colour(phrase: str) -> str:
    """'red apple' -> 'apple': the name's own colour words go when the object is recoloured."""
    words = [w for w in phrase.split() if w not in COLOUR_WORDS]
    return " ".join(words) if words else phrase


def nearest_colour(hue: float, names=BASIC_COLOURS) -> str:
    """The colour word whose hue is closest to `hue` (degrees)."""
    return min(names, key=lambda n: hue_distance(hue, COLOUR_HUES[n]))


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)
