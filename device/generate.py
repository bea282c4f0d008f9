"""One private text-to-image request against a running cloud service.

    python -m device.generate "a portrait photo of an old woman" --server http://127.0.0.1:8000 --out image.png
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
import sys
from pathlib import Path

from runtime.manifest import ManifestError
from runtime.protocol import ProtocolError

from .client import ClientConfig, ServiceClient, ServiceError, generate_image
from .engines import DeviceEngines, EngineConfig
from .oblivious import ObliviousError, TransformConfig
from .pipeline import DevicePipeline, GenerationConfig, GenerationResult, Method, describe_sent

DEFAULT_ENGINES = Path(__file__).resolve().parent.parent / "engines" / "device"


class ProgressBar:
    """``on_step`` callback: a plain-text bar on a stream (no dependencies)."""

    def __init__(self, label: str = "device steps", width: int = 30, stream=None):
        self.label, self.width = label, width
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, i: int, n: int) -> None:
        filled = self.width * i // max(n, 1)
        self.stream.write(f"\r  {self.label} [{'#' * filled}{'.' * (self.width - filled)}] {i}/{n}")
        if i >= n:
            self.stream.write("\n")
        self.stream.flush()


def report_lines(result: GenerationResult, config: GenerationConfig, client: ServiceClient | None) -> list[str]:
    """What a run did, for the CLIs: the options, what the server received, and the time split
    (cloud compute / queue + transfer from the service's Server-Timing, device steps, decode)."""
    acc = config.acceleration
    acc_text = "none" if acc is None else f"r={acc.cache_step} s={acc.skip_step} reuse={acc.batch_reuse} " \
        f"cache={acc.attention_cache} skip={acc.block_skip}"
    lines = [f"method: {config.method.value}  T={config.num_inference_steps}  k={config.k}  acceleration: {acc_text}  "
             f"seed={result.prepared.seed}  size={result.prepared.height}x{result.prepared.width}  "
             f"wire: {config.wire_dtype}"]
    lines += describe_sent(result, config)
    t = result.timings
    call = client.last_call if client is not None else None
    if result.prepared.request is not None and call is not None and call.server_run_s is not None:
        cloud = (f"cloud compute {call.server_run_s:.2f} s, queue + transfer "
                 f"{max(0.0, call.total_s - call.server_run_s):.2f} s ({call.attempts} attempt(s))")
    else:
        cloud = f"cloud {t['cloud']:.2f} s"
    lines.append(f"time: {cloud}, device steps {t['device_steps']:.2f} s, decode {t['decode']:.2f} s; "
                 f"bytes sent {result.bytes_sent}, received {result.bytes_received}")
    return lines


def report_and_save(result: GenerationResult, config: GenerationConfig, client: ServiceClient | None,
                    out: Path) -> None:
    """Print the report, write the PNG (its folder made if needed) and say where."""
    print("\n".join(report_lines(result, config, client)))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save_png(out)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device.generate",
                                description="Generate one image privately: candidates to the cloud service, "
                                            "the rest on this device.")
    p.add_argument("prompt")
    p.add_argument("--server", default=os.environ.get("OBCLIP_SERVER"),
                   help="the service's base URL, e.g. http://127.0.0.1:8000 (default: $OBCLIP_SERVER)")
    p.add_argument("--out", default="out/obclip.png", type=Path, help="PNG to write (default %(default)s)")
    p.add_argument("--engines", default=None, type=Path,
                   help=f"device engines folder with manifest.json (default {DEFAULT_ENGINES})")
    p.add_argument("--method", default="obclip", choices=[m.value for m in Method])
    p.add_argument("--steps", type=int, default=25, help="T, total DPM-Solver++ steps")
    p.add_argument("--switch-step", "-k", type=int, default=None,
                   help="k, steps run in the cloud (default: the acceleration preset's k, else 10)")
    p.add_argument("--acceleration", default=None,
                   help="server-side acceleration preset: paper-k5, paper-k10 or none-k<k> (default: none)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16"],
                   help="handoff precision; float16 halves the download")
    p.add_argument("--schema", default=None, help="attribute schema JSON (default: device/schemas/person.json)")
    p.add_argument("--max-candidates", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per attempt (default %(default)s)")
    p.add_argument("--retries", type=int, default=3, help="retries on connection errors and 503 (default %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.server and args.method != Method.DEVICE_ONLY.value:
        print("error: name the service with --server URL (or set OBCLIP_SERVER)", file=sys.stderr)
        return 2
    engines_dir = args.engines or DEFAULT_ENGINES
    try:
        config = GenerationConfig(
            method=Method(args.method), num_inference_steps=args.steps, switch_step=args.switch_step,
            guidance_scale=args.guidance, height=args.size, width=args.size, seed=args.seed,
            wire_dtype=args.wire_dtype, acceleration=args.acceleration,
            transform=TransformConfig(max_candidates=args.max_candidates, schema_path=args.schema),
        )
        if not (Path(engines_dir) / "manifest.json").is_file():
            raise ManifestError(f"no device engines at {engines_dir}: export them first "
                                "(python export/build_engines.py [--device-model PATH]) or pass --engines")
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir))))
        client = ServiceClient(ClientConfig(args.server or "http://127.0.0.1", timeout_s=args.timeout,
                                            retries=args.retries))
        result = generate_image(args.prompt, client, pipeline, config, on_step=ProgressBar())
    except ServiceError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, ObliviousError, ProtocolError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    report_and_save(result, config, client, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
