"""`ldm data | train | eval`: build the emoji set, train the default model's stages, measure it.

Cheap to import: torch, diffusers and transformers load inside the command functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ldmkit.errors import LdmError

STAGES = ("clip", "vae", "unet", "scene", "controlnet", "phrasing")


def register(subparsers) -> None:
    """Add the `data`, `train` and `eval` subcommands to the `ldm` CLI's subparsers."""
    data = subparsers.add_parser("data", help="build a training data set")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    emoji = data_sub.add_parser("emoji", help="open emoji sets from the npm registry, rendered and captioned")
    emoji.add_argument("--out", type=Path, default=Path(".data/emoji"), help="output folder")
    emoji.add_argument(
        "--cache", type=Path, default=None, help="where the npm .tgz files are kept (default OUT/packages)"
    )
    emoji.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    emoji.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    emoji.add_argument("--skin-tones", action="store_true", help="keep the skin-tone variants (5x more people)")
    emoji.add_argument(
        "--resolution", type=int, default=128, metavar="PX",
        help="sprite size: 128 (default), 256, 384 or 512; larger keeps big objects in 256 px scenes sharp",
    )  # fmt: skip
    emoji.add_argument(
        "--extra-sets",
        action="store_true",
        help="also the five sets matched by name (noto-v1, emojione, fxemoji, streamline-emojis, fluent-emoji)",
    )
    emoji.set_defaults(func=run_data)

    train = subparsers.add_parser("train", help="train a stage of the default model (accelerate: CPU, GPU, multi-GPU)")
    train.add_argument(
        "stage",
        choices=STAGES + ("export",),
        help="clip, vae, unet (single emoji), scene (text encoder + 256 px UNet on scenes), controlnet (edges and "
        "sketches, for --model), phrasing (--model's text encoder learns typed prompts); export assembles the model",
    )
    train.add_argument("--data", type=Path, default=Path(".data/emoji"))
    train.add_argument("--runs", type=Path, default=Path(".runs"), help="stage outputs go to RUNS/<stage>")
    train.add_argument("--minutes", type=float, default=None, help="wall-time budget (the LR decay ends there)")
    train.add_argument("--steps", type=int, default=None, help="step budget")
    train.add_argument("--out", type=Path, default=None, help="export: the model folder to write")
    train.add_argument("--vae", type=Path, default=None, help="export and scene: the VAE folder (default RUNS/vae/vae)")
    train.add_argument(
        "--default-guidance",
        type=float,
        default=None,
        help="export: the guidance the model samples at unless asked otherwise, written to its ldmkit.json (pick it "
        "with `ldm eval --guidance`); without it an ldmkit.json already in --out is kept",
    )
    train.add_argument(
        "--model",
        type=Path,
        default=None,
        help="controlnet: the model it guides; phrasing: the model whose text encoder learns (default: shipped)",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any field of the stage's config, e.g. --set batch_size=256",
    )
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser("eval", help="prompt adherence (CLIP retrieval) and VAE reconstruction PSNR")
    evaluate.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    evaluate.add_argument("--clip", type=Path, default=Path(".runs/clip/clip"), help="the trained CLIP (both towers)")
    evaluate.add_argument("--data", type=Path, default=Path(".data/emoji"))
    evaluate.add_argument("--prompts", type=int, default=None, help="use only the first N eval prompts")
    evaluate.add_argument(
        "--name-seeds",
        type=int,
        default=1,
        metavar="N",
        help="score the bare names at N seeds (the first stays the headline figure; each is listed)",
    )
    evaluate.add_argument("--steps", type=int, default=25)
    evaluate.add_argument(
        "--guidance", type=float, default=None, help="default: the model's own (7.5 unless its ldmkit.json says)"
    )
    evaluate.add_argument(
        "--size",
        type=int,
        default=None,
        help="draw the eval images at SIZE x SIZE (default: the model's own), e.g. a scene model at 128 px",
    )
    evaluate.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    evaluate.add_argument(
        "--generate-only",
        type=Path,
        default=None,
        metavar="DIR",
        help="only generate the eval images into DIR (e.g. on a GPU machine without the data set)",
    )
    evaluate.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help="score the images a --generate-only run wrote instead of generating them",
    )
    evaluate.add_argument(
        "--controlnet",
        type=Path,
        default=None,
        metavar="DIR",
        help="measure this ControlNet instead: edge F1 of images generated from held-out images' canny maps, with "
        "and without it",
    )
    evaluate.add_argument("--count", type=int, default=32, help="--controlnet: held-out images to measure")
    evaluate.add_argument(
        "--grid", type=Path, default=None, metavar="PNG", help="--controlnet: also write a grid of maps and results"
    )
    evaluate.set_defaults(func=run_eval)


def run_data(args) -> int:
    from ldmkit.data import emoji

    sources = emoji.SOURCES + (emoji.EXTRA_SOURCES if args.extra_sets else ())
    records = emoji.build(
        args.out, cache_dir=args.cache, workers=args.workers, limit=args.limit, skin_tones=args.skin_tones,
        sources=sources, resolution=args.resolution,
    )  # fmt: skip
    print(f"{len(records)} images, {len({r.name for r in records})} names -> {args.out}")
    return 0


def stage_config(stage: str, args):
    """The stage's dataclass config with paths from --data/--runs and --set overrides applied."""
    from ldmkit.train import clip, controlnet, phrasing, scene, unet, vae

    runs = args.runs
    vae_dir = str(args.vae or runs / "vae" / "vae")
    if stage == "clip":
        cfg = clip.ClipTrainConfig(data_dir=str(args.data), out_dir=str(runs / "clip"))
    elif stage == "vae":
        cfg = vae.VaeTrainConfig(data_dir=str(args.data), out_dir=str(runs / "vae"))
    elif stage == "unet":
        cfg = unet.UnetTrainConfig(
            data_dir=str(args.data),
            out_dir=str(runs / "unet"),
            text_encoder_dir=str(runs / "clip" / "text_encoder"),
            vae_dir=vae_dir,
        )
    elif stage == "controlnet":
        cfg = controlnet.ControlNetTrainConfig(data_dir=str(args.data), out_dir=str(runs / "controlnet"))
        if args.model is not None:
            cfg.model_dir = str(args.model)
    elif stage == "phrasing":
        cfg = phrasing.PhrasingTrainConfig(data_dir=str(args.data), out_dir=str(runs / "phrasing"))
        if args.model is not None:
            cfg.text_encoder_dir = str(args.model / "text_encoder")
    else:
        cfg = scene.SceneTrainConfig(
            data_dir=str(args.data),
            out_dir=str(runs / "scene"),
            text_encoder_dir=str(runs / "clip" / "text_encoder"),
            vae_dir=vae_dir,
        )
    if args.minutes is not None:
        cfg.max_minutes = args.minutes
    if args.steps is not None:
        cfg.max_steps = args.steps
    return apply_overrides(cfg, args.set)


def apply_overrides(cfg, assignments: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in fields:
            raise LdmError(f"--set {assignment}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(value, list):
            value = tuple(value)
        setattr(cfg, name, value)
    return cfg


def run_train(args) -> int:
    if args.model is not None and args.stage not in ("controlnet", "phrasing"):
        raise LdmError(f"--model applies to `ldm train controlnet` and `phrasing` only, not to {args.stage}")
    if args.default_guidance is not None and args.stage != "export":
        raise LdmError(f"--default-guidance applies to `ldm train export` only, not to {args.stage}")
    if args.stage == "export":
        from ldmkit.params import MAX_GUIDANCE, is_guidance
        from ldmkit.train import export

        if args.default_guidance is not None and not is_guidance(args.default_guidance):
            raise LdmError(f"--default-guidance must be a number from 0 to {MAX_GUIDANCE}, got {args.default_guidance}")
        out = args.out or Path(".runs/default-model")
        runs = args.runs
        licenses = args.data / "LICENSES.md"
        # the scene stage trains its own text encoder; the single-emoji UNet uses the CLIP's frozen one
        denoiser = runs / "scene" if (runs / "scene" / "unet").exists() else runs / "unet"
        text_encoder = denoiser / "text_encoder" if denoiser.name == "scene" else runs / "clip" / "text_encoder"
        export.assemble(
            text_encoder,
            args.vae or runs / "vae" / "vae",
            denoiser / "unet",
            denoiser / "scheduler",
            out,
            licenses if licenses.exists() else None,
            args.default_guidance,
        )
        print(json.dumps(export.folder_report(out)))
        return 0
    import importlib

    cfg = stage_config(args.stage, args)
    result = importlib.import_module(f"ldmkit.train.{args.stage}").train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun/accelerate launch, the main process reports for all
    print(
        json.dumps(
            {
                "stage": args.stage,
                "steps": result["steps"],
                "minutes": round(result["minutes"], 2),
                "final_loss": result["history"][-1][1] if result["history"] else None,
                **{key: result[key] for key in ("export", "export_bytes") if key in result},
            }
        )
    )
    return 0


def run_eval(args) -> int:
    import torch

    if args.controlnet is not None:
        return run_eval_controlnet(args)
    if args.grid is not None:
        raise LdmError("--grid applies to --controlnet only")
    from ldmkit.eval import report

    if args.name_seeds < 1:
        raise LdmError(f"--name-seeds must be at least 1, got {args.name_seeds}")
    if args.images and args.name_seeds != 1:
        raise LdmError("--name-seeds applies when the images are generated; --images scores the seeds its files hold")
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise LdmError(f"--size must be a positive multiple of 8, got {args.size}")
    if args.generate_only:
        images = report.generate_eval_images(
            report.load_eval_model(args.model),
            args.prompts,
            args.steps,
            args.guidance,
            name_seeds=args.name_seeds,
            size=args.size,
        )
        args.generate_only.mkdir(parents=True, exist_ok=True)
        for key, value in images.items():
            torch.save(value, args.generate_only / f"{key}.pt")
        count = sum(len(v) for k, v in images.items() if k not in report.SETTINGS)
        print(f"{count} images -> {args.generate_only}")
        return 0
    images = None
    if args.images:
        images = {path.stem: torch.load(path, weights_only=True) for path in sorted(args.images.glob("*.pt"))}
        missing = {"plain", "styled", "seconds"} - set(images)
        if missing:
            raise LdmError(f"--images {args.images}: missing {', '.join(sorted(missing))}.pt")
    metrics = report.evaluate(
        model_dir=args.model,
        clip_dir=args.clip,
        data_dir=args.data,
        num_prompts=args.prompts,
        steps=args.steps,
        guidance=args.guidance,
        images=images,
        name_seeds=args.name_seeds,
        size=args.size,
    )
    text = json.dumps(metrics, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def run_eval_controlnet(args) -> int:
    from ldmkit.eval import controlnet
    from ldmkit.loading import DEFAULT_MODEL_DIR

    model_only = (
        ("--generate-only", args.generate_only),
        ("--images", args.images),
        ("--prompts", args.prompts),
        ("--name-seeds", args.name_seeds if args.name_seeds != 1 else None),
        ("--size", args.size),
    )
    for flag, value in model_only:
        if value is not None:
            raise LdmError(f"{flag} does not apply to --controlnet")
    if not (args.controlnet / "config.json").is_file():
        raise LdmError(f"--controlnet {args.controlnet}: not a diffusers ControlNet folder (no config.json)")
    if args.count < 1:
        raise LdmError(f"--count must be at least 1, got {args.count}")
    model = args.model or DEFAULT_MODEL_DIR
    metrics = controlnet.evaluate_controlnet(model, args.controlnet, args.data, args.count, args.steps, args.guidance)
    text = json.dumps(metrics, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid = controlnet.docs_grid(model, args.controlnet, args.data, steps=args.steps, guidance=args.guidance)
        grid.save(args.grid)
        print(f"grid -> {args.grid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m ldmkit.train.cli train vae`), for machines without the full `ldm` CLI."""
    parser = argparse.ArgumentParser(prog="ldm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LdmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
