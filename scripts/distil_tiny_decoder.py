"""Distil a tiny decoder (diffusers' AutoencoderTiny, the TAESD architecture) from a device model's VAE.

    python scripts/distil_tiny_decoder.py                      # the embedded device model -> its vae_tiny/
    python scripts/distil_tiny_decoder.py --steps 200 --out /tmp/tiny   # a quick try elsewhere

Build time only (torch, diffusers). Data, both kinds in every batch:
  * pipeline latents: the final latents the shipped device pipeline produces (ONNX engines exported from
    the model, method device-only, the shapes dataset's training captions, one seed each);
  * encoded images: the VAE encoder's posterior samples (x scaling factor) of the shapes dataset's
    rendered training images (mini/shapes.py).
Targets: the full VAE decoder's images of the same latents (diffusers' convention: decode(latents /
scaling_factor)). The tiny decoder learns them with an MSE loss on [-1, 1] images; its encoder learns the
VAE encoder's scaled posterior mean of the rendered images (the folder is a whole AutoencoderTiny; the
device runs only the decoder). The decoder upsamples by 2 between its blocks: as many blocks as the
VAE has, so its downscale matches. Held-out pipeline latents (the held-out split's captions, other seeds)
give the PSNR against the full decoder that PROVENANCE.json records with the settings and the command.
Seeded: a rerun with the same settings on the same torch writes the same weights up to float noise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # mini/ (the demo model's data) runs from the checkout only

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, AutoencoderTiny  # noqa: E402

from mini.shapes import make_dataset  # noqa: E402
from obclip.cloud.models import resolve_model_dir  # noqa: E402
from obclip.export.device_variants import psnr  # noqa: E402
from obclip.export.tiny_decoder import SHIPPED_SUBFOLDER, tiny_upscale  # noqa: E402
from obclip.runtime.graphs import to_uint8_images  # noqa: E402


@dataclass(frozen=True)
class DistilConfig:
    seed: int = 0
    steps: int = 1000
    batch: int = 16
    crop: int = 8                      # latent pixels per side of the training windows
    lr: float = 2e-3
    channels: int = 32                 # every decoder block's width (DecoderTiny keeps one width)
    decoder_blocks: tuple[int, ...] = (3, 3, 0)   # AutoencoderTinyBlocks per resolution, lowest first
    encoder_channels: int = 16
    encoder_blocks: tuple[int, ...] = (1, 1, 1)
    pipeline_latents: int = 128        # training latents from the device pipeline
    encoded_images: int = 1024         # training latents from VAE encodings of rendered images
    held_out: int = 32                 # pipeline latents for the PSNR check (held-out captions, other seeds)
    pipeline_steps: int = 25           # the pipeline's solver steps (its default)


def pipeline_latents(model: str, runs: list[tuple[str, int]], steps: int) -> np.ndarray:
    """Final latents [n, C, h, w] of the shipped device pipeline (ONNX, device-only), one per (prompt, seed)."""
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig, Method
    from obclip.export.device_engines import ensure_engines

    with tempfile.TemporaryDirectory() as tmp:
        engines = ensure_engines(model, Path(tmp))
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines))))
        latents = []
        for prompt, seed in runs:
            config = GenerationConfig(method=Method.DEVICE_ONLY, seed=seed, num_inference_steps=steps)
            prepared = pipeline.prepare(prompt, config)
            latents.append(pipeline.finish(prepared, None, config, None))
    return np.concatenate(latents).astype(np.float32)


def encoded_images(vae: AutoencoderKL, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled posterior samples, scaled posterior means) of n rendered training images."""
    images, _, _ = make_dataset(n, seed=seed, split="train")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    generator = torch.Generator().manual_seed(seed)
    samples, means = [], []
    with torch.no_grad():
        for chunk in x.split(64):
            posterior = vae.encode(chunk).latent_dist
            samples.append(posterior.sample(generator) * vae.config.scaling_factor)
            means.append(posterior.mean * vae.config.scaling_factor)
    return torch.cat(samples), torch.cat(means)


def full_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The full decoder's images in [-1, 1], as diffusers' pipelines call it."""
    with torch.no_grad():
        return torch.cat([vae.decode(z / vae.config.scaling_factor).sample for z in latents.split(64)])


def crop(latents: torch.Tensor, images: torch.Tensor, i: int, j: int, size: int,
         scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window of latents [B, C, h, w] and of their images [B, 3, h * scale, w * scale]: the
    tiny decoder is convolutional, so crops train it at a fraction of the cost of whole images."""
    return (latents[:, :, i:i + size, j:j + size],
            images[:, :, i * scale:(i + size) * scale, j * scale:(j + size) * scale])


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of the uint8 images the device writes (``b``, the full decoder's, as reference)."""
    return psnr(to_uint8_images(a.numpy()), to_uint8_images(b.numpy()))


def build_tiny(config: DistilConfig, vae: AutoencoderKL) -> AutoencoderTiny:
    tiny = AutoencoderTiny(
        latent_channels=int(vae.config.latent_channels),
        decoder_block_out_channels=(config.channels,) * len(config.decoder_blocks),
        num_decoder_blocks=config.decoder_blocks,
        encoder_block_out_channels=(config.encoder_channels,) * len(config.encoder_blocks),
        num_encoder_blocks=config.encoder_blocks)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if tiny_upscale(tiny.config) != vae_scale:
        raise SystemExit(f"{len(config.decoder_blocks)} decoder blocks upsample by {tiny_upscale(tiny.config)}, "
                         f"the VAE downscales by {vae_scale}: give {len(vae.config.block_out_channels)} blocks")
    return tiny


def distil(config: DistilConfig, model: str) -> tuple[AutoencoderTiny, dict]:
    torch.manual_seed(config.seed)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", local_files_only=True).eval()
    t0 = time.perf_counter()
    captions = make_dataset(config.pipeline_latents, seed=config.seed, split="train")[1]
    held_captions = make_dataset(config.held_out, seed=config.seed, split="heldout")[1]
    runs = [(c, i) for i, c in enumerate(captions)] + [(c, 10_000 + i) for i, c in enumerate(held_captions)]
    z_all = torch.from_numpy(pipeline_latents(model, runs, config.pipeline_steps))
    z_pipe, z_held = z_all[:len(captions)], z_all[len(captions):]
    z_enc, z_mean = encoded_images(vae, config.encoded_images, config.seed)
    images, _, _ = make_dataset(config.encoded_images, seed=config.seed, split="train")
    x_enc = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = torch.cat([z_pipe, z_enc])
    targets = full_decode(vae, latents)
    held_targets = full_decode(vae, z_held)
    data_s = time.perf_counter() - t0

    tiny = build_tiny(config, vae)
    scale = tiny_upscale(tiny.config)
    optimiser = torch.optim.Adam(tiny.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    for step in range(config.steps):
        rows = torch.randint(0, len(latents), (config.batch,), generator=generator)
        image_rows = torch.randint(0, len(x_enc), (config.batch,), generator=generator)
        (i, j), k = torch.randint(0, latents.shape[-1] - config.crop + 1, (2,), generator=generator).tolist(), scale
        z, want = crop(latents[rows], targets[rows], i, j, config.crop, k)
        z_target, x = crop(z_mean[image_rows], x_enc[image_rows], i, j, config.crop, k)
        loss_dec = torch.nn.functional.mse_loss(tiny.decode(z).sample, want)
        loss_enc = torch.nn.functional.mse_loss(tiny.encode(x).latents, z_target)
        optimiser.zero_grad()
        (loss_dec + loss_enc).backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            print(f"step {step:5d}  decoder mse {loss_dec.item():.5f}  encoder mse {loss_enc.item():.5f}", flush=True)
    train_s = time.perf_counter() - t0
    tiny.eval()
    with torch.no_grad():
        held = torch.cat([tiny.decode(z).sample for z in z_held.split(64)])
        enc_mse = float(torch.nn.functional.mse_loss(tiny.encode(x_enc[:256]).latents, z_mean[:256]))
    per_image = [psnr_db(held[i:i + 1], held_targets[i:i + 1]) for i in range(len(held))]
    result = {"held_out_psnr_db_mean": round(float(np.mean(per_image)), 2),
              "held_out_psnr_db_min": round(float(np.min(per_image)), 2),
              "held_out_latents": len(held), "encoder_mse_vs_vae_mean": round(enc_mse, 5),
              "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1)}
    return tiny, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="device model folder (default: the embedded one)")
    p.add_argument("--out", default=None, type=Path, help="output folder (default: <model>/vae_tiny)")
    defaults = DistilConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--channels", type=int, default=defaults.channels)
    p.add_argument("--decoder-blocks", default=",".join(map(str, defaults.decoder_blocks)))
    args = p.parse_args(argv)
    model = resolve_model_dir(args.model, "device")
    config = DistilConfig(seed=args.seed, steps=args.steps, channels=args.channels,
                          decoder_blocks=tuple(int(b) for b in args.decoder_blocks.split(",")))
    tiny, result = distil(config, model)
    out = args.out if args.out is not None else Path(model) / SHIPPED_SUBFOLDER
    tiny.save_pretrained(str(out), safe_serialization=True)
    provenance = {
        "what": "AutoencoderTiny (TAESD architecture) distilled from this model's VAE decoder",
        "command": "python scripts/distil_tiny_decoder.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": asdict(config), "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "result": result,
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(json.dumps(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
