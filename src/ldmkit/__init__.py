"""ldmkit: latent diffusion text-to-image (CLIP text encoder -> UNet denoiser -> VAE decoder)."""

from ldmkit.pipeline import GenerationResult, Pipeline, StepInfo

__all__ = ["Pipeline", "GenerationResult", "StepInfo"]
__version__ = "0.1.0"
