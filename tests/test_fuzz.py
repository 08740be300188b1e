"""Fuzz both HTTP APIs from the server's own OpenAPI schema (schemathesis): no request may get a 5xx.

A real uvicorn server on 127.0.0.1 serving the tiny random model, with small limits so that generated
requests stay quick (each operation gets a bounded number of examples). The full run's command and
result are in docs/reliability.md.
"""

from __future__ import annotations

import base64
import collections
import io
import os
from datetime import timedelta

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis", reason="fuzz test extras not installed (pip install schemathesis)")
from e2e.serving import serve_tiny, tiny_pipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from ldmkit.server.app import create_app
from ldmkit.server.limits import ServerLimits

# Small enough that any request the fuzzer makes runs in milliseconds on the tiny model.
FUZZ_LIMITS = ServerLimits(
    max_pixels=64 * 64,
    max_input_pixels=256 * 256,
    max_steps=8,
    max_images=2,
    max_prompt_chars=300,
    max_body_bytes=256 * 1024,
)
MAX_EXAMPLES = int(os.environ.get("LDM_FUZZ_EXAMPLES", "15"))  # per operation; docs/reliability.md's run used more


STATUSES: collections.Counter[int] = collections.Counter()  # of every fuzzed request; printed at the end (pytest -s)


@pytest.fixture(scope="module")
def fuzzed_url():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads, and they spin when cores are shared
    try:
        with serve_tiny(ui=False, limits=FUZZ_LIMITS) as (url, _, _):
            yield url
    finally:
        torch.set_num_threads(threads)
        print(f"\nfuzzed requests: {sum(STATUSES.values())}, by status: {dict(sorted(STATUSES.items()))}")


def operations():
    """The app's operations, from its schema (the app is built, not started, to read it)."""
    app = create_app(tiny_pipeline(), ui=False)
    api_schema = schemathesis.openapi.from_dict(app.openapi())
    return [result.ok() for result in api_schema.get_all_operations()]


def small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@st.composite
def cases(draw, operation):
    """The schema's cases, valid and not; for generation, half within the limits, so the fuzzer reaches the model."""
    case = draw(operation.as_strategy(draw(st.sampled_from(list(GenerationMode)))))
    if (
        operation.path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
        and isinstance(case.body, dict)
        and draw(st.booleans())
    ):
        side = st.sampled_from([8, 16, 24, 32])
        case.body.update(width=draw(side), height=draw(side), steps=draw(st.integers(1, FUZZ_LIMITS.max_steps)))
        if operation.path.endswith("img2img"):
            case.body["init_images"] = [small_png()]
    if operation.path == "/sdapi/v1/png-info" and isinstance(case.body, dict) and draw(st.booleans()):
        case.body["image"] = small_png()
    return case


@pytest.mark.parametrize("operation", operations(), ids=lambda operation: operation.label)
def test_no_request_gets_a_server_error(fuzzed_url, operation):
    @given(case=cases(operation))
    @settings(max_examples=MAX_EXAMPLES, deadline=timedelta(seconds=20), suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call_and_validate(base_url=fuzzed_url, checks=[not_a_server_error], timeout=30)
        STATUSES[response.status_code] += 1

    fuzz()
