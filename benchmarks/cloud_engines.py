"""Cloud engines parity: --backend onnxruntime against --backend torch, per preset, down to the device's image.

    python benchmarks/cloud_engines.py --engines OUT/cloud [--model CLOUD_DIR] [--device-engines DIR]

For each preset (none-k5, none-k10, paper-k5, paper-k10, and each with the
exact extras) one request runs on the torch runner (model folder, diffusers'
scheduler) and on the onnxruntime runner (exported graphs, numpy solver);
prints max|a-b|/max(1,max|b|) of the handoff latents and solver state, then
lets the device finish both handoffs and prints the final images' max and
mean absolute difference in grey levels (0..255).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from obclip.cloud.engine_backend import OrtEngine
from obclip.cloud.models import load_text_to_latent, resolve_model_dir
from obclip.cloud.steps import CloudStepRunner
from obclip.runtime.plan import preset

PRESETS = ("none-k5", "none-k10", "paper-k5", "paper-k10")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


def write_narrow_sd(out: Path) -> Path:
    """SD-v1.4's UNet topology (4 stages, 3 with cross-attention, mid block, 8 heads, 768-d text) at
    channels (32, 64, 128, 128), with a 2-layer 768-d CLIP text tower: random weights, seconds to export."""
    from obclip.cloud.models import write_random_model

    return write_random_model("sd-v1.4-narrow", out, seed=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=Path, help="the cloud engines folder (OUT/cloud)")
    p.add_argument("--model", default=None, help="the cloud model folder they were exported from (default: embedded)")
    p.add_argument("--device-engines", default=None, type=Path,
                   help="device engines for the image check (default: the embedded pair's, exported on first use)")
    p.add_argument("--prompt", default="a red circle", help="(default %(default)s: N=18 candidates on the mini pair)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated (default %(default)s)")
    p.add_argument("--write-narrow-sd", default=None, type=Path,
                   help="only write a reduced-width SD-v1.4-shaped random model to this folder and exit")
    p.add_argument("--write-tiny-sdxl", default=None, type=Path,
                   help="only write the tiny SDXL-family models (random weights, the full topologies at 32-64 "
                        "channels) to DIR/sdxl, DIR/koala-700m, DIR/lcm-sdxl and exit")
    p.add_argument("--write-sd", default=None, type=Path,
                   help="only write a full-size SD-v1.4-shaped random model (4.3 GB) to this folder and exit")
    args = p.parse_args(argv)
    if args.write_narrow_sd is not None:
        print(write_narrow_sd(args.write_narrow_sd))
        return 0
    if args.write_tiny_sdxl is not None:
        from obclip.cloud.models import write_random_model

        for seed, (name, spec) in enumerate((("sdxl", "sdxl-tiny"), ("koala-700m", "koala-700m-tiny"),
                                             ("lcm-sdxl", "lcm-sdxl-tiny"))):
            print(write_random_model(spec, args.write_tiny_sdxl / name, seed=seed))
        return 0
    if args.write_sd is not None:
        from obclip.cloud.models import write_random_model

        print(write_random_model("sd-v1.4", args.write_sd, seed=0))
        return 0

    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig
    from obclip.export.device_engines import ensure_default_engines

    torch_runner = CloudStepRunner(load_text_to_latent(resolve_model_dir(args.model, "cloud")))
    ort_runner = CloudStepRunner(engine=OrtEngine(args.engines))
    device_dir = args.device_engines or ensure_default_engines()
    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(device_dir))))
    worst = 0.0
    print(f"{'preset':28s} {'latents':>9s} {'prev_x0':>9s} {'img max':>8s} {'img mean':>8s} "
          f"{'torch s':>8s} {'ort s':>8s}")
    for name in args.presets.split(","):
        for extras in (False, True):
            acc = preset(name)
            if extras:
                acc = acc.replace(cross_kv_once=True, merge_step0_uncond=True)
            config = GenerationConfig(num_inference_steps=args.steps, acceleration=acc, seed=11)
            prepared = pipeline.prepare(args.prompt, config)
            assert prepared.request is not None
            n = prepared.request.n
            t0 = time.perf_counter()
            want = torch_runner.run(prepared.request)
            t1 = time.perf_counter()
            got = ort_runner.run(prepared.request)
            t2 = time.perf_counter()
            d_lat, d_x0 = rel(got.latents, want.latents), rel(got.prev_x0, want.prev_x0)
            images = [pipeline.generate(args.prompt, runner.handle, config).image.astype(np.int32)
                      for runner in (torch_runner, ort_runner)]
            diff = np.abs(images[0] - images[1])
            worst = max(worst, d_lat, d_x0)
            label = name + (" +extras" if extras else "") + f" N={n}"
            print(f"{label:28s} {d_lat:9.2e} {d_x0:9.2e} {int(diff.max()):8d} {float(diff.mean()):8.3f} "
                  f"{t1 - t0:8.2f} {t2 - t1:8.2f}")
    print(f"worst handoff difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
