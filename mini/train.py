"""Train ObCLIP-Mini: a small cloud/device text-to-image pair on the synthetic shapes data.

    python -m mini.train --out src/obclip/models/obclip-mini --work .train            # every stage
    python -m mini.train --out src/obclip/models/obclip-mini --work .train --stage distil
    python -m mini.train ... --budget-scale 0.01                           # smoke run
    python -m mini.train ... --set n_train=256 --set eval_prompts=4        # any Hyper field

Stages (each resumable; ``--stage all`` skips the finished ones):

1. ``vae``: AutoencoderKL(VAE_CONFIGS["mini"]) on the images (L1 + L2 + a small
   KL), then the fixed training set is encoded once (posterior means); their
   measured std sets the VAE's ``scaling_factor`` so that the UNet sees std ~1
   latents.
2. ``text-unet``: CLIPTextModel(TEXT_CONFIGS["mini"]) + the cloud UNet
   (UNET_CONFIGS["mini"], SD-v1.4's block structure) from scratch, jointly, on
   SD-v1.4's noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon),
   with EMA weights and 10% empty captions for classifier-free guidance.
3. ``distil``: the device UNet (UNET_CONFIGS["mini-small"]) the BK-SDM way:
   initialised from the cloud UNet (second res+attention pair of each down
   stage and the middle pair of each up stage dropped, no mid block), then
   trained on task + output-KD + feature-KD losses; text encoder frozen.
4. ``package``: ``--out/cloud`` and ``--out/device`` in diffusers layout,
   a final measured evaluation of the packaged pair, and ``--out/MODEL_CARD.md``
   written from the run's log.

Everything random is drawn from generators seeded by (seed, stage, step), so a
run killed and resumed from a checkpoint draws the same batches as one that
was not. Progress goes to stdout and ``--work/log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# libgomp's threads spin for a while at every barrier before sleeping. On
# cores shared with other jobs a spinning thread takes the core the other
# thread needs (measured with mini.bench_step: docs/benchmarks.md, "Training").
# Passive waiting must be chosen before torch loads libgomp;
# MINI_OMP_DEFAULTS=1 keeps libgomp's default (for that comparison).
if "OMP_WAIT_POLICY" not in os.environ and not os.environ.get("MINI_OMP_DEFAULTS"):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mini.card import last_record, model_card  # noqa: E402

STAGES = ("vae", "text-unet", "distil", "package")
CLOUD_SPEC, DEVICE_SPEC = "mini", "mini-small"


# --------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """Everything that decides the trained weights. Step budgets are at
    --budget-scale 1; the scale multiplies them and nothing else.

    The budgets come from `--measure` (the time per step of each stage and of an
    evaluation) and `python -m mini.bench_step` (what a text-unet step spends its
    time on); v2 trains the text-unet longer than v1 with the same recipe
    (warm-up + cosine, Min-SNR, EMA), because v1's cloud model was still
    improving when it stopped. The measurements: docs/benchmarks.md, "Training".
    """

    seed: int = 0
    n_train: int = 20000          # fixed training set, encoded once (216 distinct captions)

    # vae: affordable only on crops (the decoder at 64x64 is ~1.2 GFLOP per
    # image); convolutions don't care, the attention runs on the crop's 8x8 latent.
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6

    # text-unet
    unet_steps: int = 8000
    batch: int = 64
    lr: float = 3e-4              # UNet and text encoder alike: the text side is the slow one to learn
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty prompt, so classifier-free guidance works
    offset_noise: float = 0.1     # lets the model move the mean: backgrounds are pure white/black
    min_snr_gamma: float = 5.0    # Min-SNR loss weighting: faster convergence on a fixed budget
    warmup_frac: float = 0.04
    final_lr_frac: float = 0.1    # cosine decay to this fraction of lr

    # distil (BK-SDM: task + output-KD + feature-KD, each weight 1)
    distil_steps: int = 1200
    distil_lr: float = 2e-4
    kd_out_weight: float = 1.0
    kd_feat_weight: float = 1.0

    # evaluation: held-out prompts, DPM-Solver++ with guidance as the runtime does it
    eval_every: int = 500         # steps between evals; an eval costs a small share of them
    eval_prompts: int = 36
    final_eval_prompts: int = 120
    sample_steps: int = 25
    guidance: float = 7.5
    switch_step: int = 10         # hybrid evaluation: cloud steps 0..k-1, device the rest

    # checkpoints
    ckpt_every_s: float = 180.0
    ckpt_every_steps: int = 0     # 0: by time only (tests use steps)
    log_every: int = 25

    # packaging: components stored in fp16 (loaded back as fp32); the UNets stay fp32
    fp16_text_embedding: bool = True
    fp16_vae: bool = True
    max_package_mb: float = 40.0

    def steps(self, stage: str, scale: float) -> int:
        base = {"vae": self.vae_steps, "text-unet": self.unet_steps, "distil": self.distil_steps}[stage]
        return max(1, round(base * scale))

    def with_overrides(self, items: list[str]) -> Hyper:
        types = {f.name: f.type for f in dataclasses.fields(self)}
        changes = {}
        for item in items:
            key, _, value = item.partition("=")
            if key not in types:
                raise SystemExit(f"--set {item}: unknown field {key!r}; fields: {', '.join(types)}")
            kind = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}[types[key]]
            changes[key] = kind(value)
        return dataclasses.replace(self, **changes)


# Fields that may differ between the runs that share a --work folder.
_FREE_FIELDS = {"ckpt_every_s", "ckpt_every_steps", "log_every"}


# --------------------------------------------------------------------------
# Run context: paths, log, checkpoints, seeds
# --------------------------------------------------------------------------


@dataclass
class Run:
    hp: Hyper
    scale: float
    work: Path
    out: Path
    device: torch.device
    threads: int
    die_at: tuple[str, int] | None = None  # testing: SIGKILL self after this step

    def log(self, **record) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.work / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        path = self.work / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def stage_dir(self, stage: str) -> Path:
        d = self.work / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, stage: str) -> bool:
        return (self.work / stage / "final.pt").exists()

    def generator(self, stage: str, step: int) -> torch.Generator:
        """The CPU generator of one step: the same draws however often a stage restarts."""
        seed = np.random.SeedSequence([self.hp.seed, STAGES.index(stage), step + 1]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_at(step: int, total: int, base: float, hp: Hyper) -> float:
    """Linear warm-up, then cosine from base to final_lr_frac * base."""
    warmup = max(1, round(hp.warmup_frac * total))
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (hp.final_lr_frac + (1 - hp.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's parameters (with the usual
    warm-up, so that short runs are not dominated by the initial weights)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in module.named_parameters()]
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1 - d)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict) -> None:
        for t, n in zip(self.shadow, self.names):
            t.copy_(state[n])

    def averaged(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of module carrying the averaged weights."""
        m = copy.deepcopy(module)
        with torch.no_grad():
            for p, s in zip(m.parameters(), self.shadow):
                p.copy_(s)
        return m.eval()


def train_loop(run: Run, stage: str, total: int, state: dict, step_fn: Callable[[int], dict],
               eval_fn: Callable[[int], dict] | None = None) -> float:
    """Steps [start, total) of one stage, with checkpoints, log lines and evals.

    state: name -> object with state_dict()/load_state_dict() (modules,
    optimizers, EMAs): what a checkpoint holds. step_fn(step) runs one
    optimisation step and returns its losses. Returns the stage's seconds
    (summed over resumed runs).
    """
    hp = run.hp
    ckpt = run.stage_dir(stage) / "ckpt.pt"
    start, elapsed, eval_s = 0, 0.0, 0.0
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=run.device, weights_only=False)
        for name, obj in state.items():
            obj.load_state_dict(saved["state"][name])
        start, elapsed, eval_s = saved["step"], saved["elapsed"], saved["eval_seconds"]
        torch.set_rng_state(saved["rng"])  # unused by the steps (they draw from run.generator), kept anyway
        print(f"[{stage}] resuming from step {start}/{total} (checkpoint {ckpt})", flush=True)
        run.log(event="resume", stage=stage, step=start, seconds=elapsed)
    else:
        run.log(event="start", stage=stage, step=0, total=total)

    def save(step: int) -> None:
        _save_atomic({"step": step, "elapsed": elapsed, "eval_seconds": eval_s, "rng": torch.get_rng_state(),
                      "state": {k: v.state_dict() for k, v in state.items()}}, ckpt)
        run.log(event="checkpoint", stage=stage, step=step, seconds=round(elapsed, 1))

    t_mark, last_ckpt, window = time.perf_counter(), time.perf_counter(), []
    step_s = 0.0  # this process's time in training steps (for the rate and eta)
    for step in range(start, total):
        losses = step_fn(step)
        window.append(losses)
        done = step + 1
        now = time.perf_counter()
        elapsed += now - t_mark
        step_s += now - t_mark
        t_mark = now
        if done % hp.log_every == 0 or done == total:
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            window = []
            run.log(event="train", stage=stage, step=done, seconds=round(elapsed, 2), **mean)
            rate = step_s / (done - start)
            print(f"[{stage}] step {done}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in mean.items())
                  + f" | {rate:.2f} s/step, {elapsed / 60:.1f} min, eta {(total - done) * rate / 60:.1f} min",
                  flush=True)
        if eval_fn is not None and (done % hp.eval_every == 0 or done == total):
            t0 = time.perf_counter()
            result = eval_fn(done)
            dt = time.perf_counter() - t0
            eval_s += dt
            elapsed += dt
            t_mark = time.perf_counter()
            run.log(event="eval", stage=stage, step=done, seconds=round(elapsed, 1), eval_seconds=round(dt, 1),
                    **result)
            print(f"[{stage}] eval at step {done}: {json.dumps(result)} ({dt:.1f} s)", flush=True)
        by_steps = hp.ckpt_every_steps and done % hp.ckpt_every_steps == 0
        # The last step too: a kill during the stage's post-processing then costs no steps.
        if done == total or by_steps or time.perf_counter() - last_ckpt >= hp.ckpt_every_s:
            save(done)
            last_ckpt = time.perf_counter()
        if run.die_at == (stage, done):  # testing: die like a killed job, no clean-up
            os.kill(os.getpid(), signal.SIGKILL)
    return elapsed


# --------------------------------------------------------------------------
# Text and sampling
# --------------------------------------------------------------------------


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """CLIP ids padded to 77, as the runtime and SD-v1.4 do."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=False, return_tensors="pt").input_ids
    if ids.shape[1] != tokenizer.model_max_length:
        raise ValueError("a caption is longer than 77 tokens")
    return ids


@functools.lru_cache(maxsize=1)
def dpm_scheduler_config() -> dict:
    """DPM-Solver++ on SD-v1.4's schedule, as the packaged dirs' scheduler_config.json.

    Only what differs from diffusers' defaults is written: its full dump holds
    ``-Infinity``, which strict JSON readers refuse. Checked to load into the
    same scheduler as SD-v1.4's own config read as DPM-Solver++ (the runtime's way).
    """
    from diffusers import DPMSolverMultistepScheduler

    from obclip.cloud.models import SD14_SCHEDULER_CONFIG

    config = {**SD14_SCHEDULER_CONFIG, "_class_name": "DPMSolverMultistepScheduler",
              "algorithm_type": "dpmsolver++", "solver_order": 2, "prediction_type": "epsilon",
              "timestep_spacing": "linspace"}
    full = lambda c: {k: v for k, v in DPMSolverMultistepScheduler.from_config(c).config.items()  # noqa: E731
                      if not k.startswith("_")}
    if full(config) != full(SD14_SCHEDULER_CONFIG):
        raise RuntimeError("DPM-Solver++ config drifted from SD-v1.4's")
    return config


@torch.no_grad()
def sample(unet_for_step: Callable[[int], torch.nn.Module], cond: torch.Tensor, uncond: torch.Tensor,
           vae, hp: Hyper, seed: int, batch: int = 64) -> np.ndarray:
    """Guided DPM-Solver++ sampling, then decoding: uint8 [n, 64, 64, 3].

    unet_for_step(i) picks the UNet of step i (the hybrid switches at k).
    """
    from diffusers import DPMSolverMultistepScheduler

    device = cond.device
    n = cond.shape[0]
    cfg = unet_for_step(0).config
    x_all = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                        generator=torch.Generator().manual_seed(seed))
    images = []
    for lo in range(0, n, batch):
        c = cond[lo:lo + batch]
        scheduler = DPMSolverMultistepScheduler.from_config(dpm_scheduler_config())
        scheduler.set_timesteps(hp.sample_steps)
        x = x_all[lo:lo + batch].to(device) * scheduler.init_noise_sigma
        h = torch.cat([uncond.expand(len(c), -1, -1), c])
        for i, t in enumerate(scheduler.timesteps):
            eps_u, eps_c = unet_for_step(i)(torch.cat([x, x]), t.to(device), encoder_hidden_states=h).sample.chunk(2)
            x = scheduler.step(eps_u + hp.guidance * (eps_c - eps_u), t, x).prev_sample
        images.append(decode(vae, x))
    return np.concatenate(images)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    img = vae.decode(latents / vae.config.scaling_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def eval_prompts(hp: Hyper, n: int):
    """Held-out prompts and their attributes (and the real renders, for reference)."""
    from mini.shapes import make_dataset

    images, captions, attrs = make_dataset(n, seed=hp.seed, split="heldout")
    return captions, attrs, images


def _accuracy(images: np.ndarray, attrs, prompts: list[str] | None = None) -> dict:
    """Analyser accuracies; with prompts, background only where the prompt names one."""
    from mini.analyser import attribute_accuracy

    return {k: round(v, 4) for k, v in attribute_accuracy(images, attrs, prompts).items()}


def _to_float_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# --------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------


def stage_vae(run: Run) -> None:
    from diffusers import AutoencoderKL

    from mini.shapes import make_dataset
    from obclip.cloud.models import VAE_CONFIGS, build_vae

    hp, dev = run.hp, run.device
    total = hp.steps("vae", run.scale)
    print(f"[vae] rendering {hp.n_train} training images (seed {hp.seed})", flush=True)
    images, captions, _ = make_dataset(hp.n_train, seed=hp.seed, split="train")
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW

    torch.manual_seed(run.generator("vae", -1).initial_seed())
    vae = build_vae("mini").to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=hp.vae_lr, weight_decay=0.0)

    def step_fn(step: int) -> dict:
        g = run.generator("vae", step)
        idx = torch.randint(len(data), (hp.vae_batch,), generator=g)
        c = hp.vae_crop
        y0, x0 = (torch.randint(64 - c + 1, (2,), generator=g)).tolist()  # one crop window per batch
        x = data[idx, :, y0:y0 + c, x0:x0 + c].float() / 127.5 - 1
        flip = torch.rand(hp.vae_batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(dev)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean()
        loss = rec + hp.vae_kl_weight * kl
        _set_lr(opt, _lr_at(step, total, hp.vae_lr, hp))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}

    seconds = train_loop(run, "vae", total, {"vae": vae, "opt": opt}, step_fn)
    vae.eval()

    # Encode the training set once. The UNet learns the posterior means: with a
    # KL weight this small the posterior's spread is a leftover of VAE training
    # (it shrinks as reconstruction improves), not part of the data. Their std
    # sets scaling_factor = 1/std, as SD's 0.18215 was set.
    t0 = time.perf_counter()
    means, stds = [], []
    with torch.no_grad():
        for lo in range(0, len(data), 256):
            dist = vae.encode((data[lo:lo + 256].float() / 127.5 - 1).to(dev)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.sum().item())
    mean = torch.cat(means)
    raw_std = float(mean.std())
    scaling = 1.0 / raw_std
    encode_s = time.perf_counter() - t0

    # Held-out reconstructions: can the analyser still read colour and shape?
    captions_h, attrs_h, real_h = eval_prompts(hp, 64)
    with torch.no_grad():
        recon = vae.decode(vae.encode(_to_float_images(real_h).to(dev)).latent_dist.mode()).sample
    recon_u8 = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    mse = float(((recon_u8.astype(np.float64) - real_h) ** 2).mean())
    psnr = 10 * math.log10(255 ** 2 / max(mse, 1e-10))
    acc = _accuracy(recon_u8, attrs_h)

    out = run.stage_dir("vae")
    final = AutoencoderKL(**{**VAE_CONFIGS["mini"], "scaling_factor": scaling})
    final.load_state_dict(vae.state_dict())
    final.save_pretrained(out / "model", safe_serialization=True)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    _save_atomic({"mean": mean.half(), "scaling_factor": scaling, "captions": unique,
                  "caption_index": torch.tensor([index[c] for c in captions])}, out / "latents.pt")
    info = {"steps": total, "seconds": round(seconds, 1), "encode_seconds": round(encode_s, 1),
            "latent_std_raw": round(raw_std, 5), "scaling_factor": round(scaling, 6),
            "latent_channel_means": [round(float(v), 4) for v in (mean.mean(dim=(0, 2, 3)) * scaling)],
            "posterior_std_mean": round(sum(stds) / mean.numel(), 6),
            "heldout_recon_psnr": round(psnr, 2), "heldout_recon_accuracy": acc,
            "n_train": hp.n_train, "unique_captions": len(unique)}
    run.log(event="done", stage="vae", **info)
    _save_atomic({"vae": final.state_dict(), "info": info}, out / "final.pt")
    print(f"[vae] done: scaling_factor {scaling:.4f} (raw latent std {raw_std:.4f}), held-out reconstruction "
          f"PSNR {psnr:.1f} dB, analyser {acc}", flush=True)


def _load_vae(run: Run):
    from diffusers import AutoencoderKL

    if not run.done("vae"):
        raise SystemExit("stage vae has not finished; run --stage vae first")
    return AutoencoderKL.from_pretrained(run.work / "vae" / "model").to(run.device).eval()


class Latents:
    """The pre-encoded training set (scaled posterior means) and caption indices."""

    def __init__(self, run: Run):
        saved = torch.load(run.work / "vae" / "latents.pt", weights_only=False)
        self.mean = saved["mean"].float()
        self.scaling = saved["scaling_factor"]
        self.captions = saved["captions"] + [""]  # last entry: the dropped caption
        self.empty = len(self.captions) - 1
        self.caption_index = saved["caption_index"]

    def batch(self, g: torch.Generator, size: int, dropout: float):
        idx = torch.randint(len(self.mean), (size,), generator=g)
        z = self.mean[idx] * self.scaling
        cap = self.caption_index[idx].clone()
        cap[torch.rand(size, generator=g) < dropout] = self.empty
        return z, cap


def _noise_batch(run: Run, scheduler, z: torch.Tensor, g: torch.Generator):
    """SD-v1.4 forward process at uniform timesteps, with offset noise; the Min-SNR weight of each row."""
    hp = run.hp
    b, c = z.shape[:2]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
    noise = torch.randn(z.shape, generator=g) + hp.offset_noise * torch.randn(b, c, 1, 1, generator=g)
    noisy = scheduler.add_noise(z, noise, t)
    abar = scheduler.alphas_cumprod[t]
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=hp.min_snr_gamma) / snr
    return noisy.to(run.device), noise.to(run.device), t.to(run.device), weight.to(run.device)


def _train_scheduler():
    from diffusers import DDPMScheduler

    from obclip.cloud.models import SD14_SCHEDULER_CONFIG

    s = DDPMScheduler.from_config(SD14_SCHEDULER_CONFIG)
    assert s.config.prediction_type == "epsilon" and s.config.beta_schedule == "scaled_linear"
    return s


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


# --------------------------------------------------------------------------
# Stage 2: text encoder + cloud UNet
# --------------------------------------------------------------------------


@dataclass
class TextUnetTrainer:
    """Stage text-unet's models, optimiser, EMAs and one optimisation step.

    Built by text_unet_trainer(); mini.bench_step times this same step.
    """

    text: torch.nn.Module
    unet: torch.nn.Module
    opt: torch.optim.Optimizer
    ema_text: EMA
    ema_unet: EMA
    step: Callable[[int], dict]

    def state(self) -> dict:
        return {"text": self.text, "unet": self.unet, "opt": self.opt, "ema_text": self.ema_text,
                "ema_unet": self.ema_unet}


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # fused: one kernel over all tensors instead of ~10 small ops per tensor (mini.bench_step times it).
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def text_unet_trainer(run: Run, data: Latents, total: int) -> TextUnetTrainer:
    from obclip.cloud.models import build_text_encoder, build_unet

    hp, dev = run.hp, run.device
    ids = tokenize(clip_tokenizer(), data.captions)
    scheduler = _train_scheduler()

    torch.manual_seed(run.generator("text-unet", -1).initial_seed())
    text = build_text_encoder("mini").to(dev).train()
    unet = build_unet(CLOUD_SPEC).to(dev).train()
    params = list(text.parameters()) + list(unet.parameters())
    opt = _adamw(params, hp.lr, hp.weight_decay)
    ema_text, ema_unet = EMA(text, hp.ema_decay), EMA(unet, hp.ema_decay)

    def step_fn(step: int) -> dict:
        g = run.generator("text-unet", step)
        z, cap = data.batch(g, hp.batch, hp.caption_dropout)
        noisy, noise, t, weight = _noise_batch(run, scheduler, z, g)
        # The batch holds few distinct captions (216 in all): encode each once.
        uniq, inverse = torch.unique(cap, return_inverse=True)
        h = text(ids[uniq].to(dev))[0][inverse.to(dev)]
        loss = _weighted_mse(unet(noisy, t, encoder_hidden_states=h).sample, noise, weight)
        _set_lr(opt, _lr_at(step, total, hp.lr, hp))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        opt.step()
        ema_text.update(text, step)
        ema_unet.update(unet, step)
        return {"loss": loss.item(), "grad_norm": float(gnorm)}

    return TextUnetTrainer(text, unet, opt, ema_text, ema_unet, step_fn)


def stage_text_unet(run: Run) -> None:
    hp, dev = run.hp, run.device
    total = hp.steps("text-unet", run.scale)
    vae = _load_vae(run)
    data = Latents(run)
    tr = text_unet_trainer(run, data, total)
    text, unet, ema_text, ema_unet = tr.text, tr.unet, tr.ema_text, tr.ema_unet

    captions_e, attrs_e, _ = eval_prompts(hp, hp.eval_prompts)

    def eval_fn(step: int) -> dict:
        te, un = ema_text.averaged(text), ema_unet.averaged(unet)
        cond, uncond = _encode(te, captions_e, dev), _encode(te, [""], dev)
        images = sample(lambda i: un, cond, uncond, vae, hp, seed=hp.seed + 1)
        return {"cloud": _accuracy(images, attrs_e, captions_e)}

    seconds = train_loop(run, "text-unet", total, tr.state(), tr.step, eval_fn)
    info = {"steps": total, "seconds": round(seconds, 1), "batch": hp.batch,
            "text_params": sum(p.numel() for p in text.parameters()),
            "unet_params": sum(p.numel() for p in unet.parameters())}
    run.log(event="done", stage="text-unet", **info)
    _save_atomic({"text": ema_text.averaged(text).state_dict(), "unet": ema_unet.averaged(unet).state_dict(),
                  "info": info},
                 run.stage_dir("text-unet") / "final.pt")
    print(f"[text-unet] done in {seconds / 60:.1f} min", flush=True)


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    from obclip.cloud.models import load_clip_tokenizer

    return load_clip_tokenizer()


@torch.no_grad()
def _encode(text_encoder, prompts: list[str], dev) -> torch.Tensor:
    return text_encoder(tokenize(clip_tokenizer(), prompts).to(dev))[0]


def _load_cloud(run: Run):
    """The EMA text encoder and cloud UNet of stage text-unet."""
    from obclip.cloud.models import build_text_encoder, build_unet

    if not run.done("text-unet"):
        raise SystemExit("stage text-unet has not finished; run --stage text-unet first")
    saved = torch.load(run.work / "text-unet" / "final.pt", map_location=run.device, weights_only=False)
    text, unet = build_text_encoder("mini"), build_unet(CLOUD_SPEC)
    text.load_state_dict(saved["text"])
    unet.load_state_dict(saved["unet"])
    return text.to(run.device).eval().requires_grad_(False), unet.to(run.device).eval().requires_grad_(False)


# --------------------------------------------------------------------------
# Stage 3: BK-SDM distillation of the device UNet
# --------------------------------------------------------------------------


def bk_teacher_name(student_key: str) -> str:
    """BK-SDM-Small's map from a student tensor to the teacher's: down stages keep
    their first res+attention pair (same name); up stages keep the first and
    the last of their three (the last is the one fed by the stage's input skip),
    so the student's pair 1 comes from the teacher's pair 2."""
    parts = student_key.split(".")
    if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions") and parts[3] == "1":
        parts[3] = "2"
    return ".".join(parts)


def init_student_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> dict:
    """Copy every student tensor whose mapped teacher tensor exists with the same shape."""
    tsd = teacher.state_dict()
    copied, missing = 0, []
    with torch.no_grad():
        for key, tensor in student.state_dict().items():
            src = tsd.get(bk_teacher_name(key))
            if src is not None and src.shape == tensor.shape:
                tensor.copy_(src)
                copied += 1
            else:
                missing.append(key)
    part = lambda k: "mid_block" if k.startswith("mid_block") else ".".join(k.split(".")[:4])  # noqa: E731
    dropped = sorted({part(k) for k in tsd if k.startswith(("down_blocks", "up_blocks", "mid_block"))}
                     - {part(bk_teacher_name(k)) for k in student.state_dict()})
    return {"copied": copied, "student_tensors": len(student.state_dict()), "teacher_tensors": len(tsd),
            "not_copied": missing, "teacher_parts_dropped": dropped}


class StageOutputs:
    """Forward hooks keeping each down/up stage's output: BK-SDM's feature-KD points."""

    def __init__(self, unet: torch.nn.Module):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for kind in ("down_blocks", "up_blocks"):
            for i, block in enumerate(getattr(unet, kind)):
                self.handles.append(block.register_forward_hook(self._keep(f"{kind}.{i}")))

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output  # down blocks: (h, skips)
        return hook


def stage_distil(run: Run) -> None:
    from obclip.cloud.models import build_unet

    hp, dev = run.hp, run.device
    total = hp.steps("distil", run.scale)
    vae = _load_vae(run)
    data = Latents(run)
    text, teacher = _load_cloud(run)
    # The text encoder is frozen: every caption's embedding once.
    with torch.no_grad():
        embeddings = torch.cat([text(ids.to(dev))[0] for ids in tokenize(clip_tokenizer(), data.captions).split(64)])
    scheduler = _train_scheduler()

    torch.manual_seed(run.generator("distil", -1).initial_seed())
    student = build_unet(DEVICE_SPEC).to(dev)
    init = init_student_from_teacher(student, teacher)
    print(f"[distil] student initialised from the teacher: {init['copied']} of {init['student_tensors']} tensors "
          f"copied; teacher parts dropped: {', '.join(init['teacher_parts_dropped'])}", flush=True)
    student.train()
    opt = _adamw(student.parameters(), hp.distil_lr, hp.weight_decay)
    ema = EMA(student, hp.ema_decay)
    feats_t, feats_s = StageOutputs(teacher), StageOutputs(student)

    def step_fn(step: int) -> dict:
        g = run.generator("distil", step)
        z, cap = data.batch(g, hp.batch, hp.caption_dropout)
        noisy, noise, t, weight = _noise_batch(run, scheduler, z, g)
        h = embeddings[cap.to(dev)]
        with torch.no_grad():
            eps_t = teacher(noisy, t, encoder_hidden_states=h).sample
        eps_s = student(noisy, t, encoder_hidden_states=h).sample
        task = _weighted_mse(eps_s, noise, weight)
        kd_out = F.mse_loss(eps_s, eps_t)
        kd_feat = torch.stack([F.mse_loss(feats_s.out[k], feats_t.out[k]) for k in feats_t.out]).sum()
        loss = task + hp.kd_out_weight * kd_out + hp.kd_feat_weight * kd_feat
        _set_lr(opt, _lr_at(step, total, hp.distil_lr, hp))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), hp.grad_clip)
        opt.step()
        ema.update(student, step)
        return {"loss": loss.item(), "task": task.item(), "kd_out": kd_out.item(), "kd_feat": kd_feat.item()}

    captions_e, attrs_e, _ = eval_prompts(hp, hp.eval_prompts)
    cond = _encode(text, captions_e, dev)
    uncond = _encode(text, [""], dev)

    def eval_fn(step: int) -> dict:
        s = ema.averaged(student)
        k = hp.switch_step
        return {"device": _accuracy(sample(lambda i: s, cond, uncond, vae, hp, seed=hp.seed + 1), attrs_e,
                                    captions_e),
                f"hybrid_k{k}": _accuracy(sample(lambda i: teacher if i < k else s, cond, uncond, vae, hp,
                                                 seed=hp.seed + 1), attrs_e, captions_e)}

    seconds = train_loop(run, "distil", total, {"student": student, "opt": opt, "ema": ema}, step_fn, eval_fn)
    info = {"steps": total, "seconds": round(seconds, 1), "batch": hp.batch,
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "init_copied": init["copied"], "init_student_tensors": init["student_tensors"],
            "init_not_copied": init["not_copied"], "teacher_parts_dropped": init["teacher_parts_dropped"]}
    run.log(event="done", stage="distil", **info)
    _save_atomic({"unet": ema.averaged(student).state_dict(), "info": info}, run.stage_dir("distil") / "final.pt")
    print(f"[distil] done in {seconds / 60:.1f} min", flush=True)


# --------------------------------------------------------------------------
# Stage 4: package
# --------------------------------------------------------------------------


def write_model_dir(out: Path, text, unet, vae, spec: str, hp: Hyper, provenance: dict) -> None:
    """A diffusers-layout model dir, loadable by cloud.models.load_text_to_latent and the export."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    text, vae = copy.deepcopy(text), copy.deepcopy(vae)
    if hp.fp16_text_embedding:  # most of the text encoder's bytes; the tokens in use are few
        text.embeddings.token_embedding.half()
    if hp.fp16_vae:
        vae.half()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(dpm_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(dpm_scheduler_config(), indent=2,
                                                                        allow_nan=False) + "\n")
    # transformers 5 loads a checkpoint in the config's dtype unless told otherwise:
    # with an fp16 embedding table it would load the whole encoder as fp16.
    cfg_path = out / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # "schema": the attribute schema shipped with obclip that this model draws (the device and the
    # main job use it by default for this model).
    (out / "obclip_model.json").write_text(json.dumps({"spec": spec, "weights": "trained", "schema": "shapes",
                                                       **provenance}, indent=2))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _component_table(path: Path) -> dict:
    from safetensors import safe_open

    table = {}
    for sub in ("text_encoder", "unet", "vae", "tokenizer"):
        files = [f for f in (path / sub).iterdir() if f.is_file()]
        entry = {"bytes": sum(f.stat().st_size for f in files)}
        weights = [f for f in files if f.suffix == ".safetensors"]
        if weights:
            params, dtypes = 0, {}
            with safe_open(str(weights[0]), "pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    n = int(np.prod(t.get_shape()))
                    params += n
                    d = t.get_dtype()
                    dtypes[d] = dtypes.get(d, 0) + n
            entry.update(params=params, dtypes=dtypes)
        table[sub] = entry
    return table


def stage_package(run: Run) -> None:
    from diffusers import AutoencoderKL

    from obclip.cloud.models import build_unet, load_text_to_latent

    hp, dev = run.hp, run.device
    for stage in ("vae", "text-unet", "distil"):
        if not run.done(stage):
            raise SystemExit(f"stage {stage} has not finished; run it first")
    vae = _load_vae(run)
    text, cloud = _load_cloud(run)
    device_unet = build_unet(DEVICE_SPEC)
    device_unet.load_state_dict(torch.load(run.work / "distil" / "final.pt", weights_only=False)["unet"])
    device_unet = device_unet.to(dev).eval()

    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"trained_by": "mini/train.py", "seed": hp.seed, "budget_scale": run.scale}
    to_cpu = lambda m: copy.deepcopy(m).cpu().float()  # noqa: E731
    write_model_dir(out / "cloud", to_cpu(text), to_cpu(cloud), to_cpu(vae), CLOUD_SPEC, hp, provenance)
    write_model_dir(out / "device", to_cpu(text), to_cpu(device_unet), to_cpu(vae), DEVICE_SPEC, hp, provenance)
    sizes = {role: _dir_bytes(out / role) for role in ("cloud", "device")}
    total_mb = sum(sizes.values()) / 1e6
    if total_mb > hp.max_package_mb:
        raise SystemExit(f"packaged pair is {total_mb:.1f} MB, over the {hp.max_package_mb} MB limit")

    # Final evaluation, on the packaged dirs loaded back the way the project loads them.
    t0 = time.perf_counter()
    c_model = load_text_to_latent(str(out / "cloud"), device=str(dev))
    d_model = load_text_to_latent(str(out / "device"), device=str(dev))
    d_vae = AutoencoderKL.from_pretrained(out / "device", subfolder="vae").to(dev).eval()
    captions, attrs, real = eval_prompts(hp, hp.final_eval_prompts)
    k, seed = hp.switch_step, hp.seed + 2
    cond_c, uncond_c = c_model.encode_prompts(captions), c_model.encode_prompts([""])
    cond_d, uncond_d = d_model.encode_prompts(captions), d_model.encode_prompts([""])
    if not torch.equal(cond_c, cond_d):
        raise RuntimeError("the cloud and device dirs encode prompts differently; they must share the text encoder")
    runs = {
        "cloud": sample(lambda i: c_model.unet, cond_c, uncond_c, d_vae, hp, seed),
        "device": sample(lambda i: d_model.unet, cond_d, uncond_d, d_vae, hp, seed),
        f"hybrid_k{k}": sample(lambda i: c_model.unet if i < k else d_model.unet, cond_d, uncond_d, d_vae, hp, seed),
    }
    # The in-memory fp32 weights on the same prompts and noise: does packaging change the images?
    fp32_cloud = sample(lambda i: cloud, _encode(text, captions, dev), _encode(text, [""], dev), vae, hp, seed)
    from mini.analyser import mmd2
    from mini.shapes import make_dataset

    reference = make_dataset(hp.final_eval_prompts, seed=hp.seed + 1, split="heldout")[0]
    final = {name: {**_accuracy(images, attrs, captions), "mmd2": round(mmd2(images, real), 5)}
             for name, images in runs.items()}
    final["real_renders"] = {**_accuracy(real, attrs, captions), "mmd2": round(mmd2(reference, real), 5)}
    intervals = _final_intervals(runs, attrs, captions, hybrid=f"hybrid_k{k}")
    packaging = {"cloud_fp32_weights": _accuracy(fp32_cloud, attrs, captions),
                 "max_abs_pixel_diff_vs_fp32": int(np.abs(runs["cloud"].astype(int) - fp32_cloud.astype(int)).max())}
    eval_s = time.perf_counter() - t0
    np.savez_compressed(run.stage_dir("package") / "samples.npz", captions=np.array(captions), **runs)
    info = {"final_eval": final, "intervals": intervals, "packaging_check": packaging, "eval_prompts": len(captions),
            "eval_seconds": round(eval_s, 1), "bytes": sizes, "total_mb": round(total_mb, 2),
            "components": {role: _component_table(out / role) for role in ("cloud", "device")}}
    run.log(event="done", stage="package", **info)
    card = model_card(run, info)
    (out / "MODEL_CARD.md").write_text(card)
    print(f"[package] {out}: cloud {sizes['cloud'] / 1e6:.1f} MB + device {sizes['device'] / 1e6:.1f} MB; "
          f"final accuracy {json.dumps(final)}", flush=True)


# --------------------------------------------------------------------------
# Final intervals (the model card itself is mini/card.py, from mini/model_card.md)
# --------------------------------------------------------------------------


def _final_intervals(runs: dict[str, np.ndarray], attrs, captions: list[str], hybrid: str) -> dict:
    """Wilson 95% intervals of each model's joint (colour and shape) accuracy, and paired
    bootstrap intervals of hybrid - cloud and device - cloud on the same prompts."""
    from mini.analyser import attribute_hits
    from mini.stats import paired_bootstrap, wilson_interval

    both = {name: attribute_hits(images, attrs, captions)["both"] for name, images in runs.items()}
    out = {"both_wilson95": {name: [round(v, 4) for v in wilson_interval(int(b.sum()), len(b))]
                             for name, b in both.items()}}
    for name in (hybrid, "device"):
        d = paired_bootstrap(both[name], both["cloud"], seed=0)
        out[f"both_{name}_minus_cloud"] = {"diff": round(d.diff, 4), "ci95": [round(d.lo, 4), round(d.hi, 4)],
                                           "resamples": d.resamples}
    return out


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

STAGE_FUNCS = {"vae": stage_vae, "text-unet": stage_text_unet, "distil": stage_distil, "package": stage_package}


def measure(threads: int, device: str, sets: list[str], steps: int = 6) -> dict:
    """Time a few real steps of every stage (the same code, a small dataset, a
    throw-away --work) and estimate a full run from them. Evaluations run on
    12 prompts and are scaled to the real numbers (their cost is ~linear in it)."""
    import tempfile

    hp = Hyper().with_overrides(sets)
    n, prompts = 512, 12
    with tempfile.TemporaryDirectory() as tmp:
        overrides = sets + [f"{k}={v}" for k, v in dict(
            n_train=n, vae_steps=steps, unet_steps=steps, distil_steps=steps, log_every=1, eval_every=10 ** 9,
            eval_prompts=prompts, final_eval_prompts=prompts, ckpt_every_s=1e9).items()]
        t0 = time.perf_counter()
        main(["--out", f"{tmp}/out", "--work", f"{tmp}/work", "--threads", str(threads), "--device", device]
             + [a for o in overrides for a in ("--set", o)])
        total_s = time.perf_counter() - t0
        log = [json.loads(line) for line in Path(f"{tmp}/work/log.jsonl").read_text().splitlines()]

    def per_step(stage: str) -> float:
        secs = [r["seconds"] for r in log if r.get("event") == "train" and r["stage"] == stage]
        return float(np.median(np.diff(secs)[1:]))  # the first step warms up allocators: left out

    ev = {r["stage"]: r["eval_seconds"] * hp.eval_prompts / prompts for r in log if r.get("event") == "eval"}
    vae = last_record(log, event="done", stage="vae")
    pkg = last_record(log, event="done", stage="package")
    rate = {s: per_step(s) for s in ("vae", "text-unet", "distil")}
    full = {
        "vae": hp.vae_steps * rate["vae"] + hp.n_train / n * vae["encode_seconds"],
        "text-unet": hp.unet_steps * rate["text-unet"] + math.ceil(hp.unet_steps / hp.eval_every) * ev["text-unet"],
        "distil": hp.distil_steps * rate["distil"] + math.ceil(hp.distil_steps / hp.eval_every) * ev["distil"],
        "package": pkg["eval_seconds"] * hp.final_eval_prompts / prompts,
    }
    print(f"\nmeasured on {threads} threads ({device}), {steps} steps per stage, {total_s:.0f} s in all:")
    for stage, batch in (("vae", f"{hp.vae_batch} crops {hp.vae_crop}px"), ("text-unet", hp.batch),
                         ("distil", hp.batch)):
        print(f"  {stage:9s} {rate[stage]:6.2f} s/step at batch {batch}")
    print(f"  encoding  {vae['encode_seconds'] / n * 1000:6.1f} ms/image; evaluation {ev['text-unet']:.1f} s "
          f"(text-unet), {ev['distil']:.1f} s (distil), {hp.eval_prompts} prompts x {hp.sample_steps} steps")
    print("estimated full run (--budget-scale 1): " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in full.items())
          + f"; total {sum(full.values()) / 60:.0f} min")
    return {"s_per_step": rate, "eval_s": ev, "estimate_s": full}


def _check_run_config(run: Run) -> None:
    """A --work folder belongs to one setting of the hyper-parameters and budget."""
    path = run.work / "run.json"
    mine = {"hyper": {k: v for k, v in dataclasses.asdict(run.hp).items() if k not in _FREE_FIELDS},
            "budget_scale": run.scale}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != mine:
            diff = {k: (saved["hyper"].get(k), v) for k, v in mine["hyper"].items() if saved["hyper"].get(k) != v}
            if saved["budget_scale"] != run.scale:
                diff["budget_scale"] = (saved["budget_scale"], run.scale)
            raise SystemExit(f"{run.work} was started with other settings {diff} (saved, now); "
                             "use those, or a fresh --work folder")
    else:
        path.write_text(json.dumps(mine, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mini.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="where cloud/, device/ and MODEL_CARD.md go")
    p.add_argument("--work", type=Path, help="checkpoints, latents and log.jsonl")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES)
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every stage's step budget")
    # Not part of the run's settings: a resumed run may use another count (on
    # cores busy with other jobs one thread was faster than two, mini.bench_step).
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device (cpu; cuda works too)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Hyper field, e.g. --set n_train=256")
    p.add_argument("--measure", action="store_true",
                   help="time a few steps of each stage in a temporary folder and estimate a full run")
    p.add_argument("--card", action="store_true",
                   help="only rewrite OUT/MODEL_CARD.md from WORK's log (after the package stage; nothing is rerun)")
    p.add_argument("--die-at", default=None, help=argparse.SUPPRESS)  # tests: STAGE:STEP, SIGKILL after it
    args = p.parse_args(argv)
    if args.measure:
        measure(args.threads, args.device, args.set)
        return 0
    if args.out is None or args.work is None:
        p.error("--out and --work are required")

    torch.set_num_threads(args.threads)
    if args.die_at:
        stage, _, step = args.die_at.partition(":")
        die_at = (stage, int(step))
    else:
        die_at = None
    hp = Hyper().with_overrides(args.set)
    args.work.mkdir(parents=True, exist_ok=True)
    run = Run(hp=hp, scale=args.budget_scale, work=args.work, out=args.out, device=torch.device(args.device),
              threads=args.threads, die_at=die_at)
    _check_run_config(run)
    if args.card:
        done = [r for r in run.read_log() if r.get("event") == "done" and r.get("stage") == "package"]
        if not done:
            raise SystemExit(f"{run.work} has no finished package stage; run --stage package first")
        info = {k: v for k, v in done[-1].items() if k not in ("event", "stage", "time")}
        (run.out / "MODEL_CARD.md").write_text(model_card(run, info))
        print(f"wrote {run.out / 'MODEL_CARD.md'}")
        return 0

    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage != "package" and run.done(stage):
            print(f"[{stage}] already finished ({run.work / stage / 'final.pt'}); delete that folder to redo it",
                  flush=True)
            continue
        budget = f": {hp.steps(stage, run.scale)} steps" if stage != "package" else ""
        print(f"[{stage}] starting{budget}", flush=True)
        STAGE_FUNCS[stage](run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
