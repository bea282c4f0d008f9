"""Device engine variants side by side: size, memory, speed and image agreement with fp32.

    python benchmarks/device.py [--out DIR] [--repeats 7] [--threads 1] [--steps 20] [--json]
                                [--precisions fp32,fp16,int8] [--torch] [--rounds 1]
                                [--memory MODE [MODE ...]] [--size PX]

Builds (or reuses, with --reuse) fp32, fp16 and int8 device engines of the embedded, trained
ObCLIP-Mini device model (``export/build_engines.py --device-precision fp16,int8``, each variant
checked against fp32 at export), then measures each variant in its own process (so peak RSS is
that variant's alone; the process imports no torch, like an app):

    folder size     every file the app would ship (graphs, external data, tokenizer, manifest)
    peak RSS        ru_maxrss after loading the engines, the timed steps and the generations
    step            one device step: the UNet on the guided batch of 2 at the trained size
    decode          the VAE decoder on one latent
    (min and median of --repeats timed calls after one warm-up; the ratio column is fp32 / variant
     median, all variants measured in the same run; the *_vs_fp32 and =fp32 columns compare with the
     first row: fp32, or with --memory fp32 in the first mode)

``--torch`` adds a torch eager row: the same device model's UNet and VAE decoder through diffusers on
the same weights and inputs (its own process too, ``torch.inference_mode``, ``torch.set_num_threads``
of ``--threads``), with max|a-b| / max(1, max|b|) of its step and decode outputs against fp32's;
its image columns are not measured. ``--rounds R`` runs the processes R times in turn (fp32 torch
fp16 ... fp32 torch ...), each round's repeats pooled, so a busier phase of a shared machine touches
every row alike.

``--memory MODE [MODE ...]`` measures the fp32 engines once per onnxruntime memory mode instead
(runtime/memory.MEMORY_MODES, ``EngineConfig.memory``; each mode in its own process, so peak RSS is
that mode's alone; the first mode is the baseline of the x columns and of the image comparison).
``--size PX`` times the step and decode, and makes the images, at PX x PX instead of the trained size
(any size the engines' manifest accepts).

It also compares each variant's images with fp32's over a prompt set (every colour x shape of the
shapes vocabulary, device-only runs of --steps steps, the same seed per prompt in every variant):
image PSNR (mean and worst), and colour/shape agreement with fp32's image and with the prompt
(mini/analyser.py, from the checkout). Threads default to 1: the ratios then measure the graphs,
not how many cores are free. Providers: onnxruntime's CPU provider (the only one installed here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # mini/ (the demo model's data and analyser) runs from the checkout only
PRECISIONS = ("fp32", "fp16", "int8")
TORCH = "torch"   # the torch eager row's name


def prompt_set() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x shape, backgrounds alternating."""
    from mini.shapes import COLOURS, SHAPES, article

    out = []
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            bg = ("white", "black")[(i + j) % 2]
            out.append((f"{article(colour)} {colour} {shape} on a {bg} background", colour, shape))
    return out


# --- one variant, in its own process --------------------------------------------------------


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM: fresh after exec, unlike ru_maxrss, which a child
    inherits from a parent that had torch loaded)."""
    return status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmHWM: peak resident set, VmRSS: resident now); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def timed(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_inputs(engines, size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The timed step's guided batch of 2 (latents, hidden states of "" and a prompt) and one latent
    to decode, at ``size`` px (None: the trained size): the same arrays in every row's process (seeded)."""
    size = engines.manifest.default_image_size if size is None else size
    c, h, w = engines.latent_shape(size, size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    text = engines.encode_text(["", "a red circle"])
    latent = rng.standard_normal((1, c, h, w)).astype(np.float32)
    return x, text, latent


def measure(folder: str, repeats: int, threads: int, steps: int, images_out: str, prompts: int,
            memory: str | None = None, size: int | None = None) -> dict:
    from obclip.device.engines import DEFAULT_DEVICE_MEMORY, DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig, Method

    assert "torch" not in sys.modules
    memory = DEFAULT_DEVICE_MEMORY if memory is None else memory
    rss0 = peak_rss_kb()
    t0 = time.perf_counter()
    engines = DeviceEngines(EngineConfig(engines_dir=folder, threads=threads, memory=memory))
    load = time.perf_counter() - t0
    m = engines.manifest
    x, text, latent = bench_inputs(engines, size)
    step = timed(lambda: engines.unet(x, 500.0, text), repeats)
    decode = timed(lambda: engines.decode(latent), repeats)
    decoder = engines.vae_decoder
    np.savez(images_out + ".outputs.npz", step=engines.unet(x, 500.0, text),
             decode=decoder.session.run(None, {decoder.component.inputs[0]:
                                               (latent / m.vae_scaling_factor).astype(np.float32)},
                                        decoder.run_options)[0])
    pipe = DevicePipeline(engines)
    images = []
    for n, (prompt, _, _) in enumerate(prompt_set()[:prompts]):
        config = GenerationConfig(method=Method.DEVICE_ONLY, num_inference_steps=steps, seed=1000 + n,
                                  height=size, width=size)
        images.append(pipe.generate(prompt, None, config).image)
    np.save(images_out, np.stack(images))
    return {"folder": folder, "precision": m.precision, "memory": memory, "load_s": load,
            "size": m.default_image_size if size is None else size,
            "step_s": step, "decode_s": decode, "rss_start_kb": rss0,
            "peak_rss_kb": peak_rss_kb(), "rss_end_kb": status_kb("VmRSS"),
            "load_avg_1m": os.getloadavg()[0], "torch_loaded": "torch" in sys.modules}


def measure_torch(folder: str, model: str, repeats: int, threads: int, outputs_out: str) -> dict:
    """The torch eager row: the device model's UNet and VAE decoder through diffusers, on the inputs
    ``measure`` times (built from the fp32 engines' text encoder, as there), same calls: the UNet on
    the guided batch at timestep 500, the decoder on one latent scaled as the runtime scales it, then
    the same uint8 conversion."""
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.runtime.graphs import to_uint8_images

    engines = DeviceEngines(EngineConfig(engines_dir=folder, threads=threads))
    x, text, latent = bench_inputs(engines)
    scaling = engines.manifest.vae_scaling_factor
    del engines
    rss0 = peak_rss_kb()

    import torch
    from diffusers import AutoencoderKL

    from obclip.cloud.models import from_pretrained, load_text_to_latent

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    unet = load_text_to_latent(model).unet.eval()
    vae = from_pretrained(AutoencoderKL, model, "vae").eval()
    load = time.perf_counter() - t0
    xt, textt, latentt = torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(latent)
    t = torch.full((2,), 500.0)

    def step() -> np.ndarray:
        return unet(xt, t, encoder_hidden_states=textt, return_dict=False)[0].numpy()

    def decoded() -> np.ndarray:
        return vae.decode(latentt / scaling, return_dict=False)[0].numpy()

    with torch.inference_mode():
        step_s = timed(step, repeats)
        decode_s = timed(lambda: to_uint8_images(decoded()), repeats)
        np.savez(outputs_out, step=step(), decode=decoded())
    return {"folder": model, "precision": TORCH, "load_s": load, "step_s": step_s, "decode_s": decode_s,
            "rss_start_kb": rss0, "peak_rss_kb": peak_rss_kb(), "torch_loaded": True,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# --- the table ---------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def variant_folder(out: Path, precision: str) -> Path:
    return out / ("device" if precision == "fp32" else f"device-{precision}")


def build(out: Path, reuse: bool, model: str | None, check_steps: int, check_prompts: int,
          precisions: tuple[str, ...] = PRECISIONS) -> None:
    """What ``export/build_engines.py --device-precision fp16,int8`` builds (device side only)."""
    if reuse and all((variant_folder(out, p) / "manifest.json").is_file() for p in ("fp32", *precisions)):
        return
    from obclip.cloud.models import resolve_model_dir
    from obclip.export.device_engines import build_device_engines
    from obclip.export.device_variants import CHECK_PROMPTS, VariantCheck, build_device_variants

    out.mkdir(parents=True, exist_ok=True)
    build_device_engines(resolve_model_dir(model, "device"), out)
    check = VariantCheck(steps=check_steps, prompts=CHECK_PROMPTS[:check_prompts],
                         calibration_prompts=CHECK_PROMPTS[2:2 + check_prompts])
    variants = [p for p in precisions if p != "fp32"]
    if variants:
        build_device_variants(out / "device", variants, out, check)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max|a-b| / max(1, max|b|)."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    from obclip.runtime.memory import MEMORY_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "obclip-device-bench",
                   help="engines folder to build into (default: %(default)s)")
    p.add_argument("--reuse", action="store_true", help="reuse engines already built in --out")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="device-only steps per image for the comparison")
    p.add_argument("--prompts", type=int, default=18, help="how many of the 18 colour x shape prompts to compare")
    p.add_argument("--device-model", default=None,
                   help="another device model dir, e.g. one written by write_random_model('bk-sdm-small', ...) "
                        "(random weights: the image columns then mean nothing); default: the embedded one")
    p.add_argument("--check-steps", type=int, default=20, help="export check: steps per trajectory")
    p.add_argument("--check-prompts", type=int, default=4, help="export check: prompts (and calibration prompts)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma-separated engine variants to build and measure; fp32 always (default %(default)s)")
    p.add_argument("--torch", action="store_true",
                   help="also a torch eager row: the same device model's UNet and VAE decoder through diffusers")
    p.add_argument("--memory", nargs="+", choices=MEMORY_MODES, default=None, metavar="MODE",
                   help="instead of the precisions: the fp32 engines once per onnxruntime memory mode "
                        f"({', '.join(MEMORY_MODES)}); the first is the baseline")
    p.add_argument("--size", type=int, default=None,
                   help="image size in px of the timed step, decode and images (default: the trained size)")
    p.add_argument("--rounds", type=int, default=1, help="times each row's process runs, in turn (default 1)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", help=argparse.SUPPRESS)       # internal: one variant, in a child process
    p.add_argument("--measure-torch", help=argparse.SUPPRESS)  # internal: the torch row, given the model
    p.add_argument("--measure-memory", help=argparse.SUPPRESS)  # internal: the child's memory mode
    p.add_argument("--images-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_torch:
        print(json.dumps(measure_torch(args.measure, args.measure_torch, args.repeats, args.threads,
                                       args.images_out + ".outputs.npz")))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats, args.threads, args.steps, args.images_out,
                                 args.prompts, args.measure_memory, args.size)))
        return 0
    precisions = tuple(dict.fromkeys(("fp32", *(q.strip() for q in args.precisions.split(",") if q.strip()))))
    unknown = [q for q in precisions if q not in PRECISIONS]
    if unknown:
        p.error(f"--precisions {unknown}: each must be one of {list(PRECISIONS)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.memory is not None and args.torch:
        p.error("--memory measures the fp32 engines' memory modes; run --torch without it")
    if args.memory is not None:
        precisions = ("fp32",)

    from mini.analyser import analyse
    from obclip.cloud.models import resolve_model_dir
    from obclip.runtime.manifest import Manifest

    build(args.out, args.reuse, args.device_model, args.check_steps, args.check_prompts, precisions)
    if args.size is not None:   # refuse a size the engines do not run before starting any process
        from obclip.runtime.errors import InputError

        try:
            Manifest.load(args.out / "device").geometry(source="these device engines").latent_shape(args.size,
                                                                                                   args.size)
        except InputError as e:
            p.error(f"--size {args.size}: {e}")
    # Each row: (name, precision, memory mode or None for the engines' default).
    specs = [(q, q, None) for q in precisions] if args.memory is None else \
        [(mode, "fp32", mode) for mode in dict.fromkeys(args.memory)]
    if args.torch:
        specs.append((TORCH, "fp32", None))
    base = specs[0][0]   # the x columns and the output/image comparisons are against this row
    rows: dict[str, dict] = {}
    images, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, precision, memory in specs:
                folder = variant_folder(args.out, precision)
                npy = Path(tmp) / f"{name.replace('+', '-')}-{round_}.npy"
                cmd = [sys.executable, __file__, "--measure", str(folder), "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--steps", str(args.steps), "--images-out", str(npy),
                       "--prompts", str(args.prompts)]
                if memory is not None:
                    cmd += ["--measure-memory", memory]
                if args.size is not None:
                    cmd += ["--size", str(args.size)]
                if name == TORCH:
                    cmd += ["--measure-torch", resolve_model_dir(args.device_model, "device")]
                done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
                if done.returncode:
                    raise SystemExit(f"measuring {name} failed:\n{done.stderr}")
                got = json.loads(done.stdout.strip().splitlines()[-1])
                if name in rows:   # a later round: pool the timings, keep the largest peak
                    rows[name]["step_s"] += got["step_s"]
                    rows[name]["decode_s"] += got["decode_s"]
                    rows[name]["peak_rss_kb"] = max(rows[name]["peak_rss_kb"], got["peak_rss_kb"])
                    rows[name]["peak_rss_kb_per_round"].append(got["peak_rss_kb"])
                    continue
                rows[name] = got
                rows[name]["peak_rss_kb_per_round"] = [got["peak_rss_kb"]]
                source = Path(got["folder"])   # the torch row: the diffusers model folder it loaded
                rows[name]["bytes"] = folder_bytes(source) if source.is_dir() else None
                rows[name]["unet_bytes"] = folder_bytes(source / "unet") if source.is_dir() else None
                rows[name]["variant_check"] = Manifest.load(folder).variant_check if name != TORCH else {}
                outputs[name] = dict(np.load(str(npy) + ".outputs.npz"))
                if name != TORCH:
                    images[name] = np.load(npy)
    for name, row in rows.items():   # each row's outputs against the baseline row's, on the same inputs
        row["step_vs_fp32"] = rel(outputs[name]["step"], outputs[base]["step"])
        row["decode_vs_fp32"] = rel(outputs[name]["decode"], outputs[base]["decode"])
    prompts = prompt_set()[:args.prompts]
    ref = [analyse(im) for im in images[base]]
    for name, row in rows.items():
        if name == TORCH:
            continue
        found = [analyse(im) for im in images[name]]
        psnrs = [psnr(a, b) for a, b in zip(images[base], images[name])]
        row["image_psnr_mean_db"] = float(np.mean(psnrs))
        row["image_psnr_min_db"] = float(np.min(psnrs))
        row["agree_with_fp32"] = float(np.mean([(f.colour, f.shape) == (r.colour, r.shape)
                                                for f, r in zip(found, ref)]))
        row["match_prompt"] = float(np.mean([(f.colour, f.shape) == (c, s) for f, (_, c, s) in zip(found, prompts)]))

    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    base_step = statistics.median(rows[base]["step_s"])
    base_dec = statistics.median(rows[base]["decode_s"])
    m = Manifest.load(args.out / "device")
    size = m.default_image_size if args.size is None else args.size
    print(f"device engines, {m.model_id} ({'embedded, trained' if args.device_model is None else 'as given'}), "
          f"{size} px, "
          f"CPUExecutionProvider, {args.threads} thread(s), {args.repeats} repeats; "
          f"images: {len(prompts)} prompts x {args.steps} device-only steps")
    label = "memory" if args.memory is not None else "variant"
    head = (f"{label:17s} {'folder MB':>9s} {'UNet MB':>8s} {'peak RSS MB':>11s} {'step ms min/med':>16s} "
            f"{'x base':>6s} {'decode ms min/med':>18s} {'x base':>6s} {'step/decode vs base':>19s} "
            f"{'PSNR dB mean/min':>17s} {'=base':>6s} {'=prompt':>7s}")
    print(f"{args.rounds} round(s) of the processes in turn, {args.repeats} repeats each, pooled; base = {base}, "
          "x base = median(base) / median(row); peak RSS: the largest round's; the torch row's folder columns "
          "are the diffusers model folder's")
    print(head)
    for name, r in rows.items():
        st, dc = r["step_s"], r["decode_s"]
        size_mb = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        unet_size = "-" if r["unet_bytes"] is None else f"{r['unet_bytes'] / 1e6:.2f}"
        images_ = ("-", "-", "-") if name == TORCH else (
            f"{r['image_psnr_mean_db']:.1f}/{r['image_psnr_min_db']:.1f}", f"{r['agree_with_fp32']:.0%}",
            f"{r['match_prompt']:.0%}")
        print(f"{name:17s} {size_mb:>9s} {unet_size:>8s} {r['peak_rss_kb'] / 1024:11.1f} "
              f"{min(st) * 1e3:7.2f}/{statistics.median(st) * 1e3:7.2f} {base_step / statistics.median(st):6.2f} "
              f"{min(dc) * 1e3:8.2f}/{statistics.median(dc) * 1e3:8.2f} {base_dec / statistics.median(dc):6.2f} "
              f"{r['step_vs_fp32']:9.1e}/{r['decode_vs_fp32']:9.1e} {images_[0]:>17s} {images_[1]:>6s} "
              f"{images_[2]:>7s}")
    for name, r in rows.items():
        check = r["variant_check"]
        if check and name in PRECISIONS:
            print(f"export check {name}: mean PSNR {check['image_psnr_mean_db']} dB, worst "
                  f"{check['image_psnr_min_db']} dB, final-latent max diff "
                  f"{check['final_latent_max_abs_diff']:.3g} "
                  f"(floor {check['psnr_floor_db']} dB, enforced={check['enforced']})")
    print("torch loaded in an onnxruntime measuring process:",
          any(r["torch_loaded"] for name, r in rows.items() if name != TORCH))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
