"""Evaluation of the default model: prompt adherence (CLIP retrieval) and VAE reconstruction."""
