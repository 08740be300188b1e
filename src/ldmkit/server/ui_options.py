"""The web UI's less used generation options, as AUTOMATIC1111's UI groups them: the hires pass's own prompt and
sampler, tiling, a variation seed and seed resize, eta and ENSD, the VAE, and for inpainting what the masked area
starts from and "only masked"."""

from __future__ import annotations

import gradio as gr

from ldmkit.errors import InvalidRequest
from ldmkit.samplers import SAMPLERS

AUTOMATIC_VAE, OWN_VAE = "Automatic", "None"  # A1111's sd_vae choices: the server's --vae (else the model's), its own
SAME_SAMPLER = "Use same sampler"  # A1111's choice for a hires pass that keeps the first pass's sampler
# A1111's "Masked content" labels -> GenerationParams.masked_content
MASKED_CONTENT = {
    "fill": "fill",
    "original": "original",
    "latent noise": "latent_noise",
    "latent nothing": "latent_nothing",
}
INPAINT_AREAS = ("Whole picture", "Only masked")


def hires_pass_inputs(fields: dict) -> None:
    """Inside the Hires fix accordion: the second pass's prompt, negative prompt and sampler (empty: the first's)."""
    with gr.Row():
        fields["hires_prompt"] = gr.Textbox(label="Hires prompt (empty: the prompt)", lines=1)
        fields["hires_negative"] = gr.Textbox(label="Hires negative prompt (empty: the negative prompt)", lines=1)
    fields["hires_sampler"] = gr.Dropdown([SAME_SAMPLER, *SAMPLERS], value=SAME_SAMPLER, label="Hires sampler")


def hires_pass_kwargs(values: dict) -> dict:
    """HiresFix's keyword arguments for the second pass's own prompt, negative prompt and sampler."""
    sampler = values.get("hires_sampler")
    return {
        "prompt": values.get("hires_prompt") or "",
        "negative_prompt": values.get("hires_negative") or "",
        "sampler": None if sampler in (None, "", SAME_SAMPLER) else sampler,
    }


def advanced_panel(mode: str, fields: dict, vae_names: list[str]) -> None:
    """An "Advanced" accordion: tiling, a variation seed and (where the server has VAEs) the VAE; on the inpaint tab
    also the masked area's start."""
    with gr.Accordion("Advanced", open=False, elem_id=f"{mode}-advanced"):
        with gr.Row():
            fields["tiling"] = gr.Checkbox(label="Tiling (seamless: the image tiles without seams)")
            if vae_names:
                fields["vae"] = gr.Dropdown([AUTOMATIC_VAE, OWN_VAE, *vae_names], value=AUTOMATIC_VAE, label="VAE")
        with gr.Row():
            fields["subseed"] = gr.Number(label="Variation seed (-1: random)", value=-1, precision=0)
            fields["subseed_strength"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Variation strength")
        with gr.Row():  # A1111's "Resize seed from": the seed's noise as drawn at that size, centred (0: off)
            fields["seed_resize_w"] = gr.Number(label="Resize seed from width (0: off)", value=0, precision=0)
            fields["seed_resize_h"] = gr.Number(label="Resize seed from height (0: off)", value=0, precision=0)
        with gr.Row():
            # text, not a number box: empty must mean the sampler's own (a number box shows and sends 0)
            fields["eta"] = gr.Textbox(label="Eta, 0 to 1 (empty: the sampler's default)", value="", max_lines=1)
            fields["ensd"] = gr.Number(label="Eta noise seed delta (ENSD)", value=0, precision=0, minimum=0)
        if mode == "inpaint":
            with gr.Row():
                fields["masked_content"] = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content")
                fields["inpaint_area"] = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area")
                fields["inpaint_padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels")


def advanced_kwargs(values: dict, automatic_vae: str | None = None) -> dict:
    """GenerationParams' keyword arguments for what advanced_panel shows (a variation only at strength > 0); a
    value the tab does not send keeps its default. `automatic_vae`: the server's --vae, which "Automatic" names."""
    kwargs = {"tiling": bool(values.get("tiling"))}
    eta = str(values.get("eta") or "").strip()
    if eta:
        try:
            kwargs["eta"] = float(eta)
        except ValueError:
            message = f"eta must be a number from 0 to 1, or empty for the sampler's default; got {eta!r}"
            raise InvalidRequest(message) from None
    resize = (int(values.get("seed_resize_w") or 0), int(values.get("seed_resize_h") or 0))
    if min(resize) > 0:  # as the API's seed_resize_from_w/_h: a side of 0 or less turns it off
        kwargs["seed_resize_from"] = resize
    if values.get("ensd"):
        kwargs["eta_noise_seed_delta"] = int(values["ensd"])
    vae = values.get("vae") or AUTOMATIC_VAE
    kwargs["vae"] = automatic_vae if vae == AUTOMATIC_VAE else None if vae == OWN_VAE else vae
    strength = float(values.get("subseed_strength") or 0.0)
    if strength > 0:
        subseed = values.get("subseed")
        kwargs.update(subseed=None if subseed in (None, -1) else int(subseed), subseed_strength=strength)
    if "masked_content" in values:
        kwargs.update(
            masked_content=MASKED_CONTENT[values["masked_content"]],
            inpaint_only_masked=values["inpaint_area"] == "Only masked",
            inpaint_padding=int(values["inpaint_padding"]),
        )
    return kwargs
