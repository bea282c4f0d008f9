"""What the fp16 handoff costs: bytes saved vs the change in the final image.

    python benchmarks/handoff.py [--cloud-model DIR --engines DIR] [--prompts N] [--k 5 10]

Runs each prompt twice through the split pipeline (fp32 and fp16 wire) with
the same seed and prints handoff bytes per candidate, the final latent's max
abs difference and the decoded image's PSNR (fp32 as reference). With no
model named it uses the embedded default pair (ObCLIP-Mini, trained).
"""

from __future__ import annotations

import argparse

import numpy as np

PROMPTS = [
    "a portrait photo of an old woman wearing glasses",
    "High-quality, face portrait photo of a young asian man, wearing glasses",
    "a middle-aged indian woman in hat Fashion portrait photo",
    "a photo of a man reading a book in a park",
    "close-up of an elderly african gentleman smiling",
    "a young european woman on a bicycle",
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cloud-model", default=None)
    p.add_argument("--engines", default=None)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--k", type=int, nargs="+", default=[5, 10])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None)
    args = p.parse_args(argv)

    from obclip.cloud.models import load_text_to_latent, resolve_model_dir
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig
    from obclip.export.device_engines import ensure_default_engines

    engines = args.engines or ensure_default_engines()
    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines))))
    runner = CloudStepRunner(load_text_to_latent(resolve_model_dir(args.cloud_model, "cloud")))

    print(f"{'k':>3} {'N':>3}  {'fp32 B/cand':>11} {'fp16 B/cand':>11}  {'latent max|d|':>13} {'PSNR dB':>8}  prompt")
    rows = []
    for k in args.k:
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            out = {}
            for dtype in ("float32", "float16"):
                config = GenerationConfig(num_inference_steps=args.steps, switch_step=k, seed=1000 + i,
                                          height=args.size, width=args.size, wire_dtype=dtype)
                out[dtype] = pipeline.generate(prompt, runner.handle, config)
            a, b = out["float32"], out["float16"]
            n = a.prepared.request.n
            d = float(np.abs(a.latent - b.latent).max())
            q = psnr(a.image, b.image)
            rows.append(q)
            print(f"{k:>3} {n:>3}  {a.bytes_received / n:>11.0f} {b.bytes_received / n:>11.0f}  "
                  f"{d:>13.2e} {q:>8.1f}  {prompt}")
    finite = [q for q in rows if np.isfinite(q)]
    mean = np.mean(finite) if finite else float("inf")
    print(f"min PSNR {min(rows):.1f} dB, mean PSNR over finite rows {mean:.1f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
