"""Model loading: diffusers folders, cached Hub repo ids and original single files, never the network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"


@dataclass
class Components:
    """Everything a latent diffusion pipeline needs, loaded on the CPU."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict  # diffusers scheduler config: betas, num_train_timesteps, prediction_type, ...
    source: str  # resolved location: a folder or a file
    name: str  # short model name for metadata ("v1-5-pruned", "default-model")


def load_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer shipped with the package (SD1.x pads with <|endoftext|>, SD2.x with '!')."""
    folder = CONFIGS_DIR / "clip-tokenizer"
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=model_max_length
    )
