"""The device's models, run through onnxruntime from an export manifest.

Text encoder, UNet and VAE decoder, as exported by export/build_engines.py, opened by the
runtime (``runtime/graphs.py``): numpy in, numpy out; no torch anywhere on this side. This module
only says which folder to open and how (``EngineConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass

from obclip.runtime.errors import InputError
from obclip.runtime.graphs import DeviceGraphs, check_decoder
from obclip.runtime.memory import MEMORY_MODES
from obclip.runtime.sessions import SessionConfig

__all__ = ["DEFAULT_DEVICE_MEMORY", "DeviceEngines", "EngineConfig"]

# How the device's sessions allocate (runtime/memory.MEMORY_MODES): one arena for the text encoder,
# UNet and decoder, without per-session memory patterns; no slower than a per-session arena and lower
# in peak memory (benchmarks/device.py --memory, docs/engines.md 'Device memory').
DEFAULT_DEVICE_MEMORY = "shared+no-pattern"


@dataclass(frozen=True)
class EngineConfig:
    """Which engines folder (one precision variant: device, device-fp16, device-int8), which decoder, and how
    to run it."""

    engines_dir: str = "engines/device"           # folder holding manifest.json
    providers: tuple[str, ...] | str = ("CPUExecutionProvider",)   # names, short names, or "auto"
    threads: int | None = None                    # onnxruntime intra-op threads (None = its default)
    allow_below_floor: bool = False               # open a variant whose export check failed (int8-qdq on request)
    decoder: str = "full"                         # "full": the VAE decoder; "tiny": the AutoencoderTiny beside it
    memory: str = DEFAULT_DEVICE_MEMORY           # how the sessions allocate: one of runtime/memory.MEMORY_MODES

    def __post_init__(self) -> None:
        check_decoder(self.decoder)
        if self.memory not in MEMORY_MODES:
            raise InputError(f"engine memory {self.memory!r}: choose one of {list(MEMORY_MODES)} "
                             "(docs/engines.md 'Device memory')")
        self.session_config()   # checks threads and the rest now, not when the engines open

    def session_config(self) -> SessionConfig:
        return SessionConfig.for_memory(self.memory, providers=self.providers, threads=self.threads)


class DeviceEngines(DeviceGraphs):
    """The device engines folder of an ``EngineConfig``: ``tokenizer``, ``text_encoder``, ``unet``,
    ``vae_decoder``, ``latent_shape``, ``encode_text`` and ``decode`` (``runtime.graphs.DeviceGraphs``)."""

    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        super().__init__(config.engines_dir, config.session_config(), config.allow_below_floor, config.decoder)
