"""Compiled functions kept on disk, so a fresh process skips torch.compile's tracing.

Even with inductor's kernel cache warm, every new process pays dynamo to trace the model's Python
again: about 9 s for an SD1.5 UNet on an H100, most of a warm `ldm generate --fast` start
(docs/benchmarks.md). torch's AOT precompile (`torch.compile(...).aot_compile`, experimental, torch
2.9 on) saves the traced and compiled function, kernels included, to one file that a later process
loads in a second or two. The weights are not in it: the function takes the module as an argument,
so its parameters are inputs, and the same file serves any weights of the same architecture.

A file is named by a hash of everything that shapes the compiled code: the torch, diffusers and
ldmkit versions, the GPU, the function (its bytecode too), the compile options, the module's class, config and
parameters (names, shapes, dtypes, strides: fused QKV and channels_last show there) and the call's
tensors. The tensor and global-state guards saved with it are checked again when it is loaded.
Whatever cannot be loaded is compiled again; what is compiled but cannot be saved runs as compiled in this process
(the next one compiles again); what cannot be compiled ahead of time falls back to a plain torch.compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$LDMKIT_COMPILE_CACHE, else ~/.cache/ldmkit/compiled (under $XDG_CACHE_HOME when set)."""
    if os.environ.get("LDMKIT_COMPILE_CACHE"):
        return Path(os.environ["LDMKIT_COMPILE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ldmkit" / "compiled"


def call_signature(tensors) -> tuple:
    """What a compiled graph is specialised on: per tensor shape, dtype, strides, device and whether it
    is an inference tensor (made under torch.inference_mode), and the grad mode of the call."""
    per_tensor = tuple((tuple(t.shape), str(t.dtype), t.stride(), str(t.device), t.is_inference()) for t in tensors)
    return (per_tensor, torch.is_grad_enabled(), torch.is_inference_mode_enabled())


class PrecompiledCall:
    """`call(*tensors)` runs `fn(module, *tensors)` compiled, one compiled function per tensor signature.

    Each is loaded from the cache directory when a matching file is there, and compiled (then saved)
    otherwise. `options` are torch.compile's inductor options (a mode's, spelled out).
    """

    def __init__(self, fn: Callable, module: torch.nn.Module, options: dict, cache_dir: Path | None = None):
        self.fn, self.module, self.options = fn, module, options
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.compiled: dict[tuple, Callable] = {}

    def __call__(self, *tensors):
        signature = call_signature(tensors)
        compiled = self.compiled.get(signature)
        if compiled is None:
            compiled = self.compiled[signature] = self._load_or_compile(tensors)
        return compiled(self.module, *tensors)

    def cache_path(self, tensors) -> Path:
        digest = hashlib.sha256(json.dumps(self._key(tensors), sort_keys=True, default=str).encode()).hexdigest()
        return self.cache_dir / f"{self.fn.__name__}-{digest[:32]}.bin"

    def _key(self, tensors) -> dict:
        import diffusers

        import ldmkit

        cuda = [str(t.device) for t in tensors if t.is_cuda]
        module = self.module
        # Keys with "_" are bookkeeping (`_use_default_values` is a set, listed in a random order).
        config = {k: v for k, v in dict(getattr(module, "config", {})).items() if not k.startswith("_")}
        return {
            "versions": [torch.__version__, torch.version.cuda, diffusers.__version__, ldmkit.__version__],
            "python": platform.python_version(),
            "gpu": [torch.cuda.get_device_name(cuda[0]), torch.cuda.get_device_capability(cuda[0])] if cuda else None,
            # its bytecode too: a file saved by an older version of the function would run that version
            "fn": [f"{self.fn.__module__}.{self.fn.__qualname__}", self.fn.__code__.co_code.hex()],
            "options": self.options,
            "module": [type(module).__module__, type(module).__qualname__, config],
            "state": [
                (name, tuple(p.shape), str(p.dtype), p.stride())
                for name, p in [*module.named_parameters(), *module.named_buffers()]
            ],
            "call": call_signature(tensors),
        }

    def _load_or_compile(self, tensors) -> Callable:
        path = self.cache_path(tensors)
        if path.exists():
            try:
                with path.open("rb") as f:
                    loaded = torch.compiler.load_compiled_function(f)
                # The saved guards (tensor metadata, global state) must hold for this call. guard_check
                # tests them without running the function; a mismatch means a stale file.
                if not loaded.guard_check(self.module, *tensors):
                    raise RuntimeError("the saved guards do not match this call")
                log.info("precompile: loaded %s", path)
                return loaded
            except Exception as error:  # a stale or foreign file: compile afresh
                log.warning("precompile: could not use %s (%s); compiling again", path, _brief(error))
                log.debug("precompile: load failure", exc_info=True)
        options = {**self.options, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe}
        try:
            # torch 2.9-2.12 attach .aot_compile only under this flag (on by default from 2.13).
            with torch._dynamo.config.patch(enable_aot_compile=True):
                compiled_fn = torch.compile(self.fn, fullgraph=True, options=options)
                compiled = compiled_fn.aot_compile(((self.module, *tensors), {}))
        except Exception as error:  # AOT precompile is experimental: keep working without it
            log.warning("precompile: not compiled ahead of time (%s); using torch.compile", _brief(error))
            log.debug("precompile: AOT compile failure", exc_info=True)
            return torch.compile(self.fn, fullgraph=True, options=self.options)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(path))  # written to a temporary file, then renamed
            log.info("precompile: saved %s", path)
        except Exception as error:
            # Compiled, only not kept: this process runs it as it is; compiling again would double the wait.
            # Seen on torch 2.11 after other torch.compile calls in the same process ("cannot pickle
            # RootGuardManager": its pickler of the saved state reached an object of dynamo's own).
            log.warning("precompile: compiled but not saved (%s); the next process compiles again", _brief(error))
            log.debug("precompile: save failure", exc_info=True)
        return compiled


def _brief(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
