"""Device engine variants: fp16 and int8 folders built from the fp32 one, each checked against it.

    python export/build_engines.py --device-precision fp16,int8,int8-qdq

writes, beside ``<out>/device`` (fp32), ``<out>/device-fp16``, ``<out>/device-int8`` and
``<out>/device-int8-qdq``: each a complete, self-contained engines folder (graphs, external data if
any, tokenizer, diffusers' layout files, manifest with every file hashed), so one variant's folder
is all an app ships. The device runtime opens any of them the same way; only the folder differs.

fp16: weights and compute in float16 (``onnxruntime.transformers.float16``), inputs and outputs
kept float32, and the numerically sensitive ops in ``FP16_KEEP_FP32`` kept float32 (norms'
variance, softmax, the timestep embedding's sin/cos/exp).  Providers without float16 kernels
(onnxruntime's x86 CPU) run those nodes in float32 behind inserted casts: the folder is half the
size there but not faster; CoreML, NNAPI, CUDA and DirectML run float16 natively.

int8 (onnxruntime.quantization, for onnxruntime's CPU provider) quantises the UNet, which runs
every step (``INT8_OPS``):
  UNet:         MatMul/Gemm with constant weights (attention and feed-forward projections, time
                embedding), dynamic: per-channel uint8 weights, activations quantised per call.
                Conv, attention-score MatMuls (two activations), norms, softmax and everything
                else stay float32;
  text encoder: float32 (its fp16 error on top of the int8 UNet's tipped a check prompt);
  VAE decoder and encoder: fp16.
Why (docs/engines.md, "int8"): classifier-free guidance multiplies the small difference of the two
branches by the guidance scale, and 8-bit activations in the convolutions drown it; and weights are
uint8, not int8, because x86 CPUs without VNNI multiply uint8 x int8 pairs into int16 with
saturation (onnxruntime's U8S8 caveat), which broke the same folder there; uint8 x uint8 is exact.

int8-qdq (``INT8_QDQ_OPS``): the same model as QuantizeLinear/DequantizeLinear pairs around float
ops only (static, symmetric int8, zero points 0, no MatMulInteger/DynamicQuantizeLinear): the format
TensorRT's ONNX parser and mobile NPU delegates (QNN, NNAPI, CoreML via conversion) take. Its
activations are calibrated on fp32 trajectories of ``CALIBRATION_PROMPTS`` (none of them checked).

Every variant is checked on real trajectories (device-only runs, the device pipeline's loop, fp32
vs variant, every check prompt at every check seed): final-latent difference and image PSNR go into
the manifest's ``variant_check``. A prompt's score is its median PSNR over the seeds (one seed near
a tipping point, where a fraction of a pixel moves an edge, does not decide it; two do), and for a
trained model (the fp32 manifest's ``verification`` says ``"weights": "trained"``, from the model's
``obclip_model.json``) a variant whose worst prompt is below ``PSNR_FLOOR`` is refused; with
``allow_below_floor`` (``--allow-below-floor``) it is written marked failed
(``variant_check.passed = false``), and the device runtime opens it only when the app passes
``allow_below_floor=True`` (fail closed). For random weights the check is recorded only.

The fp32 folder holds the graphs as exported (export/device_engines.py): saved optimised, a graph
is closed to later passes (onnxruntime's transformer optimizer found no attention to fuse in a
saved-optimised UNet); the session optimises at load. A variant is converted from a copy of the
fp32 graph with onnxruntime's provider-independent (BASIC) optimisations, which its conversion was
designed and checked on, and saved after them again; provider-specific fusions (EXTENDED and up)
are left to the session on the device, because a graph saved with them runs only on the provider
that made them.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from obclip.export.staging import staged_folder
from obclip.export.standard_folder import copy_standard_files
from obclip.runtime.denoise import denoise
from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.graphs import DeviceGraphs, UNet
from obclip.runtime.manifest import PRECISIONS, Manifest, sha256_file
from obclip.runtime.noise import initial_noise
from obclip.runtime.sessions import SessionConfig, open_session
from obclip.runtime.solver import SolverConfig, initial_state, make_schedule

# ops kept float32 in the fp16 variant (on top of onnxruntime's default block list)
FP16_KEEP_FP32 = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
                  "ReduceMean", "Pow", "Sqrt", "Exp", "Sin", "Cos", "Erf", "Resize")
PSNR_FLOOR = {"fp16": 30.0, "int8": 25.0, "int8-qdq": 25.0}   # dB against fp32, enforced for trained models
PSNR_CAP = 100.0                             # dB recorded for an image identical to fp32's
EXTERNAL_DATA_ABOVE = 256 << 20              # graphs larger than this keep weights in model.onnx.data
INT8_OPS: dict[str, tuple[str, ...]] = {
    "unet": ("dynamic: MatMul, Gemm with constant weights (per-channel uint8 weights)",
             "float32: Conv, attention scores, norms, softmax"),
    "text_encoder": ("float32",), "vae_decoder": ("fp16",), "vae_encoder": ("fp16",)}
INT8_QDQ_OPS: dict[str, tuple[str, ...]] = {
    "unet": ("static QDQ: Conv, MatMul, Gemm (per-channel symmetric int8 weights, symmetric int8 activations "
             "calibrated on fp32 trajectories of the calibration prompts; biases float32)",),
    "text_encoder": ("float32",), "vae_decoder": ("fp16",), "vae_encoder": ("fp16",)}
QUANTISED_OPS: dict[str, dict[str, tuple[str, ...]]] = {"int8": INT8_OPS, "int8-qdq": INT8_QDQ_OPS}

# Prompts for the check: the embedded model's vocabulary (coloured shapes); any
# text encoder reads them, so random-weight models use them too.
CHECK_PROMPTS = ("a large red circle on a white background", "a small blue square on a black background",
                 "a green triangle", "a picture of a large yellow square", "a purple circle on a black background",
                 "an orange triangle on a white background")
# Static int8 (QDQ) calibration: prompts the check does not use.
CALIBRATION_PROMPTS = CHECK_PROMPTS[4:] + ("a small green circle on a white background", "a large blue triangle")


@dataclass(frozen=True)
class VariantCheck:
    """How a variant is checked and calibrated: device-only runs of these prompts and seeds."""

    prompts: tuple[str, ...] = CHECK_PROMPTS[:4]
    steps: int = 20
    guidance_scale: float = 7.5
    seeds: tuple[int, ...] = (1234, 1235, 1236)
    calibration_prompts: tuple[str, ...] = CALIBRATION_PROMPTS  # static int8 (QDQ) only
    enforce: bool | None = None    # None: enforce PSNR_FLOOR exactly when the model is trained
    allow_below_floor: bool = False  # write a refused variant anyway, marked failed (apps must opt in to run it)


def parse_precisions(text: str) -> list[str]:
    """"fp16,int8" -> ["fp32", "fp16", "int8"]: fp32 is always built (the others come from it)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise InputError(f"--device-precision {text!r}: each must be one of {', '.join(PRECISIONS)}")
    return ["fp32"] + [p for p in PRECISIONS[1:] if p in names]


def variant_dir(out: Path, precision: str) -> Path:
    return out / ("device" if precision == "fp32" else f"device-{precision}")


# --- graph optimisation -------------------------------------------------------------------


def optimise_onnx(path: Path, level: str = "basic", external_above: int | None = None) -> None:
    """Apply onnxruntime's graph optimisations at ``level`` and save the result over ``path``.
    A graph (with its weights) above ``external_above`` bytes is saved as model.onnx + model.onnx.data."""
    external_above = EXTERNAL_DATA_ABOVE if external_above is None else external_above
    folder = path.parent
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    tmp = Path(tempfile.mkdtemp(prefix=".opt-", dir=folder))
    try:
        entries = {}
        if size > external_above:
            entries = {"session.optimized_model_external_initializers_file_name": path.name + ".data",
                       "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}
        open_session(path, SessionConfig(optimization=level), save_optimized=tmp / path.name, entries=entries)
        for f in folder.iterdir():  # the exporter's files (one per tensor for large models) go
            if f.is_file():
                f.unlink()
        for f in tmp.iterdir():
            f.rename(folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def basic_copy(src: Path, dst: Path) -> Path:
    """``src``'s component folder copied to ``dst``'s, with BASIC optimisations saved; returns ``dst``."""
    shutil.copytree(src.parent, dst.parent)
    optimise_onnx(dst)
    return dst


# --- conversions --------------------------------------------------------------------------


def save_onnx(model: Any, path: Path) -> None:
    """Save a graph: weights inline, or in ``<name>.data`` beside it when large."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > EXTERNAL_DATA_ABOVE if model.ByteSize() < 2**31 - 1 else True
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data")


def fp16_model(model: Any, keep_fp32: Iterable[str] = FP16_KEEP_FP32, keep_nodes: Iterable[str] = ()) -> Any:
    """An fp32 ONNX model (a ModelProto, or a path, which lets shape inference pass protobuf's 2 GB)
    with float16 weights and compute: graph inputs and outputs stay float32, and
    the ops in ``keep_fp32`` (on top of onnxruntime's default block list) and the nodes named in
    ``keep_nodes`` stay float32 behind casts. The device fp16/int8 variants and the cloud fp16
    folder (``export/cloud_fp16.py``) all convert with this."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, node_block_list=list(keep_nodes),
                                    op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32))


def to_fp16(src: Path, dst: Path) -> None:
    import onnx

    save_onnx(fp16_model(onnx.load_model(str(src))), dst)


class _Calibration:
    """onnxruntime's CalibrationDataReader over recorded UNet inputs."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def to_int8_unet(src: Path, dst: Path) -> None:
    """The int8 variant's UNet (see INT8_OPS)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QUInt8, use_external_data_format=_is_large(src),
                     extra_options={"MatMulConstBOnly": True})


def to_int8_qdq_unet(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """The QDQ-only int8 variant's UNet (see INT8_QDQ_OPS): QuantizeLinear / DequantizeLinear pairs
    around float ops, no MatMulInteger or DynamicQuantizeLinear, symmetric int8 (zero points 0), the
    form TensorRT's ONNX parser and mobile NPU delegates take."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _Calibration(calibration),  # type: ignore[arg-type]
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_is_large(src),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})


def _is_large(src: Path) -> bool:
    return sum(f.stat().st_size for f in src.parent.iterdir()) > EXTERNAL_DATA_ABOVE


def convert(precision: str, name: str, src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """One component of the fp32 folder as the ``precision`` variant's graph. The int8 variants
    quantise the UNet only (it runs every step); their text encoder stays float32, the rest fp16."""
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp16" or (name not in ("unet", "text_encoder")):
        to_fp16(src, dst)
    elif name == "text_encoder":
        save_onnx(onnx.load_model(str(src)), dst)
    elif precision == "int8":
        to_int8_unet(src, dst)
    else:
        to_int8_qdq_unet(src, dst, calibration)


# --- trajectories: calibration and the check -----------------------------------------------


class RecordingUNet:
    """A UNet that also keeps every feed it runs (int8 calibration records the fp32 UNet's inputs)."""

    def __init__(self, unet: UNet, record: list[dict[str, np.ndarray]]):
        self.unet, self.record = unet, record

    def __call__(self, sample: np.ndarray, timestep: float, encoder_hidden_states: np.ndarray,
                 **added: np.ndarray) -> np.ndarray:
        feeds = self.unet.feeds(sample, timestep, encoder_hidden_states, **added)
        self.record.append(feeds)
        return self.unet.run(feeds)


def device_only_run(graphs: DeviceGraphs, prompt: str, seed: int, check: VariantCheck,
                    record: list[dict[str, np.ndarray]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A device-only run of one engines folder through the device's own loop (``runtime.denoise``, as
    ``DevicePipeline.finish`` runs it with k = 0): (final latent [1, C, h, w], image uint8 [H, W, 3]).
    ``record`` collects the UNet's inputs."""
    m = graphs.manifest
    solver = SolverConfig.from_scheduler_config(m.scheduler_config)
    schedule = make_schedule(solver, check.steps)
    shape = graphs.latent_shape(m.default_image_size, m.default_image_size)
    unet = graphs.unet if record is None else RecordingUNet(graphs.unet, record)
    size = m.default_image_size
    text, added = graphs.condition(["", prompt], size, size, check.guidance_scale)
    x = denoise(unet, text, initial_noise(seed, (1, *shape)), initial_state(), schedule, solver,
                range(check.steps), check.guidance_scale, added=added)
    return x, graphs.decode(x)[0]


def record_unet_inputs(fp32: Path, check: VariantCheck) -> list[dict[str, np.ndarray]]:
    """The fp32 UNet's inputs at every step of device-only runs of the calibration prompts (static int8)."""
    feeds: list[dict[str, np.ndarray]] = []
    graphs = DeviceGraphs(fp32)
    for prompt in check.calibration_prompts:
        device_only_run(graphs, prompt, check.seeds[0], check, feeds)
    return feeds


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def compare_variant(fp32: Path, variant: Path, check: VariantCheck) -> dict[str, Any]:
    """Device-only runs of every check prompt at every check seed on both folders: latent and image
    agreement. A prompt's score is its median PSNR over the seeds (one seed near a tipping point, where
    a fraction of a pixel moves an edge, does not decide it; two do); the floor is on the worst prompt."""
    ref, var = DeviceGraphs(fp32), DeviceGraphs(variant)
    latent_diff, per_prompt = [], []
    for prompt in check.prompts:
        scores = []
        for seed in check.seeds:
            (la, ia), (lb, ib) = device_only_run(ref, prompt, seed, check), device_only_run(var, prompt, seed, check)
            latent_diff.append(float(np.abs(la - lb).max()))
            scores.append(min(psnr(ia, ib), PSNR_CAP))
        per_prompt.append(scores)
    medians = [float(np.median(s)) for s in per_prompt]
    return {"prompts": list(check.prompts), "steps": check.steps, "seeds": list(check.seeds),
            "guidance_scale": check.guidance_scale, "final_latent_max_abs_diff": max(latent_diff),
            "image_psnr_db": [[round(p, 2) for p in s] for s in per_prompt],
            "image_psnr_median_db": [round(p, 2) for p in medians],
            "image_psnr_min_db": round(min(medians), 2),
            "image_psnr_mean_db": round(float(np.mean(medians)), 2)}


def _component_diff(fp32: Manifest, variant: Path, name: str) -> float:
    """Max abs difference of one component against its fp32 graph on one random input
    (token ids for the text encoder; batch 2 at the default size; timestep 500)."""
    c = fp32.components[name]
    ref, var = (open_session(p) for p in (fp32.root / c.path, variant / c.path))
    rng = np.random.default_rng(0)
    side = fp32.default_image_size // fp32.vae_scale_factor
    feed = {}
    for i in ref.get_inputs():
        shape = [d if isinstance(d, int) else {"batch": 2}.get(d, side) for d in i.shape]
        if "int" in i.type:
            feed[i.name] = rng.integers(0, 1000, shape).astype(np.int64 if "64" in i.type else np.int32)
        elif i.name == "timestep":
            feed[i.name] = np.full(shape, 500.0, np.float32)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    a, b = (s.run([c.outputs[0]], feed)[0] for s in (ref, var))
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


# --- building -----------------------------------------------------------------------------


def build_device_variant(fp32_dir: Path, precision: str, out: Path,
                         check: VariantCheck = VariantCheck()) -> Manifest:
    """``out``/device-<precision> from the fp32 folder, atomically; refused (nothing written) when a
    trained model's variant falls below its PSNR floor."""
    if precision not in PRECISIONS[1:]:
        raise InputError(f"precision {precision!r}: build one of {PRECISIONS[1:]} from the fp32 folder")
    base = Manifest.load(fp32_dir)
    if base.precision != "fp32":
        raise InputError(f"{fp32_dir} holds {base.precision} engines; variants are built from the fp32 folder")
    target = variant_dir(out, precision)
    with staged_folder(target) as work:
        t0 = time.perf_counter()
        print(f"building {precision} device engines from {fp32_dir} -> {target}")
        calibration = record_unet_inputs(fp32_dir, check) if precision == "int8-qdq" else []
        components = {}
        for name, c in base.components.items():
            src, dst = basic_copy(fp32_dir / c.path, work / ".basic" / c.path), work / c.path
            convert(precision, name, src, dst, calibration)
            shutil.rmtree(work / ".basic")
            optimise_onnx(dst)
            components[name] = replace(c, sha256=sha256_file(dst), check_max_abs_diff=_component_diff(base, work, name))
        shutil.copytree(fp32_dir / Path(base.tokenizer).parent, work / Path(base.tokenizer).parent)
        copy_standard_files(fp32_dir, work)
        files = {str(f.relative_to(work)): sha256_file(f) for f in sorted(work.rglob("*"))
                 if f.is_file() and f.name != "model.onnx" and f.name != "manifest.json"}
        manifest = replace(base, components=components, files=files, precision=precision, variant_check={},
                           root=work)
        manifest.save(work)
        result = compare_variant(fp32_dir, work, check)
        enforce = base.verification.get("weights") == "trained" if check.enforce is None else check.enforce
        floor = PSNR_FLOOR[precision]
        result.update(precision=precision, psnr_floor_db=floor, enforced=enforce,
                      quantised_ops={k: list(v) for k, v in QUANTISED_OPS.get(precision, {}).items()},
                      fp16_keep_fp32=list(FP16_KEEP_FP32) if precision == "fp16" else [],
                      component_max_abs_diff={n: c.check_max_abs_diff for n, c in components.items()},
                      build_seconds=round(time.perf_counter() - t0, 1))
        mean, worst = result["image_psnr_mean_db"], result["image_psnr_min_db"]
        print(f"  {precision}: final latent max abs diff {result['final_latent_max_abs_diff']:.3g}, image PSNR vs "
              f"fp32 (median over {len(check.seeds)} seeds) mean {mean} dB, worst prompt {worst} dB (floor {floor} dB "
              f"on the worst prompt, {'enforced' if enforce else 'recorded only: random weights'})")
        below = enforce and worst < floor
        result.update(passed=not below)
        if below and not check.allow_below_floor:
            raise ArtifactError(f"the {precision} device engines reach only {worst} dB PSNR against fp32 on their "
                                f"worst check prompt (median over {len(check.seeds)} seeds; mean {mean} dB; floor "
                                f"{floor} dB) on a trained model: not written; ship the fp32 or another variant "
                                "(--device-precision), or write it marked as failed with --allow-below-floor")
        if below:
            print(f"  WARNING: {target} is written marked as below its floor (variant_check.passed = false); the "
                  "device runtime refuses to open it unless the app passes allow_below_floor=True")
        replace(manifest, variant_check=result).save(work)
    print(f"wrote {target / 'manifest.json'}")
    return Manifest.load(target)


def build_device_variants(fp32_dir: Path, precisions: list[str], out: Path,
                          check: VariantCheck = VariantCheck()) -> dict[str, Manifest]:
    return {p: build_device_variant(fp32_dir, p, out, check) for p in precisions if p != "fp32"}
