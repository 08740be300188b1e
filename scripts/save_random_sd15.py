"""Save SD1.5-shaped random fp16 weights as a diffusers folder (default /tmp/sd15) for the device scripts."""

import sys

import torch

from ldmkit.bench import random_sd15
from ldmkit.loading import save_pretrained

components = random_sd15(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
for module in (components.unet, components.vae, components.text_encoder):
    module.half()
save_pretrained(components, sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd15")
