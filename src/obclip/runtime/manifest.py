"""The export manifest: what ``export/build_engines.py`` wrote and how to run it.

One manifest per side: ``<engines>/device/manifest.json`` and
``<engines>/cloud/manifest.json``. The runtimes read only this file to find
their models, so a manifest must say everything: file paths, tensor names, the
latent geometry, the tokenizer, the solver config and (cloud) which graph
serves which step mode and which cache tensors it reads and writes.

Loading verifies before anything runs: every field is type- and range-checked,
every path (component files, the tokenizer, extra files, and the external-data
paths written inside each ONNX file) must stay inside the engines folder, and
every file's SHA-256 must match (hashes are cached per process by path, size
and mtime, so a second start-up does not re-read gigabytes). Each failure is a
``ManifestError`` subclass naming the file and the fix: re-export.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .conditioning import Conditioning
from .errors import ArtifactError, InputError
from .geometry import LatentGeometry
from .onnx_file import OnnxReadError, external_locations

JSON = dict[str, Any]

MANIFEST_FORMAT = "obclip.manifest.v1"
MANIFEST_NAME = "manifest.json"
EXPORT_VERSION = 2        # bump when the exported graphs' contract changes: old cloud engines are refused
_REEXPORT = "rerun export: python export/build_engines.py"


class ManifestError(ArtifactError):
    """A manifest that is missing, malformed or points at missing files: re-export."""


class ManifestMissingError(ManifestError):
    """No manifest.json, or a file it lists is missing."""


class ManifestFormatError(ManifestError):
    """manifest.json is not valid JSON, not an object, or a field has the wrong type or range."""


class ManifestPathError(ManifestError):
    """A path in the manifest, or an external-data path inside an ONNX file, leaves the engines folder."""


class ManifestHashError(ManifestError):
    """A file's SHA-256 differs from the manifest's: it was changed after the export."""


class ManifestMismatchError(ManifestError):
    """A valid manifest for something else: the other side, another model or an older export version."""


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FORMATS = ("onnx", "engine")


@dataclass(frozen=True)
class Component:
    """One exported model file."""

    path: str                      # relative to the manifest's folder
    format: str                    # "onnx" (TensorRT "engine")
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str
    check_max_abs_diff: float      # exporter's check against torch

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))


@dataclass(frozen=True)
class Manifest:
    side: str                              # "device" or "cloud"
    model_id: str                          # the model's name (never a path on the build machine)
    components: dict[str, Component]       # device: text_encoder, unet, vae_decoder; cloud: text_encoder, unet/<mode>
    tokenizer: str                         # tokenizer.json, relative path
    text_max_length: int                   # 77 for CLIP
    pad_token_id: int
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    default_image_size: int
    scheduler_config: JSON                 # diffusers scheduler config of the model
    schema: str | None = None              # attribute schema the model was trained for (e.g. "shapes")
    modes: JSON = field(default_factory=dict)   # cloud: mode name -> {component, spec, reads, writes, ...}
    files: JSON = field(default_factory=dict)   # other files (shared weights) -> sha256
    source: JSON | None = None             # cloud: model fingerprint, precision, export version, latent multiple
    # device variants (export/device_variants.py); older manifests load with these defaults
    precision: str = "fp32"                # "fp32", "fp16", "int8", "int8-qdq": how the device graphs store weights
    image_size: JSON | None = None         # device: {"min", "max", "multiple"} pixels of dynamic graphs; None: fixed
    variant_check: JSON = field(default_factory=dict)  # device: this variant against fp32 on a real trajectory
    # device: how the device checks cloud answers, decided at export from the model's own files:
    # {"weights": "trained" | "random" | "unknown", "statistics": bool, "envelope": {VerifyConfig bound: override}};
    # absent in older manifests (the device then applies the full envelope: fail closed)
    verification: JSON = field(default_factory=dict)
    # the UNet's family (runtime.conditioning.Conditioning.to_dict); empty in SD exports and older manifests.
    # An SDXL-family export also has text_encoder_2 and its tokenizer (tokenizer_2, padded with pad_token_id_2).
    conditioning: JSON = field(default_factory=dict)
    tokenizer_2: str | None = None
    pad_token_id_2: int | None = None
    root: Path = field(default=Path("."), compare=False)
    format: str = MANIFEST_FORMAT

    REQUIRED = {"device": ("text_encoder", "unet", "vae_decoder"), "cloud": ("text_encoder",)}

    def geometry(self, fixed: tuple[int, int] | None = None, source: str | None = None) -> LatentGeometry:
        """The sizes these engines run: the VAE's factor, the cloud graphs' latent multiple, the device
        graphs' dynamic range (``fixed``: the latent size of graphs exported for one size only)."""
        r = self.image_size
        return LatentGeometry(
            channels=self.latent_channels, vae_scale_factor=self.vae_scale_factor,
            latent_multiple=int((self.source or {}).get("latent_multiple", 1)),
            size_range=None if r is None else (int(r["min"]), int(r["max"]), int(r["multiple"])),
            fixed=fixed, default_size=self.default_image_size,
            source=source or f"these {self.side} engines ({self.root})")

    def unet_conditioning(self) -> Conditioning:
        """What the exported UNet takes besides the text hidden states (its model family)."""
        return Conditioning.from_dict(self.conditioning)

    def path_of(self, name: str) -> Path:
        if name not in self.components:
            raise ManifestMissingError(f"manifest {self.root / MANIFEST_NAME} has no component {name!r}; "
                                       f"it has {sorted(self.components)}; {_REEXPORT}")
        return self.root / self.components[name].path

    def save(self, folder: str | Path) -> Path:
        d = asdict(self)
        d.pop("root")
        out = Path(folder) / MANIFEST_NAME
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=2, sort_keys=True))
        tmp.replace(out)  # never a half-written manifest
        return out

    @classmethod
    def load(cls, folder: str | Path, *, verify: bool = True) -> Manifest:
        """Read and check ``folder/manifest.json``; with ``verify`` (the default) also every file's hash and
        every ONNX file's external-data paths. Raises a ManifestError subclass naming the file and the fix."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            out = folder.parent if folder.name.split("-")[0] in ("device", "cloud") else folder  # also cloud-fp16
            raise ManifestMissingError(f"no {MANIFEST_NAME} in {folder}; build the engines first: "
                                       f"python export/build_engines.py --out {out}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestFormatError(f"{path} is not valid JSON ({e}); {_REEXPORT}") from None
        m = _from_dict(d, path, folder)
        for rel, what in m._listed_paths():
            _confined(folder, rel, f"{path}: {what}")
        second = ("text_encoder_2",) if m.unet_conditioning().text_encoders == 2 else ()
        for name in (*cls.REQUIRED[m.side], *second):
            if not m.path_of(name).is_file():
                raise ManifestMissingError(f"{path} lists {name} at {m.path_of(name)}, which is missing; {_REEXPORT}")
        for rel, what in m._listed_paths():
            if not (folder / rel).is_file():
                raise ManifestMissingError(f"{path} lists {what} at {folder / rel}, which is missing; {_REEXPORT}")
        if verify:
            m.verify()
        return m

    def _listed_paths(self) -> Iterator[tuple[str, str]]:
        yield self.tokenizer, "tokenizer"
        if self.tokenizer_2 is not None:
            yield self.tokenizer_2, "tokenizer_2"
        for name, c in self.components.items():
            yield c.path, f"component {name}"
        for rel in self.files:
            yield rel, "file"

    def verify(self) -> None:
        """Every listed file's SHA-256, and the external-data paths inside every ONNX file."""
        for name, c in self.components.items():
            p = self.root / c.path
            _check_hash(p, c.sha256, f"component {name}")
            if c.format == "onnx":
                for location in _external_locations(p):
                    _confined(p.parent, location, f"{p}: external data",
                              root=self.root)
        for rel, digest in self.files.items():
            _check_hash(self.root / rel, digest, "file")


# --- field checks ---------------------------------------------------------------------


def _fail(path: Path, msg: str) -> ManifestFormatError:
    return ManifestFormatError(f"{path}: {msg}; {_REEXPORT}")


def _int(d: Mapping[str, Any], key: str, path: Path, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(d: Mapping[str, Any], key: str, path: Path, *, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > 4096 or "\0" in v:
        raise _fail(path, f"{key} must be a non-empty string, got {v!r}")
    return v


def _dict(d: Mapping[str, Any], key: str, path: Path, *, optional: bool = False) -> JSON:
    v = d.get(key)
    if v is None and optional:
        return {}
    if not isinstance(v, dict):
        raise _fail(path, f"{key} must be an object, got {type(v).__name__}")
    return v


def _str_list(v: Any, what: str, path: Path) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _fail(path, f"{what} must be a list of names, got {v!r}")
    return tuple(v)


def _component(name: str, v: Any, path: Path) -> Component:
    if not isinstance(v, dict):
        raise _fail(path, f"component {name!r} must be an object, got {type(v).__name__}")
    expected = {"path", "format", "inputs", "outputs", "sha256", "check_max_abs_diff"}
    if set(v) != expected:
        raise _fail(path, f"component {name!r} has fields {sorted(v)}, expected {sorted(expected)}")
    fmt = v["format"]
    if fmt not in _FORMATS:
        raise _fail(path, f"component {name!r} format must be one of {_FORMATS}, got {fmt!r}")
    digest = v["sha256"]
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise _fail(path, f"component {name!r} sha256 must be 64 lowercase hex digits, got {digest!r}")
    diff = v["check_max_abs_diff"]
    if isinstance(diff, bool) or not isinstance(diff, (int, float)) or not math.isfinite(diff) or diff < 0:
        raise _fail(path, f"component {name!r} check_max_abs_diff must be a finite number >= 0, got {diff!r}")
    rel = _str(v, "path", path)
    assert rel is not None
    return Component(path=rel, format=fmt, inputs=_str_list(v["inputs"], f"component {name!r} inputs", path),
                     outputs=_str_list(v["outputs"], f"component {name!r} outputs", path), sha256=digest,
                     check_max_abs_diff=float(diff))


def _from_dict(d: Any, path: Path, folder: Path) -> Manifest:
    if not isinstance(d, dict):
        raise _fail(path, f"the manifest must be a JSON object, got {type(d).__name__}")
    if d.get("format") != MANIFEST_FORMAT:
        raise ManifestMismatchError(f"{path} has format {d.get('format')!r}, this runtime reads "
                                    f"{MANIFEST_FORMAT!r}; {_REEXPORT}")
    known = {f for f in Manifest.__dataclass_fields__ if f != "root"}
    unknown = set(d) - known
    if unknown:
        raise _fail(path, f"unknown fields {sorted(unknown)}")
    side = d.get("side")
    if not isinstance(side, str) or side not in Manifest.REQUIRED:
        raise _fail(path, f"side must be one of {sorted(Manifest.REQUIRED)}, got {side!r}")
    comps = _dict(d, "components", path)
    components = {}
    for name, v in comps.items():
        components[name] = _component(name, v, path)
    vae_scale = _int(d, "vae_scale_factor", path, 1, 64)
    if vae_scale & (vae_scale - 1):
        raise _fail(path, f"vae_scale_factor must be a power of two, got {vae_scale}")
    scaling = d.get("vae_scaling_factor")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (math.isfinite(scaling)
                                                                                and 0 < scaling <= 100):
        raise _fail(path, f"vae_scaling_factor must be a number in (0, 100], got {scaling!r}")
    image = _int(d, "default_image_size", path, vae_scale, 16384)
    if image % vae_scale:
        raise _fail(path, f"default_image_size {image} must be a multiple of vae_scale_factor {vae_scale}")
    files = _dict(d, "files", path, optional=True)
    for rel, digest in files.items():
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise _fail(path, f"files[{rel!r}] must be a sha256 (64 lowercase hex digits), got {digest!r}")
    modes = _dict(d, "modes", path, optional=True)
    for name, info in modes.items():
        if not isinstance(info, dict) or not isinstance(info.get("component"), str) \
                or info["component"] not in components:
            raise _fail(path, f"mode {name!r} must name one of the components, got {info!r}")
        _str_list(info.get("reads"), f"mode {name!r} reads", path) if info.get("reads") else None
        _str_list(info.get("writes"), f"mode {name!r} writes", path) if info.get("writes") else None
    source = d.get("source")
    if source is not None and not isinstance(source, dict):
        raise _fail(path, f"source must be an object or null, got {type(source).__name__}")
    return Manifest(
        side=side, model_id=_str(d, "model_id", path) or "", components=components,
        tokenizer=_str(d, "tokenizer", path) or "",
        text_max_length=_int(d, "text_max_length", path, 1, 4096),
        pad_token_id=_int(d, "pad_token_id", path, 0, 2**31 - 1),
        latent_channels=_int(d, "latent_channels", path, 1, 64),
        vae_scale_factor=vae_scale, vae_scaling_factor=float(scaling), default_image_size=image,
        scheduler_config=_dict(d, "scheduler_config", path), schema=_str(d, "schema", path, optional=True),
        modes=modes, files=files, source=source, **_device_fields(d, path, vae_scale),
        **_family_fields(d, path), root=folder,
    )


def _family_fields(d: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """conditioning, tokenizer_2 and pad_token_id_2 (SDXL-family exports); absent in SD and older manifests."""
    conditioning = _dict(d, "conditioning", path, optional=True)
    try:
        family = Conditioning.from_dict(conditioning)
    except InputError as e:
        raise _fail(path, str(e)) from None
    tokenizer_2 = _str(d, "tokenizer_2", path, optional=True)
    pad_2 = None if d.get("pad_token_id_2") is None else _int(d, "pad_token_id_2", path, 0, 2**31 - 1)
    if (family.text_encoders == 2) != (tokenizer_2 is not None and pad_2 is not None):
        raise _fail(path, f"a {family.family}-family export has {family.text_encoders} text encoder(s), and "
                          "tokenizer_2 and pad_token_id_2 exactly when it has two")
    return {"conditioning": conditioning, "tokenizer_2": tokenizer_2, "pad_token_id_2": pad_2}


PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")


def _device_fields(d: Mapping[str, Any], path: Path, vae_scale: int) -> dict[str, Any]:
    """precision, image_size and variant_check (device variants); absent in older manifests."""
    precision = d.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise _fail(path, f"precision must be one of {PRECISIONS}, got {precision!r}")
    size = d.get("image_size")
    if size is not None:
        if not isinstance(size, dict) or set(size) != {"min", "max", "multiple"}:
            raise _fail(path, f"image_size must be an object with min, max and multiple, got {size!r}")
        lo, hi, mult = (_int(size, k, path, 1, 16384) for k in ("min", "max", "multiple"))
        if mult % vae_scale or lo % mult or hi % mult or lo > hi:
            raise _fail(path, f"image_size {size} must have min <= max, both multiples of multiple, "
                              f"itself a multiple of vae_scale_factor {vae_scale}")
    return {"precision": precision, "image_size": size,
            "variant_check": _dict(d, "variant_check", path, optional=True),
            "verification": _verification(d, path)}


WEIGHT_KINDS = ("trained", "random", "unknown")


def _verification(d: Mapping[str, Any], path: Path) -> JSON:
    v = _dict(d, "verification", path, optional=True)
    if not v:
        return {}
    if set(v) != {"weights", "statistics", "envelope"} or v["weights"] not in WEIGHT_KINDS \
            or not isinstance(v["statistics"], bool) or not isinstance(v["envelope"], dict):
        raise _fail(path, f"verification must be {{weights: one of {WEIGHT_KINDS}, statistics: true/false, "
                          f"envelope: {{bound: number}}}}, got {v!r}")
    for key, bound in v["envelope"].items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise _fail(path, f"verification envelope {key!r} must be a finite number > 0, got {bound!r}")
    return v


# --- paths and hashes -------------------------------------------------------------------


def _confined(base: Path, rel: str, what: str, root: Path | None = None) -> Path:
    """``base / rel``, refusing absolute paths and anything that resolves outside ``root`` (default base)."""
    root = base if root is None else root
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or "\0" in rel:
        raise ManifestPathError(f"{what} path {rel!r} must be relative to the engines folder; {_REEXPORT}")
    full = (base / rel).resolve()
    try:
        full.relative_to(root.resolve())
    except ValueError:
        raise ManifestPathError(f"{what} path {rel!r} leaves the engines folder {root}; refusing to read it. "
                                f"{_REEXPORT}") from None
    return full


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _check_hash(path: Path, digest: str, what: str) -> None:
    if not path.is_file():
        raise ManifestMissingError(f"{what} {path} is missing; {_REEXPORT}")
    got = _cached_sha256(path)
    if got != digest:
        raise ManifestHashError(f"{what} {path} has SHA-256 {got[:16]}..., the manifest says {digest[:16]}...: "
                                f"the file was changed after the export; {_REEXPORT}")


def _external_locations(path: Path) -> tuple[str, ...]:
    try:
        return external_locations(path)
    except OnnxReadError as e:
        raise ManifestFormatError(str(e)) from None
