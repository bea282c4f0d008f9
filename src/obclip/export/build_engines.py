"""Export the device side to ONNX: text encoder, UNet, VAE decoder (+ tokenizer).

    python export/build_engines.py                      # embedded default model
    python export/build_engines.py --device-model PATH  # e.g. a BK-SDM-Small directory
    python -m obclip.export.build_engines ...           # the same, from an installed obclip
    python export/build_engines.py --cloud-model DIR    # cloud engines only: <out>/cloud (export/cloud_engines.py)
    python export/build_engines.py --cloud-model DIR --cloud-precision fp16  # + <out>/cloud-fp16 (cloud_fp16.py)

Writes ``<out>/device/`` (``<out>`` defaults to ``$OBCLIP_HOME/engines``): one ``model.onnx`` per
component, ``tokenizer.json``
and ``manifest.json`` (what ``device/engines.py`` reads). Each export is run
once through onnxruntime and compared with torch; the max abs difference is
printed and recorded, and an export that disagrees fails. The folder is built
beside the target and moved into place at the end, so a failed export never
leaves a half-written engine folder. (Cloud engines and TensorRT builds are a
later step; the manifest has a ``side`` so they fit beside this one.)

Tensor names follow optimum's ONNX export, so tools that read those work:
text encoder ``input_ids`` -> ``last_hidden_state``, ``pooler_output``;
UNet ``sample``, ``timestep``, ``encoder_hidden_states`` -> ``out_sample``;
VAE decoder ``latent_sample`` -> ``sample``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from obclip.cloud.models import from_pretrained, load_text_to_latent, model_schema, resolve_model_dir
from obclip.export.staging import staged_folder
from obclip.runtime.locations import default_engines_root
from obclip.runtime.manifest import Component, Manifest, ManifestError
from obclip.runtime.sessions import open_session

OPSET = 17


class _UNetForExport(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _TextForExport(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _VaeDecoderForExport(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_component(name: str, module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
                     dynamic_axes: dict, folder: Path, check_inputs: dict[str, torch.Tensor],
                     tolerance: float, optimise: bool = False) -> Component:
    """torch.onnx export (classic TorchScript exporter), then check against torch in onnxruntime."""
    path = folder / name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape; the check below is what counts.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # indices here are >= 0
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=outputs, dynamic_axes=dynamic_axes, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    exported = time.perf_counter() - t0
    if optimise:  # provider-independent graph optimisations, offline, so app start-up doesn't redo them
        from obclip.export.device_variants import optimise_onnx
        optimise_onnx(path)

    session = open_session(path)
    with torch.no_grad():
        want = module(*check_inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    got = session.run(outputs, {k: v.numpy() for k, v in check_inputs.items()})
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    print(f"  {name:13s} exported in {exported:5.1f} s, {path.stat().st_size / 1e6:8.1f} MB, "
          f"onnxruntime vs torch max abs diff {diff:.2e}")
    if not diff <= tolerance * scale:
        raise RuntimeError(f"{name}: ONNX output differs from torch by {diff:.3e} (> {tolerance * scale:.1e}); "
                           "the export is wrong, not saved")
    return Component(path=f"{name}/model.onnx", format="onnx", inputs=tuple(inputs), outputs=tuple(outputs),
                     sha256=_sha256(path), check_max_abs_diff=diff)


def build_device_engines(model: str, out: Path, tolerance: float = 1e-3) -> Manifest:
    """Export the device model at ``model`` into ``out``/device, atomically."""
    lm = load_text_to_latent(model)
    vae = from_pretrained(AutoencoderKL, model, "vae").eval()
    target = out / "device"
    out.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as work:
        print(f"exporting device model {model} -> {target}")
        max_len = lm.tokenizer.model_max_length
        c, h, w = lm.latent_shape(lm.default_image_size, lm.default_image_size)
        g = torch.Generator().manual_seed(0)
        text_dim = lm.text_encoder.config.hidden_size
        # Dynamic height/width: the check runs another (non-square) size than the export's.
        from obclip.export.device_variants import image_size_range
        size_range = image_size_range(lm.unet, lm.vae_scale_factor, lm.default_image_size)
        m = size_range["multiple"] // lm.vae_scale_factor
        hw = {0: "batch", 2: "height", 3: "width"}

        ids = lambda b: torch.randint(0, lm.text_encoder.config.vocab_size, (b, max_len), generator=g)  # noqa: E731
        comps = {
            "text_encoder": export_component(
                "text_encoder", _TextForExport(lm.text_encoder), {"input_ids": ids(1)},
                ["last_hidden_state", "pooler_output"],
                {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
                work, {"input_ids": ids(2)}, tolerance, optimise=True),
            "unet": export_component(
                "unet", _UNetForExport(lm.unet),
                {"sample": torch.randn(2, c, h, w, generator=g), "timestep": torch.tensor([981.0, 981.0]),
                 "encoder_hidden_states": torch.randn(2, max_len, text_dim, generator=g)},
                ["out_sample"],
                {"sample": hw, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                 "out_sample": hw},
                work,
                {"sample": torch.randn(4, c, h + m, w + 2 * m, generator=g), "timestep": torch.tensor([501.0] * 4),
                 "encoder_hidden_states": torch.randn(4, max_len, text_dim, generator=g)}, tolerance, optimise=True),
            "vae_decoder": export_component(
                "vae_decoder", _VaeDecoderForExport(vae), {"latent_sample": torch.randn(1, c, h, w, generator=g)},
                ["sample"], {"latent_sample": hw, "sample": {0: "batch", 2: "image_height", 3: "image_width"}},
                work, {"latent_sample": torch.randn(2, c, h + m, w + 2 * m, generator=g)}, tolerance, optimise=True),
        }
        # External-data files beside each graph (large models), hashed in the manifest too.
        files = {str(f.relative_to(work)): _sha256(f) for f in sorted(work.rglob("*"))
                 if f.is_file() and f.name != "model.onnx"}
        (work / "tokenizer").mkdir()
        lm.tokenizer.backend_tokenizer.save(str(work / "tokenizer" / "tokenizer.json"))
        manifest = Manifest(
            side="device", model_id=str(model), components=comps, tokenizer="tokenizer/tokenizer.json",
            text_max_length=int(max_len), pad_token_id=int(lm.tokenizer.pad_token_id),
            latent_channels=c, vae_scale_factor=lm.vae_scale_factor, vae_scaling_factor=lm.vae_scaling_factor,
            default_image_size=lm.default_image_size, scheduler_config=dict(lm.scheduler_config),
            schema=model_schema(model), files=files, precision="fp32", image_size=size_range,
        )
        manifest.save(work)
    print(f"wrote {target / 'manifest.json'}")
    return Manifest.load(target)


def model_fingerprint(model: Path) -> str:
    """SHA-256 over a model dir's file names and contents: retrained weights in place change it."""
    h = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def ensure_engines(device_model: str, out: Path) -> Path:
    """``<out>/device`` exported from a local device model dir, reused while its manifest names
    that model and the model's files are unchanged (``source.json`` beside the manifest)."""
    target = out / "device"
    model = Path(device_model).resolve()
    want = {"model": str(model), "fingerprint": model_fingerprint(model)}
    try:
        current = (Manifest.load(target).model_id == str(model)
                   and json.loads((target / "source.json").read_text()) == want)
    except (ManifestError, OSError, ValueError):
        current = False
    if not current:  # missing, stale, or exported from another model or other weights
        build_device_engines(str(model), out)
        (target / "source.json").write_text(json.dumps(want, indent=1))
    return target


def ensure_default_engines() -> Path:
    """``$OBCLIP_HOME/engines/device`` for the embedded default model, exported on first use."""
    return ensure_engines(resolve_model_dir(None, "device"), default_engines_root())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device-model", default=None,
                   help="device model: a diffusers-layout directory or hub id (default: the embedded mini model)")
    p.add_argument("--out", default=None, type=Path,
                   help=f"output folder (default: $OBCLIP_HOME/engines, now {default_engines_root()})")
    p.add_argument("--tolerance", default=1e-3, type=float,
                   help="max abs ONNX-vs-torch difference allowed, relative to max(1, |output|)")
    p.add_argument("--device-precision", default="fp32",
                   help="comma-separated device variants to build: fp32 (always, <out>/device), fp16 "
                        "(<out>/device-fp16), int8 (<out>/device-int8); each is checked against fp32")
    from obclip.export.cloud_engines import add_cloud_arguments, export_cloud_cli  # cloud engines
    add_cloud_arguments(p)
    args = p.parse_args(argv)
    if args.cloud_model is not None or args.device_model is None:  # cloud engines: first, then the device's
        rc = export_cloud_cli(args)
        if rc or args.device_model is None and args.cloud_model is not None:
            return rc
    try:
        out = args.out if args.out is not None else default_engines_root()
        from obclip.export.device_variants import build_device_variants, parse_precisions
        precisions = parse_precisions(args.device_precision)
        build_device_engines(resolve_model_dir(args.device_model, "device"), out, args.tolerance)
        build_device_variants(out / "device", [p for p in precisions if p != "fp32"], out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
