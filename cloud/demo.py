"""The main job: one private request through a real cloud service on loopback.

    python -m cloud.demo "a large red circle on a white background" --schema device/schemas/shapes.json

Starts the cloud service (``python -m cloud.serve``, torch) as a child process
on 127.0.0.1 with the embedded default models (cloud/local.py), runs the
device client against it over HTTP (device/client.py: numpy + onnxruntime +
http.client), writes the PNG, prints the candidates the server received and
the time split (cloud compute / queue + transfer / device steps / decode),
and stops the service. ``--in-process`` skips HTTP: the cloud step runner is
called directly with the same request bytes. With no model named, the
embedded default pair is used (exported to ONNX on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from device.client import ClientConfig, ServiceClient, ServiceError, generate_image
from device.engines import DeviceEngines, EngineConfig
from device.generate import ProgressBar, report_and_save
from device.pipeline import DevicePipeline, GenerationConfig, Method
from device.oblivious import ObliviousError, TransformConfig
from runtime.manifest import ManifestError
from runtime.protocol import ProtocolError

from .local import LocalService, LocalServiceConfig, LocalServiceError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Run one private text-to-image request: a loopback cloud service + this device.")
    p.add_argument("prompt")
    p.add_argument("--out", default="out/obclip.png", type=Path, help="PNG to write")
    p.add_argument("--cloud-model", default=None, help="cloud model directory or hub id (default: embedded mini)")
    p.add_argument("--engines", default=None,
                   help="device engines folder with manifest.json (default: <repo>/engines/device, "
                        "exported from the embedded model on first use)")
    p.add_argument("--method", default="obclip", choices=[m.value for m in Method])
    p.add_argument("--steps", type=int, default=25, help="T, total DPM-Solver++ steps")
    p.add_argument("--switch-step", "-k", type=int, default=None,
                   help="k, steps run in the cloud (default: the acceleration preset's k, else 10)")
    p.add_argument("--acceleration", default=None,
                   help="server-side acceleration preset: paper-k5 (k=5,r=3,s=3), paper-k10 (k=10,r=4,s=6) "
                        "or none-k<k>; default: every cloud step a full pass")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--max-candidates", type=int, default=32)
    p.add_argument("--schema", default=None,
                   help="attribute schema JSON (default: device/schemas/person.json; the embedded mini "
                        "model draws shapes: use device/schemas/shapes.json)")
    p.add_argument("--in-process", action="store_true",
                   help="call the cloud step runner in this process instead of starting the HTTP service")
    args = p.parse_args(argv)

    from .models import resolve_model_dir  # torch loads here, after argument errors

    try:
        if args.engines is not None:
            engines_dir = args.engines
        elif args.cloud_model is not None:
            raise ManifestError("with --cloud-model, export the matching device model first "
                                "(python export/build_engines.py --device-model PATH) and pass --engines")
        else:
            from export.build_engines import ensure_default_engines

            engines_dir = ensure_default_engines()
        config = GenerationConfig(
            method=Method(args.method), num_inference_steps=args.steps, switch_step=args.switch_step,
            guidance_scale=args.guidance, height=args.size, width=args.size, seed=args.seed,
            wire_dtype=args.wire_dtype,
            transform=TransformConfig(max_candidates=args.max_candidates, schema_path=args.schema),
            acceleration=args.acceleration,
        )
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir))))
        prepared = pipeline.prepare(args.prompt, config)  # refuse bad input before loading the cloud

        client = None
        if prepared.request is None:  # device-only: nothing is sent, no service needed
            result = pipeline.generate(args.prompt, None, config, on_step=ProgressBar())
        elif args.in_process:
            from .models import load_text_to_latent
            from .steps import CloudStepRunner

            runner = CloudStepRunner(load_text_to_latent(resolve_model_dir(args.cloud_model, "cloud")))
            result = pipeline.generate(args.prompt, runner.handle, config, on_step=ProgressBar())
        else:
            model = str(resolve_model_dir(args.cloud_model, "cloud"))
            print(f"starting the cloud service on loopback ({model}) ...", file=sys.stderr)
            with LocalService(LocalServiceConfig(model=model)) as service:
                print(f"cloud service ready at {service.url}", file=sys.stderr)
                client = ServiceClient(ClientConfig(service.url, timeout_s=600.0, retries=1))
                result = generate_image(args.prompt, client, pipeline, config, on_step=ProgressBar())
            print("cloud service stopped", file=sys.stderr)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, ObliviousError, ProtocolError, ManifestError, LocalServiceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    report_and_save(result, config, client, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
