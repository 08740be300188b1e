"""Evaluation metrics and the batched sampler, on made-up features and the tiny random components."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldmkit.eval import metrics, report
from ldmkit.eval.generate import generate, grid
from ldmkit.pipeline import Pipeline


def test_retrieval_accuracy_ranks_the_target_caption():
    candidates = torch.eye(6)
    images = torch.tensor(
        [
            [1.0, 0, 0, 0, 0, 0],  # best match: caption 0 (its target)
            [0.9, 0.8, 0.1, 0, 0, 0],  # target 1 ranks second
            [0.1, 0.2, 0.0, 0.3, 0.4, 0.5],
        ]
    )  # target 2 ranks last
    scores = metrics.retrieval_accuracy(images, candidates, torch.tensor([0, 1, 2]))
    assert scores["top1"] == pytest.approx(1 / 3)
    assert scores["top5"] == pytest.approx(2 / 3)


def test_psnr_of_a_perfect_autoencoder_is_high_and_of_a_bad_one_low():
    class Identity(torch.nn.Module):
        """Encodes to the image itself, decodes it back: a lossless 'VAE'."""

        def __init__(self, noise=0.0):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.noise = noise

        def encode(self, x):
            return type("E", (), {"latent_dist": type("D", (), {"mean": x})()})()

        def decode(self, z):
            return type("S", (), {"sample": z + self.noise})()

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert metrics.reconstruction_psnr(Identity(), images, "cpu") > 50
    assert metrics.reconstruction_psnr(Identity(noise=0.5), images, "cpu") < 20


def test_eval_prompts_are_fixed_and_numerous():
    prompts = report.eval_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    assert all(report.style_table()[p] for p in prompts)
    styled = report.styled_prompts(prompts[:3], report.style_table())
    assert all(style in report.style_table()[p] for p, style in styled)


@pytest.fixture
def tiny_model(tiny_components):
    return Pipeline(tiny_components, torch.device("cpu"), torch.float32)


def test_generate_is_seeded_and_batch_independent(tiny_model):
    images = generate(tiny_model, ["a", "b", "a"], [0, 1, 0], steps=3, height=16, width=16, batch_size=2)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images[0], images[2])  # same prompt and seed, different batches
    assert not torch.equal(images[0], images[1])
    assert grid(images, columns=2).size == (32, 32)


def test_image_features_are_unit_vectors():
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
                "vocab_size": 49408,
                "eos_token_id": 49407,
                "pad_token_id": 49407,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 8,
            },
            projection_dim=8,
        )
    ).eval()
    feats = metrics.image_features(clip, torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), "cpu")
    text = metrics.text_features(clip, ["otter", "red apple"], "cpu")
    assert feats.shape == (3, 8) and text.shape == (2, 8)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_vae_helper_shapes():
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    from ldmkit.train.vae import encode_posteriors

    mean, std = encode_posteriors(vae, torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), "cpu", batch_size=2)
    assert mean.shape == std.shape == (3, 4, 8, 8) and (std > 0).all()


def _canvas(n: int = 1, size: int = 64, colour=255) -> torch.Tensor:
    return torch.full((n, 3, size, size), colour, dtype=torch.uint8)


def test_composition_pixel_rules_find_objects_counts_and_hues():
    from ldmkit.eval import scenes

    images = _canvas(2)
    images[0, :, 10:20, 10:20] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]  # a red square
    images[0, :, 40:50, 40:54] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]  # a blue one
    masks = scenes.foreground(images)
    assert masks[0].sum() == 100 + 140 and masks[1].sum() == 0
    assert scenes.count_objects(masks[0]) == 2 and scenes.count_objects(masks[1]) == 0
    red = np.zeros_like(masks[0])
    red[10:20, 10:20] = True
    assert scenes.object_hue(images[0], red) == pytest.approx(0.0, abs=1)
    assert scenes.object_hue(images[1], masks[1]) is None  # nothing saturated
    assert scenes.centre_square(images, "right").shape == (2, 3, 32, 32)


def test_object_crops_zoom_to_the_drawn_object_despite_specks():
    from ldmkit.eval import scenes

    images = _canvas(2)
    images[0, :, 24:40, 16:48] = 0  # a 32x16 object
    images[0, :, 0, 63] = 0  # a one-pixel speck in the corner
    crops = scenes.object_crops(images, margin=0.0)
    dark = (crops[0] < 128).all(0)
    assert dark.float().mean() == pytest.approx(0.5, abs=0.05)  # the square around it: the object fills half
    assert torch.equal(crops[1], images[1])  # nothing drawn: kept whole


def test_white_background_reads_the_border():
    from ldmkit.eval import scenes

    images = _canvas(3)
    images[1, :, :, :] = torch.tensor([120, 200, 90], dtype=torch.uint8)[:, None, None]  # grass everywhere
    images[2, :, 20:44, 20:44] = 0  # an object inside a white frame
    assert scenes.white_background(images).tolist() == [True, False, True]
