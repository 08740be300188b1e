"""ldmkit.precompile: compiled functions saved once, loaded by later processes, never trusted blindly (CPU)."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_components

from ldmkit.fast import unet_forward
from ldmkit.precompile import PrecompiledCall, call_signature


class Tiny(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.a, self.b = torch.nn.Linear(width, 16), torch.nn.Linear(16, width)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def forward(module, x):
    return module(x)


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import make_tiny_components
from ldmkit.fast import unet_forward
from ldmkit.precompile import PrecompiledCall
call = PrecompiledCall(unet_forward, make_tiny_components().unet, {{}}, cache_dir={cache!r})
print(call.cache_path((torch.ones(2, 4, 8, 8),)).name)
"""


@pytest.fixture
def cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ldmkit.precompile")
    return tmp_path / "compiled"


def test_first_call_saves_and_a_new_instance_loads_with_its_own_weights(cache, caplog):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    first = Tiny()
    with torch.inference_mode():
        out = PrecompiledCall(forward, first, {}, cache_dir=cache)(x)
    torch.testing.assert_close(out, first(x))
    assert len(list(cache.glob("forward-*.bin"))) == 1
    assert "saved" in caplog.text

    caplog.clear()
    other = Tiny()  # same architecture, other weights: the file holds code, not weights
    with torch.inference_mode():
        out = PrecompiledCall(forward, other, {}, cache_dir=cache)(x)
    assert "loaded" in caplog.text and "saved" not in caplog.text
    torch.testing.assert_close(out, other(x))
    assert not torch.allclose(out, first(x))


def test_other_shapes_and_architectures_get_their_own_files(cache):
    module = Tiny()
    call = PrecompiledCall(forward, module, {}, cache_dir=cache)
    paths = {call.cache_path((torch.ones(2, 8),)), call.cache_path((torch.ones(3, 8),))}
    paths.add(PrecompiledCall(forward, Tiny(width=4), {}, cache_dir=cache).cache_path((torch.ones(2, 8),)))
    paths.add(call.cache_path((torch.ones(2, 8, dtype=torch.float64),)))
    assert len(paths) == 4


def test_a_changed_function_of_the_same_name_gets_its_own_file(cache):
    # A file saved by an older ldmkit holds the older function's code: loading it would run that code.
    def changed(module, x):
        return 2 * module(x)

    changed.__name__, changed.__qualname__ = forward.__name__, forward.__qualname__
    module, x = Tiny(), torch.ones(2, 8)
    paths = [PrecompiledCall(fn, module, {}, cache_dir=cache).cache_path((x,)) for fn in (forward, changed)]
    assert paths[0].name.startswith("forward-") and paths[1].name.startswith("forward-")
    assert paths[0] != paths[1]


def test_the_file_name_is_the_same_in_a_fresh_process(cache):
    # A key that changed between processes (a set's order, an address) would make every process compile;
    # diffusers configs hold such a set (_use_default_values).
    here = PrecompiledCall(unet_forward, make_tiny_components().unet, {}, cache_dir=cache)
    here = here.cache_path((torch.ones(2, 4, 8, 8),)).name
    script = SCRIPT.format(tests=str(Path(__file__).parent), cache=str(cache))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip().splitlines()[-1] == here


def test_a_corrupt_file_is_compiled_again_and_replaced(cache, caplog):
    module, x = Tiny(), torch.randn(2, 8)
    call = PrecompiledCall(forward, module, {}, cache_dir=cache)
    with torch.inference_mode():  # the key holds the grad mode: name the file as the call will
        path = call.cache_path((x,))
        cache.mkdir(parents=True)
        path.write_bytes(b"not a compiled function")
        torch.testing.assert_close(call(x), module(x))
    assert "could not use" in caplog.text and "saved" in caplog.text
    assert path.read_bytes() != b"not a compiled function"


def test_a_function_compiled_but_not_saved_runs_without_compiling_again(cache, caplog, monkeypatch):
    # Issue 21: on torch 2.11, after diffusers' compiled row in the same process, saving failed with this error;
    # the fallback then compiled the function a second time. Now it runs as compiled, and says why it was not kept.
    from torch._dynamo.aot_compile import AOTCompiledFunction

    def refuse(self, path, external_data=None):
        raise TypeError("cannot pickle 'torch._C._dynamo.guards.RootGuardManager' object")

    compiles = []
    compile = torch.compile
    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", refuse)
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compiles.append(args) or compile(*args, **kwargs))
    module, x = Tiny(), torch.randn(2, 8)
    other_x = 2 * x  # made outside inference mode, as x: the same signature
    call = PrecompiledCall(forward, module, {}, cache_dir=cache)
    with torch.inference_mode():
        torch.testing.assert_close(call(x), module(x))
        torch.testing.assert_close(call(other_x), module(other_x))
    [compiled] = call.compiled.values()
    assert len(compiles) == 1 and isinstance(compiled, AOTCompiledFunction)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "precompile: compiled but not saved (TypeError: cannot pickle 'torch._C._dynamo.guards.RootGuardManager' "
        "object); the next process compiles again"
    ]
    assert not list(cache.glob("*.bin"))


def test_signature_tells_inference_tensors_and_grad_mode_apart():
    x = torch.ones(2, 8)
    with torch.inference_mode():
        inference = call_signature((torch.ones(2, 8),))
        plain_in_inference_mode = call_signature((x,))
    assert len({call_signature((x,)), inference, plain_in_inference_mode}) == 3
