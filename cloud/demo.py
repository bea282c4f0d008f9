"""One ObCLIP request end to end in one process, with bytes between the sides.

    python -m cloud.demo "a portrait photo of an old woman wearing glasses" --out out/demo.png

The device side (device.pipeline, numpy + onnxruntime) builds the request
bytes; the cloud side (cloud.steps, torch) answers them with handoff bytes;
the device finishes and writes the PNG. Nothing but those bytes crosses
between the two. With no model named, the embedded default pair is used
(built and exported on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from device.engines import DeviceEngines, EngineConfig
from device.pipeline import DevicePipeline, GenerationConfig, Method, describe_sent
from device.oblivious import ObliviousError, TransformConfig
from runtime.manifest import ManifestError
from runtime.protocol import ProtocolError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run one private text-to-image request (cloud + device in one process).")
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
            wire_dtype=args.wire_dtype, transform=TransformConfig(max_candidates=args.max_candidates),
            acceleration=args.acceleration,
        )
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir))))
        prepared = pipeline.prepare(args.prompt, config)  # refuse bad input before loading the cloud

        cloud = None
        if prepared.request is not None:
            from .models import load_text_to_latent
            from .steps import CloudStepRunner

            runner = CloudStepRunner(load_text_to_latent(resolve_model_dir(args.cloud_model, "cloud")))
            received: list[bytes] = []

            def cloud(request_bytes: bytes) -> bytes:
                received.append(request_bytes)
                return runner.handle(request_bytes)

        result = pipeline.generate(args.prompt, cloud, config,
                                   on_step=lambda i, n: print(f"\r  device step {i}/{n}", end="", file=sys.stderr))
        print(file=sys.stderr)
    except (ValueError, FileNotFoundError, ObliviousError, ProtocolError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    acc = config.acceleration
    acc_text = "none" if acc is None else f"r={acc.cache_step} s={acc.skip_step} reuse={acc.batch_reuse} " \
        f"cache={acc.attention_cache} skip={acc.block_skip}"
    print(f"method: {config.method.value}  T={config.num_inference_steps}  k={config.k}  acceleration: {acc_text}  "
          f"seed={result.prepared.seed}  size={result.prepared.height}x{result.prepared.width}")
    print("\n".join(describe_sent(result, config)))
    t = result.timings
    print(f"time: cloud {t['cloud']:.2f} s, device steps {t['device_steps']:.2f} s, decode {t['decode']:.2f} s; "
          f"bytes sent {result.bytes_sent}, received {result.bytes_received}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.save_png(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
