"""The GPU fast path: exact speed-ups for a loaded `Pipeline`, applied in place.

Each one leaves the arithmetic the same up to fp16 rounding (measured: docs/benchmarks.md):
  - fp16 weights on CUDA (tensor cores; the activations follow the weights);
  - channels_last memory layout for the UNet and the VAE (cuDNN's NHWC convolutions);
  - fused QKV projections (one matmul for q, k, v in self-attention, one for k, v in
    cross-attention), whose attention processor runs PyTorch's SDPA (cuDNN or flash attention kernels);
  - torch.compile of the UNet and of the VAE decoder, saved to disk by ldmkit.precompile so that a
    second process loads them instead of tracing the models again;
  - the compiled UNet call replayed as a CUDA graph (ldmkit.cuda_graphs), which removes the
    per-kernel launch cost that bounds a 512 px step on a fast GPU.
Approximate speed-ups (fewer steps, caches of UNet features, lower precision than fp16) are not
here: they change the picture and must be asked for by name.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ldmkit.tiled_vae import will_tile

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Modes whose options turn on inductor's own CUDA graphs: those compile in-process, as torch.compile does.
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def make_fast(
    pipe,
    *,
    channels_last: bool | None = None,
    fuse_qkv: bool | None = None,
    compile: bool | None = None,
    mode: str = "default",
    inductor_options: dict | None = None,
    cuda_graphs: bool = True,
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
        compile_models(pipe, mode, inductor_options, cuda_graphs)


def use_fp16(pipe) -> None:
    """Cast the models to fp16; later stages read `pipe.dtype`, so it follows."""
    for module in (pipe.text_encoder, _original(pipe.unet), pipe.vae):
        torch.nn.Module.to(module, dtype=torch.float16)
    pipe.dtype = torch.float16


def compile_models(pipe, mode: str = "default", inductor_options: dict | None = None, cuda_graphs: bool = True) -> None:
    """Compile the UNet (every step) and the VAE decoder (once an image) in place.

    In the default mode both go through ldmkit.precompile (loaded from disk after the first process)
    and, on CUDA with `cuda_graphs`, the UNet call replays as a CUDA graph. Modes with inductor's own CUDA graphs
    ("reduce-overhead", "max-autotune") use plain torch.compile, as diffusers' docs do.
    The UNet's stand-in forwards attribute reads (`.config`, `.dtype`) to the module it wraps; the
    compiled decoder replaces `vae.decode` on this VAE instance only.
    """
    if hasattr(pipe.unet, "_orig_mod"):
        return  # already compiled: compiling twice would only stack wrappers
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode), **(inductor_options or {})}
    vae = pipe.vae
    if mode in INDUCTOR_GRAPH_MODES:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, options=options)
        vae.decode = torch.compile(vae.decode, fullgraph=True, options=options)
        return
    from ldmkit.precompile import PrecompiledCall

    unet_call = PrecompiledCall(unet_forward, pipe.unet, options)
    if cuda_graphs and pipe.device.type == "cuda":
        from ldmkit.cuda_graphs import CUDAGraphed

        unet_call = CUDAGraphed(unet_call, pipe.unet)
    pipe.unet = FastUNet(pipe.unet, unet_call)
    vae.decode = FastDecode(vae, PrecompiledCall(vae_decode, vae, options))


def unet_forward(unet, sample, timestep, encoder_hidden_states):
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def vae_decode(vae, latents):
    return type(vae).decode(vae, latents, return_dict=False)[0]  # the class's: vae.decode is the stand-in


class FastUNet:
    """Stands in for the UNet: the pipeline's calls go to the compiled call, attribute reads to the UNet."""

    def __init__(self, unet, call):
        self._orig_mod, self._call = unet, call

    def __getattr__(self, name):  # only for names not set in __init__
        if name in ("_orig_mod", "_call"):
            raise AttributeError(name)
        return getattr(self._orig_mod, name)

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        if kwargs or encoder_hidden_states is None:  # what the pipeline never passes: not compiled for it
            return self._orig_mod(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
        # One graph for every sampler: the UNet embeds timesteps as float32 whatever their dtype.
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        output = self._call(sample, timestep, encoder_hidden_states)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)


class FastDecode:
    """Stands in for `vae.decode` with the same signature, compiled for the VAE's dtype at the time.

    The pipeline's retry of an fp16 overflow casts the VAE to fp32: that rare call runs eager rather
    than compiling for minutes. So do tiled decodes (ldmkit.tiled_vae swaps layers' forward per tile).
    """

    def __init__(self, vae, call):
        self.vae, self._call, self.dtype = vae, call, vae.dtype

    def __call__(self, latents, return_dict=True, **kwargs):
        if kwargs or latents.dtype != self.dtype or will_tile(self.vae, latents):
            return type(self.vae).decode(self.vae, latents, return_dict=return_dict, **kwargs)
        image = self._call(latents)
        return DecoderOutput(sample=image) if return_dict else (image,)


def _original(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper or FastUNet, or the module itself."""
    return getattr(module, "_orig_mod", module)
