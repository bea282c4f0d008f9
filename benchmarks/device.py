"""Device engine variants side by side: size, memory, speed and image agreement with fp32.

    python benchmarks/device.py [--out DIR] [--repeats 7] [--threads 1] [--steps 20] [--json]

Builds (or reuses, with --reuse) fp32, fp16 and int8 device engines of the embedded, trained
ObCLIP-Mini device model (``export/build_engines.py --device-precision fp16,int8``, each variant
checked against fp32 at export), then measures each variant in its own process (so peak RSS is
that variant's alone; the process imports no torch, like an app):

    folder size     every file the app would ship (graphs, external data, tokenizer, manifest)
    peak RSS        ru_maxrss after loading the engines, the timed steps and the generations
    step            one device step: the UNet on the guided batch of 2 at the trained size
    decode          the VAE decoder on one latent
    (min and median of --repeats timed calls after one warm-up; the ratio column is fp32 / variant
     median, all variants measured in the same run)

and compares each variant's images with fp32's over a prompt set (every colour x shape of the
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
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(folder: str, repeats: int, threads: int, steps: int, images_out: str, prompts: int) -> dict:
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig, Method

    assert "torch" not in sys.modules
    rss0 = peak_rss_kb()
    t0 = time.perf_counter()
    engines = DeviceEngines(EngineConfig(engines_dir=folder, threads=threads))
    load = time.perf_counter() - t0
    m = engines.manifest
    c, h, w = engines.latent_shape(m.default_image_size, m.default_image_size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    text = engines.encode_text(["", "a red circle"])
    latent = rng.standard_normal((1, c, h, w)).astype(np.float32)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    step = timed(lambda: engines.unet(x, 500.0, text))
    decode = timed(lambda: engines.decode(latent))
    pipe = DevicePipeline(engines)
    images = []
    for n, (prompt, _, _) in enumerate(prompt_set()[:prompts]):
        config = GenerationConfig(method=Method.DEVICE_ONLY, num_inference_steps=steps, seed=1000 + n)
        images.append(pipe.generate(prompt, None, config).image)
    np.save(images_out, np.stack(images))
    return {"folder": folder, "precision": m.precision, "load_s": load,
            "step_s": step, "decode_s": decode, "rss_start_kb": rss0,
            "peak_rss_kb": peak_rss_kb(),
            "torch_loaded": "torch" in sys.modules}


# --- the table ---------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build(out: Path, reuse: bool, model: str | None, check_steps: int, check_prompts: int) -> None:
    """What ``export/build_engines.py --device-precision fp16,int8`` builds (device side only)."""
    if reuse and all((out / d / "manifest.json").is_file() for d in ("device", "device-fp16", "device-int8")):
        return
    from obclip.cloud.models import resolve_model_dir
    from obclip.export.device_engines import build_device_engines
    from obclip.export.device_variants import CHECK_PROMPTS, VariantCheck, build_device_variants

    out.mkdir(parents=True, exist_ok=True)
    build_device_engines(resolve_model_dir(model, "device"), out)
    check = VariantCheck(steps=check_steps, prompts=CHECK_PROMPTS[:check_prompts],
                         calibration_prompts=CHECK_PROMPTS[2:2 + check_prompts])
    build_device_variants(out / "device", ["fp16", "int8"], out, check)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", help=argparse.SUPPRESS)       # internal: one variant, in a child process
    p.add_argument("--images-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats, args.threads, args.steps, args.images_out,
                                 args.prompts)))
        return 0

    from mini.analyser import analyse
    from obclip.runtime.manifest import Manifest

    build(args.out, args.reuse, args.device_model, args.check_steps, args.check_prompts)
    rows, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            folder = args.out / ("device" if precision == "fp32" else f"device-{precision}")
            npy = Path(tmp) / f"{precision}.npy"
            cmd = [sys.executable, __file__, "--measure", str(folder), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--steps", str(args.steps), "--images-out", str(npy),
                   "--prompts", str(args.prompts)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
            if done.returncode:
                raise SystemExit(f"measuring {precision} failed:\n{done.stderr}")
            rows[precision] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[precision]["bytes"] = folder_bytes(folder)
            rows[precision]["unet_bytes"] = folder_bytes(folder / "unet")
            rows[precision]["variant_check"] = Manifest.load(folder).variant_check
            images[precision] = np.load(npy)
    prompts = prompt_set()[:args.prompts]
    ref = [analyse(im) for im in images["fp32"]]
    for precision, row in rows.items():
        found = [analyse(im) for im in images[precision]]
        psnrs = [psnr(a, b) for a, b in zip(images["fp32"], images[precision])]
        row["image_psnr_mean_db"] = float(np.mean(psnrs))
        row["image_psnr_min_db"] = float(np.min(psnrs))
        row["agree_with_fp32"] = float(np.mean([(f.colour, f.shape) == (r.colour, r.shape)
                                                for f, r in zip(found, ref)]))
        row["match_prompt"] = float(np.mean([(f.colour, f.shape) == (c, s) for f, (_, c, s) in zip(found, prompts)]))

    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    base_step = statistics.median(rows["fp32"]["step_s"])
    base_dec = statistics.median(rows["fp32"]["decode_s"])
    m = Manifest.load(args.out / "device")
    print(f"device engines, {m.model_id} ({'embedded, trained' if args.device_model is None else 'as given'}), "
          f"{m.default_image_size} px, "
          f"CPUExecutionProvider, {args.threads} thread(s), {args.repeats} repeats; "
          f"images: {len(prompts)} prompts x {args.steps} device-only steps")
    head = (f"{'variant':8s} {'folder MB':>9s} {'UNet MB':>8s} {'peak RSS MB':>11s} {'step ms min/med':>16s} "
            f"{'x fp32':>6s} {'decode ms min/med':>18s} {'x fp32':>6s} {'PSNR dB mean/min':>17s} "
            f"{'=fp32':>6s} {'=prompt':>7s}")
    print(head)
    for precision, r in rows.items():
        st, dc = r["step_s"], r["decode_s"]
        print(f"{precision:8s} {r['bytes'] / 1e6:9.2f} {r['unet_bytes'] / 1e6:8.2f} {r['peak_rss_kb'] / 1024:11.1f} "
              f"{min(st) * 1e3:7.2f}/{statistics.median(st) * 1e3:7.2f} {base_step / statistics.median(st):6.2f} "
              f"{min(dc) * 1e3:8.2f}/{statistics.median(dc) * 1e3:8.2f} {base_dec / statistics.median(dc):6.2f} "
              f"{r['image_psnr_mean_db']:8.1f}/{r['image_psnr_min_db']:7.1f} {r['agree_with_fp32']:6.0%} "
              f"{r['match_prompt']:7.0%}")
    for precision, r in rows.items():
        check = r["variant_check"]
        if check:
            print(f"export check {precision}: mean PSNR {check['image_psnr_mean_db']} dB, worst "
                  f"{check['image_psnr_min_db']} dB, final-latent max diff "
                  f"{check['final_latent_max_abs_diff']:.3g} "
                  f"(floor {check['psnr_floor_db']} dB, enforced={check['enforced']})")
    print("torch loaded in a measuring process:", any(r["torch_loaded"] for r in rows.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
