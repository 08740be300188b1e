"""`ldm serve`: AUTOMATIC1111- and OpenAI-compatible HTTP APIs and a Gradio web UI over one loaded model."""
