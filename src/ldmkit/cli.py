"""`ldm`: the command line. Subcommands: generate, samplers, info (and those that other modules register)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

# Library chatter (optional-dependency notices, weight-loading bars) is not for CLI users; set
# before transformers and diffusers are first imported.
for _var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
    os.environ.setdefault(_var, "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from ldmkit.cli_options import add_model_options, check_vae_option, load_pipelines  # noqa: E402
from ldmkit.control_cli import add_control_options, units_from_args  # noqa: E402
from ldmkit.errors import InvalidRequest, LdmError  # noqa: E402
from ldmkit.params import MASKED_CONTENTS, RESIZE_MODES  # noqa: E402
from ldmkit.samplers import ALGORITHMS, DEFAULT_SAMPLER, REFUSED, get_sampler  # noqa: E402
from ldmkit.schedules import SCHEDULE_TYPES  # noqa: E402
from ldmkit.xyz_cli import add_xyz_options, plot_from_args, run_xyz, wants_plot  # noqa: E402

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs before decoding them


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so pending temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return args.func(args)
    except LdmError as exc:
        print(f"ldm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # run_generate adds what it had written; a bare Ctrl-C elsewhere has nothing to say about files.
        print(f"ldm: interrupted{'; ' + exc.args[0] if exc.args else ''}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        # torch.OutOfMemoryError (CUDA) is a RuntimeError; matched by name so the CLI need not import torch
        gpu = type(exc).__name__ == "OutOfMemoryError"
        if not (gpu or isinstance(exc, MemoryError)):
            raise
        what = "GPU" if gpu else "host"
        print(f"ldm: error: out of {what} memory; try a smaller --size or fewer images (-n)", file=sys.stderr)
        return 2


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    samplers = sub.add_parser("samplers", help="list samplers and the schedule types each takes")
    samplers.set_defaults(func=run_samplers)
    info = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image")
    info.set_defaults(func=run_info)
    for module in _EXTENSIONS:
        __import__(module, fromlist=["register"]).register(sub)
    return parser


# Subcommands that live beside their subsystem; each module's register() adds its parsers.
_EXTENSIONS = ["ldmkit.server.cli", "ldmkit.train.cli", "ldmkit.bench"]


def add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="text (and optionally an init image) to images")
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompts)")
    gen.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="one prompt per line; split across processes under torchrun/accelerate launch",
    )
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images to make (seeds seed, seed+1, ...)")
    gen.add_argument("--negative", default="", help="negative prompt (the unconditional text)")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; <= 1 disables it; default: the model's own (7.5, unless its folder's "
        "ldmkit.json names another: the shipped model's is 3.5)",
    )
    gen.add_argument("--sampler", default=DEFAULT_SAMPLER, help="see `ldm samplers`")
    gen.add_argument(
        "--scheduler",
        default=None,
        metavar="SCHEDULE_TYPE",
        help="schedule type (A1111's 'Schedule type'): Karras, Exponential, SGM Uniform, ...; default Automatic",
    )
    gen.add_argument("--seed", type=int, default=None, help="default: random (and reported)")
    gen.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="default: the model's native size")
    add_noise_options(gen)
    gen.add_argument("--init-image", type=Path, default=None, help="img2img: start from this image")
    gen.add_argument("--strength", type=float, default=0.75, help="img2img: how much of the init image to repaint")
    gen.add_argument("--mask", type=Path, default=None, help="inpainting: white = repaint (needs --init-image)")
    gen.add_argument("--mask-blur", type=int, default=4, help="inpainting: Gaussian blur of the mask, in pixels")
    gen.add_argument(
        "--resize-mode",
        default="resize",
        choices=RESIZE_MODES,
        help="img2img: fit the init image by stretching, cropping, filling the sides, or resizing its latents",
    )
    gen.add_argument(
        "--masked-content",
        default="original",
        choices=MASKED_CONTENTS,
        help="inpainting: what the masked area starts from (A1111's 'Masked content')",
    )
    gen.add_argument(
        "--only-masked",
        type=int,
        default=None,
        metavar="PADDING",
        help="inpainting: repaint the mask's box plus PADDING pixels at --size, pasted back (A1111's 'Only masked')",
    )
    gen.add_argument("--tiling", action="store_true", help="seamless textures: the image tiles without seams")
    gen.add_argument(
        "--hires-scale", type=float, default=None, help="hires fix: upscale factor of a second, img2img pass"
    )
    gen.add_argument(
        "--hires-strength", type=float, default=0.5, help="hires fix: denoising strength of the second pass"
    )
    gen.add_argument(
        "--hires-steps", type=int, default=None, help="hires fix: steps of the second pass (default: --steps)"
    )
    gen.add_argument(
        "--hires-upscaler",
        default="latent",
        help="hires fix: latent (on the latents), pixel (Lanczos), Nearest, or an upscaler of --upscalers-dir by name",
    )
    gen.add_argument("--hires-prompt", default="", help="hires fix: the second pass's prompt (default: the prompt)")
    gen.add_argument("--hires-negative", default="", help="hires fix: the second pass's negative prompt")
    gen.add_argument(
        "--hires-sampler",
        default=None,
        help="hires fix: the second pass's sampler, e.g. 'Euler Karras' (default: --sampler)",
    )
    gen.add_argument(
        "--clip-skip", type=int, default=1, help="use the text encoder's N-th last layer (A1111's clip skip)"
    )
    gen.add_argument(
        "--styles-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="A1111's prompt styles CSV (name,prompt,negative_prompt); default ./styles.csv if there is one",
    )
    gen.add_argument(
        "--style",
        action="append",
        default=[],
        metavar="NAME",
        help="apply this style of the styles file to the prompt and negative prompt (repeatable, in order)",
    )
    add_model_options(gen)
    gen.add_argument(
        "--refiner-switch", type=float, default=0.8, help="with --refiner: the fraction of the steps the model runs"
    )
    add_control_options(gen)
    gen.add_argument("-o", "--output-dir", type=Path, default=Path("outputs"))
    gen.add_argument(
        "--fast",
        action="store_true",
        help="GPU fast path: fp16, channels_last, fused QKV, torch.compile (first image compiles)",
    )
    gen.add_argument(
        "--save-intermediates",
        action="store_true",
        help="save the predicted image every K steps, a grid and an animation",
    )
    gen.add_argument("--every", type=int, default=1, metavar="K", help="with --save-intermediates: every K steps")
    gen.add_argument(
        "--preview",
        default="full",
        choices=["full", "fast"],
        help="intermediates: VAE decode or a cheap latent->RGB projection",
    )
    gen.add_argument("--animation-format", default="gif", choices=["gif", "webp"])
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_xyz_options(gen)
    gen.set_defaults(func=run_generate)


def add_noise_options(gen) -> None:
    """AUTOMATIC1111's variation seed, seed resize and sampler noise options (GenerationParams' fields)."""
    noise = gen.add_argument_group("noise (AUTOMATIC1111's variation seed, seed resize and sampler options)")
    noise.add_argument(
        "--subseed", type=int, default=None, help="variation seed (image i: subseed + i); default: random"
    )
    noise.add_argument(
        "--subseed-strength",
        type=float,
        default=0.0,
        help="0: the seed's noise; 1: the variation seed's; between: their slerp (every image keeps the seed)",
    )
    noise.add_argument(
        "--seed-resize-from",
        type=parse_size,
        default=None,
        metavar="WxH",
        help="draw the seed's noise at this size and centre it (the composition of that size's image)",
    )
    noise.add_argument(
        "--eta", type=float, default=None, help="DDIM (default 0) and Euler a (default 1): share of fresh noise"
    )
    noise.add_argument("--s-churn", type=float, default=0.0, help="Euler: Karras et al.'s churn (default 0)")
    noise.add_argument("--s-tmin", type=float, default=0.0, help="Euler: churn from this sigma")
    noise.add_argument("--s-tmax", type=float, default=math.inf, help="Euler: churn up to this sigma (default inf)")
    noise.add_argument("--s-noise", type=float, default=1.0, help="Euler: scale of the churn noise")
    noise.add_argument(
        "--ensd",
        type=int,
        default=0,
        metavar="N",
        help="eta noise seed delta: ancestral/SDE samplers' per-step noise seeded seed + N (A1111's ENSD)",
    )


def run_samplers(args) -> int:
    """One line per sampler: its name, what 'Automatic' runs, and the schedule types it takes."""
    for algorithm in ALGORITHMS:
        automatic = algorithm.default_schedule if algorithm.default_schedule != "Automatic" else "its own"
        others = [s for s in algorithm.supported_schedules() if s != "Automatic"]
        print(f"{algorithm.name:<18}  Automatic = {automatic}; also: {', '.join(others) or 'none'}")
    print(f"\nSchedule types (--scheduler): {', '.join(SCHEDULE_TYPES)}")
    print(f"Not available: {', '.join(REFUSED)} (diffusers has no scheduler for them)")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768, got {text!r}") from None
    return width, height


def run_generate(args) -> int:
    # Everything that can be checked without the model is checked before loading it.
    prompts = read_prompts(args)
    if args.every < 1:
        raise InvalidRequest(f"--every must be >= 1, got {args.every}")
    ensure_writable(args.output_dir)
    folders = ((args.lora_dir, "LoRA folder"), (args.embeddings_dir, "embeddings folder"))
    folders += ((args.controlnet_dir, "ControlNet folder"), (args.upscalers_dir, "upscalers folder"))
    for folder, what in folders:
        if folder is not None and not folder.is_dir():
            raise LdmError(f"{what} not found: {folder}")
    check_vae_option(args)
    prompts, args.negative = styled_prompts(args, prompts)
    init_image = load_image(args.init_image, "init image") if args.init_image else None
    mask_image = load_image(args.mask, "mask") if args.mask else None
    args.sampler = get_sampler(args.sampler, args.scheduler).name  # the one label the pipeline takes
    controls = units_from_args(args, load_image)
    requests = generation_params(args, prompts, init_image, mask_image, controls)
    for request in requests:
        request.validate()
    plot = plot_from_args(args, requests) if wants_plot(args) else None
    if controls:
        from ldmkit.control_preprocess import opencv
        from ldmkit.controlnet import ControlNetLibrary

        opencv()  # the preprocessors and map fitting need it: say so before loading anything
        from ldmkit.loading import model_controlnet_dir

        library = ControlNetLibrary(args.controlnet_dir or model_controlnet_dir(args.model))
        for unit in controls:
            library.resolve(unit.model)
    from ldmkit.params import HIRES_UPSCALERS

    if args.hires_scale is not None and args.hires_upscaler not in HIRES_UPSCALERS:
        from ldmkit.upscalers import UpscalerLibrary

        UpscalerLibrary(args.upscalers_dir).resolve(args.hires_upscaler, "--hires-upscaler")
    if plot is not None:
        return run_xyz(args, plot, StopOnSignal(), written_note)
    from diffusers.utils import logging as diffusers_logging

    from ldmkit.distributed import start_workers  # torch and diffusers load only when needed
    from ldmkit.job import GenerateJob
    from ldmkit.metadata import next_free_index
    from ldmkit.params import random_seed
    from ldmkit.pipeline import resolve_device

    diffusers_logging.disable_progress_bar()  # shard-loading bars; ours is the one over steps
    workers = start_workers(args.device)
    if args.offload:
        from ldmkit.offload import check_offload

        check_offload(resolve_device(workers.device), args.fast)
    # Prompt j's images get seeds base + j*n + i and indices first + j*n + i, agreed by all ranks,
    # so a split run fills the folder exactly as one process would.
    n = args.num_images
    base_seed = workers.share(args.seed if args.seed is not None else random_seed(n * len(prompts)))
    first_index = workers.share(next_free_index(args.output_dir))
    pipe, refiner = load_pipelines(args, workers.device)
    if refiner is not None:
        requests = [dataclasses.replace(request, refiner=refiner) for request in requests]
    written: list[Path] = []

    def saved(path: Path) -> None:  # each file is listed as soon as it is complete
        written.append(path)
        print(path, flush=True)

    job = GenerateJob(
        pipe,
        output_dir=args.output_dir,
        intermediates_every=args.every if args.save_intermediates else None,
        preview_mode=args.preview,
        animation_format=args.animation_format,
        progress=not args.quiet,
        on_saved=saved,
    )
    mine = workers.mine(list(range(len(prompts))))
    if workers.world_size > 1:
        print(
            f"ldm: process {workers.rank + 1}/{workers.world_size}: {len(mine)} of {len(prompts)} prompts",
            file=sys.stderr,
        )
    stop = StopOnSignal()
    try:
        with stop.installed():
            for j in mine:
                request = dataclasses.replace(requests[j], seed=base_seed + j * n)
                job.run(first_index=first_index + j * n, should_stop=stop, **request.as_kwargs())
        if stop.signalled:  # after the last check: what was written is complete, the run still ends as interrupted
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise KeyboardInterrupt(written_note(written)) from None
    except LdmError as exc:
        raise LdmError(f"{exc}; {written_note(written)}") from None
    workers.barrier()
    return 0


class StopOnSignal:
    """Ctrl-C or SIGTERM while generating: the first ends the run at the pipeline's next check (a step, a LoRA
    file, a phase), so its LoRAs come off and no file is half-written; a second ends it at once."""

    def __init__(self):
        self.signalled = False

    def __call__(self) -> bool:
        """The pipeline's should_stop: a signalled run is abandoned (KeyboardInterrupt), not finished early."""
        if self.signalled:
            raise KeyboardInterrupt
        return False

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True


def generation_params(args, prompts: list[str], init_image, mask_image, controls=()) -> list:
    """One GenerationParams per prompt; prompt j's seeds follow prompt j-1's (seed None: drawn after loading)."""
    from ldmkit.params import GenerationParams, HiresFix

    hires = None
    if args.hires_scale is not None:
        hires = HiresFix(
            args.hires_scale,
            args.hires_strength,
            args.hires_steps,
            args.hires_upscaler,
            prompt=args.hires_prompt,
            negative_prompt=args.hires_negative,
            sampler=args.hires_sampler,
        )
    else:
        given = [flag for flag in ("hires_prompt", "hires_negative", "hires_sampler") if getattr(args, flag)]
        if given:
            raise InvalidRequest(
                f"--{given[0].replace('_', '-')} describes the hires fix's second pass: add --hires-scale"
            )
    width, height = args.size if args.size else (None, None)
    n = args.num_images
    return [
        GenerationParams(
            prompt=prompt,
            negative_prompt=args.negative,
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            seed=None if args.seed is None else args.seed + j * n,
            width=width,
            height=height,
            num_images=n,
            init_image=init_image,
            strength=args.strength,
            mask_image=mask_image,
            mask_blur=args.mask_blur,
            hires=hires,
            clip_skip=args.clip_skip,
            controls=controls,
            refiner=args.refiner,  # its name until it is loaded: validate checks what goes with it
            refiner_switch=args.refiner_switch,
            vae=args.vae,
            subseed=None if args.subseed is None else args.subseed + j * n,
            subseed_strength=args.subseed_strength,
            seed_resize_from=args.seed_resize_from,
            eta=args.eta,
            s_churn=args.s_churn,
            s_tmin=args.s_tmin,
            s_tmax=args.s_tmax,
            s_noise=args.s_noise,
            eta_noise_seed_delta=args.ensd,
            tiling=args.tiling,
            resize_mode=args.resize_mode,
            masked_content=args.masked_content,
            inpaint_only_masked=args.only_masked is not None,
            inpaint_padding=32 if args.only_masked is None else args.only_masked,
        )
        for j, prompt in enumerate(prompts)
    ]


def styled_prompts(args, prompts: list[str]) -> tuple[list[str], str]:
    """The prompts and the negative prompt with every --style applied (A1111's styles; ldmkit.styles)."""
    from ldmkit.styles import StyleLibrary

    if not args.style:
        if args.styles_file is not None and not args.styles_file.is_file():
            raise LdmError(f"styles file not found: {args.styles_file}")
        return prompts, args.negative
    styles = StyleLibrary.from_option(args.styles_file)
    styled = [styles.apply(args.style, prompt, args.negative) for prompt in prompts]
    return [prompt for prompt, _ in styled], styled[0][1]


def written_note(written: list[Path]) -> str:
    """What a generate run that stopped early leaves: complete files only (each is written whole, then linked)."""
    if not written:
        return "no file was written"
    return f"{len(written)} file(s) were written, listed above; none is partial"


def read_prompts(args) -> list[str]:
    """The positional prompt, or the non-empty lines of --prompts FILE (exactly one of the two)."""
    if (args.prompt is None) == (args.prompts is None):
        raise InvalidRequest("give either a prompt or --prompts FILE")
    if args.prompts is None:
        return [args.prompt]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LdmError(f"cannot read prompts file {args.prompts}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InvalidRequest(f"prompts file {args.prompts} has no prompts")
    return prompts


def ensure_writable(folder: Path) -> None:
    """Create the output folder and prove a file can be written there, before any compute."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise LdmError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None


def load_image(path: Path, what: str):
    """Open and fully decode an input image, upright (its EXIF orientation applied), refusing non-images,
    truncated files and decompression bombs."""
    from PIL import Image, ImageOps

    if not path.is_file():
        raise LdmError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise LdmError(
                    f"{what} {path} is {image.width}x{image.height}, over the {MAX_INPUT_PIXELS} pixel limit"
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise LdmError(f"cannot read {what} {path}: {exc}") from None


def run_info(args) -> int:
    from ldmkit.metadata import read_infotext

    text = read_infotext(args.image)
    if text is None:
        raise LdmError(f"{args.image} carries no generation parameters")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
