"""The GPU fast path: exact speed-ups for a loaded `Pipeline`, applied in place.

Each one leaves the arithmetic the same up to fp16 rounding (measured: docs/benchmarks.md):
  - fp16 weights on CUDA (tensor cores; the activations follow the weights);
  - channels_last memory layout for the UNet and the VAE (cuDNN's NHWC convolutions);
  - fused QKV projections (one matmul for q, k, v in self-attention, one for k, v in
    cross-attention), whose attention processor runs PyTorch's SDPA (cuDNN or flash attention kernels);
  - torch.compile of the UNet and of the VAE decoder, saved to disk by ldmkit.precompile so that a
    second process loads them instead of tracing the models again;
  - the compiled UNet call replayed as a CUDA graph (ldmkit.cuda_graphs), which removes the
    per-kernel launch cost that bounds a 512 px step on a fast GPU; the text encoders replay as CUDA
    graphs too (eager inside: they run once a request, so compiling them would not pay).
Approximate speed-ups (fewer steps, caches of UNet features, lower precision than fp16) are not
here: they change the picture and must be asked for by name.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ldmkit.model_state import ModelState

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Modes whose options turn on inductor's own CUDA graphs: those compile in-process, as torch.compile does.
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def make_fast(
    state: ModelState,
    *,
    channels_last: bool | None = None,
    fuse_qkv: bool | None = None,
    compile: bool | None = None,
    mode: str = "default",
    inductor_options: dict | None = None,
    cuda_graphs: bool = True,
) -> ModelState:
    """The exact speed-ups applied to the state's models (in place) and recorded: Pipeline.make_fast installs it.

    `compile=None` compiles on CUDA only: that is where it was measured to pay; on the CPU the
    compile time (minutes) outweighs what it saves on a few images. `channels_last` and `fuse_qkv`
    (None) follow `compile`: on an H100 both together made the eager UNet slower; under compile,
    fused QKV made it 2% faster and channels_last is diffusers' advice (docs/benchmarks.md).
    Fused attention reads `to_qkv`/`to_kv`, so LoRA adapters put on to_q/to_k/to_v afterwards would be
    silently unused: the Pipeline refuses LoRAs once "fused_qkv" is on record.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    on_cuda = state.device.type == "cuda"
    compile = on_cuda if compile is None else compile
    channels_last = compile if channels_last is None else channels_last
    fuse_qkv = compile if fuse_qkv is None else fuse_qkv
    if on_cuda and state.dtype == torch.float32:
        state = use_fp16(state)
    if fuse_qkv:
        # FusedAttnProcessor2_0 calls F.scaled_dot_product_attention: SDPA comes with the fusion.
        state.unet.fuse_qkv_projections()
        state.vae.fuse_qkv_projections()
        state = state.with_transform("fused_qkv")
    if channels_last:
        state.unet.to(memory_format=torch.channels_last)
        state.vae.to(memory_format=torch.channels_last)
        state = state.with_transform("channels_last")
    if compile:
        state = compile_models(state, mode, inductor_options, cuda_graphs)
    return state


def use_fp16(state: ModelState) -> ModelState:
    """The models cast to fp16; later stages read the state's dtype, so the activations follow."""
    for module in (state.text_encoder, state.text_encoder_2, state.unet, state.vae):
        if module is not None:  # SD has no second text encoder, the SDXL refiner no first one
            torch.nn.Module.to(module, dtype=torch.float16)
    return state.with_transform("fp16", dtype=torch.float16)


def compile_models(
    state: ModelState, mode: str = "default", inductor_options: dict | None = None, cuda_graphs: bool = True
) -> ModelState:
    """The UNet (every step) and the VAE decoder (once an image) compiled, as the state's unet_forward and
    vae_decode.

    In the default mode both go through ldmkit.precompile (loaded from disk after the first process)
    and, on CUDA with `cuda_graphs`, the UNet call replays as a CUDA graph. Modes with inductor's own CUDA graphs
    ("reduce-overhead", "max-autotune") use plain torch.compile, as diffusers' docs do.
    """
    if state.has("compiled"):
        return state  # compiling twice would only stack wrappers
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode), **(inductor_options or {})}
    unet, vae = state.unet, state.vae
    if mode in INDUCTOR_GRAPH_MODES:
        compiled_unet = torch.compile(unet, fullgraph=True, options=options)
        compiled_decode = torch.compile(vae.decode, fullgraph=True, options=options)
        return state.with_transform(f"compiled:{mode}", unet_forward=compiled_unet, vae_decode=compiled_decode)
    from ldmkit.precompile import PrecompiledCall

    unet_call, encoders = PrecompiledCall(unet_forward, unet, options), {}
    if cuda_graphs and state.device.type == "cuda":
        from ldmkit.cuda_graphs import CUDAGraphed

        unet_call = CUDAGraphed(unet_call, unet)
        encoders = {
            f"{name}_forward": FastTextEncoder(encoder)
            for name, encoder in (("text_encoder", state.text_encoder), ("text_encoder_2", state.text_encoder_2))
            if encoder is not None  # the SDXL refiner has no CLIP ViT-L
        }
    fast_decode = FastDecode(vae, PrecompiledCall(vae_decode, vae, options))
    return state.with_transform(
        f"compiled:{mode}", unet_forward=FastUNet(unet, unet_call), vae_decode=fast_decode, **encoders
    )


# The UNet inputs a family adds, as `added_cond_kwargs` (SDXL's pooled text embedding and size/crop numbers):
# the compiled call takes them as tensors after the text states, in this order.
ADDED_CONDITIONING = ("text_embeds", "time_ids")


def unet_forward(unet, sample, timestep, encoder_hidden_states, *added):
    """The UNet call the fast path compiles; `added` holds the ADDED_CONDITIONING tensors, or nothing (SD)."""
    added_cond_kwargs = dict(zip(ADDED_CONDITIONING, added)) if added else None
    return unet(
        sample,
        timestep,
        encoder_hidden_states=encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]


def vae_decode(vae, latents):
    return vae.decode(latents, return_dict=False)[0]


class FastUNet:
    """Called as the UNet is; the pipeline's calls go to the compiled call, any other to the UNet itself.

    The pipeline's calls are SD's (text states only) and SDXL's (with added_cond_kwargs text_embeds and time_ids,
    base and refiner alike); the compiled call takes the added conditioning as tensors (ADDED_CONDITIONING).
    """

    def __init__(self, unet, call):
        self.unet, self.call = unet, call

    def __call__(
        self, sample, timestep, encoder_hidden_states=None, return_dict=True, added_cond_kwargs=None, **kwargs
    ):
        added = _added_tensors(added_cond_kwargs)
        if kwargs or encoder_hidden_states is None or added is None:  # what the pipeline never passes: eager
            return self.unet(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=return_dict,
                **kwargs,
            )  # fmt: skip
        # One graph for every sampler: the UNet embeds timesteps as float32 whatever their dtype.
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        output = self.call(sample, timestep, encoder_hidden_states, *added)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)


def _added_tensors(added_cond_kwargs: dict | None) -> tuple | None:
    """The added conditioning as the compiled call takes it: () for none, None when it is not ADDED_CONDITIONING."""
    if not added_cond_kwargs:
        return ()
    if set(added_cond_kwargs) != set(ADDED_CONDITIONING):
        return None
    return tuple(added_cond_kwargs[name] for name in ADDED_CONDITIONING)


class FastDecode:
    """Called as `vae.decode` is, compiled for the VAE's dtype at the time.

    The pipeline's retry of an fp16 overflow casts the VAE to fp32: that rare call runs eager rather
    than compiling for minutes. Tiled decodes never come here (ModelState.decode runs ldmkit.tiled_vae).
    """

    def __init__(self, vae, call):
        self.vae, self.call, self.dtype = vae, call, vae.dtype

    def __call__(self, latents, return_dict=True, **kwargs):
        if kwargs or latents.dtype != self.dtype:
            return self.vae.decode(latents, return_dict=return_dict, **kwargs)
        image = self.call(latents)
        return DecoderOutput(sample=image) if return_dict else (image,)


class FastTextEncoder:
    """Called as a transformers CLIP text encoder is, `encoder(ids)` or `encoder(ids, output_hidden_states=True)`, on
    CUDA each from a CUDA graph (ldmkit.cuda_graphs); every attribute is the encoder's own.

    The SDXL encoders ran eagerly before the first step: 627 kernel launches while the GPU idled 27 ms of 29.5
    (docs/benchmarks.md). Calls with other arguments run the encoder itself. `graph(fn, module)` makes the replayed
    call (CUDAGraphed; tests pass a stand-in).
    """

    def __init__(self, encoder, graph=None):
        from ldmkit.cuda_graphs import CUDAGraphed

        self.encoder = encoder
        self.calls = {hidden: _FlatOutputCall(encoder, hidden, graph or CUDAGraphed) for hidden in (False, True)}

    def __getattr__(self, name):
        return getattr(self.encoder, name)  # config, device, text_model, offload hooks: the encoder's

    def __call__(self, input_ids, output_hidden_states=False, **kwargs):
        if kwargs:
            return self.encoder(input_ids, output_hidden_states=output_hidden_states, **kwargs)
        return self.calls[bool(output_hidden_states)](input_ids)


class _FlatOutputCall:
    """The encoder's output (a transformers ModelOutput holding tensors and a tuple of hidden states) flattened to
    the tuple of tensors a CUDA graph returns, and rebuilt as the same ModelOutput after each replay."""

    def __init__(self, encoder, output_hidden_states: bool, graph):
        self.encoder, self.output_hidden_states = encoder, output_hidden_states
        self.layout = None  # (ModelOutput class, [(field, tuple length or None)]): set by every eager run
        self.graphed = graph(self.flat_outputs, encoder)

    def flat_outputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.encoder(input_ids, output_hidden_states=self.output_hidden_states, return_dict=True)
        fields, flat = [], []
        for name, value in output.items():  # a ModelOutput's items leave out its None fields
            is_tuple = isinstance(value, tuple)
            fields.append((name, len(value) if is_tuple else None))
            flat.extend(value if is_tuple else (value,))
        self.layout = (type(output), fields)
        return tuple(flat)

    def __call__(self, input_ids: torch.Tensor):
        flat = iter(self.graphed(input_ids))
        output_class, fields = self.layout
        return output_class(
            **{name: next(flat) if n is None else tuple(next(flat) for _ in range(n)) for name, n in fields}
        )
