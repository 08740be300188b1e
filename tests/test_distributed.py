"""A prompt list split across processes (torchrun, gloo on CPU) fills the folder as one process would."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import make_tiny_components
from PIL import Image

from ldmkit.loading import save_pretrained

GENERATE = [
    "generate",
    "--prompts",
    "{prompts}",
    "-n",
    "2",
    "--steps",
    "3",
    "--sampler",
    "Euler a",
    "--seed",
    "100",
    "--size",
    "16x16",
    "--device",
    "cpu",
    "-q",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_pretrained(make_tiny_components(), root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("an otter\n\na red apple\nsmiling face with sunglasses\n")
    return root, prompts


def run(args):
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def folder_contents(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_split_run_matches_one_process(setup, launcher):
    root, prompts = setup
    args = [a.replace("{prompts}", str(prompts)) for a in GENERATE] + ["--model", str(root / "model")]
    if not (root / "single").exists():
        run([sys.executable, "-m", "ldmkit.cli", *args, "-o", str(root / "single")])
    run([*LAUNCHERS[launcher], "-m", "ldmkit.cli", *args, "-o", str(root / launcher)])
    single, split = folder_contents(root / "single"), folder_contents(root / launcher)
    # 3 prompts x 2 images: seeds 100..105 in prompt order, indices 1..6
    assert list(single) == [f"{i + 1:05d}-{100 + i}.png" for i in range(6)]
    assert list(split) == list(single)
    for name in single:
        assert np.array_equal(single[name], split[name]), name


@pytest.mark.slow
def test_torchrun_with_the_default_device_splits_the_prompts_on_a_cpu_machine(setup):
    """--device auto (the default) on a machine without CUDA: each prompt once, not once per process."""
    root, prompts = setup
    args = [a.replace("{prompts}", str(prompts)) for a in GENERATE if a not in ("--device", "cpu")]
    run([*LAUNCHERS["torchrun"], "-m", "ldmkit.cli", *args, "--model", str(root / "model"), "-o", str(root / "auto")])
    assert sorted(p.name for p in (root / "auto").iterdir()) == [f"{i + 1:05d}-{100 + i}.png" for i in range(6)]
