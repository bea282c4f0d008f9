"""One private text-to-image request against a running cloud service.

    obclip-generate "a portrait photo of an old woman" --server http://127.0.0.1:8000 --out image.png
    obclip-generate "..." --server URL --engines engines/device

The device side only (numpy + onnxruntime + the standard library): the
prompt is turned into its candidate set, the candidates go to the service
(cloud/serve.py), the device keeps its own latent, runs the remaining steps
with a progress bar on stderr and writes the PNG. Prints the candidates the
server received and the time split (cloud compute / queue + transfer /
device steps / decode).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.locations import default_engines_root
from obclip.runtime.options import add_flags, from_flags

from .cli import ProgressBar, add_generation_flags, generation_config, report_and_save, run_reported
from .client import ClientConfig, ServiceClient, generate_image
from .engines import DeviceEngines, EngineConfig
from .pipeline import DevicePipeline, Method


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="obclip-generate",
                                description="Generate one image privately: candidates to the cloud service, "
                                            "the rest on this device.")
    add_generation_flags(p)
    p.add_argument("--server", default=os.environ.get("OBCLIP_SERVER"),
                   help="the service's base URL, e.g. http://127.0.0.1:8000 (default: $OBCLIP_SERVER)")
    p.add_argument("--engines", default=None, type=Path,
                   help="device engines folder with manifest.json (default: $OBCLIP_HOME/engines/device); "
                        "a variant's folder (engines/device-fp16, engines/device-int8) runs the same way")
    p.add_argument("--providers", default="cpu",
                   help="onnxruntime providers for the device engines, comma-separated, tried in order (cpu, "
                        "coreml, nnapi, xnnpack, cuda, dml or full names), or 'auto': the first available of "
                        "CUDA, DirectML, CoreML, NNAPI, XNNPACK, then CPU (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    add_flags(p.add_argument_group("the service client (ClientConfig)"), ClientConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        if not args.server and args.method != Method.DEVICE_ONLY.value:
            raise InputError("name the service with --server URL (or set OBCLIP_SERVER)")
        engines_dir = args.engines or default_engines_root() / "device"
        config = generation_config(args)
        client = ServiceClient(from_flags(ClientConfig, args, url=args.server or "http://127.0.0.1"))
        if not (Path(engines_dir) / "manifest.json").is_file():
            raise ArtifactError(f"no device engines at {engines_dir}: export them first "
                                "(python export/build_engines.py [--device-model PATH]) or pass --engines")
        providers = "auto" if args.providers == "auto" else tuple(args.providers.split(","))
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir), providers=providers,
                                                             threads=args.threads, decoder=args.decoder,
                                                             memory=args.engine_memory)))
        result = generate_image(args.prompt, client, pipeline, config, on_step=ProgressBar())
        report_and_save(result, config, client, args.out)
        return 0

    return run_reported(work)


if __name__ == "__main__":
    raise SystemExit(main())
