"""The main job: one private request through a real cloud service on loopback.

    obclip-demo "a large red circle on a white background"

Starts the cloud service (``python -m obclip.cloud.serve``, torch) as a child
process on 127.0.0.1 with the embedded default models (app/local.py), runs the
device client against it over HTTP (device/client.py: numpy + onnxruntime +
http.client), writes the PNG, prints the candidates the server received and
the time split (cloud compute / queue + transfer / device steps / decode),
and stops the service. ``--in-process`` skips HTTP: the cloud step runner is
called directly with the same request bytes. With no model named, the
embedded default pair is used (its device half exported to ONNX into
``$OBCLIP_HOME/engines`` on first use), with the attribute schema it was
trained for.

This is the one layer that sees both sides: it imports the device client,
the cloud's model loading and the exporter; neither side imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from obclip.device.cli import ProgressBar, add_generation_flags, generation_config, report_and_save, run_reported
from obclip.device.client import ClientConfig, ServiceClient, generate_image
from obclip.device.engines import DeviceEngines, EngineConfig
from obclip.device.pipeline import DevicePipeline
from obclip.runtime.errors import ArtifactError

from .local import LocalService, LocalServiceConfig
from .pairing import check_pair


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="obclip-demo",
        description="Run one private text-to-image request: a loopback cloud service + this device.")
    add_generation_flags(p)
    p.add_argument("--cloud-model", default=None, help="cloud model directory or hub id (default: embedded mini)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--device-model", default=None, type=Path,
                        help="device model directory (diffusers layout, e.g. Koala-700m for an SDXL cloud), exported "
                             "to $OBCLIP_HOME/engines/models/<name>/device on first use and checked against the "
                             "cloud model (family, latent channels, VAE, scheduler, tokenizer)")
    device.add_argument("--engines", default=None, type=Path,
                        help="device engines folder with manifest.json (default: $OBCLIP_HOME/engines/device, "
                             "exported from the embedded model on first use)")
    p.add_argument("--in-process", action="store_true",
                   help="call the cloud step runner in this process instead of starting the HTTP service")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        from obclip.cloud.models import resolve_model_dir  # torch loads here, after argument errors

        if args.engines is not None:
            engines_dir = args.engines
        elif args.device_model is not None:
            from obclip.export.device_engines import ensure_model_engines

            engines_dir = ensure_model_engines(str(args.device_model))
        elif args.cloud_model is not None:
            raise ArtifactError("with --cloud-model, name the matching device model (--device-model DIR), or export "
                                "it first (python export/build_engines.py --device-model PATH) and pass --engines")
        else:
            from obclip.export.device_engines import ensure_default_engines

            engines_dir = ensure_default_engines()
        config = generation_config(args)
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir), decoder=args.decoder,
                                                             memory=args.engine_memory)))
        cloud_dir = resolve_model_dir(args.cloud_model, "cloud")
        if Path(cloud_dir).is_dir():  # a hub id is read by the service; a local folder is checked here
            check_pair(cloud_dir, pipeline.engines.manifest, config.solver)
        prepared = pipeline.prepare(args.prompt, config)  # refuse bad input before loading the cloud

        client = None
        if prepared.request is None:  # device-only: nothing is sent, no service needed
            result = pipeline.generate(args.prompt, None, config, on_step=ProgressBar())
        elif args.in_process:
            from obclip.cloud.models import load_text_to_latent
            from obclip.cloud.steps import CloudStepRunner

            runner = CloudStepRunner(load_text_to_latent(cloud_dir))
            result = pipeline.generate(args.prompt, runner.handle, config, on_step=ProgressBar())
        else:
            model = str(cloud_dir)
            print(f"starting the cloud service on loopback ({model}) ...", file=sys.stderr)
            with LocalService(LocalServiceConfig(model=model)) as service:
                url = service.ready_url
                print(f"cloud service ready at {url}", file=sys.stderr)
                client = ServiceClient(ClientConfig(url, timeout_s=600.0, retries=1))
                result = generate_image(args.prompt, client, pipeline, config, on_step=ProgressBar())
            print("cloud service stopped", file=sys.stderr)
        report_and_save(result, config, client, args.out)
        return 0

    return run_reported(work)   # LocalServiceError is a ServiceError: exit 3


if __name__ == "__main__":
    raise SystemExit(main())
