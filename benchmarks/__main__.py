"""The one driver: `python -m benchmarks SCENARIO [options]` (`python -m benchmarks` lists them)."""

import importlib
import sys

# scenario -> (module in this package, one line on what it measures)
SCENARIOS = {
    "table": ("table", "`ldm bench`'s table (ours vs diffusers, eager and fast), optionally with ablation rows"),
    "first-image": ("startup", "a fresh `ldm generate --fast` process on empty compile caches: the first image"),
    "warm-start": ("startup", "the same command again on the caches the first run filled"),
    "tiling": ("tiling", "large images with the tiled VAE: peak memory, time, seams against a whole decode"),
    "step-profile": ("step_profile", "a warm --fast generation's time outside the UNet (GPU idle per phase)"),
    "scaling": ("scaling", "images/s and UNet training samples/s on 1, 2, ... N GPUs"),
    "scene-step": ("scene_step", "`ldm train scene`'s step in parts: VAE encode and UNet step, eager and compiled"),
}


def usage() -> str:
    lines = ["usage: python -m benchmarks SCENARIO [options]  (SCENARIO --help for its options)", ""]
    lines += [f"  {name:<12} {what}" for name, (_, what) in SCENARIOS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SCENARIOS:
        print(usage(), file=sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"benchmarks.{SCENARIOS[argv[0]][0]}")
    return module.main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
