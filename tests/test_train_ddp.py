"""Training under DDP: two CPU processes (gloo, started by torchrun) run a stage to the end in step."""

import json
import subprocess
import sys

import pytest
import torch
from test_train import TINY_VAE, data_dir  # noqa: F401  (data_dir is a fixture)


def sets(config: dict) -> list[str]:
    return [arg for key, value in config.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def train_vae(launcher: list[str], data_dir, runs):  # noqa: F811
    train = ["-m", "ldmkit.cli", "train", "vae", "--data", str(data_dir), "--runs", str(runs), "--steps", "12"]
    out = subprocess.run(
        [*launcher, *train, *sets({**TINY_VAE, "log_every": 4})], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out, torch.load(runs / "vae" / "ckpt.pt", weights_only=True)


@pytest.mark.slow
def test_vae_stage_trains_under_two_process_ddp(data_dir, tmp_path):  # noqa: F811
    _, alone = train_vae([sys.executable], data_dir, tmp_path / "one")
    out, ddp = train_vae(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"], data_dir, tmp_path / "two"
    )
    # one log line per 4 steps, from the main process only, and both ranks reached the last step together
    lines = [line for line in out.stdout.splitlines() if line.startswith("vae step")]
    assert [line.split()[2] for line in lines] == ["4", "8", "12"]
    assert ddp["step"] == 12
    # rank 0 drew the same batches as the lone process; the other rank's gradients changed the result
    first = next(iter(alone["model"]))
    assert not torch.equal(alone["model"][first], ddp["model"][first])


def test_each_rank_draws_its_own_batches():
    from types import SimpleNamespace

    from ldmkit.train.common import process_generator

    draws = [
        torch.randint(
            0, 1000, (8,), generator=process_generator(SimpleNamespace(device="cpu", process_index=rank), 0, 0)
        )
        for rank in (0, 1, 0)
    ]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
