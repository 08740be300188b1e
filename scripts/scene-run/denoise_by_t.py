"""Which UNet denoises single emoji better, timestep by timestep: the plain v-prediction error of two UNets on
the same noised latents, for single emoji on a 256 px canvas (as the scene stage draws them, 0.45-0.6 of the side)
and close-ups on 128 px (0.9-1.0). A teacher only adds what the student lacks where its error is the lower one.
Then the first UNet's error on the data set's own 128 px images against the same sprites drawn by the compositor
at 1.0, 0.95 and 0.9 of the side (bare names as captions): how much its answers depend on the exact framing.

Run on a CPU in about five minutes (the shipped VAE and text encoder; captions in the shipped data's words):
  .venv/bin/python scripts/scene-run/denoise_by_t.py [--a DIR] [--b DIR] [--count N] [--seed S]
"""

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from probe import SHIPPED, Frozen, load_unet

from ldmkit.data import emoji, scenes
from ldmkit.data.scenes import Placed, Scene
from ldmkit.train.compose import Compositor, SceneBatch

TIMESTEPS = (50, 200, 400, 600, 800, 950)
CANVASES = ((256, (0.45, 0.6)), (128, (0.9, 1.0)))  # (side, the emoji's share of it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default=f"{SHIPPED}/unet", help="a UNet folder (default: the shipped one)")
    parser.add_argument("--b", default="checkpoints/scene-unet", help="another UNet folder")
    parser.add_argument("--data", default=".data/emoji", help="`ldm data emoji --resolution 256` output")
    parser.add_argument("--count", type=int, default=64, help="emoji per canvas")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    frozen = Frozen()
    unets = {"a": load_unet(args.a), "b": load_unet(args.b)}
    sprites, sampler = scenes.load_sampler(Path(args.data), None, (1, 0, 0, 0, 0, 0), (0.45, 0.6), 0.8)
    compositor = Compositor(sprites, "cpu")
    print(f"a: {args.a}\nb: {args.b}\nv-prediction MSE, {args.count} single emoji per canvas, seed {args.seed}")

    @torch.no_grad()
    def errors(images: torch.Tensor, captions: list[str], unet) -> list[float]:
        """unet's v-prediction MSE on these images (B, 3, H, W) in [-1, 1], at each of TIMESTEPS."""
        latents, states = frozen.latents(images), frozen.states(captions)
        found = []
        for t in TIMESTEPS:
            noisy, target = frozen.noised(latents, t, args.seed)
            prediction = unet(noisy, torch.full((len(captions),), t), states).sample
            found.append(float(((prediction - target) ** 2).mean()))
        return found

    def row(label: str, values: list[float]) -> None:
        print(f"{label:<44}" + "".join(f"{v:8.4f}" for v in values))

    print(f"{'':<44}" + "".join(f"{f't={t}':>8}" for t in TIMESTEPS))
    for side, share in CANVASES:
        rng = random.Random(args.seed)
        classic = sampler.classic_only(share)  # built once a canvas, not once an emoji
        drawn = [classic.sample(rng) for _ in range(args.count)]
        with torch.no_grad():
            images = compositor(SceneBatch(drawn, "cpu"), side, side, torch.Generator().manual_seed(args.seed))
        for name, unet in unets.items():
            row(
                f"{side} px, emoji at {share[0]}-{share[1]}: {name}", errors(images, [s.canonical for s in drawn], unet)
            )

    own, records = emoji.load(Path(args.data))
    picked = random.Random(args.seed).sample(range(len(own)), args.count)
    names = [records[i].name for i in picked]
    as_built = torch.tensor(np.stack([own[i] for i in picked])).permute(0, 3, 1, 2).float() / 127.5 - 1
    row("a on the data set's 128 px images", errors(as_built, names, unets["a"]))
    for share in (1.0, 0.95, 0.9):
        placed = [
            Scene([Placed(i, 0.5, 0.5, share)], "white", "none", name, "classic", name)
            for i, name in zip(picked, names)
        ]
        with torch.no_grad():
            images = compositor(SceneBatch(placed, "cpu"), 128, 128, torch.Generator().manual_seed(args.seed))
        row(f"a on the same, composited at {share} of 128 px", errors(images, names, unets["a"]))


if __name__ == "__main__":
    main()
