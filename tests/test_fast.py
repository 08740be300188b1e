"""make_fast: what it changes in a Pipeline's models and records in its state, and that the pictures stay the same
(tiny model, CPU)."""

import functools
import logging

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0
from support.sdxl import make_tiny_sdxl_components

from ldmkit import Pipeline
from ldmkit.fast import FastTextEncoder, FastUNet, compile_models, unet_forward, use_fp16

KWARGS = {
    "prompt": "an otter in a river",
    "negative_prompt": "blurry",
    "steps": 4,
    "sampler": "DDIM",
    "seed": 7,
    "width": 16,
    "height": 16,
    "num_images": 2,
}


SDXL_KWARGS = {**KWARGS, "width": 24, "sampler": "Euler"}  # non-square: time_ids hold (height, width)


def pixels(pipe, **kwargs):
    return np.stack([np.asarray(image, dtype=int) for image in pipe.generate(**{**KWARGS, **kwargs}).images])


def cpu_pipeline(components):
    return Pipeline(components, torch.device("cpu"), torch.float32)


def test_make_fast_on_cpu_changes_nothing(tiny_components):
    # Compile, fp16 and the layouts that serve the compiled UNet were measured to pay on CUDA only.
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    pipe.make_fast()
    assert pipe.state.transforms == () and pipe.state.run_unet is pipe.unet
    assert pipe.dtype == torch.float32
    assert not any(isinstance(p, FusedAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_qkv_and_channels_last_keep_the_images(tiny_components):
    eager = pixels(Pipeline(tiny_components, torch.device("cpu"), torch.float32))
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    pipe.make_fast(channels_last=True, fuse_qkv=True, compile=False)
    assert pipe.state.transforms == ("fused_qkv", "channels_last")
    for model in (pipe.unet, pipe.vae):
        processors = model.attn_processors.values()
        assert processors and all(isinstance(p, FusedAttnProcessor2_0) for p in processors)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(pixels(pipe) - eager).max() <= 1


@pytest.mark.slow  # compiling the tiny UNet and decoder with inductor: over a minute on a CPU
def test_compile_models_wraps_unet_and_decoder_once(tiny_components, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LDMKIT_COMPILE_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="ldmkit.precompile")
    eager = pixels(Pipeline(tiny_components, torch.device("cpu"), torch.float32))
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    unet = pipe.unet
    pipe.apply(compile_models)
    forward, decode = pipe.state.unet_forward, pipe.state.vae_decode
    assert isinstance(forward, FastUNet) and forward.unet is unet and pipe.unet is unet
    assert pipe.state.transforms == ("compiled:default",)
    pipe.apply(compile_models)
    assert pipe.state.unet_forward is forward and pipe.state.vae_decode is decode
    assert np.abs(pixels(pipe) - eager).max() <= 1
    pipe.generate(**{**KWARGS, "sampler": "Euler"})  # float timesteps, where DDIM's are integers
    assert len(forward.call.compiled) == 1  # one compiled UNet serves both samplers
    assert len(list(tmp_path.glob("unet_forward-*.bin"))) == 1 and len(list(tmp_path.glob("vae_decode-*.bin"))) == 1

    caplog.clear()
    again = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    again.apply(compile_models)
    assert np.array_equal(pixels(again), pixels(pipe))
    assert caplog.text.count("precompile: loaded") == 2 and "saved" not in caplog.text


class RecordedCall:
    """Stands in for the compiled call (the UNet run eagerly through unet_forward) and keeps what it was given."""

    def __init__(self, unet):
        self.call, self.calls = functools.partial(unet_forward, unet), []

    def __call__(self, *tensors):
        self.calls.append(tensors)
        return self.call(*tensors)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_sdxl_calls_take_the_compiled_path_with_their_added_conditioning(kind):
    # Issue 18: SDXL's added_cond_kwargs (pooled text_embeds, time_ids) used to send every call to the eager UNet.
    components = make_tiny_sdxl_components(seed=3, kind=kind)
    eager = pixels(cpu_pipeline(components), **SDXL_KWARGS)
    pipe = cpu_pipeline(components)
    recorded = RecordedCall(pipe.unet)
    pipe.apply(lambda state: state.with_transform("compiled:test", unet_forward=FastUNet(state.unet, recorded)))
    assert np.array_equal(pixels(pipe, **SDXL_KWARGS), eager)
    assert len(recorded.calls) == SDXL_KWARGS["steps"]  # every step, none eager
    sample, timestep, context, text_embeds, time_ids = recorded.calls[0]
    rows = 2 * SDXL_KWARGS["num_images"]  # the guidance batch
    assert sample.shape == (rows, 4, 8, 12) and timestep.dtype == torch.float32 and context.shape[0] == rows
    assert text_embeds.shape == (rows, 8)
    # size and crop conditioning: (height, width, top, left) then the target size, or the refiner's aesthetic score
    last = [[2.5], [6.0]] if kind == "refiner" else [[16, 24], [16, 24]]
    assert time_ids.tolist() == [[16, 24, 0, 0, *last[0]]] * 2 + [[16, 24, 0, 0, *last[1]]] * 2


def test_fast_unet_runs_what_it_was_not_compiled_for_eagerly():
    components = make_tiny_sdxl_components(seed=3)
    unet, recorded = components.unet, RecordedCall(components.unet)
    fast = FastUNet(unet, recorded)
    sample, context = torch.randn(1, 4, 2, 2), torch.randn(1, 77, 16)
    added = {"text_embeds": torch.randn(1, 8), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        expected = unet(sample, 10, context, added_cond_kwargs=added).sample
        torch.testing.assert_close(fast(sample, 10, context, added_cond_kwargs=added).sample, expected)
        assert len(recorded.calls) == 1
        # a key the compiled call has no place for: the UNet itself runs (and ignores it, as diffusers does)
        extra = fast(sample, 10, context, added_cond_kwargs={**added, "extra": torch.ones(1)})
        torch.testing.assert_close(extra.sample, expected)
        with pytest.raises(ValueError, match="time_ids"):  # diffusers' own refusal: the call reached the UNet
            fast(sample, 10, context, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    assert len(recorded.calls) == 1


def test_sdxl_base_and_refiner_with_fused_qkv_and_channels_last_keep_the_images():
    base, refiner = make_tiny_sdxl_components(seed=3), make_tiny_sdxl_components(seed=4, kind="refiner")
    kwargs = {**SDXL_KWARGS, "refiner_switch": 0.5}
    eager = pixels(cpu_pipeline(base), **kwargs, refiner=cpu_pipeline(refiner))
    fast_base, fast_refiner = cpu_pipeline(base), cpu_pipeline(refiner)
    for pipe in (fast_base, fast_refiner):
        pipe.make_fast(channels_last=True, fuse_qkv=True, compile=False)
        assert pipe.state.transforms == ("fused_qkv", "channels_last")
    assert np.abs(pixels(fast_base, **kwargs, refiner=fast_refiner) - eager).max() <= 1


@pytest.mark.slow  # compiling the tiny SDXL UNet and decoder with inductor: over a minute on a CPU
def test_compiled_sdxl_keeps_the_images_and_loads_from_the_saved_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LDMKIT_COMPILE_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="ldmkit.precompile")
    components = make_tiny_sdxl_components(seed=3)
    eager = pixels(cpu_pipeline(components), **SDXL_KWARGS)
    pipe = cpu_pipeline(components)
    pipe.apply(compile_models)
    assert np.abs(pixels(pipe, **SDXL_KWARGS) - eager).max() <= 1
    assert len(pipe.state.unet_forward.call.compiled) == 1  # every step through the one compiled UNet call
    assert "saved" in caplog.text and "not saved" not in caplog.text

    caplog.clear()
    again = cpu_pipeline(components)
    again.apply(compile_models)
    assert np.abs(pixels(again, **SDXL_KWARGS) - eager).max() <= 1
    assert caplog.text.count("precompile: loaded") == 2 and "saved" not in caplog.text


def test_use_fp16_casts_both_sdxl_text_encoders_and_skips_the_refiners_missing_one():
    for kind in ("base", "refiner"):
        pipe = cpu_pipeline(make_tiny_sdxl_components(kind=kind))
        pipe.apply(use_fp16)
        encoders = [m for m in (pipe.state.text_encoder, pipe.state.text_encoder_2) if m is not None]
        assert len(encoders) == (1 if kind == "refiner" else 2)
        assert all(next(m.parameters()).dtype == torch.float16 for m in encoders)


def test_modes_with_inductor_graphs_use_plain_torch_compile(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    pipe.apply(lambda state: compile_models(state, mode="reduce-overhead"))
    assert isinstance(pipe.state.unet_forward, torch._dynamo.eval_frame.OptimizedModule)


def test_use_fp16_casts_models_and_pipeline_dtype(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    pipe.apply(use_fp16)
    assert pipe.dtype == torch.float16 and pipe.state.transforms == ("fp16",)
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert next(model.parameters()).dtype == torch.float16


def test_unknown_compile_mode_is_refused(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="compile mode"):
        pipe.make_fast(mode="fastest")


class RecordedGraph:
    """Stands in for CUDAGraphed(fn, module) on the CPU: runs fn and counts the calls."""

    def __init__(self, fn, module):
        self.fn, self.calls = fn, 0

    def __call__(self, *tensors):
        self.calls += 1
        return self.fn(*tensors)


def assert_same_outputs(got, expected):
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    for name, value in expected.items():
        values = value if isinstance(value, tuple) else (value,)
        got_values = got[name] if isinstance(value, tuple) else (got[name],)
        assert len(got_values) == len(values)
        for a, b in zip(got_values, values):
            assert torch.equal(a, b), name


def test_fast_text_encoder_rebuilds_each_encoders_output_from_the_flat_graph_outputs():
    components = make_tiny_sdxl_components(seed=3)
    ids = torch.randint(0, 1000, (2, 77))
    for encoder in (components.text_encoder, components.text_encoder_2):  # CLIPTextModel, ...WithProjection
        fast = FastTextEncoder(encoder, graph=RecordedGraph)
        assert fast.config is encoder.config and fast.device == encoder.device  # read through to the encoder
        with torch.no_grad():
            for hidden in (False, True):
                expected = encoder(ids, output_hidden_states=hidden)
                assert_same_outputs(fast(ids, output_hidden_states=hidden), expected)
                assert fast.calls[hidden].graphed.calls == 1
            assert fast(ids)[0] is not None and fast.calls[False].graphed.calls == 2
            # an argument the graphs were not made for: the encoder itself
            masked = fast(ids, attention_mask=torch.ones_like(ids))
            assert_same_outputs(masked, encoder(ids, attention_mask=torch.ones_like(ids)))
        assert fast.calls[False].graphed.calls == 2


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_generation_encodes_prompts_through_the_states_text_encoder_calls(tiny_components, family):
    components = make_tiny_sdxl_components(seed=3) if family == "sdxl" else tiny_components
    kwargs = SDXL_KWARGS if family == "sdxl" else KWARGS
    eager = pixels(cpu_pipeline(components), **kwargs)
    pipe = cpu_pipeline(components)
    names = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    fast = {f"{name}_forward": FastTextEncoder(getattr(pipe.state, name), graph=RecordedGraph) for name in names}
    pipe.apply(lambda state: state.with_transform("graphed-text:test", **fast))
    assert np.array_equal(pixels(pipe, **kwargs), eager)
    # SDXL takes the penultimate hidden states (and bigG's pooled embedding): the hidden-states graphs
    hidden = family == "sdxl"
    assert all(encoder.calls[hidden].graphed.calls == 1 and encoder.calls[not hidden].graphed.calls == 0
               for encoder in fast.values())  # fmt: skip


def test_compile_models_graphs_the_text_encoders_on_cuda_only(tiny_components):
    pipe = cpu_pipeline(tiny_components)
    pipe.apply(compile_models)  # builds the wrappers; nothing compiles before a call
    assert pipe.state.text_encoder_forward is None and pipe.state.run_text_encoder is pipe.text_encoder


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fast_text_encoders_replay_cuda_graphs_with_the_eager_outputs():
    components = make_tiny_sdxl_components(seed=3)
    for encoder in (components.text_encoder, components.text_encoder_2):
        encoder.cuda()
        fast = FastTextEncoder(encoder)
        with torch.inference_mode():
            for seed in (0, 1):  # new ids through the same graph
                ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(seed)).cuda()
                for hidden in (False, True):
                    expected = encoder(ids, output_hidden_states=hidden)
                    got = fast(ids, output_hidden_states=hidden)
                    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
                    torch.testing.assert_close(got.to_tuple(), expected.to_tuple())
        assert all(len(call.graphed.captured) == 1 for call in fast.calls.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_returns_copies_of_tuple_outputs():
    from ldmkit.cuda_graphs import CUDAGraphed

    module = torch.nn.Linear(8, 8).cuda()
    call = CUDAGraphed(lambda x: (module(x), 2 * x), module)
    x = torch.randn(4, 8, device="cuda")
    first = call(x)
    torch.testing.assert_close(first, (module(x), 2 * x))
    call(3 * x)  # a replay writes the graph's outputs: the copies handed out before stay
    torch.testing.assert_close(first, (module(x), 2 * x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_replays_and_recaptures_when_weights_move():
    from ldmkit.cuda_graphs import CUDAGraphed

    module = torch.nn.Linear(8, 8).cuda()
    call = CUDAGraphed(lambda x: module(x), module)
    x = torch.randn(4, 8, device="cuda")
    torch.testing.assert_close(call(x), module(x))
    torch.testing.assert_close(call(2 * x), module(2 * x))  # new values through the same graph
    assert len(call.captured) == 1
    module.to(torch.float64).to(torch.float32)  # new weight storage: the old graph would read freed memory
    torch.testing.assert_close(call(x), module(x))


@pytest.mark.slow  # compiles the tiny SDXL UNet and decoder (about a minute)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_sdxl_on_cuda_runs_every_step_through_one_cuda_graph_and_keeps_the_images(tmp_path, monkeypatch):
    from ldmkit.cuda_graphs import CUDAGraphed

    monkeypatch.setenv("LDMKIT_COMPILE_CACHE", str(tmp_path))
    components = make_tiny_sdxl_components(seed=3)
    cuda = torch.device("cuda")
    eager = pixels(Pipeline(components, cuda, torch.float32), **SDXL_KWARGS)
    pipe = Pipeline(components, cuda, torch.float32)
    pipe.apply(compile_models)  # fp32 as the eager run: compile and CUDA graphs alone
    assert np.abs(pixels(pipe, **SDXL_KWARGS) - eager).max() <= 1
    graphed = pipe.state.unet_forward.call
    assert isinstance(graphed, CUDAGraphed) and len(graphed.captured) == 1 and len(graphed.fn.compiled) == 1
    for encoder in (pipe.state.text_encoder_forward, pipe.state.text_encoder_2_forward):  # prompts: graphs too
        assert isinstance(encoder, FastTextEncoder) and len(encoder.calls[True].graphed.captured) == 1
