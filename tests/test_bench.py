"""`ldm bench` on the CPU with a tiny saved model: the table has its rows and sane numbers."""

import argparse
import json
import math

import pytest
from conftest import make_tiny_components

from ldmkit import bench
from ldmkit.errors import InvalidRequest
from ldmkit.loading import save_pretrained


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_pretrained(make_tiny_components(), tmp_path_factory.mktemp("bench") / "tiny")


def test_bench_table_on_cpu(tiny_model, tmp_path, capsys):
    out, raw = tmp_path / "table.md", tmp_path / "bench.json"
    argv = [
        "--model",
        str(tiny_model),
        "--size",
        "16",
        "--steps",
        "3",
        "--warmup",
        "0",
        "--repeats",
        "2",
        "--device",
        "cpu",
    ]
    assert bench.main([*argv, "--out", str(out), "--json", str(raw)]) == 0
    table = capsys.readouterr().out
    assert table == out.read_text()
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    # diffusers-compiled is left out by default on the CPU, where compiling costs minutes.
    assert names == ["diffusers", "ours", "ours-fast"]
    rows = {row["name"]: row for row in json.loads(raw.read_text())["rows"]}
    for row in rows.values():
        assert row["error"] is None
        assert row["its"] > 0 and math.isclose(row["its"], 3 / row["latency_s"])
        assert row["first_image_s"] > 0
        assert row["peak_mem_gib"] is None  # no GPU
        assert row["psnr_compiled"] is None
    assert rows["diffusers"]["psnr_eager"] == math.inf  # against itself
    # Same weights, seeds and sampler in fp32: at most one 8-bit level apart.
    assert rows["ours"]["psnr_eager"] > 48 and rows["ours-fast"]["psnr_eager"] > 48


def test_bench_without_diffusers_leaves_psnr_empty(tiny_model, capsys):
    argv = [
        "--model",
        str(tiny_model),
        "--size",
        "16",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--no-diffusers",
    ]
    assert bench.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ours")]
    assert [r.split("|")[1].strip() for r in rows] == ["ours", "ours-fast"]
    assert all(r.rstrip(" |").endswith("| - | -") for r in rows)


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
