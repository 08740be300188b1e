"""How the web UI shows a problem with the user's input: a Gradio error toast with its reason, never a crash."""

from __future__ import annotations

import html

import gradio as gr

from ldmkit.errors import LdmError
from ldmkit.server.queue import OutOfMemory, QueueFull


def user_error(make):
    """Run make(); a problem with the user's input becomes a Gradio error toast instead of a crash."""
    try:
        return make()
    except (LdmError, QueueFull, OutOfMemory) as exc:
        raise gr.Error(html.escape(str(exc))) from None  # Gradio renders it as HTML: keep <lora:...> visible
