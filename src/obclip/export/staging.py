"""Build an engines folder so that it appears whole or not at all, and know when to rebuild it."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def model_label(model: str | Path) -> str:
    """What a manifest's ``model_id`` says about the model it was exported from: a hub id as given, a
    local folder by its name (the embedded pair as ``obclip-mini/<role>``), never a path on the
    build machine (an app's engines folder must not depend on, or reveal, where it was built)."""
    from obclip.cloud.models import DEFAULT_MODELS_DIR

    path = Path(model).expanduser()
    if not path.exists():
        return str(model)
    path = path.resolve()
    embedded = DEFAULT_MODELS_DIR.resolve()
    if path.parent == embedded:
        return f"{embedded.name}/{path.name}"
    return path.name


def model_weights(model: str | Path) -> str:
    """"trained", "random" or "unknown": what the model folder's ``obclip_model.json`` says its
    weights are (a hub id or a folder without that file: "unknown")."""
    info = Path(model).expanduser() / "obclip_model.json"
    try:
        kind = json.loads(info.read_text(encoding="utf-8")).get("weights")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return kind if kind in ("trained", "random") else "unknown"


def verification_settings(weights: str) -> dict[str, object]:
    """The device manifest's ``verification`` for a model whose weights are ``weights`` (``model_weights``):
    statistics checks unless the weights are random; ``envelope`` empty, i.e. the bounds of the
    ``device/verify.VerifyConfig`` that opens the folder (an entry there would override one)."""
    return {"weights": weights, "statistics": weights != "random", "envelope": {}}


TOKENIZER_2 = "tokenizer_2/tokenizer.json"


def family_fields(lm: Any) -> dict[str, Any]:
    """A manifest's model-family fields for a ``cloud.models.TextToLatentModel``: its ``conditioning``
    and, for the SDXL family, the second tokenizer (the exporter writes it at ``TOKENIZER_2``) and its pad id."""
    cond = lm.conditioning
    if cond.text_encoders == 1:
        return {"conditioning": cond.to_dict()}
    return {"conditioning": cond.to_dict(), "tokenizer_2": TOKENIZER_2,
            "pad_token_id_2": int(lm.tokenizer_2.pad_token_id)}
