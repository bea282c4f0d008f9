"""Where obclip finds files: what ships inside the package, and the cache it writes to.

Shipped files (the CLIP vocabulary, the attribute schemas, the embedded
ObCLIP-Mini pair) are read through ``importlib.resources``, so they are found
the same way from a checkout (editable install) and from an installed wheel.
Everything obclip writes on its own (exported engines) goes under
``$OBCLIP_HOME``, by default the user's cache folder; a path given on the
command line always wins.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import ArtifactError

EMBEDDED_MODEL = "obclip-mini"


def package_path(*parts: str) -> Path:
    """A file or folder shipped inside the installed ``obclip`` package."""
    path = resources.files("obclip").joinpath(*parts)
    if not isinstance(path, Path):  # e.g. imported from a zip archive
        raise ArtifactError(f"obclip's data file {'/'.join(parts)} is not on the file system; "
                            "install obclip as a regular (unzipped) package")
    return path


def clip_bpe_dir() -> Path:
    """CLIP's byte-level BPE vocabulary (vocab.json + merges.txt), shared by every tokenizer."""
    return package_path("runtime", "data", "clip_bpe")


def schemas_dir() -> Path:
    """The attribute schemas that ship with the device side (person.json, shapes.json)."""
    return package_path("device", "schemas")


def embedded_models_dir() -> Path:
    """The embedded ObCLIP-Mini pair: ``<dir>/cloud`` and ``<dir>/device``, diffusers layout."""
    return package_path("models", EMBEDDED_MODEL)


def obclip_home() -> Path:
    """``$OBCLIP_HOME``, else ``$XDG_CACHE_HOME/obclip``, else ``~/.cache/obclip``."""
    explicit = os.environ.get("OBCLIP_HOME")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "obclip"


def default_engines_root() -> Path:
    """Where engines are exported when no ``--out``/``--engines`` is given: ``<home>/engines``."""
    return obclip_home() / "engines"
