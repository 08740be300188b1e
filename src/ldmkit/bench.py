"""`ldm bench`: diffusers' pipeline against ours, eager and fast, in one process.

Every row starts from the same weights (SD1.5- or, with `--family sdxl`, SDXL-shaped random ones by default:
speed does not depend on the values) and the same starting noise per seed, and reports speed, first-image time
(compile included), peak GPU memory, the UNet's achieved TFLOP/s and PSNR against diffusers' eager images.
Ablation rows (one speed-up at a time) are in the repository's benchmarks/ (`python -m benchmarks table
--ablations`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse on the moon"
GUIDANCE = 7.5
# Rows in the order they run. Compiled rows after the first find inductor's on-disk cache warm,
# so ours-fast runs before diffusers-compiled: our first-image time is the cold one.
DEFAULT_ROWS = ("diffusers", "ours", "ours-fast", "diffusers-compiled")
# SDXL adds model CPU offload (`--offload`), for the peak GPU memory it saves at 1024 px.
FAMILY_ROWS = {"sd15": DEFAULT_ROWS, "sdxl": ("diffusers", "ours", "ours-offload", "ours-fast", "diffusers-compiled")}
CUDA_ONLY_ROWS = ("diffusers-compiled", "ours-offload")  # compiling takes minutes on a CPU; offload needs CUDA
DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
clock = time.perf_counter  # wall-clock seconds of the timed calls (tests put a clock of their own here)


@dataclasses.dataclass
class RowResult:
    name: str
    its: float = math.nan  # steps / median end-to-end latency
    latency_s: float = math.nan  # median end-to-end latency: prompt to 8-bit images, decode included
    first_image_s: float = math.nan  # setup (compile included) plus the first call
    s_per_image: float = math.nan  # latency / images per call
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated while generating, resident weights included
    psnr_eager: float | None = None  # dB against the diffusers row's images, same seeds
    psnr_compiled: float | None = None  # dB against the diffusers-compiled row's images
    unet_ms: float | None = None  # one UNet call alone (CUDA events, mean of back-to-back calls), the guidance batch
    decode_ms: float | None = None  # one VAE decode alone
    unet_tflops: float | None = None  # the UNet call's FLOPs (torch.utils.flop_counter) / unet_ms
    run_tflops: float | None = None  # steps x the UNet call's FLOPs / latency: the UNet's share of the whole run
    error: str | None = None
    steps: int = 0


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="time diffusers against ldmkit (eager and fast) on this machine")
    add_arguments(bench)
    bench.set_defaults(func=run_bench)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model to load (a folder, cached repo id, single file, or 'default'); default: random weights of "
        "--family's shape",
    )
    parser.add_argument(
        "--family",
        default="sd15",
        choices=sorted(RANDOM_MODELS),
        help="the random model's shape when --model is not given (bundled configs, no download): SD1.5 or SDXL base",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels (default: the model's, 512 or 1024 for --family sdxl)",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first image")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls (seeds seed, seed+1, ...); the median is reported"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diffusers", action="store_true", help="only our rows (PSNR columns stay empty)")
    parser.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated rows, from {', '.join(RUNNER_NAMES)} (default: {', '.join(DEFAULT_ROWS)}; for "
        f"--family sdxl also ours-offload)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on GPUs, fp32 on the CPU"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here, after every row")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")


def main(argv: list[str] | None = None) -> int:
    """`python -m ldmkit.bench`: the same command without the rest of the CLI."""
    quiet_libraries()
    parser = argparse.ArgumentParser(prog="ldm bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


def quiet_libraries() -> None:
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_bench(args, runners: dict[str, Callable] | None = None, extra_rows: tuple[str, ...] = ()) -> int:
    """The table; `runners` and `extra_rows` let benchmarks/ add rows of its own after the default ones."""
    import torch

    from ldmkit.errors import InvalidRequest
    from ldmkit.params import GenerationParams
    from ldmkit.pipeline import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    runners = RUNNERS if runners is None else runners
    rows = select_rows(args, device, runners, extra_rows)
    if args.repeats < 1 or args.warmup < 0:
        raise InvalidRequest("--repeats must be at least 1, --warmup at least 0")
    size = args.size or DEFAULT_SIZE[args.family]
    request = GenerationParams(
        PROMPT, steps=args.steps, guidance=GUIDANCE, sampler=args.sampler, seed=args.seed,
        width=size, height=size, num_images=args.batch,
    )  # fmt: skip
    request.validate()
    request = request.resolved(size)
    dtype = resolve_dtype(args.dtype, device)

    log(f"bench: {describe_device(device)}, torch {torch.__version__}, {dtype}, rows {', '.join(rows)}")
    master = load_master(args.model, device, dtype, args.family)
    if args.size is None and args.model is not None:  # the size the loaded model was trained at
        size = master.unet.config.sample_size * vae_scale_factor(master)
        request = dataclasses.replace(request, width=size, height=size)
        request.validate()
    unet_flops = count_unet_flops(master, request, dtype)
    header = (
        f"{master.name}, {size}x{size}, {request.steps} {request.sampler} steps, "
        f"batch {request.num_images}, guidance {GUIDANCE}, {describe_device(device)}, "
        f"{str(dtype).removeprefix('torch.')}; one UNet call ({unet_input_rows(request)} rows): "
        f"{unet_flops / 1e12:.2f} TFLOP (torch.utils.flop_counter)"
    )
    results: list[RowResult] = []
    images: dict[str, list] = {}
    for name in rows:
        log(f"bench: row {name} ...")
        result, row_images = bench_row(name, runners[name], master, device, dtype, request, args.warmup, args.repeats)
        fill_tflops(result, unet_flops)
        results.append(result)
        if row_images is not None:
            images[name] = row_images
        fill_psnr(results, images)
        log(f"bench: {format_row(result)}")
        if args.out:
            args.out.write_text(format_table(header, results))
        if args.json:
            args.json.write_text(
                json.dumps({"setup": header, "rows": [dataclasses.asdict(r) for r in results]}, indent=1)
            )
    print(format_table(header, results), end="")
    return 1 if any(r.error for r in results) else 0


def select_rows(args, device, runners: dict[str, Callable], extra_rows: tuple[str, ...] = ()) -> list[str]:
    from ldmkit.errors import InvalidRequest

    if args.rows is None:
        rows = list(FAMILY_ROWS[args.family])
        if device.type != "cuda":
            # Compiling SD's UNet takes minutes on a CPU and was measured to pay on CUDA only.
            rows = [r for r in rows if r not in CUDA_ONLY_ROWS]
    else:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    rows += [r for r in extra_rows if r not in rows]
    if args.no_diffusers:
        rows = [r for r in rows if not r.startswith("diffusers")]
    unknown = [r for r in rows if r not in runners]
    if unknown or not rows:
        raise InvalidRequest(f"unknown rows {unknown}; choose from {', '.join(runners)}")
    return rows


# ---- weights ----


def load_master(model: str | None, device, dtype, family: str = "sd15"):
    """The weights every row copies, on the CPU in the run's dtype."""
    import torch

    from ldmkit import loading

    if model is None:
        components = RANDOM_MODELS[family](device)
    else:
        components = loading.load_components(None if model == "default" else model)
    for module in _models(components):
        torch.nn.Module.to(module, "cpu", dtype)
    return components


def _models(components) -> list:
    """The components' torch modules (SD has no text_encoder_2, the SDXL refiner no text_encoder)."""
    modules = (components.text_encoder, components.text_encoder_2, components.unet, components.vae)
    return [module for module in modules if module is not None]


def random_sd15(device, seed: int = 0):
    """SD1.5-shaped components (bundled configs) with random weights, initialised on `device` for speed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmkit import loading

    folder = loading.SD1_CONFIG
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return loading.Components(
        tokenizer=loading.load_tokenizer(),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=loading._scheduler_config(folder / "scheduler", None),
        source=str(folder),
        name="sd15-random",
    )


def random_sdxl(device, seed: int = 0):
    """SDXL-base-shaped components (bundled configs: 2.6B-parameter UNet, CLIP ViT-L and OpenCLIP bigG) with random
    weights, initialised on `device` for speed.

    The VAE's force_upcast is off, as in the fp16-fix SDXL VAE people use for speed: with it on, diffusers' pipeline
    decodes in fp32 and ours in fp16, and the rows would time different decodes.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldmkit import loading

    folder = loading.SDXL_BASE_CONFIG
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config({**AutoencoderKL.load_config(folder / "vae"), "force_upcast": False})
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return loading.Components(
        tokenizer=loading._folder_tokenizer(folder / "tokenizer"),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=loading._scheduler_config(folder / "scheduler", None),
        source=str(folder),
        name="sdxl-random",
        tokenizer_2=loading._folder_tokenizer(folder / "tokenizer_2"),
        text_encoder_2=text_encoder_2.eval(),
        pipeline_config=loading._sdxl_pipeline_config(loading._read_json(folder / "model_index.json")),
    )


RANDOM_MODELS = {"sd15": random_sd15, "sdxl": random_sdxl}


def place(master, device, dtype):
    """A fresh copy of the models on the device: rows change their models (fusion, layout, compile)."""
    import torch

    def copied(module):
        return None if module is None else torch.nn.Module.to(copy.deepcopy(module), device, dtype).eval()

    return dataclasses.replace(
        master,
        text_encoder=copied(master.text_encoder),
        text_encoder_2=copied(master.text_encoder_2),
        unet=copied(master.unet),
        vae=copied(master.vae),
    )


# ---- rows ----


def bench_row(name: str, runner: Callable, master, device, dtype, request, warmup: int, repeats: int):
    """Time one row (the same request for every row, seeds seed, seed + 1, ...); a row that fails is reported in
    the table and the others still run."""
    import torch

    result = RowResult(name, steps=request.steps)
    on_cuda = device.type == "cuda"
    row_images = None
    try:
        components = place(master, device, dtype)
        if on_cuda:
            torch.cuda.synchronize()
        start = clock()
        generate = runner(components, device, dtype, request)
        if on_cuda:
            # From here: the weights the row keeps on the GPU (none with offload, which moved them back) and what
            # generating adds, compiling included.
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        generate(request.seed)
        result.first_image_s = clock() - start
        for _ in range(warmup):
            generate(request.seed)
        latencies, row_images = [], []
        for k in range(repeats):
            start = clock()
            row_images.append(generate(request.seed + k))
            latencies.append(clock() - start)
        log(f"bench: {name} images: mean {row_images[0].mean():.1f}, std {row_images[0].std():.1f} (8-bit)")
        result.latency_s = statistics.median(latencies)
        result.its = request.steps / result.latency_s
        result.s_per_image = result.latency_s / request.num_images
        if on_cuda:
            result.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
            if generate.unet is not None:
                result.unet_ms, result.decode_ms = time_parts(generate, components, device, dtype, request)
    except Exception as error:  # noqa: BLE001 - one broken row must not lose the others' numbers
        traceback.print_exc()
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        row_images = None
    finally:
        components = generate = None
        release(device)
    return result, row_images


def time_parts(generate, components, device, dtype, request, calls: int = 20):
    """Mean ms of one UNet call and one VAE decode, called as the row's pipeline calls them.

    With the whole run's latency this says how much of a step is not the UNet: the sampler's small
    kernels, host syncs and Python.
    """

    try:
        # Made under the row's grad mode, as the pipeline makes its tensors: ours compiles per inference-ness.
        with generate.grad_mode():
            sample, timestep, kwargs = unet_inputs(components, request, device, dtype)
            latents = sample[: request.num_images]
            unet_ms = _mean_cuda_ms(lambda: generate.unet(sample, timestep, return_dict=False, **kwargs)[0], calls)
            decode_ms = _mean_cuda_ms(lambda: generate.decode(latents, return_dict=False)[0], calls)
        return unet_ms, decode_ms
    except Exception:  # noqa: BLE001 - the breakdown is extra; the row's numbers stand without it
        traceback.print_exc()
        return None, None


def unet_input_rows(request) -> int:
    """The UNet's batch in a step: both guidance halves of every image."""
    return 2 * request.num_images if request.guidance > 1 else request.num_images


def vae_scale_factor(components) -> int:
    return 2 ** (len(components.vae.config.block_out_channels) - 1)


def unet_inputs(components, request, device, dtype) -> tuple:
    """(sample, timestep, kwargs) of one UNet call of a step, random, shaped from the models' configs: the latents of
    the guidance batch, 77 text tokens and, for SDXL (addition_embed_type "text_time"), the pooled text embedding
    and the size/crop ids."""
    import torch

    config, rows = components.unet.config, unet_input_rows(request)
    side = request.width // vae_scale_factor(components)
    sample = torch.randn(rows, config.in_channels, side, side, device=device, dtype=dtype)
    context = torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)
    kwargs = {"encoder_hidden_states": context}
    if config.addition_embed_type == "text_time":
        # The add embedding takes the pooled embedding and each id's Fourier features: 6 ids (original size, crop,
        # target size) for SDXL base, 5 for the refiner (an aesthetic score for the target size).
        pooled = components.text_encoder_2.config.projection_dim
        ids = (config.projection_class_embeddings_input_dim - pooled) // config.addition_time_embed_dim
        time_ids = [request.height, request.width, 0, 0, request.height, request.width][:ids]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([time_ids] * rows, device=device, dtype=dtype),
        }
    return sample, scheduler_timestep(components, request, device), kwargs


def scheduler_timestep(components, request, device):
    """A timestep of the request's schedule as diffusers' scheduler gives it to the UNet (int64 for DDIM, float32 for
    Euler, on the device): a compiled UNet called with another dtype would compile again."""
    from ldmkit.samplers import get_sampler

    scheduler = get_sampler(request.sampler).make_scheduler(components.scheduler_config)
    scheduler.set_timesteps(request.steps)
    return scheduler.timesteps[request.steps // 2].to(device)


def count_unet_flops(master, request, dtype) -> float:
    """FLOPs of one UNet call of a step (the guidance batch), counted by torch.utils.flop_counter on the meta device:
    shapes only, so no weights are copied and nothing is computed."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(master.unet.config), dtype)
    sample, timestep, kwargs = unet_inputs(master, request, torch.device("meta"), dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, return_dict=False, **kwargs)
    return float(counter.get_total_flops())


def fill_tflops(result: RowResult, unet_flops: float) -> None:
    if result.unet_ms:
        result.unet_tflops = unet_flops / (result.unet_ms / 1000) / 1e12
    if not result.error and result.latency_s > 0:
        result.run_tflops = result.steps * unet_flops / result.latency_s / 1e12


def _mean_cuda_ms(call, calls: int) -> float:
    """Back to back, as in the loop: where launching is slower than running (eager), this is the launch rate."""
    import torch

    for _ in range(3):  # compiled modules warm up, then record their CUDA graph
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def release(device) -> None:
    """Free the row's models, compiled graphs and CUDA graph pools before the next row."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


def ours(fast_options: dict | None = None, offload: bool = False) -> Callable:
    """A runner for ldmkit's Pipeline; with options (even empty), pipe.make_fast(**options) first; with `offload`,
    model CPU offload (`--offload`)."""

    def runner(components, device, dtype, request):
        import numpy as np
        import torch

        from ldmkit.pipeline import Pipeline

        pipe = Pipeline(components, device, dtype)
        if fast_options is not None:
            pipe.make_fast(**fast_options)
        if offload:
            pipe.enable_offload()

        def generate(seed: int):
            result = pipe.run(dataclasses.replace(request, seed=seed))
            return np.stack([np.asarray(image) for image in result.images])

        state = pipe.state
        generate.unet, generate.decode, generate.grad_mode = (
            None if offload else state.run_unet,  # alone, an offloaded UNet would time its copies to the GPU
            state.vae_decode or state.vae.decode,
            torch.inference_mode,
        )
        return generate

    return runner


def diffusers_pipeline(compiled: bool) -> Callable:
    """A runner for diffusers' StableDiffusionPipeline; compiled as diffusers' docs recommend."""

    def runner(components, device, dtype, request):
        import numpy as np
        import torch

        from ldmkit.families import reference_pipeline
        from ldmkit.samplers import get_sampler

        sampler = get_sampler(request.sampler)
        pipe = reference_pipeline(components, sampler.make_scheduler(components.scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        if compiled:
            pipe.fuse_qkv_projections()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)
        factor = vae_scale_factor(components)

        def generate(seed: int):
            seeds = [seed + i for i in range(request.num_images)]
            # Our starting noise, drawn as ldmkit's Pipeline.prepare_latents draws it, so the rows
            # compare the same computation.
            shape = (1, components.unet.config.in_channels, request.height // factor, request.width // factor)
            noise = [
                torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds
            ]
            # Only stochastic samplers need generators; passing them would also reach vae.decode.
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds] if sampler.stochastic else None
            images = pipe(
                request.prompt,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                height=request.height,
                width=request.width,
                num_images_per_prompt=request.num_images,
                latents=torch.cat(noise).to(device, dtype),
                generator=generator,
                output_type="pil",
            ).images
            return np.stack([np.asarray(image) for image in images])

        generate.unet, generate.decode, generate.grad_mode = pipe.unet, pipe.vae.decode, torch.no_grad
        return generate

    return runner


RUNNERS: dict[str, Callable] = {
    "diffusers": diffusers_pipeline(compiled=False),
    "diffusers-compiled": diffusers_pipeline(compiled=True),
    "ours": ours(),
    "ours-fast": ours({}),
    "ours-offload": ours(offload=True),
}
RUNNER_NAMES = tuple(RUNNERS)


# ---- numbers ----


def psnr(images, reference) -> float:
    """Peak signal-to-noise ratio (dB) of 8-bit images against a reference; inf when identical."""
    import numpy as np

    a, b = np.concatenate(images).astype(np.float64), np.concatenate(reference).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def fill_psnr(results: list[RowResult], images: dict[str, list]) -> None:
    for result in results:
        if result.name not in images:
            continue
        if "diffusers" in images:
            result.psnr_eager = psnr(images[result.name], images["diffusers"])
        if "diffusers-compiled" in images:
            result.psnr_compiled = psnr(images[result.name], images["diffusers-compiled"])


COLUMNS = (
    "row", "it/s", "latency (s)", "s/image", "first image (s)", "peak GPU mem (GiB)", "PSNR vs diffusers eager (dB)",
    "PSNR vs diffusers compiled (dB)", "UNet call (ms)", "UNet TFLOP/s", "UNet TFLOP/s over the run",
    "VAE decode (ms)", "rest per step (ms)",
)  # fmt: skip


def format_table(header: str, results: list[RowResult]) -> str:
    lines = [
        f"{header}",
        "",
        f"| {' | '.join(COLUMNS)} |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append(
            f"| {r.name} | {r.its:.2f} | {r.latency_s:.3f} | {r.s_per_image:.3f} | {r.first_image_s:.1f} "
            f"| {_num(r.peak_mem_gib, '.2f')} | {_num(r.psnr_eager, '.1f')} | {_num(r.psnr_compiled, '.1f')} "
            f"| {_num(r.unet_ms, '.2f')} | {_num(r.unet_tflops, '.1f')} | {_num(r.run_tflops, '.1f')} "
            f"| {_num(r.decode_ms, '.1f')} | {_num(rest_per_step_ms(r), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def rest_per_step_ms(r: RowResult) -> float | None:
    """What a step costs beyond its UNet call: (latency - decode) / steps - UNet (text encoding included)."""
    if r.unet_ms is None or r.decode_ms is None:
        return None
    return (r.latency_s * 1000 - r.decode_ms) / r.steps - r.unet_ms


def format_row(r: RowResult) -> str:
    if r.error:
        return f"{r.name}: failed: {r.error}"
    return (
        f"{r.name}: {r.its:.2f} it/s, {r.latency_s:.3f} s, first image {r.first_image_s:.1f} s, "
        f"peak {_num(r.peak_mem_gib, '.2f')} GiB, UNet {_num(r.unet_tflops, '.1f')} TFLOP/s"
    )


def _num(value, spec: str) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else format(value, spec)


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
