"""Command-line options more than one `ldm` subcommand takes; light to import (argparse only), as
`ldm serve`'s registration must stay (tests/test_server_cli.py)."""

from __future__ import annotations

from pathlib import Path


def add_model_options(parser) -> None:
    """Which model loads, with what, where and how: the options `ldm generate` and `ldm serve` share."""
    parser.add_argument(
        "--model", default=None, help="diffusers folder, cached repo id or .safetensors file (default: shipped model)"
    )
    parser.add_argument(
        "--config", default=None, help="diffusers config folder for single files of other architectures"
    )
    parser.add_argument(
        "--lora-dir", type=Path, default=None, help="folder where <lora:NAME:WEIGHT> prompt tags are looked up"
    )
    parser.add_argument(
        "--embeddings-dir", type=Path, default=None, help="textual inversion embeddings, used by writing their names"
    )
    parser.add_argument(
        "--controlnet-dir",
        type=Path,
        default=None,
        help="folder of ControlNets, each named by its file or folder stem (default: the model folder's controlnets/; "
        "the shipped model has emoji-lines)",
    )
    parser.add_argument(
        "--upscalers-dir",
        type=Path,
        default=None,
        help="folder of upscaler models (ESRGAN, Real-ESRGAN... .pth/.safetensors), each named by its file stem",
    )
    parser.add_argument(
        "--refiner",
        default=None,
        metavar="MODEL",
        help="a refiner (SDXL's) to finish the denoising, as --model names it",
    )
    parser.add_argument(
        "--vae",
        default=None,
        metavar="FILE_OR_FOLDER",
        help="decode and encode with this VAE instead of the model's own: a .safetensors/.ckpt VAE file (original SD"
        " layout, as A1111's) or a diffusers AutoencoderKL folder",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument(
        "--offload", action="store_true", help="CUDA: keep the models on the CPU, each on the GPU only while it runs"
    )
    parser.add_argument(
        "--vae-tiling", action="store_true", help="decode/encode large images in 512 px tiles (little memory, no seams)"
    )


def check_vae_option(args) -> None:
    """--vae names a file or folder that exists (before a model loads)."""
    from ldmkit.errors import LdmError

    if args.vae is not None and not Path(args.vae).expanduser().exists():
        raise LdmError(f"VAE not found: {args.vae}")


def load_pipelines(args, device):
    """The model these options name, with its LoRA, embedding, ControlNet and VAE folders, and its --refiner (or None).

    The refiner runs on the model's device and dtype, with the same speed and memory options, and reads the same
    embeddings (the SDXL refiner's bigG takes an SDXL file's clip_g vectors), so a prompt's embedding names mean the
    same to both models. A --vae is loaded now, so a file that does not fit the model is an error before any request.
    """
    from ldmkit.pipeline import Pipeline  # heavy: only once a command runs

    speed = {"fast": args.fast, "vae_tiling": args.vae_tiling, "offload": args.offload}
    pipe = Pipeline.from_pretrained(
        args.model,
        device=device,
        dtype=args.dtype,
        config=args.config,
        lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir,
        controlnet_dir=args.controlnet_dir,
        vae_dir=getattr(args, "vae_dir", None),
        vae=args.vae,
        upscalers_dir=args.upscalers_dir,
        **speed,
    )
    if args.vae is not None:
        pipe.vaes.load(pipe.vaes.automatic, pipe.components.vae, pipe.device, pipe.dtype)
    refiner = None
    if args.refiner is not None:
        refiner = Pipeline.from_pretrained(
            args.refiner, device=pipe.device, dtype=pipe.dtype, embeddings_dir=args.embeddings_dir, **speed
        )
    return pipe, refiner
