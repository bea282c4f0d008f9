"""The export command: device and cloud engines folders from model folders.

    python export/build_engines.py                      # embedded default pair: <out>/cloud, then <out>/device
    python export/build_engines.py --device-model PATH  # e.g. a BK-SDM-Small directory: <out>/device
    python -m obclip.export.build_engines ...           # the same, from an installed obclip
    python export/build_engines.py --cloud-model DIR    # cloud engines only: <out>/cloud
    python export/build_engines.py --cloud-model DIR --cloud-precision fp16  # + <out>/cloud-fp16
    python export/build_engines.py --device-precision fp16,int8   # + <out>/device-fp16, <out>/device-int8
    python export/build_engines.py --device-model PATH --tiny-decoder TAESD_DIR   # + a tiny decoder

``<out>`` defaults to ``$OBCLIP_HOME/engines``. This module is only the command line: the builders
are a library (``device_engines``, ``device_variants``, ``cloud_engines``, ``cloud_fp16``,
``tensorrt``), and nothing but this command imports all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from obclip.cloud.models import resolve_model_dir
from obclip.runtime.errors import ObclipError
from obclip.runtime.locations import default_engines_root

from . import cloud_engines, cloud_fp16, device_engines, device_variants, tensorrt

__all__ = ["add_cloud_arguments", "build_parser", "main"]


def add_cloud_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cloud engines (OUT/cloud; without --cloud-model or --device-model both sides of "
                             "the embedded pair are exported)")
    g.add_argument("--cloud-model", default=None,
                   help="cloud model: a diffusers-layout directory (exports OUT/cloud)")
    g.add_argument("--cloud-modes", default="presets", choices=["presets", "all"],
                   help="step modes to export: those of none-k*, paper-k5, paper-k10 with and without the exact "
                        "extras, lean-k10 and the paper's '+ cache' row without batch reuse (presets), or also "
                        "DeepCache and every switch combination (all)")
    g.add_argument("--cloud-precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp32: OUT/cloud; fp16: also OUT/cloud-fp16, converted from OUT/cloud (float16 weights "
                        "and compute, float32 inputs/outputs) and checked against it, graph by graph and "
                        "end to end (for --providers cuda or --tensorrt)")
    g.add_argument("--cloud-tolerance", default=1e-4, type=float,
                   help="max |onnxruntime - torch| / max(1, |torch|) per graph (default %(default)s)")
    g.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines for the cloud graphs, from OUT/cloud-fp16 with "
                        "--cloud-precision fp16, else OUT/cloud (needs tensorrt and a GPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export obclip's device and cloud engines (ONNX + manifest).")
    p.add_argument("--device-model", default=None,
                   help="device model: a diffusers-layout directory or hub id (default: the embedded mini model)")
    p.add_argument("--out", default=None, type=Path,
                   help=f"output folder (default: $OBCLIP_HOME/engines, now {default_engines_root()})")
    p.add_argument("--tolerance", default=1e-3, type=float,
                   help="max abs ONNX-vs-torch difference allowed, relative to max(1, |output|)")
    p.add_argument("--device-precision", default="fp32",
                   help="comma-separated device variants to build: fp32 (always, <out>/device), fp16 "
                        "(<out>/device-fp16), int8 (<out>/device-int8: dynamic int8 MatMuls, CPU providers), "
                        "int8-qdq (<out>/device-int8-qdq: static QDQ only, for TensorRT and mobile NPUs); each "
                        "is checked against fp32 and refused below its floor")
    p.add_argument("--tiny-decoder", default=None, type=Path, metavar="DIR",
                   help="a local diffusers AutoencoderTiny folder (TAESD, e.g. a download of madebyollin/taesd), "
                        "exported beside the VAE decoder as vae_decoder_tiny (run with --decoder tiny); it must "
                        "match the device VAE's latent channels and downscale (default: the device model's own "
                        "vae_tiny/ when it ships one, as the embedded model does)")
    p.add_argument("--allow-below-floor", action="store_true",
                   help="write a device variant that fails its check anyway, marked as failed in its manifest "
                        "(the device runtime then opens it only with allow_below_floor=True)")
    add_cloud_arguments(p)
    return p


def export_cloud(args: argparse.Namespace, out: Path) -> None:
    """<out>/cloud, then <out>/cloud-fp16 and TensorRT engines when asked."""
    model = resolve_model_dir(args.cloud_model, "cloud")
    cloud_engines.build_cloud_engines(model, out, modes=args.cloud_modes, tolerance=args.cloud_tolerance)
    engines = out / "cloud"
    if args.cloud_precision == "fp16":
        engines = cloud_fp16.build_cloud_fp16(out / "cloud", out).root
    if args.tensorrt:
        tensorrt.build_cloud_tensorrt(engines)


def export_device(args: argparse.Namespace, out: Path) -> None:
    """<out>/device, then the precision variants asked for."""
    precisions = device_variants.parse_precisions(args.device_precision)
    model = resolve_model_dir(args.device_model, "device")
    tiny = args.tiny_decoder if args.tiny_decoder is not None else device_engines.shipped_tiny_decoder(model)
    device_engines.build_device_engines(model, out, args.tolerance, tiny_decoder=tiny)
    check = device_variants.VariantCheck(allow_below_floor=args.allow_below_floor)
    device_variants.build_device_variants(out / "device", [p for p in precisions if p != "fp32"], out, check)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out if args.out is not None else default_engines_root()
    both = args.cloud_model is None and args.device_model is None   # the embedded pair: cloud first
    try:
        if args.cloud_model is not None or both:
            export_cloud(args, out)
        if args.device_model is not None or both:
            export_device(args, out)
    except ObclipError as e:   # bad input, a refused check, a missing dependency: its kind's exit code
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
