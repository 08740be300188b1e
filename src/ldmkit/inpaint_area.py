"""'Only masked' inpainting (AUTOMATIC1111's inpaint_full_res): repaint the mask's surroundings at the full
generation size, then paste the result back into the init image.

The mask is blurred at the init image's size (the mask blur, in its pixels); the box of its non-zero pixels is
grown by the padding on every side, then to the generation's aspect ratio, as far as the image allows. That box of
the image and of the blurred mask, resized to width x height, is what the pipeline inpaints; the result is resized
back to the box and blended into the init image through the blurred mask, so outside the mask the init image's own
pixels stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldmkit.errors import InvalidRequest
from ldmkit.images import mask_to_tensor
from ldmkit.resize_modes import fit


@dataclass(frozen=True)
class MaskedArea:
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the init image's pixels, right/bottom exclusive
    init_image: Image.Image  # RGB, at its own size
    blurred_mask: Image.Image  # L at the init image's size: how much of the repainted image each pixel takes

    @classmethod
    def around(cls, init_image: Image.Image, mask: Image.Image, blur: int, padding: int, width: int, height: int):
        """The area to repaint for a width x height generation; refuses a blank mask (nothing to repaint)."""
        blurred = mask_to_tensor(mask, init_image.width, init_image.height, blur)[0, 0]  # (H, W) in [0, 1]
        blurred_mask = Image.fromarray((blurred.numpy() * 255).round().astype(np.uint8))
        rows, cols = np.nonzero(np.asarray(blurred_mask))
        if not len(rows):
            raise InvalidRequest("'only masked' inpainting: the mask is blank, there is nothing to repaint")
        image_w, image_h = init_image.size
        left, right = max(cols.min() - padding, 0), min(cols.max() + 1 + padding, image_w)
        top, bottom = max(rows.min() - padding, 0), min(rows.max() + 1 + padding, image_h)
        if (right - left) * height > (bottom - top) * width:  # wider than the generation: grow the height
            top, bottom = _grow(top, bottom, round((right - left) * height / width), image_h)
        else:
            left, right = _grow(left, right, round((bottom - top) * width / height), image_w)
        return cls((int(left), int(top), int(right), int(bottom)), init_image.convert("RGB"), blurred_mask)

    def crops(self, width: int, height: int) -> tuple[Image.Image, Image.Image]:
        """The init image's and the blurred mask's box, each at width x height: the request the pipeline runs."""
        return fit(self.init_image.crop(self.box), width, height, "fill"), fit(
            self.blurred_mask.crop(self.box), width, height, "fill"
        )

    def paste(self, repainted: Image.Image) -> Image.Image:
        """The init image with `repainted` (a generation of the crops) in the box, blended by the blurred mask."""
        left, top, right, bottom = self.box
        pasted = self.init_image.copy()
        pasted.paste(fit(repainted.convert("RGB"), right - left, bottom - top, "crop"), (left, top))
        return Image.composite(pasted, self.init_image, self.blurred_mask)


def _grow(low: int, high: int, size: int, limit: int) -> tuple[int, int]:
    """[low, high) grown to `size` (at most `limit`) around its middle, then shifted back inside [0, limit)."""
    size = min(max(size, high - low), limit)
    low = min(max(low - (size - (high - low)) // 2, 0), limit - size)
    return low, low + size
