"""Model CPU offload (`--offload`): the models stay in CPU memory and each moves to the GPU only while it runs.

The text encoders, the UNet and the VAE each get accelerate's offload hook (what diffusers'
`enable_model_cpu_offload` installs), chained in the order a request runs them: before a model's forward, the
previous one goes back to the CPU and this one to the GPU, so the GPU holds about one model (SDXL's 5 GB fp16
UNet, not its 7 GB together) and the activations. The price is the host-to-GPU copies of every request.
A transform: `Pipeline.apply(offload)` installs it and the state records "offload".
"""

from __future__ import annotations

import torch

from ldmkit.errors import InvalidRequest
from ldmkit.model_state import ModelState


def check_offload(device: torch.device, fast: bool = False) -> None:
    """Refuse offload where it cannot run: before a model loads (the CLIs), and in `offload`."""
    if device.type != "cuda":
        raise InvalidRequest(f"--offload needs a CUDA GPU (it keeps the models on the CPU between runs), not {device}")
    if fast:
        raise InvalidRequest("--offload does not go with --fast (compiled models and CUDA graphs stay on the GPU)")


def offload(state: ModelState) -> ModelState:
    """The state with its models offloaded to the CPU between their runs on the state's CUDA device."""
    check_offload(state.device, fast=state.unet_forward is not None or state.vae_decode is not None)
    return install_offload_hooks(state)


def install_offload_hooks(state: ModelState) -> ModelState:
    """The hooks on every model of the state, executing on state.device (checked by `offload`)."""
    from accelerate import cpu_offload_with_hook

    hook, hooks = None, []
    for module in (state.text_encoder, state.text_encoder_2, state.unet, state.vae):
        if module is None:  # the SDXL refiner has no CLIP ViT-L
            continue
        torch.nn.Module.to(module, "cpu")
        _, hook = cpu_offload_with_hook(module, state.device, prev_module_hook=hook)
        hooks.append(hook)
    return state.with_transform("offload", offload_hooks=tuple(hooks))
