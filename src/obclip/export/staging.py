"""Build an engines folder so that it appears whole or not at all, and know when to rebuild it."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temp folder beside ``target`` to build in. When the block succeeds it replaces
    ``target``; when it fails (or is interrupted) it is removed, so a failed export never
    leaves a half-written folder and never touches the previous one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield work
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def model_fingerprint(model: Path) -> str:
    """SHA-256 over a model dir's file names and contents: retrained weights in place change it, so
    an engines folder built from it is rebuilt."""
    h = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
