"""Can an AOTInductor artifact of a UNet be compiled once and loaded fast in a fresh process? (issue 5)

  python3 scripts/device_aoti_probe.py compile VARIANT MODEL   # export + compile, write /tmp/aoti-VARIANT.pt2
  python3 scripts/device_aoti_probe.py load VARIANT MODEL      # fresh process: load, weights, run, graph, time
VARIANT: nosoweights (weights kept out of the artifact), blob (weights beside the code in the package),
inso (inductor's default: weights inside the .so). MODEL: a diffusers folder, or "sd15" for random weights.
Prints one JSON line; a crash shows as a missing line and the exit status.
"""

import json
import sys
import time

T0 = time.perf_counter()
import torch
from device_explore_unet import UNetCall  # this script's folder is on sys.path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to check this script
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32

VARIANTS = {
    "nosoweights": {"aot_inductor.package_constants_in_so": False},
    "blob": {
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "binary_blob",
    },
    "inso": {},
}


def build(model_name):
    from diffusers import UNet2DConditionModel

    if model_name == "sd15":
        from ldmkit.bench import random_sd15

        unet = random_sd15(torch.device("cuda")).unet
    else:
        unet = UNet2DConditionModel.from_pretrained(model_name, subfolder="unet").to(DEVICE)
    unet = unet.to(dtype=DTYPE).eval()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    size = unet.config.sample_size
    torch.manual_seed(0)
    args = (
        torch.randn(2, unet.config.in_channels, size, size, device=DEVICE, dtype=DTYPE),
        torch.tensor(500.0, device=DEVICE),
        torch.randn(2, 77, unet.config.cross_attention_dim, device=DEVICE, dtype=DTYPE),
    )
    return UNetCall(unet), args


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main():
    action, variant, model_name = sys.argv[1:4]
    t_import = time.perf_counter() - T0
    package = f"/tmp/aoti-{variant}-{model_name.replace('/', '_')}.pt2"
    start = time.perf_counter()
    model, args = build(model_name)
    t_build = time.perf_counter() - start
    with torch.no_grad():
        reference = model(*args)
    result = {
        "action": action,
        "variant": variant,
        "model": model_name,
        "import_s": round(t_import, 2),
        "build_model_s": round(t_build, 2),
    }
    if action == "compile":
        from torch._inductor import aoti_compile_and_package

        start = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(model, args, strict=False)
        result["export_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        aoti_compile_and_package(exported, package_path=package, inductor_configs=VARIANTS[variant])
        result["compile_s"] = round(time.perf_counter() - start, 1)
        import os

        result["package_MB"] = round(os.path.getsize(package) / 1e6, 1)
        print("RESULT", json.dumps(result), flush=True)
        return
    from torch._inductor import aoti_load_package

    start = time.perf_counter()
    compiled = aoti_load_package(package, run_single_threaded=True)
    sync()
    result["load_package_s"] = round(time.perf_counter() - start, 2)
    print("loaded", flush=True)
    start = time.perf_counter()
    state = dict(model.state_dict())
    fqns = compiled.get_constant_fqns()
    result["constants"] = len(fqns)
    compiled.load_constants({k: state[k] for k in fqns}, check_full_update=True, user_managed=True)
    sync()
    result["load_constants_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    out = compiled(*args)
    out = out[0] if isinstance(out, (list, tuple)) else out
    sync()
    result["first_call_s"] = round(time.perf_counter() - start, 3)
    result["max_abs_err_vs_eager"] = float((out.float() - reference.float()).abs().max())
    if DEVICE == "cpu":
        print("RESULT", json.dumps(result), flush=True)
        return
    start = time.perf_counter()
    static = [a.clone() for a in args]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = compiled(*static)
    graph.replay()
    torch.cuda.synchronize()
    result["graph_capture_s"] = round(time.perf_counter() - start, 3)
    graph_out = graph_out[0] if isinstance(graph_out, (list, tuple)) else graph_out
    result["graph_err_vs_eager"] = float((graph_out.float() - reference.float()).abs().max())
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    result["graph_call_ms"] = round(begin.elapsed_time(end) / 50, 3)
    result["process_s"] = round(time.perf_counter() - T0, 2)
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
