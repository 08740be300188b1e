"""A tiny random ESRGAN (RRDBNet) state dict in Real-ESRGAN's key layout (the files RealESRGAN_x4plus.pth and
friends hold), which spandrel recognizes: conv_first, body.N.rdbK.convJ, conv_body, conv_upI, conv_hr, conv_last."""

import torch

GROWTH = 32  # RRDBNet's growth channels: the files always use 32 (spandrel assumes it)


def esrgan_state_dict(scale: int = 2, features: int = 8, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of an RRDBNet upscaling `scale` (2 or 4) times; small, so it runs in milliseconds."""
    generator = torch.Generator().manual_seed(seed)

    def conv(out_ch: int, in_ch: int, name: str, bias: float = 0.0) -> dict[str, torch.Tensor]:
        weight = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * (0.8 / (in_ch * 9) ** 0.5)
        return {f"{name}.weight": weight, f"{name}.bias": torch.randn(out_ch, generator=generator) * 0.01 + bias}

    state = conv(features, 3, "conv_first")
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for j in range(1, 6):  # dense: conv j sees the input and the j - 1 outputs before it
                out_ch = features if j == 5 else GROWTH
                state |= conv(out_ch, features + (j - 1) * GROWTH, f"body.{block}.rdb{rdb}.conv{j}")
    state |= conv(features, features, "conv_body")
    for i in range(1, {2: 1, 4: 2}[scale] + 1):
        state |= conv(features, features, f"conv_up{i}")
    state |= conv(features, features, "conv_hr")
    state |= conv(3, features, "conv_last", bias=0.5)  # mid-grey plus detail: outputs that can differ
    return state
