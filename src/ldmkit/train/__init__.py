"""Training the default model in three stages: CLIP (text encoder), VAE, UNet."""
