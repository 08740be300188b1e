"""Does a UNet use the caption to draw the objects of a scene? Its v-prediction error on the objects' pixels and on
the background's, given the scene's caption and given the empty caption, for each kind of scene the scene stage
draws (on a 256 px canvas; `classic` is one emoji on white at 0.45-0.6 of the side, `small` the same at 0.25-0.4,
the size of a `single` scene's object, so that size and background can be told apart).

The caption's gain on a region is 1 - error(caption) / error(empty caption): how much of what the UNet gets wrong
there without the caption it gets right with it. If objects gain much less in scenes than on white, the UNet draws
them from the background's context, not from their names: what a scene grid of shapeless mixtures would show.

Run on a CPU in about five minutes (the shipped VAE and text encoder, as the scene stage trains with them):
  .venv/bin/python scripts/scene-run/object_error.py [--unet DIR] [--count N] [--seed S]
"""

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from probe import Frozen, load_unet

from ldmkit.data import scenes
from ldmkit.train.compose import Compositor, SceneBatch

KINDS = ("classic", "small", "single", "pair", "count", "wearing", "float")
TIMESTEPS = (200, 400, 600, 800)
SIDE = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default="checkpoints/scene-unet", help="a UNet folder")
    parser.add_argument("--data", default=".data/emoji", help="`ldm data emoji --resolution 256` output")
    parser.add_argument("--count", type=int, default=24, help="scenes of each kind")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    frozen, unet = Frozen(), load_unet(args.unet)
    sprites, sampler = scenes.load_sampler(Path(args.data), None, scenes.SceneSampler.DEFAULT_SHARES, (0.45, 0.6), 0.8)
    compositor = Compositor(sprites, "cpu")

    rng = random.Random(args.seed)
    drawn: dict[str, list[scenes.Scene]] = {kind: [] for kind in KINDS}
    while any(len(found) < args.count for kind, found in drawn.items() if kind != "small"):
        scene = sampler.sample(rng)
        if len(drawn[scene.kind]) < args.count:
            drawn[scene.kind].append(scene)
    small = sampler.classic_only((0.25, 0.4))
    drawn["small"] = [small.sample(rng) for _ in range(args.count)]

    print(f"unet: {args.unet}; {args.count} scenes of each kind at {SIDE} px, seed {args.seed}")
    print("v-prediction MSE on the objects' latent pixels (obj) and the background's (bg), with the caption and with")
    print("the empty caption; gain = 1 - caption / empty. Averaged over t in " + ", ".join(map(str, TIMESTEPS)))
    print("kind      obj share      obj obj empty obj gain       bg bg empty  bg gain")
    empty = frozen.states([""])
    for kind, found in drawn.items():
        with torch.no_grad():
            images, covered = compositor(
                SceneBatch(found, "cpu"), SIDE, SIDE, torch.Generator().manual_seed(args.seed), coverage=True
            )
            latents = frozen.latents(images)
            # a latent pixel is the object's when the objects cover most of its 8x8 pixels
            objects = (F.avg_pool2d(covered, 8) > 0.5).float()
            states = frozen.states([s.caption for s in found])
            sums = torch.zeros(4)  # obj caption, obj empty, bg caption, bg empty
            for t in TIMESTEPS:
                noisy, target = frozen.noised(latents, t, args.seed)
                timesteps = torch.full((len(found),), t)
                for column, given in enumerate((states, empty.expand_as(states))):
                    error = ((unet(noisy, timesteps, given).sample - target) ** 2).mean(1, keepdim=True)
                    sums[column] += (error * objects).sum() / objects.sum()
                    sums[2 + column] += (error * (1 - objects)).sum() / (1 - objects).sum()
        obj, obj_empty, bg, bg_empty = (sums / len(TIMESTEPS)).tolist()
        print(
            f"{kind:<9}{float(objects.mean()):>10.3f}{obj:>9.4f}{obj_empty:>10.4f}{1 - obj / obj_empty:>9.3f}"
            f"{bg:>9.4f}{bg_empty:>9.4f}{1 - bg / bg_empty:>9.3f}"
        )


if __name__ == "__main__":
    main()
