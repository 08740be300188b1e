"""Which way of compiling the UNet is fastest per call and quickest to start warm (issue 5).

python3 scripts/device_compile_variants.py [VARIANT ...]    # default: full regional recipe autotune

Each variant runs twice in fresh processes sharing one inductor cache dir of its own: "cold" (empty cache)
then "warm" (what a second `ldm generate --fast` pays). SD1.5-shaped random fp16 UNet, fused QKV,
channels_last, batch 2 (guidance), 64x64 latents, 77 tokens; the compiled UNet is CUDA-graphed by hand,
so launch overhead is out of every number and regions compiled apart cost only their lost fusions.
  full:     torch.compile of the whole UNet (what ldmkit.fast does today, there with inductor's graphs);
  regional: torch.compile of each Transformer2DModel / ResnetBlock2D / Down- / Upsample2D instead, so
            dynamo traces each distinct block shape once instead of the whole UNet;
  recipe:   full plus diffusers' tutorial inductor settings (1x1 conv as mm, coordinate descent tuning);
  autotune: full with mode="max-autotune-no-cudagraphs" (Triton GEMM/conv templates, epilogue fusion);
  autotune_gemm: the same for GEMMs only, convolutions left to cuDNN (autotune's UNet compile passed 420 s).
Each also reports the call time with cudnn.benchmark on (cuDNN times its algorithms per shape).
Env: RUNS="cold warm" (default) or "cold"; SKIP_VAE=1 keeps the decoder eager; VARIANT_TIMEOUT (s, default 400).
Results: one JSON line per process, prefixed RESULT, and $OUT/variants.json.
"""

import json
import os
import subprocess
import sys
import time

T0 = time.perf_counter()
REGION_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def worker(variant):
    import torch
    from device_explore_unet import cuda_ms, graphed  # this script's folder is on sys.path

    from ldmkit.bench import random_sd15

    imported = time.perf_counter() - T0
    torch._dynamo.config.cache_size_limit = 64  # regional: one entry per distinct block shape
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    components = random_sd15(torch.device("cuda"))
    unet, vae = components.unet.half(), components.vae.half()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    vae.fuse_qkv_projections()
    vae.to(memory_format=torch.channels_last)

    def call(sample, timestep, context):
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    torch.manual_seed(0)
    args = (
        torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16),
        torch.tensor(500.0, device="cuda"),
        torch.randn(2, 77, 768, device="cuda", dtype=torch.float16),
    )
    latents = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        reference = call(*args)
        vae_reference = vae.decode(latents).sample
        vae_eager_ms = cuda_ms(lambda: vae.decode(latents), n=20)
    result = {"variant": variant, "import_s": imported}
    if variant == "regional":
        for module in unet.modules():
            if type(module).__name__ in REGION_CLASSES:
                module.compile(fullgraph=True)
        for module in vae.decoder.modules():
            if type(module).__name__ in ("ResnetBlock2D", "Attention", "Upsample2D"):
                module.compile(fullgraph=True)
        model, decode = call, vae.decode
    else:
        how = {
            "full": {},
            "recipe": {
                "options": {
                    "conv_1x1_as_mm": True,
                    "coordinate_descent_tuning": True,
                    "epilogue_fusion": False,
                    "coordinate_descent_check_all_directions": True,
                }
            },
            "autotune": {"mode": "max-autotune-no-cudagraphs"},
            # GEMMs only: Triton templates (epilogue fusion) against cuBLAS; convs stay on cuDNN
            "autotune_gemm": {"options": {"max_autotune": True, "max_autotune_conv_backends": "ATEN"}},
        }[variant]
        model = torch.compile(call, fullgraph=True, **how)
        # SKIP_VAE=1 leaves the decoder eager: its autotuning costs minutes and it runs once per image
        decode = vae.decode if os.environ.get("SKIP_VAE") == "1" else torch.compile(vae.decode, fullgraph=True, **how)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(*args)
        torch.cuda.synchronize()
        result["unet_first_call_s"] = time.perf_counter() - start
        start = time.perf_counter()
        image = decode(latents).sample
        torch.cuda.synchronize()
        result["vae_first_call_s"] = time.perf_counter() - start
        result["unet_max_abs_err"] = float((out.float() - reference.float()).abs().max())
        result["vae_max_abs_err"] = float((image.float() - vae_reference.float()).abs().max())
        replay, _ = graphed(model, args)
        result["unet_graph_ms"] = cuda_ms(replay, n=100)
        result["vae_eager_ms"] = vae_eager_ms
        result["vae_ms"] = cuda_ms(lambda: decode(latents), n=20)
        torch.backends.cudnn.benchmark = True
        for _ in range(3):
            out = model(*args)
        replay, _ = graphed(model, args)
        result["unet_graph_ms_cudnn_benchmark"] = cuda_ms(replay, n=100)
        result["unet_max_abs_err_cudnn_benchmark"] = float((out.float() - reference.float()).abs().max())
    result["process_s"] = time.perf_counter() - T0
    print("RESULT", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    print(torch._dynamo.utils.compile_times(repr="str")[:1500], flush=True)


def main(variants):
    out = os.environ.get("OUT", "/tmp")
    results = []
    for variant in variants:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"/tmp/inductor-{variant}")
        for run in os.environ.get("RUNS", "cold warm").split():  # RUNS=cold: compile time and speed only
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", variant],
                    check=False,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=int(os.environ.get("VARIANT_TIMEOUT", "400")),
                )
                lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(lines[0]) if lines else {"variant": variant, "error": proc.stderr[-800:]}
            except subprocess.TimeoutExpired:
                row = {"variant": variant, "error": "timed out"}
            row.update(run=run, wall_s=round(time.perf_counter() - start, 1))
            print(json.dumps(row), flush=True)
            results.append(row)
            with open(f"{out}/variants.json", "w") as f:
                json.dump(results, f, indent=1)
            if "error" in row:
                break


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main(sys.argv[1:] or ["full", "regional", "recipe", "autotune"])
