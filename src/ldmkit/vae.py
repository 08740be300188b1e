"""VAEs a Pipeline may decode and encode with instead of its model's own (A1111's sd_vae, `--vae`, `--vae-dir`).

A VAE is named as A1111 names it: a file by its file name ("vae-ft-mse.safetensors"), a diffusers AutoencoderKL
folder by the folder's name. `automatic` is the VAE `--vae` gives: what A1111's "Automatic" setting runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ldmkit import loading
from ldmkit.errors import InvalidRequest, ModelLoadError
from ldmkit.refiner import checkpoint_shorthash


class VaeLibrary:
    """The VAEs of a folder (and its subfolders) and the `--vae` one; the last one loaded is kept in memory."""

    def __init__(self, folder: str | os.PathLike | None = None, automatic: str | os.PathLike | None = None):
        self.folder = None if folder is None else Path(folder).expanduser()
        if self.folder is not None and not self.folder.is_dir():
            raise ModelLoadError(f"VAE folder {self.folder} does not exist")
        self.automatic = None if automatic is None else Path(automatic).expanduser()
        if self.automatic is not None and not self.automatic.exists():
            raise ModelLoadError(f"VAE not found: {self.automatic}")
        self._loaded: tuple[tuple, object] | None = None
        self._lock = threading.Lock()  # the worker loads; a server's listing thread only reads the folder

    def paths(self) -> dict[str, Path]:
        """Name -> file or folder, scanned now: the `--vae` one first, then the folder's (the first of a name wins)."""
        found = {} if self.automatic is None else {vae_name(self.automatic): self.automatic}
        if self.folder is None:
            return found
        for path in loading.walk_models(self.folder, "AutoencoderKL", loading.VAE_FILE_SUFFIXES):
            found.setdefault(path.name, path)  # a file is named with its suffix, as A1111's sd_vae list names it
        return found

    def names(self) -> list[str]:
        return list(self.paths())

    def resolve(self, vae: str | os.PathLike) -> Path:
        """A name this library lists, else a path to a VAE file or folder; anything else is refused by name."""
        paths = self.paths()
        if isinstance(vae, str) and vae in paths:
            return paths[vae]
        path = Path(vae).expanduser()
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            return path
        raise InvalidRequest(f"unknown VAE {str(vae)!r}; the VAEs are: {', '.join(paths) or 'none (no --vae-dir)'}")

    def load(self, path: Path, like, device, dtype):
        """The VAE at `path` on `device` in `dtype` (loading.load_vae checks that it fits the model's VAE `like`)."""
        key = (path.resolve(), path.stat().st_mtime_ns, device, dtype)
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # the previous one's memory is free before the next loads
                vae = loading.load_vae(path, like)
                # nn.Module.to: diffusers' own override warns on every cast (see pipeline._place)
                self._loaded = (key, torch.nn.Module.to(vae, device, dtype).eval())
            return self._loaded[1]


def vae_name(path: Path) -> str:
    """A1111's name of a VAE: the file name with its suffix; a folder's name."""
    return path.name


def vae_infotext(path: Path | None) -> dict:
    """A1111's infotext entries for a VAE other than the model's own: its short hash (files only) and name."""
    if path is None:
        return {}
    return {"VAE hash": checkpoint_shorthash(path) if path.is_file() else None, "VAE": vae_name(path)}
