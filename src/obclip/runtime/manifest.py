"""The export manifest: what ``export/build_engines.py`` wrote and how to run it.

One manifest per side (``<engines>/device/manifest.json`` now; the cloud's
engines get their own later). The runtimes read only this file to find their
models, so a manifest must say everything: file paths, tensor names, the
latent geometry, the tokenizer and the solver config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_FORMAT = "obclip.manifest.v1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, malformed or points at missing files."""


@dataclass(frozen=True)
class Component:
    """One exported model file."""

    path: str                      # relative to the manifest's folder
    format: str                    # "onnx" (TensorRT "engine" later)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str
    check_max_abs_diff: float      # exporter's check against torch

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))


@dataclass(frozen=True)
class Manifest:
    side: str                              # "device" (or "cloud")
    model_id: str                          # where the weights came from
    components: dict[str, Component]       # text_encoder, unet, vae_decoder
    tokenizer: str                         # tokenizer.json, relative path
    text_max_length: int                   # 77 for CLIP
    pad_token_id: int
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    default_image_size: int
    scheduler_config: dict                 # diffusers scheduler config of the model
    schema: str | None = None              # attribute schema the model was trained for (e.g. "shapes")
    root: Path = field(default=Path("."), compare=False)
    format: str = MANIFEST_FORMAT

    REQUIRED = ("text_encoder", "unet", "vae_decoder")

    def path_of(self, name: str) -> Path:
        if name not in self.components:
            raise ManifestError(f"manifest {self.root / MANIFEST_NAME} has no component {name!r}; "
                                f"it has {sorted(self.components)}; rerun python export/build_engines.py")
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
    def load(cls, folder: str | Path) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {folder}; build the engines first: "
                                "python export/build_engines.py --out "
                                f"{folder.parent if folder.name == 'device' else folder}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} is not valid JSON ({e}); rerun python export/build_engines.py") from None
        if d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path} has format {d.get('format')!r}, this runtime reads {MANIFEST_FORMAT!r}; "
                                "rerun python export/build_engines.py")
        try:
            d["components"] = {k: Component(**v) for k, v in d["components"].items()}
            m = cls(**d, root=folder)
        except TypeError as e:
            raise ManifestError(f"{path} does not have the expected fields ({e}); "
                                "rerun python export/build_engines.py") from None
        for name in cls.REQUIRED if m.side == "device" else ():
            if not m.path_of(name).is_file():
                raise ManifestError(f"{path} lists {name} at {m.path_of(name)}, which is missing; rerun export")
        if not (folder / m.tokenizer).is_file():
            raise ManifestError(f"{path} lists tokenizer {m.tokenizer}, which is missing; rerun export")
        return m
