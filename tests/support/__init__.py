"""Test support: tiny random models, the original-format writer, reference pipelines."""
