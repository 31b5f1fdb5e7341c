"""A model folder built once: in a temporary folder beside it, marked last, renamed into place under a lock.

Concurrent callers and interrupted builds therefore never see a half-written folder, and a folder built by
another version of its builder is built again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER_NAME = ".flushgate-model-ready"


def is_built(dest: Path, version: str) -> bool:
    marker = dest / MARKER_NAME
    return marker.is_file() and marker.read_text().strip() == version


def build_once(dest: Path, version: str, build: Callable[[Path, Path], None]) -> Path:
    """Return ``dest`` holding what ``build(work, out)`` writes into ``out`` (``work`` is scratch space)."""
    dest = dest.resolve()
    if is_built(dest, version):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(dest, version):  # built by another caller while this one waited
            return dest
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
            out = Path(tmp) / "build"
            build(Path(tmp), out)
            (out / MARKER_NAME).write_text(version + "\n")
            if dest.exists():  # an older or unfinished build
                shutil.rmtree(dest)
            os.rename(out, dest)
    return dest
