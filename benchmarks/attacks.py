"""Replay the HTTP attacks of issue 15 (items 5, 13, 14, 15, 18) on a server over the tests' tiny model.

The server runs in its own process on a free 127.0.0.1 port, configured as `ldm serve` configures it
(h11 with read deadlines, the default limits). Each attack prints one row: what was sent, what came
back, and whether that is the answer the server must give. docs/reliability.md holds a run's table.

    PYTHONPATH=src python benchmarks/attacks.py            # about 2 minutes: the body deadline is 60 s
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROWS: list[tuple[str, str, bool]] = []


def row(attack: str, answer: str, held: bool) -> None:
    ROWS.append((attack, answer, held))
    print(f"| {attack} | {answer} | {'held' if held else '**FAILED**'} |", flush=True)


@contextlib.contextmanager
def server(in_flight: int | None = None):
    """(base URL, pid) of the tiny-model server in its own process."""
    from support.loadtest import server_process

    command = [sys.executable, __file__, "--serve", "{port}"] + (["--in-flight", str(in_flight)] if in_flight else [])
    with server_process(command) as s:
        yield s


def serve(port: int, in_flight: int | None) -> None:
    import torch
    import uvicorn
    from e2e.serving import tiny_pipeline

    from ldmkit.server.app import create_app
    from ldmkit.server.connections import uvicorn_config
    from ldmkit.server.limits import ServerLimits

    torch.set_num_threads(1)
    limits = ServerLimits(**({"max_body_bytes_in_flight": in_flight} if in_flight else {}))
    app = create_app(tiny_pipeline(), ui=False, limits=limits)
    uvicorn.Server(uvicorn_config(app, limits, host="127.0.0.1", port=port, log_level="warning")).run()


def encoded(image: Image.Image, format: str, **save_args) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_args)
    return base64.b64encode(buffer.getvalue()).decode()


FAST = {"width": 16, "height": 16, "steps": 2}


def input_attacks(url: str) -> None:
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(url + path, json=body, timeout=60)

    init = encoded(Image.new("RGB", (16, 16), "orange"), "PNG")

    r = post(
        "/sdapi/v1/img2img",
        {"prompt": "x", "init_images": [init], "mask": encoded(Image.new("LAB", (16, 16)), "TIFF"), **FAST},
    )
    row("img2img, mask a LAB-mode TIFF", str(r.status_code), r.status_code == 200)

    nested: object = 0
    for _ in range(300):
        nested = [nested]
    start = time.perf_counter()
    r = post("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"x": nested}, **FAST, "steps": 50})
    took = time.perf_counter() - start
    row(
        "txt2img, `override_settings` nested 300 deep",
        f"{r.status_code} `{r.json()['detail']}` in {took:.2f} s",
        r.status_code == 400,
    )

    r = post("/sdapi/v1/png-info", {"image": base64.b64encode(b"hello world").decode()})
    detail = r.json()["detail"]
    row("png-info, bytes that are no image", f"{r.status_code} `{detail}`", r.status_code == 400 and "0x" not in detail)

    r = httpx.get(url + "/sdapi/v1/sd-models", timeout=10)
    filename = r.json()[0]["filename"]
    row(
        "GET /sdapi/v1/sd-models: the model's path",
        f"filename `{filename}`",
        "/" not in filename and os.getcwd() not in r.text,
    )

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    wrapped = base64.encodebytes(buffer.getvalue()).decode().replace("\n", "\r\n")
    r = post("/sdapi/v1/png-info", {"image": wrapped})
    row("png-info, MIME-wrapped base64 (76-column lines, CRLF)", str(r.status_code), r.status_code == 200)


def origin_attacks(url: str) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(url + "/sdapi/v1/interrupt", content=b"a=1", headers={**form, "Origin": "http://evil.example"})
    row(
        "POST /sdapi/v1/interrupt, form-encoded, `Origin: http://evil.example`",
        str(r.status_code),
        r.status_code == 403,
    )
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "x"}, headers={"Origin": "null"})
    row("POST /v1/images/generations, `Origin: null`", str(r.status_code), r.status_code == 403)
    r = httpx.post(url + "/sdapi/v1/interrupt", headers={"Origin": url})
    row("POST /sdapi/v1/interrupt, same origin", str(r.status_code), r.status_code == 200)
    r = httpx.post(url + "/sdapi/v1/interrupt")
    row("POST /sdapi/v1/interrupt, no Origin (curl, Python clients)", str(r.status_code), r.status_code == 200)


def slow_clients(url: str, count: int = 10) -> None:
    """`count` connections sending a request head, and `count` a body, one byte every 2 s."""
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /sdapi/v1/png-info HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"

    def trickle(prefix: bytes, payload: bytes) -> float:
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=300) as conn:
            conn.sendall(prefix)
            for byte in payload:
                try:
                    conn.sendall(bytes([byte]))
                    conn.recv(1, socket.MSG_DONTWAIT)  # b"" (closed) or an answer: either way, done
                    break
                except BlockingIOError:
                    pass  # open, and nothing to read: go on trickling
                except OSError:
                    break
                time.sleep(2)
                if time.monotonic() - start > 200:
                    return float("inf")
        return time.monotonic() - start

    with ThreadPoolExecutor(2 * count) as pool:
        heads = [pool.submit(trickle, b"", head) for _ in range(count)]
        bodies = [pool.submit(trickle, head, b"x" * 1000) for _ in range(count)]
        head_times = [f.result() for f in heads]
        body_times = [f.result() for f in bodies]
    row(
        f"{count} connections sending a request head a byte every 2 s",
        f"all closed after {min(head_times):.0f} to {max(head_times):.0f} s (limit max_header_seconds = 10)",
        max(head_times) < 20,
    )
    row(
        f"{count} connections sending a body a byte every 2 s",
        f"all closed after {min(body_times):.0f} to {max(body_times):.0f} s (limit max_body_seconds = 60)",
        max(body_times) < 75,
    )


def large_bodies(url: str, pid: int, label: str, count: int = 10) -> int:
    """`count` concurrent png-info requests of ~20 MB each: the server's peak RSS growth."""
    noise = Image.frombytes("RGB", (2240, 2240), os.urandom(2240 * 2240 * 3))
    body = json.dumps({"image": encoded(noise, "PNG", compress_level=1)}).encode()
    process, peak, stop = psutil.Process(pid), [0], threading.Event()
    before = process.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    headers = {"Content-Type": "application/json"}
    with ThreadPoolExecutor(count) as pool:
        statuses = list(
            pool.map(
                lambda _: (
                    httpx.post(url + "/sdapi/v1/png-info", content=body, headers=headers, timeout=300).status_code
                ),
                range(count),
            )
        )
    stop.set()
    sampler.join()
    growth = peak[0] - before
    row(
        f"{count} concurrent png-info requests of {len(body) / 1e6:.0f} MB ({label})",
        f"{statuses.count(200)} x 200; server RSS +{growth / 2**20:.0f} MiB at peak",
        statuses.count(200) == count,
    )
    return growth


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny model and server helpers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--skip-slow", action="store_true", help="leave out the slow-client attacks (~70 s)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.in_flight)
        return 0
    print("| attack | answer | |\n|---|---|---|")
    with server() as (url, pid):
        input_attacks(url)
        origin_attacks(url)
        if not args.skip_slow:
            slow_clients(url)
        large_bodies(url, pid, "default budget max_body_bytes_in_flight = 64 MiB")
    with server(in_flight=2**40) as (url, pid):
        large_bodies(url, pid, "no budget, as before")
    return 0 if all(held for _, _, held in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
