"""Do tiled VAE decode and encode leave seams on a trained VAE? (issue 5's large images)

python3 scripts/vae_seams.py PHOTO [--model FOLDER] [--size 2048] [--tile 512] [--out DIR]

The photo is resized to SIZE x SIZE and encoded; its latents are decoded whole and tiled, and the photo
is also encoded tiled and then decoded whole; each tiled way twice: diffusers' tiled VAE (overlapping
tiles, blended) and ldmkit.tiled_vae (shared GroupNorm statistics).
Each tiled result is compared with the whole one: PSNR, mean error, and how much sharper the jumps
across its tile joins are than the whole image's at the same places (a seam shows as a ratio above 1).
Crops around a join, magnified, amplified difference maps and a montage (whole | diffusers | ldmkit
decode) go to --out for looking at. The default model is the shipped one (a trained f=8
AutoencoderKL); --tile sets the tile size in pixels (SD's VAE uses 512, the shipped VAE's own is 128).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ldmkit import tiled_vae
from ldmkit.loading import DEFAULT_MODEL_DIR


def to_tensor(image):
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_array(tensor):
    return ((tensor[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def joins(method, tile, size, factor=8):
    """Pixel positions where one tile's kept part meets the next: diffusers' tiles step by 3/4 of a tile;
    ldmkit's are the nearly equal parts of tiled_vae._spans (the tile less its margin on each side)."""
    if method == "diffusers":
        stride = int(tile * 0.75)
        return list(range(stride, size, stride))
    latent_tile = tile // factor
    margin = max(latent_tile // 8, tiled_vae.MIN_MARGIN_PX // factor)
    spans = tiled_vae._spans(size // factor, latent_tile - 2 * margin, 1)
    return [start * factor for start, _ in spans[1:]]


def join_steps(a, b, positions):
    """How much sharper the jumps across tile joins are in `b` than in `a`: the mean absolute difference
    between the two pixel columns (and rows) on either side of each join, b's over a's. A seam shows as
    a ratio well above 1; the whole image's own edges at those places are the baseline."""
    steps = []
    for image in (a, b):
        pixels = image.astype(np.float64)
        across_columns = sum(np.abs(pixels[:, p] - pixels[:, p - 1]).mean() for p in positions)
        across_rows = sum(np.abs(pixels[p] - pixels[p - 1]).mean() for p in positions)
        steps.append(across_columns + across_rows)
    return float(steps[1] / max(steps[0], 1e-9))


def save_views(out, name, whole, tiled, at):
    """A 128 px crop around one join, whole | tiled, 4x nearest-neighbour; and the error map x8."""
    y0, x0 = at - 64, at - 64
    crops = [
        Image.fromarray(img[y0 : y0 + 128, x0 : x0 + 128]).resize((512, 512), Image.NEAREST) for img in (whole, tiled)
    ]
    side = Image.new("RGB", (1032, 512), "white")
    side.paste(crops[0], (0, 0))
    side.paste(crops[1], (520, 0))
    side.save(out / f"{name}-crop.png")
    error = np.abs(whole.astype(np.int16) - tiled.astype(np.int16)).max(axis=2) * 8
    Image.fromarray(np.clip(error, 0, 255).astype(np.uint8)).save(out / f"{name}-error-x8.png")


def save_montage(out, images, side=400):
    """whole | diffusers tiled decode | ldmkit tiled decode, each resized to side x side (docs/tiled-vae.png)."""
    montage = Image.new("RGB", (3 * side + 16, side), "white")
    for i, image in enumerate(images):
        montage.paste(Image.fromarray(image).resize((side, side), Image.LANCZOS), (i * (side + 8), 0))
    montage.save(out / "montage.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photo")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels")
    parser.add_argument("--out", default="/tmp/vae-seams")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(Path(args.model) / "vae").to(device).eval()
    photo = Image.open(args.photo).convert("RGB").resize((args.size, args.size), Image.LANCZOS)
    photo.save(out / "photo.png")
    pixels = to_tensor(photo).to(device)
    results = {"size": args.size, "tile_px": args.tile, "device": str(device)}
    with torch.inference_mode():
        latents = vae.encode(pixels).latent_dist.mean
        whole = to_array(vae.decode(latents).sample.cpu())
        tiled = {}
        # diffusers' tiling: its own switch and tile sizes (image and latent pixels); ldmkit's: functions of the VAE
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, args.tile // tiled_vae.scale_factor(vae)
        tiled["diffusers_tiled_decode"] = to_array(vae.decode(latents).sample.cpu())
        encoded = vae.encode(pixels).latent_dist.mean
        vae.disable_tiling()  # to see the encode's seams alone
        tiled["diffusers_tiled_encode"] = to_array(vae.decode(encoded).sample.cpu())
        tiled["ldmkit_tiled_decode"] = to_array(tiled_vae.decode(vae, latents, args.tile).cpu())
        encoded = tiled_vae.encode(vae, pixels, args.tile).mean
        tiled["ldmkit_tiled_encode"] = to_array(vae.decode(encoded).sample.cpu())
    Image.fromarray(whole).save(out / "whole.png")
    results["reconstruction_psnr_db"] = psnr(np.asarray(photo), whole)
    for name, image in tiled.items():
        Image.fromarray(image).save(out / f"{name}.png")
        results[name] = {
            "psnr_vs_whole_db": psnr(whole, image),
            "mean_abs_error": float(np.abs(whole.astype(np.float64) - image).mean()),
            "join_step_ratio": join_steps(whole, image, positions := joins(name.split("_")[0], args.tile, args.size)),
        }
        save_views(out, name, whole, image, positions[len(positions) // 2])
    save_montage(out, [whole, tiled["diffusers_tiled_decode"], tiled["ldmkit_tiled_decode"]])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
