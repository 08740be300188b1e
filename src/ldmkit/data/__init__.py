"""Datasets for training the default model."""
