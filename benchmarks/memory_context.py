"""Peak RSS growth of one SD1.5-shaped UNet call (random weights, fp32, CPU) against the context length.

python benchmarks/memory_context.py TOKENS   (77 per prompt chunk); the figures in ldmkit/memory.py came from it.
"""

import gc
import resource
import sys

import torch
from diffusers import UNet2DConditionModel

from ldmkit import loading

torch.manual_seed(0)
tokens = int(sys.argv[1])
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(loading.SD1_CONFIG / "unet")).eval()
sample = torch.randn(2, 4, 8, 8)
context = torch.randn(2, tokens, 768)
with torch.inference_mode():
    unet(sample, 500, encoder_hidden_states=torch.randn(2, 77, 768))  # warm: allocator, kernels
    gc.collect()
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * 4096 // 1024  # KiB, as ru_maxrss
    unet(sample, 500, encoder_hidden_states=context)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
growth, context_mib = (after - rss_now) / 1024, context.numel() * 4 / 2**20
print(f"{tokens} tokens: peak RSS growth of the call {growth:.1f} MiB, beyond the context's {context_mib:.1f} MiB")
