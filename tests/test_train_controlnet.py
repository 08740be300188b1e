"""The ControlNet stage on a tiny random model and 32x32 shapes: maps, loss, resume, export, generation, edge F1."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.data.emoji import EmojiRecord
from ldmkit.errors import LdmError
from ldmkit.eval import controlnet as cn_eval
from ldmkit.train import common, control_maps, export, unet
from ldmkit.train import controlnet as cn_train

SIZE = 32
SHAPES = ["square", "disc", "bar", "cross"]
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 200, 60)}


def shape_mask(shape: str) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return {
        "square": (abs(yy - 16) < 9) & (abs(xx - 16) < 9),
        "disc": (yy - 16) ** 2 + (xx - 16) ** 2 < 100,
        "bar": (abs(xx - 16) < 4) & (abs(yy - 16) < 12),
        "cross": ((abs(xx - 16) < 3) | (abs(yy - 16) < 3)) & (abs(xx - 16) < 12) & (abs(yy - 16) < 12),
    }[shape]


def shape_image(shape: str, color: str) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    image[shape_mask(shape)] = COLORS[color]
    return image


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    records = [
        EmojiRecord(key=f"{s}-{c}", name=f"{c} {s}", style="flat icon", package="test") for s in SHAPES for c in COLORS
    ]
    np.save(folder / "images.npy", np.stack([shape_image(*r.key.split("-")) for r in records]))
    (folder / "records.json").write_text(json.dumps([r.__dict__ for r in records]))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random v-prediction model folder of the shipped model's layout: f=8 VAE, 2-level UNet, 1-layer CLIP."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    parts = tmp_path_factory.mktemp("parts")
    CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(parts / "text_encoder")
    AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        sample_size=SIZE,
    ).save_pretrained(parts / "vae")
    cfg = unet.UnetTrainConfig(block_out_channels=(16, 32), attention_heads=(2, 2), norm_num_groups=8)
    unet.build_model(cfg, cross_attention_dim=32, sample_size=SIZE // 8).save_pretrained(parts / "unet")
    DDPMScheduler.from_config(unet.SCHEDULER_CONFIG).save_pretrained(parts / "scheduler")
    folder = tmp_path_factory.mktemp("model") / "model"
    return export.assemble(parts / "text_encoder", parts / "vae", parts / "unet", parts / "scheduler", folder)


TINY = {
    "batch_size": 12,
    "lr": 1e-3,
    "warmup_steps": 2,
    "log_every": 10,
    "holdout_fraction": 0.3,
    "map_workers": 1,
    "ema_decay": 0.9,
}


@pytest.fixture(scope="module")
def trained(data_dir, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "controlnet"
    # Without the shifts, mirrors and half-empty captions: 60 tiny steps cannot average out their noise in the
    # loss (test_augmented_pairs_stay_aligned checks them).
    cfg = cn_train.ControlNetTrainConfig(
        data_dir=str(data_dir), out_dir=str(out), model_dir=str(model_dir), max_steps=60, max_shift=0, mirror=False,
        caption_dropout=0.15, **TINY,
    )  # fmt: skip
    return cfg, cn_train.train(cfg)


def test_maps_are_made_by_the_inference_preprocessors():
    image = shape_image("square", "red")
    mask = shape_mask("square")
    border = cn_eval._dilate(mask, 1) & cn_eval._dilate(~mask, 1)  # the 2 px band where inside meets outside
    image[border & mask] = 0  # a dark outline, as most emoji have: XDoG finds dark lines, not colour boundaries
    maps = control_maps.make_maps(image[None], seed=3, workers=1)
    assert maps.shape == (1, len(control_maps.KINDS), SIZE, SIZE) and maps.dtype == np.uint8
    assert np.array_equal(maps, control_maps.make_maps(image[None], seed=3, workers=1))  # seeded
    # every kind draws the square's outline: its line pixels lie within 2 px of the square's border (and cover it)
    for kind, control in zip(control_maps.KINDS, maps[0]):
        lines = control > 0
        scores = cn_eval.edge_f1(lines, border, tolerance=2)
        assert scores["precision"] > 0.9 and scores["recall"] > 0.5, (kind, scores)


def test_controlnet_stage_lowers_its_loss_and_holds_images_out(trained):
    cfg, result = trained
    history = [loss for _, loss in result["history"]]
    assert len(history) == 6 and all(np.isfinite(history))
    assert np.mean(history[-2:]) < np.mean(history[:2]), history
    dataset = common.load_dataset(cfg.data_dir)
    held_out = int(common.holdout_mask(dataset, cfg.holdout_fraction).sum())
    assert 0 < held_out < len(dataset) and result["train_images"] == len(dataset) - held_out


def test_checkpoint_resumes(trained, tmp_path):
    cfg, _ = trained
    checkpoint = torch.load(f"{cfg.out_dir}/ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 60 and "ema" in checkpoint and checkpoint["config"]["name"] == "emoji-lines"
    cfg.max_steps = 65
    assert cn_train.train(cfg)["steps"] == 65


def test_export_is_a_small_fp16_folder_that_guides_generation(trained, data_dir, model_dir):
    from ldmkit.controlnet import load_controlnet
    from ldmkit.pipeline import Pipeline

    cfg, result = trained
    folder = cn_train.EXPORT_SUBDIR
    exported = f"{cfg.out_dir}/{folder}/{cfg.name}"
    assert result["export"] == exported and result["export_bytes"] < 2_000_000
    from safetensors.torch import load_file

    weights = [load_file(p) for p in sorted(__import__("pathlib").Path(exported).glob("*.safetensors"))]
    assert weights and all(t.dtype == torch.float16 for w in weights for t in w.values())
    model = load_controlnet(exported)
    assert model.config.cross_attention_dim == 32
    # the zero convolutions have moved: the ControlNet changes the UNet's output
    assert max(float(block.weight.detach().abs().max()) for block in model.controlnet_down_blocks) > 0
    assert tuple(model.config.conditioning_embedding_out_channels) == cfg.conditioning_channels

    pipe = Pipeline.from_pretrained(model_dir, controlnet_dir=f"{cfg.out_dir}/{folder}")
    assert pipe.controlnets.names() == ["emoji-lines"]
    image = Image.fromarray(shape_image("disc", "red"))

    def generate(weight):
        unit = cn_eval.control_unit(cfg.name, image, "canny", weight)
        return np.asarray(pipe.generate("red disc", seed=1, steps=4, controls=[unit]).images[0])

    plain = np.asarray(pipe.generate("red disc", seed=1, steps=4).images[0])
    assert plain.shape == (SIZE, SIZE, 3)
    assert np.array_equal(generate(0.0), plain)  # weight 0 is the baseline the eval compares with
    assert not np.array_equal(generate(1.0), plain)


def test_edge_f1_on_known_arrays():
    reference = np.zeros((10, 10), bool)
    reference[5, 1:9] = True  # a horizontal line of 8 pixels
    assert cn_eval.edge_f1(reference, reference, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    shifted = np.roll(reference, 1, axis=0)  # one row down
    assert cn_eval.edge_f1(shifted, reference, 0)["f1"] == 0.0
    assert cn_eval.edge_f1(shifted, reference, 1)["f1"] == 1.0
    half = reference.copy()
    half[5, 5:9] = False  # 4 of the 8 pixels, all correct
    assert cn_eval.edge_f1(half, reference, 0) == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}
    assert cn_eval.edge_f1(half, reference, 1)["recall"] == 5 / 8  # column 5 is 1 px from the drawn column 4
    extra = reference.copy()
    extra[0, :] = True  # 8 right + 10 far from the line
    scores = cn_eval.edge_f1(extra, reference, 2)
    assert scores["precision"] == pytest.approx(8 / 18) and scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(2 * (8 / 18) / (8 / 18 + 1))
    empty = np.zeros_like(reference)
    assert cn_eval.edge_f1(empty, reference, 2)["f1"] == 0.0
    assert cn_eval.edge_f1(empty, empty, 2)["f1"] == 1.0
    diagonal = np.eye(10, dtype=bool)
    off_by_two = np.eye(10, k=2, dtype=bool)  # (i, i+2): 2 columns off, but 1 px (a square's reach) from (i+1, i+1)
    assert cn_eval.edge_f1(off_by_two, diagonal, 0)["precision"] == 0.0
    assert cn_eval.edge_f1(off_by_two, diagonal, 1)["precision"] == 1.0


def test_adherence_eval_and_grid(trained, data_dir, model_dir):
    cfg, result = trained
    exported = result["export"]
    metrics = cn_eval.evaluate_controlnet(
        model_dir, exported, data_dir, count=2, steps=3, holdout_fraction=cfg.holdout_fraction
    )
    assert metrics["images"] == 2 and metrics["held_out"]
    assert metrics["guidance"] == 7.5  # the model's own (its folder names none), recorded as the number used
    for key in ("caption_without", "caption_with", "empty_without", "empty_with"):
        for tol in ("tol1", "tol2"):
            assert 0.0 <= metrics[key][tol]["f1"] <= 1.0
            assert metrics[key]["tol2"]["recall"] >= metrics[key]["tol1"]["recall"]  # a looser tolerance finds more
    pipe = cn_eval.load_pipeline(model_dir)
    sketch = cn_eval.demo_sketches()[0][1]
    grid = cn_eval.control_grid(pipe, exported, [(sketch, "invert", ""), (sketch, "invert", "apple")], seeds=(0, 1))
    assert grid.size == (3 * SIZE, 2 * SIZE)


def test_adherence_eval_asks_the_model_at_its_own_size(trained, data_dir, model_dir, monkeypatch):
    """A model that draws larger than the data's images (a 256 px scene model, 128 px emoji) is asked at its own
    size, with the held-out images upsampled to it."""
    from ldmkit.pipeline import Pipeline

    cfg, result = trained
    monkeypatch.setattr(Pipeline, "default_size", property(lambda self: 2 * SIZE))
    sizes = []
    generate = cn_eval._generate

    def recording(pipe, prompts, seed, steps, guidance, size, unit=None):
        sizes.append(size)
        images = generate(pipe, prompts, seed, steps, guidance, size, unit)
        assert images[0].shape == (2 * SIZE, 2 * SIZE, 3)
        if unit is not None:
            assert unit.image.size == (2 * SIZE, 2 * SIZE)
        return images

    monkeypatch.setattr(cn_eval, "_generate", recording)
    metrics = cn_eval.evaluate_controlnet(
        model_dir, result["export"], data_dir, count=1, steps=2, holdout_fraction=cfg.holdout_fraction
    )
    assert set(sizes) == {(2 * SIZE, 2 * SIZE)} and 0.0 <= metrics["empty_with"]["tol2"]["f1"] <= 1.0


def test_cli_wires_the_stage_and_refuses_model_elsewhere(data_dir, model_dir):
    from ldmkit.train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "controlnet", "--data", str(data_dir), "--model", str(model_dir), "--minutes", "4"]
        + ["--set", "lr=1e-4"]
    )
    cfg = cli.stage_config("controlnet", args)
    assert isinstance(cfg, cn_train.ControlNetTrainConfig)
    assert (cfg.model_dir, cfg.max_minutes, cfg.lr, cfg.out_dir) == (str(model_dir), 4.0, 1e-4, ".runs/controlnet")
    with pytest.raises(LdmError, match="--model applies to `ldm train controlnet` and `phrasing` only"):
        cli.run_train(parser.parse_args(["train", "unet", "--model", str(model_dir)]))
    with pytest.raises(LdmError, match="--grid applies to --controlnet only"):
        cli.run_eval(parser.parse_args(["eval", "--grid", "x.png"]))
    with pytest.raises(LdmError, match="--prompts does not apply to --controlnet"):
        cli.run_eval(parser.parse_args(["eval", "--controlnet", str(model_dir), "--prompts", "3"]))
    with pytest.raises(LdmError, match="--name-seeds does not apply to --controlnet"):
        cli.run_eval(parser.parse_args(["eval", "--controlnet", str(model_dir), "--name-seeds", "3"]))
    with pytest.raises(LdmError, match="--size does not apply to --controlnet"):
        cli.run_eval(parser.parse_args(["eval", "--controlnet", str(model_dir), "--size", "128"]))
    with pytest.raises(LdmError, match="--name-seeds must be at least 1"):
        cli.run_eval(parser.parse_args(["eval", "--name-seeds", "0"]))
    with pytest.raises(LdmError, match="--name-seeds applies when the images are generated"):
        cli.run_eval(parser.parse_args(["eval", "--images", str(model_dir), "--name-seeds", "2"]))


def test_epsilon_models_are_refused(model_dir, data_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    config["prediction_type"] = "epsilon"
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    cfg = cn_train.ControlNetTrainConfig(data_dir=str(data_dir), out_dir=str(tmp_path / "cn"), model_dir=str(copy))
    with pytest.raises(LdmError, match="v-prediction"):
        cn_train.train(cfg)


def test_map_encoder_must_reach_the_latent_size(model_dir, data_dir, tmp_path):
    cfg = cn_train.ControlNetTrainConfig(
        data_dir=str(data_dir), out_dir=str(tmp_path / "cn"), model_dir=str(model_dir), conditioning_channels=(8, 16)
    )
    with pytest.raises(LdmError, match="conditioning_channels needs 4 entries"):
        cn_train.train(cfg)


def test_shifted_moves_each_sample_and_fills_what_it_uncovers():
    from ldmkit.train.controlnet import _shifted

    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    out = _shifted(x, torch.tensor([1, 0]), torch.tensor([-2, 0]), torch.full((1, 1, 1), -1.0))
    expected = torch.full((4, 5), -1.0)
    expected[1:, :3] = x[0, 0, :3, 2:]  # down 1, left 2
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[1], x[1])  # no move


def test_augmented_pairs_stay_aligned():
    from ldmkit.train.controlnet import augment_pairs

    generator = torch.Generator().manual_seed(3)
    control = torch.zeros(16, 3, 32, 32)
    for i in range(16):  # a different off-centre rectangle in each map
        control[i, :, 4 + i % 5 : 12 + i % 7, 6 + i % 3 : 20 + i % 4] = 1.0
    latents = F.avg_pool2d(control[:, :1], 8).expand(-1, 4, -1, -1)  # "latents" that are the map at 1/8
    white = torch.zeros(1, 4, 4, 4)  # the background's latent here: what an empty map pools to
    mirrorable = torch.arange(16) % 2 == 0
    moved_latents, moved_control = augment_pairs(latents, control, white, 2, mirrorable, generator)
    assert torch.equal(F.avg_pool2d(moved_control[:, :1], 8).expand(-1, 4, -1, -1), moved_latents)
    assert not torch.equal(moved_latents, latents)  # they did move
    # without shifts, only the mirrorable ones may come back mirrored
    same_latents, same_control = augment_pairs(latents, control, white, 0, mirrorable, generator)
    mirrored = [not torch.equal(same_control[i], control[i]) for i in range(16)]
    assert any(mirrored) and not any(m for m, ok in zip(mirrored, mirrorable) if not ok)
    assert all(torch.equal(same_control[i], control[i].flip(-1)) for i in range(16) if mirrored[i])


def test_place_on_canvas_draws_each_image_at_a_drawn_size_and_place():
    images = torch.from_numpy(np.stack([shape_image("square", "red"), shape_image("disc", "blue")])).permute(0, 3, 1, 2)
    placed, source = cn_train.place_on_canvas(images, 96, (0.5, 1.0), 3, seed=1)
    assert placed.shape == (6, 3, 96, 96) and placed.dtype == torch.uint8
    assert source.tolist() == [0, 0, 0, 1, 1, 1]
    again, _ = cn_train.place_on_canvas(images, 96, (0.5, 1.0), 3, seed=1)
    assert torch.equal(placed, again)  # seeded
    boxes = []
    for image, j in zip(placed, source.tolist()):
        ink = (image < 250).any(0).nonzero()
        top, left = ink.min(0).values.tolist()
        bottom, right = ink.max(0).values.tolist()
        boxes.append((top, left))
        # the shape's box scales with the image: the 32 px fixture's shapes span 17-23 px of it
        span = (bottom - top + 1) / 96 * SIZE
        assert 0.5 * 17 - 1 <= span <= 23 + 1, span
        colour = image[:, (top + bottom) // 2, (left + right) // 2].tolist()
        assert colour == list({0: COLORS["red"], 1: COLORS["blue"]}[j]), colour
    assert len(set(boxes)) > 1  # not all in one place
    with pytest.raises(LdmError, match="object_scale"):
        cn_train.place_on_canvas(images, 96, (0.0, 1.0), 1, seed=1)


def test_canvas_pairs_train_at_the_models_size(data_dir, model_dir, tmp_path):
    cfg = cn_train.ControlNetTrainConfig(
        data_dir=str(data_dir), out_dir=str(tmp_path / "cn"), model_dir=str(model_dir), max_steps=3, canvas=64,
        placements=2, **TINY,
    )  # fmt: skip
    result = cn_train.train(cfg)
    dataset = common.load_dataset(cfg.data_dir)
    kept = len(dataset) - int(common.holdout_mask(dataset, cfg.holdout_fraction).sum())
    assert result["train_images"] == 2 * kept and result["steps"] == 3
    assert all(np.isfinite(loss) for _, loss in result["history"])
