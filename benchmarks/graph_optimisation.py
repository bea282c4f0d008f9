"""Graph optimisation side by side: one UNet graph under several onnxruntime settings, timed and checked against torch.

    python benchmarks/graph_optimisation.py --device-engines OUT/device --device-model DIR \\
        [--cloud-engines OUT/cloud --cloud-model DIR] [--n 2] [--size 64] [--repeats 7] [--threads 1] [--json PATH]

For the device UNet (``OUT/device/unet/model.onnx``, as exported) and the cloud's mode ``full``
graph (``OUT/cloud``'s ``unet/full.onnx`` over the shared weights), each setting is one session in
this process (onnxruntime's default CPU arena in each), and the repeats are interleaved (one run
of each setting in turn, ``--repeats`` times, after one untimed run each); min and median ms per
call. Settings:

- ``basic-saved + all`` (device only): the graph saved after onnxruntime's BASIC optimisations
  (how the device export saved it before), opened at level ALL with prepacking (its defaults);
- ``extended``: the exported graph at level EXTENDED, no prepacking (the cloud's sessions);
- ``all + prepack``: the exported graph at level ALL with prepacking (the device's sessions);
- ``transformers + all + prepack``: onnxruntime's transformer optimizer (model type ``unet``)
  with the fusions onnxruntime's CPU provider implements (no NhwcConv, GroupNorm, SkipGroupNorm,
  BiasSplitGelu, BiasAdd, packed QKV/KV: those kernels are CUDA-only), saved, then level ALL.

Each setting's output against torch (diffusers' UNet for the device graph, ``run_mode`` for the
cloud graph) on the same inputs: max|a-b| / max(1, max|b|); the attention fusions the transformer
optimizer made are counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Fusions whose contrib kernels onnxruntime's CPU provider lacks (CUDA only), turned off.
CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


def _patch_num_heads() -> None:
    """onnxruntime 1.32's UNet attention fusion reads a head count of shape [1] with int(array),
    which numpy >= 2.3 refuses (TypeError: only 0-dimensional arrays ...); the same reading with
    .item(), so the optimizer runs at all on this numpy. (Its modules import each other by their
    bare names, so the class is patched in whichever module object holds it.)"""
    import onnxruntime.transformers.optimizer  # noqa: F401 - puts its folder's bare module names in sys.modules

    classes = {m.FusionAttentionUnet for name, m in list(sys.modules.items())
               if name.endswith("fusion_attention_unet") and hasattr(m, "FusionAttentionUnet")}

    def get_num_heads(self, reshape_q, is_torch2=False):
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            value = None
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
        else:
            shape = self.model.get_constant_value(reshape_q.input[1])
            value = shape[2:3] if isinstance(shape, np.ndarray) and list(shape.shape) == [4] else None
        if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
            return int(value.item())
        return 0

    for cls in classes:
        cls.get_num_heads = get_num_heads


def transformer_optimised(src: Path, dst: Path) -> dict[str, int]:
    """``src`` through onnxruntime's transformer optimizer for a UNet on the CPU provider, saved at
    ``dst`` (weights external); returns the fused op counts."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    _patch_num_heads()

    options = FusionOptions("unet")
    for name in CUDA_ONLY_FUSIONS:
        setattr(options, name, False)
    model = optimizer.optimize_model(str(src), model_type="unet", opt_level=0, optimization_options=options,
                                     use_gpu=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=True)
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def basic_saved(src: Path, dst: Path) -> None:
    from obclip.export.device_variants import optimise_onnx

    shutil.copytree(src.parent, dst.parent)
    optimise_onnx(dst)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


def device_case(engines: Path, model_dir: str, n: int, size: int):
    """(graph path, onnxruntime feeds, torch output, initializers) of the device UNet."""
    import torch

    from obclip.cloud.models import load_text_to_latent
    from obclip.export.onnx_export import UNetModule, to_torch
    from obclip.export.specs import unet_spec
    from obclip.runtime.manifest import Manifest

    m = Manifest.load(engines)
    lm = load_text_to_latent(model_dir)
    spec = unet_spec(lm.latent_channels, int(lm.tokenizer.model_max_length), int(lm.text_encoder.config.hidden_size))
    side = size // lm.vae_scale_factor
    feeds = spec.sample({"batch": 2 * n, "height": side, "width": side}, np.random.default_rng(0))
    with torch.no_grad():
        want = UNetModule(lm.unet)(*to_torch(feeds).values()).numpy()
    return m.path_of("unet"), feeds, want, None


def cloud_case(engines: Path, model_dir: str, n: int, size: int):
    """(graph path, feeds, torch output, shared initializers) of the cloud's mode ``full``."""
    import torch

    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.modes import ModeSpec
    from obclip.cloud.step_modes import ModeInputs, run_mode
    from obclip.export.onnx_export import to_torch
    from obclip.export.specs import request_spec
    from obclip.runtime.manifest import Manifest
    from obclip.runtime.onnx_file import external_initializers
    from obclip.runtime.plan import StepMode
    from obclip.runtime.weights import SharedWeights

    m = Manifest.load(engines)
    lm = load_text_to_latent(model_dir)
    spec = request_spec(lm.latent_channels, int(lm.tokenizer.model_max_length), int(lm.text_encoder.config.hidden_size))
    feeds = spec.sample(spec.dims(n, size // lm.vae_scale_factor), np.random.default_rng(0))
    path = m.path_of(m.modes["full"]["component"])
    t = to_torch(feeds)
    with torch.no_grad():
        eps, _ = run_mode(lm.unet, ModeSpec(StepMode.FULL), ModeInputs(
            x=t["sample"], timestep=t["timestep"], text=t["text"], guidance_scale=t["guidance_scale"], sizes=None), {})
    weights = SharedWeights.from_index(engines / "unet" / "weights.bin", engines / "unet" / "weights.json")
    names = external_initializers(path, "weights.bin") & set(weights.values)
    return path, feeds, eps.numpy(), {k: weights.values[k] for k in sorted(names)}


def measure(label: str, path: Path, feeds: dict, want: np.ndarray, initializers, repeats: int,
            threads: int | None, tmp: Path) -> list[dict]:
    from obclip.runtime.sessions import SessionConfig, open_session

    optimised = tmp / label / "transformers" / path.name
    fused = transformer_optimised(path, optimised)
    settings = {}
    if initializers is None:   # a graph with its own weights (the device's): also as the device export saved it
        basic = tmp / label / "basic" / path.parent.name / path.name
        basic_saved(path, basic)
        settings["basic-saved + all"] = (basic, SessionConfig(threads=threads, optimization="all"), None)
    settings |= {
        "extended": (path, SessionConfig(threads=threads, optimization="extended", prepacking=False), initializers),
        "all + prepack": (path, SessionConfig(threads=threads, optimization="all"), initializers),
        # the optimizer folds and renames weights: its graph carries its own (no shared initializers)
        "transformers + all + prepack": (optimised, SessionConfig(threads=threads, optimization="all"), None),
    }
    sessions, outputs, times = {}, {}, {}
    for name, (graph, config, inits) in settings.items():
        try:
            session = open_session(graph, config, initializers=inits)
        except Exception as e:  # noqa: BLE001 - a setting onnxruntime cannot run is reported, not fatal
            print(f"{label}: {name}: onnxruntime cannot open it: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        wanted = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in feeds.items() if k in wanted}
        sessions[name] = (session, feed)
        outputs[name] = session.run(None, feed)[0]   # untimed first run
        times[name] = []
    for _ in range(repeats):
        for name, (session, feed) in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    rows = []
    base = statistics.median(times["extended"]) if "extended" in times else None
    for name in settings:
        if name not in times:
            rows.append({"graph": label, "setting": name, "opened": False})
            continue
        med = statistics.median(times[name])
        rows.append({"graph": label, "setting": name, "opened": True, "min_ms": 1e3 * min(times[name]),
                     "median_ms": 1e3 * med, "x_extended": base / med if base else None,
                     "vs_torch": rel(outputs[name], want),
                     "fused": fused if name.startswith("transformers") else None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device-engines", type=Path, default=None, help="OUT/device (the fp32 folder, as exported)")
    p.add_argument("--device-model", default=None, help="the device model folder it was exported from")
    p.add_argument("--cloud-engines", type=Path, default=None, help="OUT/cloud")
    p.add_argument("--cloud-model", default=None, help="the cloud model folder it was exported from")
    p.add_argument("--n", type=int, default=2, help="candidates (the UNet runs 2 x N rows)")
    p.add_argument("--size", type=int, default=64, help="image size in px")
    p.add_argument("--cloud-size", type=int, default=None, help="image size of the cloud graph (default --size)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if (args.device_engines is None) != (args.device_model is None) or (
            (args.cloud_engines is None) != (args.cloud_model is None)):
        p.error("give each engines folder with the model it was exported from")
    if args.device_engines is None and args.cloud_engines is None:
        p.error("nothing to measure: give --device-engines/--device-model and/or --cloud-engines/--cloud-model")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.device_engines is not None:
            case = device_case(args.device_engines, args.device_model, args.n, args.size)
            rows += measure("device unet", *case, args.repeats, args.threads, Path(tmp))
        if args.cloud_engines is not None:
            case = cloud_case(args.cloud_engines, args.cloud_model, args.n, args.cloud_size or args.size)
            rows += measure("cloud full", *case, args.repeats, args.threads, Path(tmp))
    print(f"{'graph':12s} {'setting':30s} {'min ms':>9s} {'median ms':>9s} {'x ext':>6s} {'vs torch':>9s}  fused")
    for r in rows:
        if not r["opened"]:
            print(f"{r['graph']:12s} {r['setting']:30s} onnxruntime cannot open it")
            continue
        print(f"{r['graph']:12s} {r['setting']:30s} {r['min_ms']:9.1f} {r['median_ms']:9.1f} "
              f"{r['x_extended'] or float('nan'):6.2f} {r['vs_torch']:9.2e}  {r['fused'] or ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python benchmarks/graph_optimisation.py "
                                               + " ".join(sys.argv[1:] if argv is None else argv),
                                               "n": args.n, "size": args.size, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
