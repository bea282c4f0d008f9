"""obclip: private text-to-image generation split between a cloud and a device (ObCLIP).

The names an app needs, importable from here (loaded on first use, so that
``import obclip`` stays light and the cloud never pulls in device code):

    from obclip import DevicePipeline, DeviceEngines, EngineConfig, GenerationConfig
    from obclip import ServiceClient, ClientConfig, generate_image

Subpackages: ``obclip.runtime`` (the torch-free core both sides share),
``obclip.device`` (numpy + onnxruntime: oblivious transform, resume, decode,
HTTP client), ``obclip.cloud`` (torch: model loading, the cloud steps, the
HTTP service), ``obclip.export`` (ONNX export), ``obclip.app`` (the main job).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "DevicePipeline": "obclip.device.pipeline",
    "GenerationConfig": "obclip.device.pipeline",
    "GenerationResult": "obclip.device.pipeline",
    "Method": "obclip.device.pipeline",
    "DeviceEngines": "obclip.device.engines",
    "EngineConfig": "obclip.device.engines",
    "ServiceClient": "obclip.device.client",
    "ClientConfig": "obclip.device.client",
    "ServiceError": "obclip.device.client",
    "generate_image": "obclip.device.client",
    "ObliviousTransform": "obclip.device.oblivious",
    "TransformConfig": "obclip.device.oblivious",
    "ObliviousError": "obclip.device.oblivious",
    "AccelerationConfig": "obclip.runtime.plan",
    "preset": "obclip.runtime.plan",
    "StepsRequest": "obclip.runtime.protocol",
    "ProtocolError": "obclip.runtime.protocol",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'obclip' has no attribute {name!r}")
