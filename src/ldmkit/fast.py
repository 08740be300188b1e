"""The GPU fast path: exact speed-ups for a loaded `Pipeline`, applied in place.

Each one leaves the arithmetic the same up to fp16 rounding (measured: docs/benchmarks.md):
  - fp16 weights on CUDA (tensor cores; the activations follow the weights);
  - channels_last memory layout for the UNet and the VAE (cuDNN's NHWC convolutions);
  - fused QKV projections (one matmul for q, k, v in self-attention, one for k, v in
    cross-attention), whose attention processor runs PyTorch's SDPA (flash attention);
  - torch.compile of the UNet and of the VAE decoder; with mode="reduce-overhead" the compiled
    UNet replays as a CUDA graph, which removes the per-kernel launch cost that bounds a 512 px
    step on a fast GPU.
Approximate speed-ups (fewer steps, caches of UNet features, lower precision than fp16) are not
here: they change the picture and must be asked for by name.
"""

from __future__ import annotations

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def make_fast(
    pipe,
    *,
    channels_last: bool | None = None,
    fuse_qkv: bool | None = None,
    compile: bool | None = None,
    mode: str = "reduce-overhead",
    inductor_options: dict | None = None,
) -> None:
    """Apply the exact speed-ups to `pipe` (an ldmkit.Pipeline) in place.

    `compile=None` compiles on CUDA only: that is where it was measured to pay; on the CPU the
    compile time (minutes) outweighs what it saves on a few images. `channels_last` and `fuse_qkv`
    (None) follow `compile`: on an H100 both together made the eager UNet slower; under compile,
    fused QKV made it 2% faster and channels_last is diffusers' advice (docs/benchmarks.md).
    Fused attention reads `to_qkv`/`to_kv`, so LoRA adapters put on to_q/to_k/to_v afterwards are
    silently unused: unfuse (`unet.unfuse_qkv_projections()`) while such a LoRA is applied.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    on_cuda = pipe.device.type == "cuda"
    compile = on_cuda if compile is None else compile
    channels_last = compile if channels_last is None else channels_last
    fuse_qkv = compile if fuse_qkv is None else fuse_qkv
    if on_cuda and pipe.dtype == torch.float32:
        use_fp16(pipe)
    unet, vae = _original(pipe.unet), pipe.vae
    if fuse_qkv:
        # FusedAttnProcessor2_0 calls F.scaled_dot_product_attention: SDPA comes with the fusion.
        unet.fuse_qkv_projections()
        vae.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if compile:
        compile_models(pipe, mode, inductor_options)


def use_fp16(pipe) -> None:
    """Cast the models to fp16; later stages read `pipe.dtype`, so it follows."""
    for module in (pipe.text_encoder, _original(pipe.unet), pipe.vae):
        torch.nn.Module.to(module, dtype=torch.float16)
    pipe.dtype = torch.float16


def compile_models(pipe, mode: str = "reduce-overhead", inductor_options: dict | None = None) -> None:
    """torch.compile the UNet (every step) and the VAE decoder (once an image), as diffusers recommends.

    The compiled decoder replaces `vae.decode` on this VAE instance only; the UNet wrapper forwards
    attribute reads (`.config`, `.dtype`) to the module it wraps.
    """
    if isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        return  # already compiled: compiling twice would only stack wrappers
    from torch._inductor import list_mode_options

    # torch.compile takes a mode or options, not both: spell the mode out as its options.
    how = {"options": {**list_mode_options(mode), **inductor_options}} if inductor_options else {"mode": mode}
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, **how)
    pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, **how)


def _original(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper, or the module itself."""
    return getattr(module, "_orig_mod", module)
