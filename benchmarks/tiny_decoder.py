"""The tiny decoder against the full VAE decoder: decode time side by side, FLOPs, and PSNR.

    python benchmarks/tiny_decoder.py [--engines OUT/device] [--repeats 15] [--threads 1]
                                      [--full-size 512] [--full-size-repeats 3] [--json PATH]

1. The shipped pair (``--engines``, default: the embedded model's engines with its tiny decoder,
   ``ensure_default_engines``): ObCLIP runs of ``PROMPTS`` x ``SEEDS`` (the cloud step runner in
   process on the embedded cloud model, then the device pipeline); each final latent decoded by both
   graphs; PSNR of the tiny decoder's uint8 image against the full decoder's (mean and worst).
   Decode time of one latent at the model's size: one onnxruntime session per decoder, one untimed run
   each, then ``--repeats`` interleaved runs (full, tiny, full, ...); min and median ms.
2. Time only, at ``--full-size`` px (0: skip): a random-weight SD-shaped VAE decoder
   (``cloud.models.VAE_CONFIGS["sd"]``) against a random-weight AutoencoderTiny of TAESD's default shape,
   both exported to ONNX here (no weights are needed to time a graph), ``--full-size-repeats``
   interleaved runs.

FLOPs are counted on the torch modules at the same sizes (``cloud.flops``: convolutions and matmuls,
2 per multiply-add); a time ratio above the FLOPs ratio is noise or a kernel effect, not a claim.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = ("a large red circle on a white background", "a small blue square on a black background",
           "a green triangle", "a picture of a large yellow square", "a purple circle on a black background",
           "an orange triangle on a white background")
SEEDS = (0, 1)


def interleaved_ms(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Min and median ms of each callable: one untimed run each, then ``repeats`` rounds in turn."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"min_ms": round(min(t), 2), "median_ms": round(statistics.median(t), 2), "repeats": repeats}
            for name, t in times.items()}


def decoder_flops(full: Any, tiny: Any, latents: Any) -> dict[str, float]:
    """FLOPs of one decode by each torch decoder (diffusers' calls) and their ratio, counted on meta
    copies (shapes only: no arithmetic at full size)."""
    import copy

    import torch

    from obclip.cloud.flops import count_flops

    full, tiny = copy.deepcopy(full).to("meta"), copy.deepcopy(tiny).to("meta")
    z = torch.empty(latents.shape, device="meta")
    with torch.no_grad():
        _, f = count_flops(lambda: full.decode(z))
        _, t = count_flops(lambda: tiny.decode(z))
    return {"full_gflops": round(f.flops / 1e9, 3), "tiny_gflops": round(t.flops / 1e9, 3),
            "flops_ratio": round(f.flops / t.flops, 2)}


def shipped_rows(engines_dir: Path, repeats: int, threads: int | None) -> dict[str, Any]:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from obclip.cloud.models import default_models, load_text_to_latent
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.oblivious import TransformConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig
    from obclip.export.device_variants import psnr
    from obclip.export.tiny_decoder import SHIPPED_SUBFOLDER

    cloud_dir, device_dir = default_models()
    full = DeviceEngines(EngineConfig(engines_dir=str(engines_dir), threads=threads))
    tiny = DeviceEngines(EngineConfig(engines_dir=str(engines_dir), threads=threads, decoder="tiny"))
    pipeline, runner = DevicePipeline(full), CloudStepRunner(load_text_to_latent(str(cloud_dir)))
    scores, latents = [], []
    for prompt in PROMPTS:
        for seed in SEEDS:
            config = GenerationConfig(seed=seed, transform=TransformConfig(schema_path="shapes"))
            result = pipeline.generate(prompt, runner.handle, config)
            latents.append(result.latent)
            scores.append(psnr(tiny.decode(result.latent)[0], result.image))
    latent = latents[0]
    timing = interleaved_ms({"full": lambda: full.decode(latent), "tiny": lambda: tiny.decode(latent)}, repeats)
    import torch

    flops = decoder_flops(AutoencoderKL.from_pretrained(str(device_dir), subfolder="vae").eval(),
                          AutoencoderTiny.from_pretrained(str(device_dir / SHIPPED_SUBFOLDER)).eval(),
                          torch.from_numpy(latent))
    size = int(full.manifest.default_image_size)
    return {"size_px": size, "images": len(scores), "psnr_db_mean": round(float(np.mean(scores)), 2),
            "psnr_db_min": round(float(np.min(scores)), 2), "psnr_db": [round(s, 2) for s in scores],
            "time": timing, **flops}


def full_size_rows(size: int, repeats: int, threads: int | None) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderTiny

    from obclip.cloud.models import build_vae
    from obclip.export.onnx_export import VaeDecoderModule, export_component
    from obclip.export.specs import vae_decoder_spec
    from obclip.export.tiny_decoder import TinyDecoderModule, tiny_decoder_spec
    from obclip.runtime.sessions import SessionConfig, open_session

    torch.manual_seed(0)
    vae, tiny = build_vae("sd").eval(), AutoencoderTiny().eval()   # TAESD's default shape
    side = size // 8
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, side, side)).astype(np.float32)
    trace, check = {"batch": 1, "height": 8, "width": 8}, {"batch": 1, "height": 8, "width": 16}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, module, spec in (("full", VaeDecoderModule(vae), vae_decoder_spec(4)),
                                   ("tiny", TinyDecoderModule(tiny), tiny_decoder_spec(4))):
            c = export_component(module, spec, Path(tmp), spec.sample(trace, rng), spec.sample(check, rng), 1e-3)
            sessions[name] = (open_session(Path(tmp) / c.path, SessionConfig(threads=threads)), c.inputs[0])
        timing = interleaved_ms({name: (lambda s=s, i=i: s.run(None, {i: latent}))
                                 for name, (s, i) in sessions.items()}, repeats)
    flops = decoder_flops(vae, tiny, torch.from_numpy(latent))
    return {"size_px": size, "weights": "random (time only)", "time": timing, **flops}


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| decoders | px | full min / median ms | tiny min / median ms | time ratio (min) | FLOPs full / tiny "
             "(G) | FLOPs ratio | PSNR tiny vs full (mean / worst) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        f, t = r["time"]["full"], r["time"]["tiny"]
        quality = f"{r['psnr_db_mean']} / {r['psnr_db_min']} dB ({r['images']} images)" if "psnr_db_mean" in r \
            else "random weights: time only"
        lines.append(f"| {label} | {r['size_px']} | {f['min_ms']} / {f['median_ms']} | {t['min_ms']} / "
                     f"{t['median_ms']} | {f['min_ms'] / t['min_ms']:.2f}x | {r['full_gflops']} / {r['tiny_gflops']} "
                     f"| {r['flops_ratio']}x | {quality} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default=None, type=Path,
                   help="device engines with a tiny decoder (default: the embedded model's, exported on first use)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default %(default)s)")
    p.add_argument("--full-size", type=int, default=512, help="px of the random SD-shaped timing (0: skip)")
    p.add_argument("--full-size-repeats", type=int, default=3)
    p.add_argument("--json", default=None, type=Path)
    args = p.parse_args(argv)
    from obclip.export.device_engines import ensure_default_engines

    engines = args.engines or ensure_default_engines()
    rows = {"obclip-mini (shipped, distilled tiny)": shipped_rows(engines, args.repeats, args.threads)}
    if args.full_size:
        rows["SD-shaped VAE vs TAESD-shaped (random)"] = full_size_rows(args.full_size, args.full_size_repeats,
                                                                         args.threads)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"command": "python benchmarks/tiny_decoder.py " + " ".join(sys.argv[1:]),
                                         "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
