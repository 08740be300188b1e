"""Tiny CPU training runs of each stage on a handful of 32x32 images: the loss goes down, checkpoints resume."""

import argparse
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from ldmkit.data.emoji import EmojiRecord
from ldmkit.errors import LdmError
from ldmkit.train import clip, common, export, phrasing, scene, unet, vae

SIZE = 32
NAMES = ["red square", "green circle", "blue bar", "yellow cross"]
STYLES = ["flat icon", "3d render"]


def make_images(name: str, style: str) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    color = {
        "red square": (220, 30, 30),
        "green circle": (30, 200, 60),
        "blue bar": (30, 60, 220),
        "yellow cross": (240, 220, 20),
    }[name]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    shape = {
        "red square": (abs(yy - 16) < 9) & (abs(xx - 16) < 9),
        "green circle": (yy - 16) ** 2 + (xx - 16) ** 2 < 81,
        "blue bar": abs(xx - 16) < 4,
        "yellow cross": (abs(xx - 16) < 3) | (abs(yy - 16) < 3),
    }[name]
    image[shape] = color
    if style == "3d render":
        image[shape] = (image[shape] * 0.7).astype(np.uint8)
    return image


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    records = [EmojiRecord(key=f"{i:x}", name=n, style=s, package="test") for i, n in enumerate(NAMES) for s in STYLES]
    np.save(folder / "images.npy", np.stack([make_images(r.name, r.style) for r in records]))
    (folder / "records.json").write_text(json.dumps([r.__dict__ for r in records]))
    (folder / "LICENSES.md").write_text("test shapes\n")
    return folder


TINY_CLIP = {
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
    "image_size": 16,
    "patch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "projection_dim": 16,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "log_every": 5,
}
TINY_VAE = {
    "block_out_channels": (8, 8, 16, 16),
    "norm_num_groups": 4,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "log_every": 5,
    "holdout_fraction": 0.0,
}
TINY_UNET = {
    "block_out_channels": (16, 32),
    "attention_heads": (2, 2),
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_steps": 2,
    "log_every": 5,
}


def losses(result):
    return [loss for _, loss in result["history"]]


@pytest.fixture(scope="module")
def sprite_dir(data_dir, tmp_path_factory):
    """The same shapes as RGBA sprites (white is transparent), as `ldm data emoji` writes them now."""
    folder = tmp_path_factory.mktemp("sprites")
    rgb = np.load(data_dir / "images.npy")
    alpha = np.where((rgb < 250).any(-1, keepdims=True), 255, 0).astype(np.uint8)
    np.save(folder / "sprites.npy", np.concatenate([rgb, alpha], -1))
    (folder / "records.json").write_text((data_dir / "records.json").read_text())
    (folder / "LICENSES.md").write_text("test shapes\n")
    return folder


TINY_SCENE = {
    "block_out_channels": (16, 32),
    "attention_heads": (2, 2),
    "norm_num_groups": 8,
    "sizes": ((32, 32, 0.7), (32, 48, 0.3)),
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_steps": 2,
    "log_every": 5,
    "workers": 0,
}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One tiny run of each stage, in order: CLIP -> VAE -> UNet (which reads the first two)."""
    torch.manual_seed(0)
    runs = tmp_path_factory.mktemp("runs")
    results = {
        "clip": clip.train(
            clip.ClipTrainConfig(data_dir=str(data_dir), out_dir=str(runs / "clip"), max_steps=40, **TINY_CLIP)
        ),
        "vae": vae.train(
            vae.VaeTrainConfig(data_dir=str(data_dir), out_dir=str(runs / "vae"), max_steps=30, **TINY_VAE)
        ),
    }
    results["unet"] = unet.train(
        unet.UnetTrainConfig(
            data_dir=str(data_dir),
            out_dir=str(runs / "unet"),
            text_encoder_dir=str(runs / "clip" / "text_encoder"),
            vae_dir=str(runs / "vae" / "vae"),
            max_steps=40,
            **TINY_UNET,
        )
    )
    return runs, results


@pytest.mark.parametrize("stage", ["clip", "vae", "unet"])
def test_stage_lowers_its_loss(trained, stage):
    history = losses(trained[1][stage])
    assert len(history) >= 3
    assert history[-1] < history[0], history


def test_outputs_are_fp16_diffusers_folders(trained):
    runs, results = trained
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(runs / "clip" / "text_encoder")
    assert text_encoder.config.hidden_size == 32 and text_encoder.config.max_position_embeddings == 77
    assert next(text_encoder.parameters()).dtype == torch.float16
    vae_model = AutoencoderKL.from_pretrained(runs / "vae" / "vae")
    assert vae_model.config.scaling_factor == pytest.approx(results["vae"]["scaling_factor"])
    unet_model = UNet2DConditionModel.from_pretrained(runs / "unet" / "unet")
    assert unet_model.config.cross_attention_dim == 32
    assert (
        json.loads((runs / "unet" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        == "v_prediction"
    )


def test_checkpoint_records_config_and_resumes(trained, data_dir):
    runs, _ = trained
    checkpoint = torch.load(runs / "vae" / "ckpt.pt", weights_only=False)
    assert checkpoint["step"] == 30 and checkpoint["config"]["block_out_channels"] == (8, 8, 16, 16)
    assert {"model", "optimizer", "config", "step"} <= set(checkpoint)
    resumed = vae.train(vae.VaeTrainConfig(data_dir=str(data_dir), out_dir=str(runs / "vae"), max_steps=35, **TINY_VAE))
    assert resumed["steps"] == 35


def test_export_assembles_the_pipeline_folder(trained, data_dir, tmp_path):
    runs, _ = trained
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.bin").write_bytes(b"old")
    (tmp_path / "model" / "ldmkit.json").write_text('{"default_guidance": 3.5}')  # the folder's own: kept
    folder = export.assemble(
        runs / "clip" / "text_encoder",
        runs / "vae" / "vae",
        runs / "unet" / "unet",
        runs / "unet" / "scheduler",
        tmp_path / "model",
        data_dir / "LICENSES.md",
    )
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer/vocab.json", "scheduler", "LICENSES.md"):
        assert (folder / part).exists(), part
    assert not (folder / "tokenizer" / "tokenizer.json").exists() and not (folder / "stale.bin").exists()
    from ldmkit.loading import load_components

    components = load_components(folder)
    assert components.default_guidance == 3.5
    assert components.scheduler_config["prediction_type"] == "v_prediction"
    ids = components.tokenizer("red square", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406


def test_ldm_train_export_writes_the_default_guidance_it_is_given(trained, data_dir, tmp_path, capsys):
    from ldmkit.cli import main
    from ldmkit.loading import load_components

    runs, _ = trained
    out = tmp_path / "model"
    export_args = ["train", "export", "--runs", str(runs), "--data", str(data_dir), "--out", str(out)]
    assert main([*export_args, "--default-guidance", "4"]) == 0
    assert load_components(out).default_guidance == 4.0
    assert main(export_args) == 0  # without the option the folder's own is kept
    assert load_components(out).default_guidance == 4.0
    capsys.readouterr()
    for bad, says in (
        ([*export_args, "--default-guidance", "-1"], "--default-guidance must be a number from 0 to"),
        (["train", "unet", "--runs", str(runs), "--default-guidance", "3"], "applies to `ldm train export` only"),
    ):
        assert main(bad) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines
    assert load_components(out).default_guidance == 4.0  # the refused export left the folder as it was


def test_vae_fine_tunes_on_scenes(trained, sprite_dir, tmp_path):
    runs, _ = trained
    cfg = vae.VaeTrainConfig(
        data_dir=str(sprite_dir), out_dir=str(tmp_path / "vae"), max_steps=6, init_dir=str(runs / "vae" / "vae"),
        scenes=True, scene_size=32, workers=0, **TINY_VAE,
    )  # fmt: skip
    result = vae.train(cfg)
    assert result["steps"] == 6 and result["scaling_factor"] > 0
    assert (tmp_path / "vae" / "vae" / "config.json").exists()

    # decoder_only keeps the latent space (encoder, quant_conv, scaling factor) the UNet was trained on
    from diffusers import AutoencoderKL

    start = AutoencoderKL.from_pretrained(runs / "vae" / "vae")
    decoder_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "decoder"), decoder_only=True, lr=1e-3)
    assert vae.train(decoder_cfg)["scaling_factor"] == start.config.scaling_factor
    tuned = AutoencoderKL.from_pretrained(tmp_path / "decoder" / "vae")
    for part in ("encoder", "quant_conv", "decoder"):
        pairs = zip(getattr(start, part).parameters(), getattr(tuned, part).parameters())
        same = all(torch.equal(a, b) for a, b in pairs)
        assert same == (part != "decoder"), part
    with pytest.raises(LdmError, match="decoder_only needs init_dir"):
        vae.train(dataclasses.replace(decoder_cfg, init_dir=None))


def test_scene_stage_trains_text_encoder_and_unet_together(trained, sprite_dir, tmp_path, capsys):
    runs, _ = trained
    cfg = scene.SceneTrainConfig(
        data_dir=str(sprite_dir), out_dir=str(tmp_path / "scene"), vae_dir=str(runs / "vae" / "vae"),
        text_encoder_dir=str(runs / "clip" / "text_encoder"), max_steps=12, **TINY_SCENE,
    )  # fmt: skip
    first = scene.train(cfg)
    assert first["steps"] == 12 and all(np.isfinite(losses(first)))
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    trained_text = CLIPTextModel.from_pretrained(tmp_path / "scene" / "text_encoder")
    start_text = CLIPTextModel.from_pretrained(runs / "clip" / "text_encoder")
    moved = [(a - b).abs().max() for a, b in zip(trained_text.parameters(), start_text.parameters())]
    assert max(moved) > 0  # the text encoder learned too
    unet_model = UNet2DConditionModel.from_pretrained(tmp_path / "scene" / "unet")
    assert unet_model.config.down_block_types[0] == "DownBlock2D"  # no attention at the full latent size
    cfg.max_steps = 15
    assert scene.train(cfg)["steps"] == 15  # resumed from ckpt.pt

    # A new run can start from an exported UNet (a curriculum stage): with lr 0 it exports that UNet unchanged
    resumed = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "next"), unet_dir=str(tmp_path / "scene" / "unet"), max_steps=2, lr=0.0, min_lr=0.0,
        text_encoder_dir=str(tmp_path / "scene" / "text_encoder"), scene_shares=(1, 1, 0, 0, 0, 0),
    )  # fmt: skip
    scene.train(resumed)
    start = UNet2DConditionModel.from_pretrained(tmp_path / "scene" / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "next" / "unet").state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start)

    # text_lr_scale 0 keeps the text encoder exactly as it started (the UNet learns to read it); close-up batches
    # (single emoji on a 16 px canvas, 32 of them a step) train alongside; steps 2 and 3 are profiled
    frozen = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "frozen"), max_steps=3, text_lr_scale=0.0, classic_size=(0.5, 0.6), close_up=0.7,
        close_up_side=16, profile_steps=2, profile_skip=1,
    )  # fmt: skip
    capsys.readouterr()
    assert all(np.isfinite(losses(scene.train(frozen))))
    printed = capsys.readouterr().out
    assert re.search(r"profile: 2 steps, \d+ ms a step under the profiler, \d+ ms of it waiting", printed), printed
    assert "Self CPU" in printed and "aten::" in printed  # torch.profiler's operator table
    kept = CLIPTextModel.from_pretrained(tmp_path / "frozen" / "text_encoder")
    assert all(torch.equal(a.half(), b.half()) for a, b in zip(start_text.parameters(), kept.parameters()))
    with pytest.raises(LdmError, match="close_up: expected a share"):
        scene.train(dataclasses.replace(frozen, close_up=1.5))
    with pytest.raises(LdmError, match="close_up_size"):
        scene.train(dataclasses.replace(frozen, close_up_size=(0.9, 1.2)))
    with pytest.raises(LdmError, match="profile_skip at least 1"):
        scene.train(dataclasses.replace(frozen, profile_skip=0))
    # the contiguous layout with AdamW's fused kernel trains too (the same start, 2 steps); a layout it does not know
    # is refused before any work
    plain = dataclasses.replace(
        frozen, out_dir=str(tmp_path / "plain"), max_steps=2, unet_layout="contiguous", fused_adamw=True,
        profile_steps=0,
    )  # fmt: skip
    plain_losses = losses(scene.train(plain))
    assert all(np.isfinite(plain_losses)) and max(plain_losses) > 0
    with pytest.raises(LdmError, match="unet_layout: expected one of channels_last, contiguous, got 'nhwc'"):
        scene.train(dataclasses.replace(plain, unet_layout="nhwc"))
    with pytest.raises(LdmError, match="fused_adamw: expected true or false, got 'yes'"):
        scene.train(dataclasses.replace(plain, fused_adamw="yes"))
    # the objects' pixels weighed more (object_weight): trains; a negative weight is refused before any work
    weighed = dataclasses.replace(plain, out_dir=str(tmp_path / "weighed"), object_weight=4.0)
    assert all(np.isfinite(losses(scene.train(weighed))))
    with pytest.raises(LdmError, match="object_weight: expected a number from 0 up, got -1"):
        scene.train(dataclasses.replace(weighed, object_weight=-1))

    # A teacher on close-up steps: a student that starts as the teacher and does not move (lr 0) matches it when the
    # target is all teacher (all but where the teacher's canonical caption differs from the typed one), not when it
    # is all data
    exported = str(tmp_path / "scene" / "unet")
    taught = dataclasses.replace(
        frozen, out_dir=str(tmp_path / "taught"), unet_dir=exported, text_encoder_dir=str(tmp_path / "scene" /
        "text_encoder"), close_up=1.0, close_up_teacher=exported, close_up_distill=1.0, lr=0.0, min_lr=0.0,
        max_steps=2, profile_steps=0, log_every=1,
    )  # fmt: skip
    data_only = dataclasses.replace(taught, out_dir=str(tmp_path / "data-only"), close_up_teacher=None)
    assert max(losses(scene.train(taught))) < 0.01 * min(losses(scene.train(data_only)))
    for bad, says in (
        (dict(close_up=0.0), "close_up_teacher needs close_up > 0"),
        (dict(close_up_distill=0.0), "close_up_distill from 0"),
        (dict(close_up_teacher=str(tmp_path)), "not a diffusers UNet folder"),
    ):
        with pytest.raises(LdmError, match=says):
            scene.train(dataclasses.replace(taught, **bad))


def test_phrasing_targets_reachable_teacher_positions():
    from ldmkit.loading import load_tokenizer

    tokenizer = load_tokenizer()
    typed = common.tokenize(tokenizer, ["a cute cat", "coffee, 3d render", "", "otter"])
    canonical = common.tokenize(tokenizer, ["cat", "hot beverage, 3d render", "", "otter"])
    target = phrasing.target_positions(typed, canonical)
    # "a cute cat" (3 tokens) -> "cat" (1): "a" and "cute" take the start token's state, "cat" cat's, then the end
    # token's, then the canonical padding from the first position it has padding at
    assert target[0, :8].tolist() == [0, 0, 0, 1, 2, 5, 6, 7]
    # 5 typed tokens right-aligned onto the last 5 of 6 canonical ones; the end token onto the end token (7)
    assert target[1, :10].tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 8, 9]
    identity = torch.arange(77).tolist()
    assert target[2].tolist() == identity and target[3].tolist() == identity  # canonical captions learn themselves
    assert int(target.max()) == 76


def test_phrasing_caption_pairs_keep_the_meaning(sprite_dir):
    import random

    from ldmkit.data import scenes

    _, sampler = scenes.load_sampler(sprite_dir)
    rng = random.Random(0)
    pairs = phrasing.draw_pairs(sampler, rng, 300, empty_share=0.1)
    assert 10 < sum(p == ("", "") for p in pairs) < 60
    canonical_forms = {c for n in NAMES for s in STYLES for c in (n, f"{n}, {s}", f"{s} of {n}")}
    typed = [(t, c) for t, c in pairs if t and t != c]
    assert len(typed) > 100 and all(c in canonical_forms for _, c in pairs if c)
    for text, canonical in typed:  # the name is in the caption, and the style phrase iff the canonical has one
        name, _, style = canonical.partition(", ")
        assert name in text and (style in text if style else not any(s in text for s in STYLES)), (text, canonical)
    # ldm eval's typed_unseen prompts stay held out: no caption uses their frames' words
    from ldmkit.eval.scenes import UNSEEN_FRAMES, UNSEEN_WORDS

    assert all(any(word in frame.split() for word in UNSEEN_WORDS) for frame in UNSEEN_FRAMES)
    assert not any(set(text.split()) & set(UNSEEN_WORDS) for text, _ in pairs)


def test_phrasing_stage_moves_typed_captions_towards_their_canonical_states(trained, sprite_dir, tmp_path):
    from transformers import CLIPTextModel

    from ldmkit.loading import load_tokenizer

    runs, _ = trained
    teacher_dir = runs / "clip" / "text_encoder"
    cfg = phrasing.PhrasingTrainConfig(
        data_dir=str(sprite_dir), out_dir=str(tmp_path / "phrasing"), text_encoder_dir=str(teacher_dir),
        max_steps=60, batch_size=32, lr=3e-3, warmup_steps=2, log_every=10, empty_share=0.1, mixed_precision="no",
    )  # fmt: skip
    result = phrasing.train(cfg)
    assert result["steps"] == 60 and losses(result)[-1] < losses(result)[0]
    teacher = CLIPTextModel.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    student = CLIPTextModel.from_pretrained(tmp_path / "phrasing" / "text_encoder", torch_dtype=torch.float32)
    assert (tmp_path / "phrasing" / "text_encoder" / "config.json").exists()
    tokenizer = load_tokenizer()
    typed = common.tokenize(tokenizer, ["a red square", "the blue bar", "a green circle emoji"])
    canonical = common.tokenize(tokenizer, ["red square", "blue bar", "green circle"])
    index = phrasing.target_positions(typed, canonical)[:, :, None].expand(-1, -1, 32)
    with torch.no_grad():
        goal = torch.gather(teacher(canonical).last_hidden_state, 1, index)
        before = torch.nn.functional.mse_loss(teacher(typed).last_hidden_state, goal)
        after = torch.nn.functional.mse_loss(student(typed).last_hidden_state, goal)
    assert after < 0.7 * before


def test_contrastive_loss_counts_every_matching_caption():
    image = torch.eye(2)
    text = torch.eye(2)
    both = torch.ones(2, 2, dtype=torch.bool)
    diagonal = torch.eye(2, dtype=torch.bool)
    scale = torch.tensor(2.0)
    assert clip.contrastive_loss(image, text, scale, diagonal) < clip.contrastive_loss(image, text, scale, both)


def test_random_framing_redraws_each_image_smaller_or_larger_on_white():
    black = -torch.ones(64, 3, 32, 32)  # a black picture filling the frame
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(clip.random_framing(black, (1.0, 1.0), generator), black)  # off: untouched
    half = clip.random_framing(black, (0.5, 0.5), generator)
    dark = half[:, 0] < 0
    assert dark.float().mean(dim=(1, 2)).sub(0.25).abs().max() < 0.03  # a quarter of the frame: a half-side square
    assert (half[:, 0][~dark] == 1).float().mean() > 0.85  # white around it (but for its blended edge)
    rows = dark.any(2).float().argmax(1)  # each picture's top row: shifted differently per image
    assert rows.min() < 6 and rows.max() > 10
    assert (clip.random_framing(black, (1.2, 1.2), generator) < 0).all()  # zoomed in: the frame stays covered
    wide = clip.random_framing(black, (0.6, 1.15), generator)[:, 0] < 0
    assert len({round(float(f), 2) for f in wide.float().mean(dim=(1, 2))}) > 10  # scales drawn per image


def test_schedule_warms_up_then_decays_by_steps_or_time():
    schedule = common.Schedule(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, max_minutes=1.0)
    assert schedule.lr_at(0, 0) == pytest.approx(0.1)
    assert schedule.lr_at(50, 0) == pytest.approx(0.5)
    assert schedule.lr_at(20, 30.0) == pytest.approx(0.5)  # half the time budget spent
    assert schedule.progress(20, 60.0) == 1.0


def test_cli_registers_data_train_eval_and_overrides(data_dir):
    from ldmkit.errors import LdmError
    from ldmkit.train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train",
            "vae",
            "--data",
            str(data_dir),
            "--minutes",
            "2",
            "--set",
            "batch_size=4",
            "--set",
            "block_out_channels=[8,16]",
        ]
    )
    cfg = cli.stage_config("vae", args)
    assert (cfg.batch_size, cfg.block_out_channels, cfg.max_minutes) == (4, (8, 16), 2.0)
    with pytest.raises(LdmError):
        cli.apply_overrides(cfg, ["nope=1"])
    args = parser.parse_args(["train", "phrasing", "--model", "some/model", "--minutes", "15"])
    cfg = cli.stage_config("phrasing", args)
    assert (cfg.text_encoder_dir, cfg.out_dir, cfg.max_minutes) == ("some/model/text_encoder", ".runs/phrasing", 15.0)
    assert parser.parse_args(["data", "emoji", "--out", "x"]).func is cli.run_data
    assert parser.parse_args(["eval"]).func is cli.run_eval


def test_a_scene_unet_starts_from_a_unet_of_another_layout():
    """The shipped model's layout (attention at every level) into the scene stage's (none at the top level): every
    weight but the top level's attention is copied; nothing in common is an error, not a silent fresh start."""
    from diffusers import UNet2DConditionModel

    from ldmkit.errors import LdmError

    def tiny(top: str, up: str, seed: int):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=(top, "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", up),
            attention_head_dim=(2, 2), cross_attention_dim=8,
        )  # fmt: skip

    shipped = tiny("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", seed=0).state_dict()
    scene_unet = tiny("DownBlock2D", "UpBlock2D", seed=1)
    copied, left = scene.copy_matching(scene_unet, shipped)
    after = scene_unet.state_dict()
    assert copied == len(after) - len(left) > 0
    assert left == []  # the scene UNet has nothing the shipped one lacks: it only drops the top attentions
    assert all(torch.equal(after[name], shipped[name]) for name in after)
    assert any(name.startswith("down_blocks.0.attentions") for name in shipped)  # ...which were not copied
    with pytest.raises(LdmError, match="no weight matches"):
        scene.copy_matching(scene_unet, {"other.weight": torch.zeros(1)})


def test_pyramid_noise_adds_low_frequencies_at_unit_std():
    """White noise averages out over a region; multi-resolution noise keeps coarse fields a model cannot read a layout
    through (see unet.pyramid_noise)."""
    shape = (64, 4, 32, 32)
    white = unet.pyramid_noise(shape, 0.0, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(white, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    multi = unet.pyramid_noise(shape, 0.6, "cpu", torch.Generator().manual_seed(0))
    assert multi.shape == shape
    assert torch.allclose(multi.std(dim=(1, 2, 3)), torch.ones(64), atol=1e-4)
    # the variance of a quadrant's mean: 1/256 for white noise, several times that with the coarse fields
    quadrant_var = {name: x[:, :, :16, :16].mean(dim=(2, 3)).var().item() for name, x in (("w", white), ("m", multi))}
    assert quadrant_var["w"] < 2 / 256 < 5 / 256 < quadrant_var["m"]


def test_diffusion_loss_pixel_weight_shifts_each_samples_loss_toward_the_weighted_pixels():
    """Each sample's pixel weights are normalised to mean 1: uniform weights change nothing, and an error only on the
    object's pixels counts (1 + w) / mean(1 + w x cover) times as much as without weights."""
    from types import SimpleNamespace

    from ldmkit.train.unet import diffusion_loss

    cfg = SimpleNamespace(noise_discount=0.0, min_snr_gamma=5.0)
    alphas_cumprod = torch.linspace(0.99, 0.01, 10)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cover = torch.zeros(2, 1, 8, 8)
    cover[:, :, :2, :2] = 1  # the object: 4 of 64 latent pixels

    def wrong_on_the_object(noisy, timesteps, states):  # the exact v target, off by 1 on the object's pixels only
        alpha = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        noise = (noisy - alpha * latents) / sigma
        return SimpleNamespace(sample=alpha * noise - sigma * latents + cover)

    def loss(weight):
        return diffusion_loss(wrong_on_the_object, latents, None, alphas_cumprod, cfg,
                              torch.Generator().manual_seed(0), pixel_weight=weight)  # fmt: skip

    plain = loss(None)
    assert plain > 0 and loss(torch.full((2, 1, 8, 8), 3.0)) == pytest.approx(float(plain), rel=1e-5)
    weighted = loss(1 + 4 * cover)
    assert weighted == pytest.approx(float(plain) * 5 / (1 + 4 * 4 / 64), rel=1e-4)


def test_diffusion_loss_teacher_target_and_noise_override():
    """The target is `distill` of the teacher's answer on the same noisy latents; a batch's noise can be white while
    the run trains on multi-resolution noise (a teacher trained on white noise is asked on white noise)."""
    from types import SimpleNamespace

    from ldmkit.train.unet import diffusion_loss, pyramid_noise

    cfg = SimpleNamespace(noise_discount=0.6, min_snr_gamma=5.0)
    alphas_cumprod = torch.linspace(0.99, 0.01, 10)
    seen = {}

    def student(noisy, timesteps, states):
        seen["noisy"] = noisy.clone()
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    def teacher(noisy, timesteps, states):
        seen["teacher_states"] = states
        return SimpleNamespace(sample=torch.ones_like(noisy))

    latents = torch.zeros(3, 4, 8, 8)
    for discount, override in ((0.6, None), (0.0, 0.0)):
        generator = torch.Generator().manual_seed(0)
        timesteps = torch.randint(0, 10, (3,), generator=generator)
        noise = pyramid_noise(latents.shape, discount, "cpu", generator)
        diffusion_loss(student, latents, None, alphas_cumprod, cfg, torch.Generator().manual_seed(0),
                       noise_discount=override)  # fmt: skip
        sigma = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        assert torch.allclose(seen["noisy"], sigma * noise, atol=1e-6), discount
    # all teacher: the student's zeros miss its ones by 1 everywhere; the teacher was asked with its own states
    args = (student, latents, "typed", alphas_cumprod, cfg, torch.Generator().manual_seed(1))
    taught = diffusion_loss(*args, teacher=teacher, distill=1.0, teacher_states="canonical")
    assert seen["teacher_states"] == "canonical"
    generator = torch.Generator().manual_seed(1)
    timesteps = torch.randint(0, 10, (3,), generator=generator)
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    assert taught == pytest.approx(float((snr.clamp(max=5.0) / (snr + 1)).mean()), rel=1e-5)
