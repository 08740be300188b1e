"""Images in and out of HTTP: guarded decoding of untrusted bytes, PNG encoding with the parameters chunk."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageOps

from ldmkit.errors import InvalidRequest, describe
from ldmkit.metadata import png_info
from ldmkit.pipeline import GenerationResult
from ldmkit.server.limits import ServerLimits

MAX_INPUT_PIXELS = ServerLimits.max_input_pixels

# Raster formats clients send. Not every format Pillow knows: EPS, for one, would run Ghostscript.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Pixel modes that convert to L, RGB and RGBA; a decoded image in another mode is converted once.
USABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
_WHITESPACE_CHARS = " \t\r\n"
_WHITESPACE = str.maketrans("", "", _WHITESPACE_CHARS)


def decode_image(data: bytes | str, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Fully decode image bytes (or a file path), checking the pixel count before any pixel is decoded.

    The image comes back upright (its EXIF orientation applied, as a viewer shows it) and in a mode
    that converts to L, RGB and RGBA.
    """
    # Any failure of a decoder on untrusted bytes is the image's fault (Pillow raises OSError, ValueError,
    # SyntaxError, EOFError, struct.error, zlib.error... depending on the format and the damage).
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=FORMATS)  # header only
    except Exception as exc:  # noqa: BLE001
        raise InvalidRequest(f"{what} is not a readable image ({describe(exc)})") from None
    if image.width * image.height > max_pixels:
        raise InvalidRequest(
            f"{what} is {image.width}x{image.height}, over this server's pixel limit max_input_pixels = {max_pixels}"
        )
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001
        raise InvalidRequest(f"{what} is a damaged image ({describe(exc)})") from None
    return _usable_mode(image, what)


def _usable_mode(image: Image.Image, what: str) -> Image.Image:
    """Modes Pillow cannot convert to L (LAB, CMYK and other TIFF modes) become RGB or RGBA here, once."""
    if image.mode in USABLE_MODES:
        return image
    try:
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    except ValueError:
        raise InvalidRequest(f"{what} has pixel mode {image.mode}, which this server cannot read") from None


def decode_base64_image(text: str, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Base64, plain or as a data: URL (AUTOMATIC1111 takes both) -> decoded PIL image. Never a file path.

    Line breaks and spaces are skipped, so MIME-wrapped base64 (76-character lines, as `base64` and
    `openssl base64` write it) is read as AUTOMATIC1111 reads it; any other non-base64 character is refused.
    """
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if any(space in text for space in _WHITESPACE_CHARS):  # the copy only when there is something to drop
        text = text.translate(_WHITESPACE)
    try:
        # b64decode(validate=True) does the same checks but first copies the text into bytes: up to 32 MiB
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64") from None
    return decode_image(data, what, max_pixels)


def encode_png(image: Image.Image, infotext: str | None = None) -> bytes:
    """PNG bytes carrying AUTOMATIC1111's 'parameters' text chunk."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(infotext) if infotext else None)
    return buffer.getvalue()


def encode_png_base64(image: Image.Image, infotext: str | None = None) -> str:
    return base64.b64encode(encode_png(image, infotext)).decode("ascii")


def encode_all(result: GenerationResult) -> list[str]:
    """A generation's images as base64 PNGs, each carrying its own parameters."""
    return [encode_png_base64(image, text) for image, text in zip(result.images, result.infotexts)]
