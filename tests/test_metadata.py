"""AUTOMATIC1111 'parameters' text: format, parse, PNG round trip, never overwriting."""

from PIL import Image

from ldmkit.metadata import format_infotext, parse_infotext, read_infotext, save_png

PARAMS = {"Steps": 25, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 42, "Size": "512x768", "Model": "v1-5"}


def test_format_matches_automatic1111_layout():
    text = format_infotext("an otter, watercolor", "blurry", PARAMS)
    assert text == (
        "an otter, watercolor\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: v1-5"
    )


def test_no_negative_line_when_empty_and_none_values_dropped():
    text = format_infotext("otter", "", {**PARAMS, "Denoising strength": None})
    assert text.splitlines() == [
        "otter",
        "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: v1-5",
    ]


def test_parse_round_trip_with_multiline_prompt_and_quoted_value():
    params = {**PARAMS, "Model": 'my, "odd" model'}
    text = format_infotext("line one\nline two", "bad, ugly", params)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two"
    assert parsed["Negative prompt"] == "bad, ugly"
    assert parsed["Model"] == 'my, "odd" model'
    assert parsed["Seed"] == "42" and parsed["Sampler"] == "DPM++ 2M Karras"


def test_parse_text_without_parameter_line_is_all_prompt():
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_parse_reads_quoted_values_as_json_strings_and_skips_what_is_no_pair():
    # A1111 quotes with JSON (json.dumps, ensure_ascii=False): \t and \u escapes must decode too.
    last = 'Steps: 20, Lora hashes: "ink: 0123abcd, tab\\tname: \\u00e9", no pair here, Hires resize-1: 0, Seed: 7'
    assert parse_infotext(f"an otter\nNegative prompt: blurry, ugly\n{last}") == {
        "Prompt": "an otter",
        "Negative prompt": "blurry, ugly",
        "Steps": "20",
        "Lora hashes": "ink: 0123abcd, tab\tname: \u00e9",
        "Hires resize-1": "0",
        "Seed": "7",
    }
    assert parse_infotext("a cat\nstyle: ink, mood: calm") == {  # fewer than 3 pairs: prompt text
        "Prompt": "a cat\nstyle: ink, mood: calm",
        "Negative prompt": "",
    }


def test_png_round_trip_and_no_overwrite(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    text = format_infotext("otter", "", PARAMS)
    first = save_png(image, tmp_path, lambda i: f"{i:05d}-42.png", text)
    second = save_png(image, tmp_path, lambda i: f"{i:05d}-42.png", text)
    assert (first.name, second.name) == ("00001-42.png", "00002-42.png")
    assert read_infotext(first) == text
    (tmp_path / "00003-42.png").write_bytes(b"taken")  # a name someone else holds is skipped
    third = save_png(image, tmp_path, lambda i: "00003-42.png" if i == 3 else f"{i:05d}-42.png", text)
    assert third.name == "00004-42.png" and (tmp_path / "00003-42.png").read_bytes() == b"taken"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
