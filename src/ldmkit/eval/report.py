"""`ldm eval`: prompt adherence of generated images next to real ones, and VAE reconstruction PSNR."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ldmkit.data.emoji import SOURCES
from ldmkit.errors import LdmError
from ldmkit.eval import metrics, scenes
from ldmkit.eval.generate import generate, load_model
from ldmkit.loading import DEFAULT_MODEL_DIR
from ldmkit.pipeline import Pipeline
from ldmkit.train.common import holdout_mask, load_dataset

# The fixed evaluation prompts: 256 emoji names (a seeded draw from the names present in >= 3 of the 4 sets),
# each with the styles it exists in, tab separated.
PROMPTS_FILE = Path(__file__).parent.parent / "assets" / "eval-prompts.tsv"  # assets/ ships in the wheel
# The entries of generate_eval_images' dict that are not images: how they were made (`ldm eval --generate-only`
# saves them with the images, so that scoring elsewhere records the settings the images were made with).
SETTINGS = ("seconds", "steps", "guidance", "size")


def style_table() -> dict[str, list[str]]:
    table = {}
    for line in PROMPTS_FILE.read_text().splitlines():
        name, _, styles = line.partition("\t")
        table[name] = styles.split(",")
    return table


def eval_prompts() -> list[str]:
    return list(style_table())


def styled_prompts(prompts: list[str], available: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Each eval prompt with one style it exists in, cycling through the styles."""
    return [(p, sorted(available[p])[i % len(available[p])]) for i, p in enumerate(prompts)]


def load_eval_model(model_dir: Path | None, device=None) -> Pipeline:
    """The model to evaluate (None: the shipped one), on the GPU where there is one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return load_model(Path(model_dir or DEFAULT_MODEL_DIR), device)


def generate_eval_images(
    model: Pipeline,
    num_prompts: int | None = None,
    steps: int = 25,
    guidance: float | None = None,
    seed: int = 0,
    name_seeds: int = 1,
    size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The images `evaluate` scores (no data set or CLIP needed): plain prompts and "name, style" prompts; with
    name_seeds > 1 the plain prompts again at seeds seed+1, ... ("plain_seed1", ...); and SETTINGS. `size` (square,
    default the model's own) can ask a scene model how it draws at another scale, e.g. 128 px close-ups."""
    guidance = model.default_guidance if guidance is None else guidance
    prompts = eval_prompts()[:num_prompts]
    styled = styled_prompts(prompts, style_table())
    size = size or model.default_size
    start = time.perf_counter()
    plain = generate(model, prompts, [seed] * len(prompts), steps, guidance, height=size, width=size)
    seconds = torch.tensor(time.perf_counter() - start)
    styled_prompts_ = [f"{p}, {s}" for p, s in styled]
    with_style = generate(model, styled_prompts_, [seed] * len(styled), steps, guidance, height=size, width=size)
    images = {"plain": plain, "styled": with_style, "seconds": seconds}
    images |= {"steps": torch.tensor(steps), "guidance": torch.tensor(float(guidance)), "size": torch.tensor(size)}
    for k in range(1, name_seeds):
        images[f"plain_seed{k}"] = generate(
            model, prompts, [seed + k] * len(prompts), steps, guidance, height=size, width=size
        )
    for name, set_prompts in scenes.prompt_sets().items():
        seeds = [seed + s for s in scenes.seeds_for(name, len(set_prompts))]
        images[name] = generate(model, set_prompts, seeds, steps, guidance, height=size, width=size)
    return images


def evaluate(
    model_dir: Path | None,
    clip_dir: Path,
    data_dir: Path,
    num_prompts: int | None = None,
    steps: int = 25,
    guidance: float | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.02,
    device=None,
    images: dict | None = None,
    name_seeds: int = 1,
    size: int | None = None,
) -> dict:
    """All metrics; `images` (from generate_eval_images, e.g. made on a GPU) skips generation here. `guidance`
    None is the model's own, and the results record the number; images that say how they were made (SETTINGS) are
    recorded so, and a different `guidance` given with them is refused."""
    from transformers import CLIPModel

    if images is not None and "guidance" in images:  # made elsewhere (--generate-only), with their own settings
        made = float(images["guidance"])
        if guidance is not None and guidance != made:  # before any model loads
            raise LdmError(f"--guidance {guidance}: the images were generated at guidance {made}")
        guidance, steps = made, int(images["steps"])
        if size is not None and "size" in images and size != int(images["size"]):
            raise LdmError(f"--size {size}: the images were generated at {int(images['size'])} px")
    model = load_eval_model(model_dir, device)
    device = model.device
    guidance = model.default_guidance if guidance is None else guidance  # also for image sets that do not say
    if images is None:
        images = generate_eval_images(model, num_prompts, steps, guidance, seed, name_seeds, size)
    clip = CLIPModel.from_pretrained(clip_dir, torch_dtype=torch.float32).to(device).eval()
    dataset = load_dataset(Path(data_dir))
    results: dict = {
        "model": str(model_dir or DEFAULT_MODEL_DIR),
        "scored_on": str(device),
        "steps": steps,
        "guidance": guidance,
        "size": int(images["size"]) if "size" in images else model.default_size,
        "sampler": "DPM++ 2M Karras",
    }

    held_out = dataset.subset(holdout_mask(dataset, holdout_fraction))
    results["vae_psnr_heldout_db"] = metrics.reconstruction_psnr(model.vae, held_out.images, device)
    results["vae_heldout_images"] = len(held_out)

    # Prompt adherence: which of all the data set's names does CLIP pick for an image of prompt p?
    prompts = eval_prompts()[:num_prompts]
    names = sorted({r.name for r in dataset.records})
    name_index = {name: i for i, name in enumerate(names)}
    name_feats = metrics.text_features(clip, names, device)
    generated = images["plain"][: len(prompts)]
    results["generation_seconds"] = float(images["seconds"])
    targets = torch.tensor([name_index[p] for p in prompts])
    more_seeds = sorted((int(key.removeprefix("plain_seed")), key) for key in images if key.startswith("plain_seed"))
    by_seed = [(seed, generated)] + [(seed + k, images[key][: len(prompts)]) for k, key in more_seeds]
    names_by_seed = [{"seed": s, **_name_scores(clip, imgs, name_feats, targets, device)} for s, imgs in by_seed]
    real_rows = [i for i, r in enumerate(dataset.records) if r.name in set(prompts)]
    real_targets = torch.tensor([name_index[dataset.records[i].name] for i in real_rows])
    real = metrics.retrieval_accuracy(
        metrics.image_features(clip, dataset.images[real_rows], device), name_feats, real_targets
    )
    results.update(
        prompts=len(prompts),
        candidates=len(names),
        generated=names_by_seed[0]["whole"],
        generated_object_crop=names_by_seed[0]["object_crop"],
        plain_white_background=names_by_seed[0]["white_background"],
        names_by_seed=names_by_seed,
        real=real,
        real_images=len(real_rows),
    )

    # Style adherence: "name, style" prompts; CLIP picks among the same name in each of the 4 styles, on the whole
    # image and (as for the names) on the square around the drawn object.
    styles = [s.style for s in SOURCES]
    styled = styled_prompts(prompts, style_table())
    options = metrics.text_features(clip, [f"{p}, {o}" for p, _ in styled for o in styles], device)
    options = options.view(len(styled), len(styles), -1)
    truth = torch.tensor([styles.index(s) for _, s in styled])
    styled_images = images["styled"][: len(prompts)]
    picked = {}
    for key, imgs in (
        ("style_top1_generated", styled_images),
        ("style_top1_object_crop", scenes.object_crops(styled_images)),
    ):
        feats = metrics.image_features(clip, imgs, device)
        picked[key] = torch.einsum("nd,nkd->nk", feats, options.to(feats.device)).argmax(1).cpu()
        results[key] = float((picked[key] == truth).float().mean())
    # which style is drawn for which is asked (object crop): rows asked, columns picked, in `styles` order
    confusion = torch.zeros(len(styles), len(styles), dtype=torch.long)
    confusion.index_put_((truth, picked["style_top1_object_crop"]), torch.ones_like(truth), accumulate=True)
    results["style_confusion_object_crop"] = {"styles": styles, "counts": confusion.tolist()}

    # Composition: prompts as people type them, spatial, colour, counting, seed diversity.
    if all(key in images for key in scenes.prompt_sets() if key != "typed_unseen"):  # (older image sets lack it)
        by_name = {}
        for i, record in enumerate(dataset.records):
            by_name.setdefault(record.name, []).append(i)
        data_images = {n: dataset.images[by_name[n]] for n in scenes.DIVERSITY_NAMES if n in by_name}
        results["composition"] = scenes.score(images, clip, names, data_images, device)
    return results


def _name_scores(clip, images: torch.Tensor, name_feats: torch.Tensor, targets: torch.Tensor, device) -> dict:
    """Bare-name retrieval on the whole image and on the square around the drawn object (a scene model may draw it
    smaller than the frame), and the share drawn on a plain white background (the prompt asks for none)."""
    whole = metrics.retrieval_accuracy(metrics.image_features(clip, images, device), name_feats, targets)
    crops = scenes.object_crops(images)
    crop = metrics.retrieval_accuracy(metrics.image_features(clip, crops, device), name_feats, targets)
    return {"whole": whole, "object_crop": crop, "white_background": float(scenes.white_background(images).mean())}
