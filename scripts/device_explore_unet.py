"""Where the fast UNet call's time goes on a GPU, and which exact changes shorten it (issue 5).

One device call: SD1.5-shaped random fp16 UNet (fused QKV, channels_last), batch 2 (guidance), 64x64
latents, 77 tokens. Parts, each timed and written to $OUT/explore.json as it finishes:
  A. SDPA backends (flash, efficient, cuDNN) on the UNet's own attention shapes: time and error;
  B. AOTInductor artifact of the UNet (torch.export + aoti_compile_and_package, weights kept out of
     the artifact): compile time, error against eager, call time under a CUDA graph, a kernel profile;
  C. the same with cuDNN attention; D. the same with diffusers' tutorial inductor settings;
  E. a fresh process loading the artifact: import, load, weights, first call, graph capture.
"""

import functools
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

OUT = os.environ.get("OUT", "explore-out")
os.makedirs(OUT, exist_ok=True)
RESULTS: dict = {}


def save(key, value):
    RESULTS[key] = value
    print(f"== {key}: {json.dumps(value)}", flush=True)
    with open(f"{OUT}/explore.json", "w") as f:
        json.dump(RESULTS, f, indent=1)


def cuda_ms(call, n=50, warmup=5):
    for _ in range(warmup):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def part_a():
    """Attention shapes of SD1.5 at 512 px, batch 2: (tokens, channels, heads=8), self and cross."""
    rows = []
    for n, c in ((4096, 320), (1024, 640), (256, 1280)):
        for kv_len in (n, 77):
            q = torch.randn(2, 8, n, c // 8, device="cuda", dtype=torch.float16)
            k = torch.randn(2, 8, kv_len, c // 8, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            row = {"q_tokens": n, "kv_tokens": kv_len, "head_dim": c // 8}
            for name, backend in (
                ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ):
                try:
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(q, k, v)
                        row[name + "_ms"] = round(
                            cuda_ms(functools.partial(F.scaled_dot_product_attention, q, k, v)), 4
                        )
                    row[name + "_err"] = float((out.float() - ref).abs().max())
                except RuntimeError as error:
                    row[name + "_ms"] = f"unsupported: {str(error)[:80]}"
            with sdpa_kernel(
                [
                    SDPBackend.FLASH_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH,
                ]
            ):
                row["default_ms"] = round(cuda_ms(functools.partial(F.scaled_dot_product_attention, q, k, v)), 4)
            rows.append(row)
    save("A_sdpa", rows)


class UNetCall(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def graphed(model, args):
    """A CUDA graph of model(*args) over static copies of args; returns (replay, static output)."""
    static = [a.clone() for a in args]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(*static)
    return graph.replay, out


def kernel_profile(model, args, top=25):
    from torch.profiler import ProfilerActivity, profile

    model(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(*args)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / 1000
    categories: dict[str, float] = {}
    for name, ms in totals.items():
        low = name.lower()
        kind = (
            "attention"
            if (
                "flash" in low
                or "fmha" in low
                or "attention" in low
                or "cudnn_generated_fort_native_sdpa" in low
                or "sdpa" in low
            )
            else "conv"
            if ("conv" in low or "implicit" in low or "xmma" in low or "cudnn" in low or "nchw" in low or "nhwc" in low)
            else "gemm"
            if ("gemm" in low or "sm90" in low or "cutlass" in low or "ampere" in low or "mm" in low)
            else "triton"
            if "triton" in low
            else "other"
        )
        categories[kind] = categories.get(kind, 0.0) + ms
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_ms": round(sum(totals.values()), 3),
        "by_kind_ms": {k: round(v, 3) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top": [(name[:110], round(ms, 3)) for name, ms in ranked],
    }


def aoti_part(key, model, args, reference, configs, package):
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    print(f"{key}: export", flush=True)
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, args, strict=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    path = aoti_compile_and_package(
        exported, package_path=package, inductor_configs={"aot_inductor.package_constants_in_so": False, **configs}
    )
    compile_s = time.perf_counter() - start
    print(f"{key}: compiled in {compile_s:.0f} s, loading", flush=True)
    compiled = aoti_load_package(path)
    state = dict(model.state_dict())
    compiled.load_constants(
        {k: state[k] for k in compiled.get_constant_fqns()}, check_full_update=True, user_managed=True
    )
    out = compiled(*args)
    out = out[0] if isinstance(out, (list, tuple)) else out
    error = float((out.float() - reference.float()).abs().max())
    replay, _ = graphed(lambda *a: compiled(*a), args)
    graph_ms = cuda_ms(replay, n=100)
    plain_ms = cuda_ms(lambda: compiled(*args), n=30)
    result = {
        "export_s": round(export_s, 1),
        "compile_s": round(compile_s, 1),
        "max_abs_err_vs_eager": error,
        "graph_ms": round(graph_ms, 3),
        "no_graph_ms": round(plain_ms, 3),
        "artifact_MB": round(os.path.getsize(path) / 1e6, 1),
    }
    save(key, result)
    save(key + "_profile", kernel_profile(lambda *a: compiled(*a), args))
    return compiled


def main():
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    parts = os.environ.get("PARTS", "AXBCED")
    if "A" in parts:
        part_a()

    from ldmkit.bench import random_sd15

    unet = random_sd15(torch.device("cuda")).unet.half()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    model = UNetCall(unet).eval()
    torch.manual_seed(0)
    args = (
        torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16),
        torch.tensor(500.0, device="cuda"),
        torch.randn(2, 77, 768, device="cuda", dtype=torch.float16),
    )
    with torch.no_grad():
        reference = model(*args)
    if "X" in parts:
        eager_parts(model, args, reference)
    package = "/tmp/unet-default.pt2"
    if "B" in parts:
        aoti_part("B_aoti_default", model, args, reference, {}, package)
    if "T" in parts:
        compiled_part(model, args, reference)
    if "C" in parts:
        cudnn_part(model, args, reference)
    if "E" in parts:
        fresh_process_part(package)
    if "D" in parts:
        tuned_part(model, args, reference)


def eager_parts(model, args, reference):
    with torch.no_grad():
        replay, _ = graphed(model, args)
        save(
            "eager",
            {"graph_ms": round(cuda_ms(replay, n=50), 3), "no_graph_ms": round(cuda_ms(lambda: model(*args), n=20), 3)},
        )
        save("eager_profile", kernel_profile(model, args))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ref = model(*args)
            save(
                "eager_cudnn_attention",
                {
                    "no_graph_ms": round(cuda_ms(lambda: model(*args), n=20), 3),
                    "max_abs_err_vs_flash": float((cudnn_ref.float() - reference.float()).abs().max()),
                },
            )


def compiled_part(model, args, reference):
    """T: torch.compile (default mode, no CUDA graphs of its own) of the same UNet, graphed by hand."""
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(*args)
        compile_s = time.perf_counter() - start
        replay, _ = graphed(compiled, args)
        save(
            "T_torch_compile",
            {
                "compile_s": round(compile_s, 1),
                "max_abs_err_vs_eager": float((out.float() - reference.float()).abs().max()),
                "graph_ms": round(cuda_ms(replay, n=100), 3),
            },
        )
        save("T_torch_compile_profile", kernel_profile(compiled, args))


def cudnn_part(model, args, reference):
    """C: cuDNN attention chosen at compile time (the backend is picked when SDPA is lowered)."""
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        aoti_part("C_aoti_cudnn_attention", model, args, reference, {}, "/tmp/unet-cudnn.pt2")
    except Exception as error:  # noqa: BLE001 - an exploration: record and go on
        save("C_aoti_cudnn_attention", {"error": repr(error)[:400]})
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)


def fresh_process_part(package):
    """E: a fresh process that only loads the default artifact."""
    probe = f"""
import time; t0 = time.perf_counter()
import torch, diffusers; t1 = time.perf_counter()
from torch._inductor import aoti_load_package
m = aoti_load_package({package!r}); t2 = time.perf_counter()
fqns = m.get_constant_fqns()
from ldmkit.bench import random_sd15
unet = random_sd15(torch.device('cuda')).unet.half(); unet.fuse_qkv_projections(); unet.to(memory_format=torch.channels_last)
state = {{'unet.' + k: v for k, v in unet.state_dict().items()}}; t3 = time.perf_counter()
m.load_constants({{k: state[k] for k in fqns}}, check_full_update=True, user_managed=True); torch.cuda.synchronize(); t4 = time.perf_counter()
args = (torch.randn(2, 4, 64, 64, device='cuda', dtype=torch.float16), torch.tensor(500.0, device='cuda'), torch.randn(2, 77, 768, device='cuda', dtype=torch.float16))
m(*args); torch.cuda.synchronize(); t5 = time.perf_counter()
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s): m(*args)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g): out = m(*args)
g.replay(); torch.cuda.synchronize(); t6 = time.perf_counter()
print('PROBE', dict(imports=round(t1-t0,2), load_package=round(t2-t1,2), make_unet=round(t3-t2,2), load_constants=round(t4-t3,2), first_call=round(t5-t4,2), graph_capture=round(t6-t5,2)))
"""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=240)
    line = [x for x in run.stdout.splitlines() if x.startswith("PROBE")]
    save(
        "E_fresh_process",
        {"whole_s": round(time.perf_counter() - start, 1), "parts": line[0] if line else run.stderr[-600:]},
    )


def tuned_part(model, args, reference):
    """D: diffusers' tutorial inductor settings (coordinate descent tuning makes compiling slower)."""
    try:
        aoti_part(
            "D_aoti_tuned",
            model,
            args,
            reference,
            {
                "conv_1x1_as_mm": True,
                "coordinate_descent_tuning": True,
                "epilogue_fusion": False,
                "coordinate_descent_check_all_directions": True,
            },
            "/tmp/unet-tuned.pt2",
        )
    except Exception as error:  # noqa: BLE001
        save("D_aoti_tuned", {"error": repr(error)[:400]})


if __name__ == "__main__":
    main()
