"""AUTOMATIC1111 'parameters' text: format, parse, PNG round trip; files saved whole, never overwriting."""

import errno
import io
import multiprocessing
import os
import stat
import struct
import zlib

import pytest
from PIL import Image

from ldmkit.errors import LdmError
from ldmkit.metadata import format_infotext, parse_infotext, read_infotext, save_new_file, save_png

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


def seed_name(seed):
    return lambda index: f"{index:05d}-{seed}.png"


def test_an_index_is_used_once_whatever_the_rest_of_the_name(tmp_path):
    """Two runs that both start at index 1 with different seeds must not both write 00001-* (issue 15, item 12)."""
    image = Image.new("RGB", (4, 4))
    first = save_png(image, tmp_path, seed_name(11), start_index=1)
    second = save_png(image, tmp_path, seed_name(22), start_index=1)
    assert (first.name, second.name) == ("00001-11.png", "00002-22.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file or claim left


def _save_many(folder, seed, start, count):
    start.wait()
    for _ in range(count):
        save_png(Image.new("RGB", (4, 4)), folder, seed_name(seed))


def test_concurrent_processes_get_distinct_indices(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_save_many, args=(tmp_path, seed, start, 8)) for seed in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    indices = sorted(int(p.name.split("-")[0]) for p in tmp_path.iterdir())
    assert indices == list(range(1, 33))


def test_numbering_goes_on_past_99999(tmp_path):
    """A1111's five digits run out at 99999; the next index is 100000, then 100001 (not 100000 again)."""
    (tmp_path / "99999-5.png").write_bytes(b"")
    image = Image.new("RGB", (4, 4))
    assert save_png(image, tmp_path, seed_name(1)).name == "100000-1.png"
    assert save_png(image, tmp_path, seed_name(2)).name == "100001-2.png"


def test_outputs_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        shared = save_png(Image.new("RGB", (4, 4)), tmp_path, seed_name(1))
        os.umask(0o077)
        private = save_png(Image.new("RGB", (4, 4)), tmp_path, seed_name(2))
    finally:
        os.umask(old)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_fixed_name_that_exists_is_refused_not_retried(tmp_path):
    (tmp_path / "step-001.png").write_bytes(b"taken")
    with pytest.raises(LdmError, match="step-001.png already exists"):
        save_new_file(lambda tmp: Image.new("RGB", (4, 4)).save(tmp, format="PNG"), tmp_path / "step-001.png")
    assert (tmp_path / "step-001.png").read_bytes() == b"taken"
    assert [p.name for p in tmp_path.iterdir()] == ["step-001.png"]


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    def fills_the_disk(tmp):
        with open(tmp, "wb") as file:
            file.write(b"half a png")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(LdmError) as caught:
        save_new_file(fills_the_disk, tmp_path / "00001-1.png")
    assert str(caught.value) == f"cannot write to {tmp_path}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def ztxt_bomb(path):
    """A PNG whose 'parameters' zTXt chunk inflates to 256 MiB (64 KiB on disk)."""
    png = small_png()
    deflate = zlib.compressobj(9)
    compressed = b"".join(deflate.compress(bytes(1 << 20)) for _ in range(256)) + deflate.flush()
    chunk = png_chunk(b"zTXt", b"parameters\0\0" + compressed)
    path.write_bytes(png[:33] + chunk + png[33:])  # after the signature (8) and the IHDR chunk (25)


def dimension_bomb(path):
    """A PNG whose header claims 100000 x 100000 pixels."""
    png = small_png()
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    path.write_bytes(png[:8] + header + png[33:])


@pytest.mark.parametrize(
    "make, reason", [(ztxt_bomb, "Decompressed data too large"), (dimension_bomb, "exceeds limit")]
)
def test_hostile_pngs_are_an_ldm_error(tmp_path, make, reason):
    make(tmp_path / "bomb.png")
    with pytest.raises(LdmError, match=reason):
        read_infotext(tmp_path / "bomb.png")
