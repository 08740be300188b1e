"""Emoji dataset: open emoji sets from the npm registry, rendered to 128x128 RGBA sprites, captioned by name.

The alpha channel is kept (scenes paste sprites onto backgrounds); `load` gives the classic RGB-on-white view.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import tarfile
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldmkit.data.codepoints import normalize_key
from ldmkit.errors import LdmError


@dataclass(frozen=True)
class EmojiSource:
    """One npm package of emoji images and the style phrase its captions carry."""

    package: str  # npm package name, fetched with `npm pack`
    style: str  # caption phrase that selects this set's look
    kind: str  # "iconify" (SVG bodies in icons.json) or "webp" (assets/<code points>.webp)
    license: str  # SPDX id
    author: str


SOURCES = (
    EmojiSource("@iconify-json/noto", "cartoon emoji", "iconify", "Apache-2.0", "Google Inc (Noto Emoji)"),
    EmojiSource(
        "@iconify-json/twemoji", "flat icon", "iconify", "CC-BY-4.0", "Twitter, Inc and other contributors (Twemoji)"
    ),
    EmojiSource(
        "@iconify-json/fluent-emoji-flat", "flat illustration", "iconify", "MIT", "Microsoft Corporation (Fluent Emoji)"
    ),
    EmojiSource(
        "@lobehub/fluent-emoji-3d",
        "3d render",
        "webp",
        "MIT",
        "Microsoft Corporation (Fluent Emoji), packaged by LobeHub",
    ),
)

# More sets for the scene model (`ldm data emoji --extra-sets`). Their iconify packages carry no chars.json, so
# their icons are matched to code points by name against the sets above (`name_index`); unmatched ones are left out.
EXTRA_SOURCES = (
    EmojiSource("@iconify-json/noto-v1", "blob emoji", "iconify", "Apache-2.0", "Google Inc (Noto Emoji, v1)"),
    EmojiSource("@iconify-json/emojione", "emojione style", "iconify", "CC-BY-4.0", "Emoji One (EmojiOne 2)"),
    EmojiSource("@iconify-json/fxemoji", "firefox emoji style", "iconify", "Apache-2.0", "Mozilla (FxEmojis)"),
    EmojiSource("@iconify-json/streamline-emojis", "doodle icon", "iconify", "CC-BY-4.0", "Streamline (webalys)"),
    EmojiSource(
        "@iconify-json/fluent-emoji", "gradient illustration", "iconify", "MIT", "Microsoft Corporation (Fluent Emoji)"
    ),
)

RESOLUTION = 128  # the single-emoji stages' size; `build(resolution=...)` renders larger sprites for scenes
RESOLUTIONS = (128, 256, 384, 512)  # multiples of 128, so that `load` gives the 128 px images by block means
SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}


@dataclass
class EmojiRecord:
    """One rendered image: which emoji, from which set, and the captions it is trained on."""

    key: str  # normalized code points, "1f9a6" or "1f468-200d-1f373"
    name: str  # Unicode short name in lower case, "otter"
    style: str
    package: str

    def captions(self) -> list[str]:
        """Name alone (any style answers it) and name with the style phrase (selects the style)."""
        return [self.name, f"{self.name}, {self.style}", f"{self.style} of {self.name}"]


def fetch_packages(cache_dir: Path, sources=SOURCES) -> dict[str, Path]:
    """`npm pack` each source package into cache_dir (kept if already there); returns package -> .tgz."""
    return {source.package: npm_pack(source.package, cache_dir) for source in sources}


def npm_pack(package: str, cache_dir: Path) -> Path:
    """The package's .tgz in cache_dir, fetched with `npm pack` unless it is there already."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = package.lstrip("@").replace("/", "-")
    found = sorted(cache_dir.glob(f"{stem}-[0-9]*.tgz"))
    if not found:
        if shutil.which("npm") is None:
            raise LdmError(f"npm is needed to fetch {package}; install Node.js or put the .tgz in {cache_dir}")
        result = subprocess.run(
            ["npm", "pack", package, "--pack-destination", str(cache_dir)], capture_output=True, text=True, check=False
        )
        found = sorted(cache_dir.glob(f"{stem}-[0-9]*.tgz"))
        if result.returncode != 0 or not found:
            raise LdmError(f"npm pack {package} failed: {result.stderr.strip().splitlines()[-1:]}")
    return found[-1]


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise LdmError(f"{tar.name}: missing {name}")
    return member.read()


def _squash(name: str) -> str:
    return name.replace("-", "").replace("_", "")


def name_index(icon_names: dict[str, str]) -> dict[str, str]:
    """{icon name, and the name without hyphens: key} from {key: icon name} of the sets that map code points."""
    index = {}
    for key, name in icon_names.items():
        index.setdefault(name, key)
        index.setdefault(_squash(name), key)
    return index


def _match_name(icon_name: str, index: dict[str, str]) -> str | None:
    """A code-point key for an icon named without code points: exact, hyphen-free, or without a '-2' variant suffix."""
    base = icon_name.rsplit("-", 1)[0] if icon_name.rsplit("-", 1)[-1].isdigit() else icon_name
    for candidate in (icon_name, _squash(icon_name), base, _squash(base)):
        if candidate in index:
            return index[candidate]
    return None


def read_iconify(tgz: Path, by_name: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """An @iconify-json package -> ({key: standalone SVG}, {key: icon name}); hidden and transformed icons skipped.

    A package whose chars.json is empty is matched by icon name through `by_name` (see `name_index`)."""
    with tarfile.open(tgz) as tar:
        icon_set = json.loads(_read_member(tar, "package/icons.json"))
        chars = json.loads(_read_member(tar, "package/chars.json"))
    icons, aliases = icon_set["icons"], icon_set.get("aliases", {})
    width, height = icon_set.get("width", 16), icon_set.get("height", 16)
    if not chars and by_name:
        chars = {}
        for icon_name in sorted(icons):  # sorted: "astronaut-1" before "astronaut-2" takes the key
            key = _match_name(icon_name, by_name)
            if key is not None and key not in chars:
                chars[key] = icon_name
    svgs, names = {}, {}
    for codepoints, icon_name in chars.items():
        alias = aliases.get(icon_name, {})
        if set(alias) - {"parent"}:
            continue  # rotated or flipped aliases do not show the emoji the code points name
        icon = icons.get(alias.get("parent", icon_name))
        if icon is None or icon.get("hidden"):
            continue
        left, top = icon.get("left", 0), icon.get("top", 0)
        w, h = icon.get("width", width), icon.get("height", height)
        key = normalize_key(codepoints)
        svgs[key] = f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{left} {top} {w} {h}">{icon["body"]}</svg>'
        names[key] = icon_name
    return svgs, names


def read_webp_assets(tgz: Path) -> dict[str, bytes]:
    """A package of assets/<code points>.webp files -> {key: webp bytes}."""
    images = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if path.parent.name == "assets" and path.suffix == ".webp":
                images[normalize_key(path.stem)] = _read_member(tar, member.name)
    return images


def emoji_name(key: str, icon_names: dict[str, str]) -> str | None:
    """Unicode short name in lower case: the iconify name (CLDR short names) or unicodedata for one code point."""
    if key in icon_names:
        return icon_names[key].replace("-", " ")
    if "-" not in key:
        try:
            return unicodedata.name(chr(int(key, 16))).lower()
        except ValueError:
            return None
    return None


def _rgba(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """(..., H, W, 4) uint8 RGBA -> (..., H, W, 3) uint8 composited on white."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.round(rgb).astype(np.uint8)


def render_svg(svg: str, size: int = RESOLUTION) -> np.ndarray:
    """SVG markup -> (size, size, 4) uint8 RGBA, rasterized by resvg."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True)
    return _rgba(Image.open(io.BytesIO(bytes(png))), size)


def render_webp(data: bytes, size: int = RESOLUTION) -> np.ndarray:
    """WebP bytes (any size, with alpha) -> (size, size, 4) uint8 RGBA."""
    return _rgba(Image.open(io.BytesIO(data)), size)


def _render(item: tuple[str, str | bytes], size: int) -> np.ndarray:
    kind, payload = item
    return render_svg(payload, size) if kind == "svg" else render_webp(payload, size)


def collect(tarballs: dict[str, Path], sources=SOURCES, skin_tones: bool = False):
    """Read every source -> (records, render jobs): one record per (emoji, set) that has a name."""
    items_by_package, icon_names, unmapped = {}, {}, []
    for source in sources:
        if source.kind == "iconify":
            svgs, names = read_iconify(tarballs[source.package])
            if not svgs:  # no chars.json: matched by name once the other sets' names are known
                unmapped.append(source)
            for key, name in names.items():
                icon_names.setdefault(key, name)  # first set wins: noto's names come first
            items_by_package[source.package] = {k: ("svg", v) for k, v in svgs.items()}
        else:
            items_by_package[source.package] = {
                k: ("webp", v) for k, v in read_webp_assets(tarballs[source.package]).items()
            }
    by_name = name_index(icon_names)
    for source in unmapped:
        svgs, _ = read_iconify(tarballs[source.package], by_name)
        items_by_package[source.package] = {k: ("svg", v) for k, v in svgs.items()}
    per_source = [(source, items_by_package[source.package]) for source in sources]
    records, jobs = [], []
    for source, items in per_source:
        for key in sorted(items):
            if not skin_tones and SKIN_TONES & set(key.split("-")):
                continue
            name = emoji_name(key, icon_names)
            if name is None:
                continue
            records.append(EmojiRecord(key=key, name=name, style=source.style, package=source.package))
            jobs.append(items[key])
    return records, jobs


def write_licenses(out_dir: Path, sources=SOURCES) -> None:
    """Attribution of every emoji set, next to the data (and next to weights trained on it)."""
    lines = ["Emoji images used to train the ldmkit default model:", ""]
    for s in sources:
        lines.append(f"- {s.package} (npm): {s.author}. License: {s.license}. Style phrase: '{s.style}'.")
    lines += [
        "",
        "Apache-2.0: https://www.apache.org/licenses/LICENSE-2.0",
        "CC-BY-4.0: https://creativecommons.org/licenses/by/4.0/ (the CC-BY-4.0 sets' authors are named above)",
        "MIT: https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE",
        "",
        "Caption keywords: emojilib (npm), Mu-An Chiou and contributors. License: MIT.",
    ]
    (out_dir / "LICENSES.md").write_text("\n".join(lines) + "\n")


def build(
    out_dir: Path,
    cache_dir: Path | None = None,
    workers: int | None = None,
    limit: int | None = None,
    skin_tones: bool = False,
    sources=SOURCES,
    keywords: bool = True,
    resolution: int = RESOLUTION,
) -> list[EmojiRecord]:
    """Fetch, render and caption: sprites.npy (N, R, R, 4) uint8 RGBA at R = `resolution`, records.json,
    keywords.json, LICENSES.md. A larger R keeps large objects in scenes sharp (a 128 px sprite drawn at 200 px
    is upsampled); the single-emoji stages read it back at 128 px (`load`)."""
    if resolution not in RESOLUTIONS:
        raise LdmError(f"--resolution: expected one of {', '.join(map(str, RESOLUTIONS))} px, got {resolution}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tarballs = fetch_packages(cache_dir or out_dir / "packages", sources)
    records, jobs = collect(tarballs, sources, skin_tones)
    if limit is not None:
        records, jobs = records[:limit], jobs[:limit]
    if not records:
        raise LdmError("no emoji found in the source packages")
    workers = workers or os.cpu_count() or 1
    render = functools.partial(_render, size=resolution)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            images = list(pool.map(render, jobs, chunksize=64))
    else:
        images = [render(job) for job in jobs]
    np.save(out_dir / "sprites.npy", np.stack(images))
    if keywords:
        from ldmkit.data import keywords as keyword_list

        table = keyword_list.read_emojilib(npm_pack(keyword_list.PACKAGE, cache_dir or out_dir / "packages"))
        (out_dir / "keywords.json").write_text(json.dumps(table))
    (out_dir / "records.json").write_text(json.dumps([r.__dict__ for r in records]))
    write_licenses(out_dir, sources)
    return records


def load(data_dir: Path) -> tuple[np.ndarray, list[EmojiRecord]]:
    """images (N, 128, 128, 3) uint8 on white and their records, as `build` wrote them (sprites rendered larger
    are area-averaged down to 128 px: the single-emoji stages, the eval and the ControlNet work at that size)."""
    data_dir = Path(data_dir)
    if (data_dir / "sprites.npy").exists():
        sprites, records = load_sprites(data_dir)
        chunks = [_on_white_at(sprites[i : i + 1024], RESOLUTION) for i in range(0, len(sprites), 1024)]
        return np.concatenate(chunks), records
    if not (data_dir / "images.npy").exists():  # RGB on white, as earlier versions wrote it
        raise LdmError(f"no dataset in {data_dir}: run `ldm data emoji --out {data_dir}` first")
    return np.load(data_dir / "images.npy", mmap_mode="r"), _records(data_dir)


def _on_white_at(rgba: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 4) uint8 RGBA -> (N, size, size, 3) uint8 on white, by the mean of each block (S = k * size;
    sprites no larger than `size`, as small test sets have, are kept). Compositing first makes transparent pixels
    count as the white they show."""
    rgb = on_white(rgba)
    factor = rgba.shape[1] // size
    if factor <= 1:
        return rgb
    blocks = rgb.reshape(len(rgb), size, factor, size, factor, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def load_sprites(data_dir: Path) -> tuple[np.ndarray, list[EmojiRecord]]:
    """sprites (N, R, R, 4) uint8 RGBA (R: the resolution `build` rendered at, 128 by default) and their records."""
    data_dir = Path(data_dir)
    if not (data_dir / "sprites.npy").exists():
        raise LdmError(f"no sprites in {data_dir}: run `ldm data emoji --out {data_dir}` first")
    return np.load(data_dir / "sprites.npy", mmap_mode="r"), _records(data_dir)


def _records(data_dir: Path) -> list[EmojiRecord]:
    return [EmojiRecord(**r) for r in json.loads((data_dir / "records.json").read_text())]
