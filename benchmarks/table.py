"""`ldm bench`'s table, with the ablation rows `ldm bench` does not ship (what each speed-up buys).

    python -m benchmarks table                      # the default rows, as `ldm bench`
    python -m benchmarks table --ablations          # + channels_last, fused QKV (eager), compile without graphs
    python -m benchmarks table --rows diffusers,ours-fast,ours-fast-no_fused_qkv   # any rows, in this order

Writes OUT/table.md (after every row, so a run stopped by a time limit keeps the rows it finished),
OUT/bench.json and OUT/env.json.
"""

from __future__ import annotations

import argparse

from ldmkit import bench

from .common import describe_environment, out_dir

# Cumulative on top of ours: channels_last, then fused QKV (both eager), then compile without CUDA graphs.
ABLATION_ROWS = ("ours+channels_last", "ours+fused_qkv", "ours+compile_default")
# The inductor settings of diffusers' "accelerate inference of text-to-image diffusion models" tutorial.
DIFFUSERS_TUTORIAL_INDUCTOR = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}
RUNNERS = {
    **bench.RUNNERS,
    "ours+channels_last": bench.ours({"channels_last": True, "fuse_qkv": False, "compile": False}),
    "ours+fused_qkv": bench.ours({"channels_last": True, "fuse_qkv": True, "compile": False}),
    "ours+compile_default": bench.ours({"cuda_graphs": False}),
    # make_fast with one piece left out or one more added, for what each buys under compile
    "ours-fast-no_channels_last": bench.ours({"channels_last": False}),
    "ours-fast-no_fused_qkv": bench.ours({"fuse_qkv": False}),
    "ours-fast+inductor_tuning": bench.ours({"inductor_options": DIFFUSERS_TUTORIAL_INDUCTOR}),
    # torch.compile's own CUDA graphs (traced per process) instead of ldmkit.cuda_graphs
    "ours-fast-inductor_graphs": bench.ours({"mode": "reduce-overhead"}),
}


def main(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.set_defaults(out=None, json=None)
    parser.add_argument("--ablations", action="store_true", help=f"add {', '.join(ABLATION_ROWS)}")
    parser.add_argument("--out-dir", default="bench-out", help="where table.md, bench.json and env.json go")
    parser.epilog = f"rows: {', '.join(RUNNERS)}"
    args = parser.parse_args(argv)
    out = out_dir(args.out_dir)
    args.out = args.out or out / "table.md"
    args.json = args.json or out / "bench.json"
    bench.quiet_libraries()
    describe_environment(out)
    return bench.run_bench(args, RUNNERS, ABLATION_ROWS if args.ablations else ())
