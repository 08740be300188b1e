"""ldmkit: latent diffusion text-to-image (CLIP text encoder -> UNet denoiser -> VAE decoder)."""

__all__ = ["GenerationParams", "GenerationResult", "HiresFix", "Pipeline", "StepInfo"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `ldm samplers` or `import ldmkit.errors` need not import torch and diffusers first.
    if name in __all__:
        from ldmkit import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
