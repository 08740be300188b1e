"""A prompt of too many 75-token chunks is refused before anything is encoded (issue 15, item 3)."""

import pytest
import requests
import torch
from support.tiny import make_tiny_components

from ldmkit import Pipeline
from ldmkit.errors import InvalidRequest
from ldmkit.server.limits import ServerLimits


def test_the_pipeline_refuses_more_chunks_than_its_default_limit(monkeypatch):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    encoded, encode = [], pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda p: (encoded.append(p), encode(p))[1])
    with pytest.raises(InvalidRequest, match="prompt takes 33 chunks .* over the limit max_prompt_chunks = 32"):
        pipe.generate(" BREAK ".join(["otter"] * 33), steps=1)
    with pytest.raises(InvalidRequest, match="negative prompt takes 40 chunks"):
        pipe.generate("otter", negative_prompt=" BREAK ".join(["blur"] * 40), steps=1)
    assert encoded == []  # refused before any text was encoded
    assert len(pipe.generate(" BREAK ".join(["otter"] * 32), steps=1, width=16, height=16).images) == 1
    assert len(encoded) == 1


def test_a_servers_chunk_limit_is_a_400_naming_it():
    from e2e.serving import serve_tiny

    with serve_tiny(ui=False, limits=ServerLimits(max_prompt_chunks=2)) as (url, _pipe, _app):
        body = {"prompt": "otter BREAK apple BREAK rocket", "steps": 1, "width": 16, "height": 16}
        response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
        assert response.status_code == 400
        assert "over the limit max_prompt_chunks = 2" in response.json()["detail"]
        body["prompt"] = "otter BREAK apple"
        assert requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60).status_code == 200
