"""`ldm serve`: load the model once, then serve the APIs and the web UI under uvicorn."""

from __future__ import annotations

from pathlib import Path

from ldmkit.cli_options import add_model_options, check_vae_option, load_pipelines


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="web UI + AUTOMATIC1111- and OpenAI-compatible HTTP APIs")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument(
        "--fast",
        action="store_true",
        help="CUDA: fp16, compile and CUDA graphs (ldmkit.fast), compiled before the first request is taken",
    )
    serve.add_argument(
        "--queue-size", type=int, default=8, metavar="N", help="requests that may wait while one runs; more get 503"
    )
    serve.add_argument("--no-ui", action="store_true", help="HTTP APIs only, without the web UI")
    serve.add_argument(
        "--styles",
        type=Path,
        default=None,
        metavar="FILE",
        help="prompt styles: A1111's styles CSV (name,prompt,negative_prompt); default ./styles.csv if there is one",
    )
    serve.add_argument(
        "--vae-dir", type=Path, default=None, metavar="DIR", help="VAE files and folders requests may name (sd_vae)"
    )
    serve.add_argument(
        "--oversize",
        choices=["native", "refuse", "as-is"],
        default=None,
        help="a request with a side over 2x the model's native size: run at the native size and upscale (native), "
        "refuse it (400), or run it as asked (as-is). Default: native for the shipped model, as-is for others",
    )
    serve.add_argument(
        "--oversize-upscaler",
        default=None,
        metavar="NAME",
        help="--oversize native's upscaler (default: the first model of --upscalers-dir, else Lanczos)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a Host name clients use to reach the server (repeatable; default: loopback names and --host)",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://host[:port]) besides this server's own whose pages may send requests that "
        "change state; e.g. the public address behind a reverse proxy (repeatable)",
    )
    limits = serve.add_argument_group("limits (a request beyond one gets a 4xx naming it; docs/reliability.md)")
    for flag, field, help_text in LIMIT_FLAGS:
        limits.add_argument(flag, dest=field, type=int, default=None, metavar="N", help=help_text)
    serve.set_defaults(func=run_serve)


# (flag, ServerLimits field, help); defaults come from ServerLimits itself
LIMIT_FLAGS = [
    ("--max-pixels", "max_pixels", "pixels per generated image, hires size included (default 2048x2048)"),
    (
        "--max-input-pixels",
        "max_input_pixels",
        "pixels per uploaded image, checked before decoding (default 4096x4096)",
    ),
    ("--max-steps", "max_steps", "denoising steps per image (default 250)"),
    ("--max-images", "max_images", "images per request (default 16)"),
    ("--max-prompt-chars", "max_prompt_chars", "characters per prompt (default 10000)"),
    ("--max-prompt-chunks", "max_prompt_chunks", "75-token chunks per prompt; each BREAK starts one (default 32)"),
    ("--max-loras", "max_loras", "different LoRAs per request (default 8)"),
    ("--max-grid-cells", "max_grid_cells", "cells (images) of one X/Y/Z plot (default 64)"),
    ("--max-body-bytes", "max_body_bytes", "request body size (default 32 MiB)"),
    ("--max-ui-cache-bytes", "max_ui_cache_bytes", "the web UI's cached uploads and images (default 1 GiB)"),
    ("--max-ui-cache-seconds", "max_ui_cache_seconds", "how long the web UI keeps a cached file (default 3600)"),
    (
        "--max-body-bytes-in-flight",
        "max_body_bytes_in_flight",
        "bytes of large request bodies handled at once; more wait their turn (default 64 MiB)",
    ),
    ("--max-header-seconds", "max_header_seconds", "seconds to send a request's head (default 10)"),
    ("--max-body-seconds", "max_body_seconds", "seconds to send a request's body (default 60)"),
]


def run_serve(args) -> int:
    from ldmkit.errors import InvalidRequest

    if args.queue_size < 0:
        raise InvalidRequest(f"--queue-size must be >= 0, got {args.queue_size}")
    folders = ((args.lora_dir, "--lora-dir"), (args.embeddings_dir, "--embeddings-dir"), (args.vae_dir, "--vae-dir"))
    folders += ((args.controlnet_dir, "--controlnet-dir"), (args.upscalers_dir, "--upscalers-dir"))
    for folder, option in folders:
        if folder is not None and not folder.is_dir():
            raise InvalidRequest(f"{option}: folder not found: {folder}")
    check_vae_option(args)
    from ldmkit.styles import StyleLibrary

    styles = StyleLibrary.from_option(args.styles)
    from ldmkit.server.limits import ServerLimits
    from ldmkit.server.origins import normalize_origin

    limits = ServerLimits(
        **{field: getattr(args, field) for _, field, _ in LIMIT_FLAGS if getattr(args, field) is not None}
    )
    for origin in args.allowed_origin:
        if normalize_origin(origin) is None:
            raise InvalidRequest(f"--allowed-origin must look like https://host or http://host:port, got {origin!r}")
    from ldmkit.server.connections import listening_socket, uvicorn_config

    sock = listening_socket(args.host, args.port)  # a bad or busy port is an error before the model loads
    try:
        # Heavy imports only now, so `ldm --help` stays fast.
        import uvicorn

        from ldmkit.server.app import allowed_hosts_for, create_app

        if args.offload:
            from ldmkit.offload import check_offload
            from ldmkit.pipeline import resolve_device

            check_offload(resolve_device(args.device), args.fast)
        pipe, refiner = load_pipelines(args, args.device)
        refiners = () if refiner is None else (refiner,)
        oversize = oversize_policy(args, pipe)
        if args.fast and pipe.device.type == "cuda":
            warm_up(pipe)
        app = create_app(
            pipe,
            queue_size=args.queue_size,
            ui=not args.no_ui,
            limits=limits,
            allowed_hosts=allowed_hosts_for(args.host, args.allowed_host),
            allowed_origins=tuple(args.allowed_origin),
            refiners=refiners,
            styles=styles,
            oversize=oversize,
        )
        print(f"ldm serve: {pipe.model_name} on {pipe.device}; web UI http://{args.host}:{args.port}/ , API docs /docs")
        # On Ctrl-C, requests get a few seconds to finish; then they are cancelled, which stops the worker.
        server = uvicorn.Server(uvicorn_config(app, limits, log_level="info", timeout_graceful_shutdown=5))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
            pass
    finally:
        sock.close()
    return 0


def oversize_policy(args, pipe):
    """--oversize and its upscaler, checked against the loaded model's upscalers."""
    from ldmkit.server.native_size import OversizePolicy

    mode = args.oversize or ("native" if args.model is None else "as-is")  # the shipped model is small
    models = [info.name for info in pipe.upscalers.entries() if info.is_model]
    name = args.oversize_upscaler or (models[0] if models else "Lanczos")
    return OversizePolicy(mode, pipe.upscalers.resolve(name, "--oversize-upscaler").name)


def warm_up(pipe) -> None:
    """Compile (or load from ldmkit.precompile's cache) for the default size before serving, so the first
    request does not wait minutes; other sizes compile on their first request."""
    import time

    start = time.perf_counter()
    pipe.generate("warm-up", steps=2, seed=0)
    print(f"ldm serve: --fast ready for {pipe.default_size}x{pipe.default_size} in {time.perf_counter() - start:.1f} s")
