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
    "generate_image": "obclip.device.client",
    "ObliviousTransform": "obclip.device.oblivious",
    "TransformConfig": "obclip.device.oblivious",
    "AccelerationConfig": "obclip.runtime.plan",
    "preset": "obclip.runtime.plan",
    "StepsRequest": "obclip.runtime.protocol",
    # Errors, by what the caller must do (runtime/errors.py): catch the kind, not the module's class.
    "ObclipError": "obclip.runtime.errors",
    "InputError": "obclip.runtime.errors",             # fix the input and run again
    "ServiceError": "obclip.runtime.errors",           # may be retried
    "UntrustedAnswerError": "obclip.runtime.errors",   # never retry, never resend
    "ArtifactError": "obclip.runtime.errors",          # rebuild the engines or export
    "ProtocolError": "obclip.runtime.protocol",        # InputError: request bytes that are not a request
    "LimitExceeded": "obclip.runtime.protocol",        # InputError: over one of the service's limits
    "HandoffError": "obclip.runtime.protocol",         # UntrustedAnswerError: not a valid answer
    "VerificationError": "obclip.device.verify",       # UntrustedAnswerError: failed the envelope
    "ServiceRejected": "obclip.device.client",         # InputError: the service refused (4xx)
    "ServiceUnavailable": "obclip.device.client",      # ServiceError
    "ServiceTimeout": "obclip.device.client",          # ServiceError
    "ServiceFailed": "obclip.device.client",           # ServiceError
    "BadResponse": "obclip.device.client",             # UntrustedAnswerError
    "ObliviousError": "obclip.device.oblivious",
    "ManifestError": "obclip.runtime.manifest",
    "ManifestMissingError": "obclip.runtime.manifest",
    "ManifestFormatError": "obclip.runtime.manifest",
    "ManifestPathError": "obclip.runtime.manifest",
    "ManifestHashError": "obclip.runtime.manifest",
    "ManifestMismatchError": "obclip.runtime.manifest",
    "OnnxReadError": "obclip.runtime.onnx_file",
    "PromptTooLongError": "obclip.runtime.tokenizer",
    "MissingCacheError": "obclip.cloud.step_modes",
    "TensorRTUnavailable": "obclip.export.tensorrt",
    "LocalServiceError": "obclip.app.local",           # ServiceError
    "Overloaded": "obclip.cloud.worker",               # ServiceError (server side: 503)
    "ShuttingDown": "obclip.cloud.worker",             # ServiceError (server side: 503)
    "NotReady": "obclip.cloud.service",                # ServiceError (server side: 503)
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'obclip' has no attribute {name!r}")
