"""`ldm bench` on the CPU with tiny saved models: the table's rows, units and numbers, on a clock of the test's own."""

import argparse
import dataclasses
import itertools
import json
import math

import pytest
import torch
from conftest import make_tiny_components
from support.sdxl import make_tiny_sdxl_components
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldmkit import bench
from ldmkit.errors import InvalidRequest
from ldmkit.loading import load_components, save_pretrained
from ldmkit.params import GenerationParams


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_pretrained(make_tiny_components(), tmp_path_factory.mktemp("bench") / "tiny")


STEP_S = 0.25  # what every timed call takes on the test's clock


@pytest.fixture
def fake_clock(monkeypatch):
    """bench's clock advancing STEP_S per reading: each timed interval (two readings in a row) is STEP_S."""
    readings = itertools.count()
    monkeypatch.setattr(bench, "clock", lambda: next(readings) * STEP_S)


def table_rows(table: str) -> list[list[str]]:
    """The markdown table's cells, header first, without the |---| line."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def cpu_flops(components, request) -> float:
    """One UNet call of a step counted on real CPU tensors: what count_unet_flops counts on the meta device.

    Attention through SDPA's math backend (its two matmuls counted as such): the flop counter knows the CUDA
    attention kernels' FLOPs but not those of the CPU's fused kernel."""
    sample, timestep, kwargs = bench.unet_inputs(components, request, torch.device("cpu"), torch.float32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        components.unet(sample, timestep, return_dict=False, **kwargs)
    return float(counter.get_total_flops())


def test_bench_table_on_cpu(tiny_model, tmp_path, capsys, fake_clock):
    out, raw = tmp_path / "table.md", tmp_path / "bench.json"
    argv = ["--model", str(tiny_model), "--size", "16", "--steps", "3", "--warmup", "0", "--repeats", "2"]
    argv += ["--batch", "2", "--device", "cpu"]
    assert bench.main([*argv, "--out", str(out), "--json", str(raw)]) == 0
    table = capsys.readouterr().out
    assert table == out.read_text()
    header, *rows = table_rows(table)
    assert header == list(bench.COLUMNS)  # the units are in the header
    # diffusers-compiled is left out by default on the CPU, where compiling costs minutes.
    assert [row[0] for row in rows] == ["diffusers", "ours", "ours-fast"]
    request = GenerationParams(bench.PROMPT, width=16, height=16, num_images=2).resolved(16)
    flops = cpu_flops(make_tiny_components(), request)
    results = {row["name"]: row for row in json.loads(raw.read_text())["rows"]}
    for row in rows:
        result = results[row[0]]
        assert result["error"] is None
        # every timed interval is STEP_S on the fake clock: 3 steps in 0.25 s, 2 images a call
        assert (result["latency_s"], result["first_image_s"], result["its"]) == (STEP_S, STEP_S, 3 / STEP_S)
        assert result["s_per_image"] == STEP_S / 2
        assert result["run_tflops"] == pytest.approx(3 * flops / STEP_S / 1e12, rel=1e-12)
        # no GPU: no peak memory, no CUDA-event timing of the UNet and decode, so no UNet TFLOP/s
        assert [result[k] for k in ("peak_mem_gib", "unet_ms", "decode_ms", "unet_tflops", "psnr_compiled")] == [
            None
        ] * 5
        assert row[1:5] == ["12.00", "0.250", "0.125", "0.2"] and row[5] == "-"
        assert row[10] == f"{3 * flops / STEP_S / 1e12:.1f}" and row[9] == row[11] == row[12] == "-"
    assert results["diffusers"]["psnr_eager"] == math.inf  # against itself
    # Same weights, seeds and sampler in fp32: at most one 8-bit level apart.
    assert results["ours"]["psnr_eager"] > 48 and results["ours-fast"]["psnr_eager"] > 48
    assert [row[6] for row in rows] == ["inf"] + [f"{results[n]['psnr_eager']:.1f}" for n in ("ours", "ours-fast")]


def test_bench_sdxl_rows_match_diffusers(tmp_path_factory, tmp_path, capsys, fake_clock):
    folder = save_pretrained(make_tiny_sdxl_components(seed=2), tmp_path_factory.mktemp("bench") / "tiny-sdxl")
    raw = tmp_path / "bench.json"
    argv = ["--model", str(folder), "--size", "16", "--steps", "3", "--warmup", "0", "--repeats", "1"]
    assert bench.main([*argv, "--device", "cpu", "--sampler", "Euler", "--json", str(raw)]) == 0
    rows = {row["name"]: row for row in json.loads(raw.read_text())["rows"]}
    assert list(rows) == ["diffusers", "ours", "ours-fast"]
    # diffusers' StableDiffusionXLPipeline against ours, same weights, noise and sampler in fp32
    assert rows["ours"]["psnr_eager"] > 48 and rows["ours-fast"]["psnr_eager"] > 48
    components = load_components(str(folder))
    flops = cpu_flops(components, GenerationParams(bench.PROMPT, width=16, height=16).resolved(16))
    assert rows["ours"]["run_tflops"] == pytest.approx(3 * flops / STEP_S / 1e12, rel=1e-12)


@pytest.mark.parametrize("make", [make_tiny_components, make_tiny_sdxl_components])
def test_unet_flops_counted_on_the_meta_device_are_those_of_a_real_call(make):
    components = make()
    request = GenerationParams(bench.PROMPT, width=16, height=16, num_images=3).resolved(16)
    assert bench.count_unet_flops(components, request, torch.float32) == cpu_flops(components, request)
    # without guidance the UNet's batch halves, and so do its FLOPs
    single = dataclasses.replace(request, guidance=1.0)
    assert 2 * bench.count_unet_flops(components, single, torch.float32) == cpu_flops(components, request)


def test_sdxl_family_rows_and_size():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--family", "sdxl"])
    assert (args.family, args.size, bench.DEFAULT_SIZE[args.family]) == ("sdxl", None, 1024)
    assert bench.select_rows(args, torch.device("cuda"), bench.RUNNERS) == [
        "diffusers", "ours", "ours-offload", "ours-fast", "diffusers-compiled",
    ]  # fmt: skip
    assert bench.select_rows(args, torch.device("cpu"), bench.RUNNERS) == ["diffusers", "ours", "ours-fast"]


def test_random_sdxl_is_sdxl_base_shaped():
    # Parameter counts of SDXL base 1.0's components (UNet 2.6B, as the SDXL paper states; the others as the
    # published checkpoints hold them): built on the meta device, no memory used.
    components = bench.random_sdxl(torch.device("meta"))
    counts = [sum(p.numel() for p in m.parameters()) for m in bench._models(components)]
    assert counts == [123_060_480, 694_659_840, 2_567_463_684, 83_653_863]
    assert components.unet.config.addition_embed_type == "text_time" and not components.vae.config.force_upcast


def test_bench_without_diffusers_leaves_psnr_empty_and_takes_the_models_size(tiny_model, capsys):
    argv = ["--model", str(tiny_model), "--steps", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu"]
    assert bench.main([*argv, "--no-diffusers"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("tiny, 16x16, 2 DDIM steps,")  # no --size: the model's (sample_size 8 x VAE factor 2)
    header, *rows = table_rows(table)
    assert [row[0] for row in rows] == ["ours", "ours-fast"]
    psnr_columns = [header.index("PSNR vs diffusers eager (dB)"), header.index("PSNR vs diffusers compiled (dB)")]
    assert all(row[i] == "-" for row in rows for i in psnr_columns)


def test_register_adds_the_bench_subcommand():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--size", "256", "--steps", "20", "--no-diffusers"])
    assert args.func is bench.run_bench
    assert (args.size, args.steps, args.sampler, args.batch, args.no_diffusers) == (256, 20, "DDIM", 1, True)


def test_unknown_row_is_refused(tiny_model):
    with pytest.raises(InvalidRequest, match="unknown rows"):
        bench.main(["--model", str(tiny_model), "--device", "cpu", "--rows", "ours,warp-speed"])
    with pytest.raises(InvalidRequest, match="unknown rows"):  # ablation rows are benchmarks/' only
        bench.main(["--model", str(tiny_model), "--device", "cpu", "--rows", "ours+fused_qkv"])


def test_benchmarks_table_adds_the_ablation_rows_which_compute_the_same_images(tiny_model, tmp_path, capsys):
    from benchmarks import __main__ as driver

    argv = ["table", "--model", str(tiny_model), "--size", "16", "--steps", "2", "--warmup", "0", "--repeats", "1"]
    argv += ["--device", "cpu", "--rows", "diffusers,ours", "--ablations", "--out-dir", str(tmp_path)]
    assert driver.main(argv) == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert list(rows) == ["diffusers", "ours", "ours+channels_last", "ours+fused_qkv", "ours+compile_default"]
    # the same weights, seeds and sampler in fp32 (nothing compiles on the CPU): within one 8-bit level of diffusers
    assert all(row["error"] is None and row["psnr_eager"] > 48 for row in rows.values())
    assert capsys.readouterr().out.endswith((tmp_path / "table.md").read_text())  # after the environment line
    assert json.loads((tmp_path / "env.json").read_text())["gpus"] == []


def test_step_profile_phases_from_a_trace():
    """A hand-made trace: 3 ms of prompt encoding (1 ms of it on the GPU), two 10 ms steps whose kernels cover 8 ms
    each, then a 4 ms decode; the phases, the GPU's idle time and the per-step kernel time follow from it."""
    from benchmarks.step_profile import MARK, analyse

    def event(name, cat, ts, dur):
        return {"name": name, "cat": cat, "ts": ts, "dur": dur}

    events = [
        event("generate", "user_annotation", 0, 20_000),
        event("encoder", "kernel", 1_000, 1_000),
        event(MARK, "user_annotation", 3_000, 100),
        event(MARK, "user_annotation", 3_200, 100),
        event(MARK, "gpu_user_annotation", 4_000, 10_000),
        event(MARK, "gpu_user_annotation", 14_000, 10_000),
        *[event("unet", "kernel", 4_000 + 10_000 * i + 1_000 * k, 800) for i in range(2) for k in range(10)],
        event("decode", "kernel", 24_000, 4_000),
    ]
    result = analyse(events)
    assert result["before"] == {"wall_ms": 3.0, "gpu_busy_ms": 1.0, "gpu_idle_ms": 2.0}
    assert result["loop"] == {"wall_ms": 20.0, "gpu_busy_ms": 16.0, "gpu_idle_ms": 4.0}
    assert result["after"] == {"wall_ms": 4.0, "gpu_busy_ms": 4.0, "gpu_idle_ms": 0.0}
    assert result["total"]["wall_ms"] == 28.0  # the GPU's last kernel ends after the CPU's range
    assert result["steps"] == 2 and result["step_kernels_ms"]["mean"] == 8.0 and result["step_span_ms_mean"] == 10.0
