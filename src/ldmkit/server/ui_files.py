"""The web UI's file cache: one private folder per server, bounded in size and age, removed at shutdown.

Gradio keeps every upload and every image it serves back (previews, gallery) as a file in its
cache folder, `$GRADIO_TEMP_DIR` (default /tmp/gradio, shared by every Gradio app on the machine), and
deletes nothing unless asked. The server gives the UI a folder of its own instead, sweeps it on a
timer (files older than the age limit, then the oldest files while the folder is over its size limit)
and deletes it when the server stops.

Gradio reads the folder from `GRADIO_TEMP_DIR` when each component and the app are created, and again
whenever it checks that an input file was uploaded here, so the variable is set for the process (the
only setting Gradio offers for it) and stays set while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SWEEP_SECONDS = 30.0
# Where the user wanted Gradio's files, read before any server of this process replaces the variable.
USER_TEMP_DIR = os.environ.get("GRADIO_TEMP_DIR") or None


@dataclass
class UiFileCache:
    folder: Path
    max_bytes: int  # the folder's size limit; the oldest files go first
    max_age_seconds: int  # no file is kept longer

    @classmethod
    def create(cls, max_bytes: int, max_age_seconds: int) -> UiFileCache:
        """A fresh private folder (under a GRADIO_TEMP_DIR the user set, else the system's temp folder)."""
        if USER_TEMP_DIR is not None:
            Path(USER_TEMP_DIR).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="ldmkit-ui-", dir=USER_TEMP_DIR)).resolve()
        os.environ["GRADIO_TEMP_DIR"] = str(folder)
        return cls(folder, max_bytes, max_age_seconds)

    def sweep(self, now: float | None = None) -> int:
        """Delete files past the age limit, then the oldest until the folder fits; returns bytes freed."""
        now = time.time() if now is None else now
        files = []
        for path in self.folder.rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                if path.is_file() and not path.is_symlink():
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
        files.sort()  # oldest first
        total = sum(size for _, size, _ in files)
        freed = 0
        for mtime, size, path in files:
            if now - mtime <= self.max_age_seconds and total - freed <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                freed += size
        self._remove_empty_folders()
        return freed

    def _remove_empty_folders(self) -> None:
        for folder in sorted((p for p in self.folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty

    async def sweep_forever(self, every: float = SWEEP_SECONDS) -> None:
        while True:
            await asyncio.to_thread(self.sweep)
            await asyncio.sleep(every)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
