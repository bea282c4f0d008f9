"""What every command that generates an image shares: its flags, the GenerationConfig they
make, the progress bar, the report, and how errors become exit codes.

Used by ``obclip-generate`` (device/generate.py) and the main job ``obclip-demo``
(app/demo.py), so a flag means the same thing everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from obclip.runtime.errors import InputError, ObclipError, UntrustedAnswerError, kind_of
from obclip.runtime.graphs import DECODERS
from obclip.runtime.memory import MEMORY_MODES
from obclip.runtime.plan import LCM_PAPER_STEPS, SkipVariant, preset
from obclip.runtime.solver import DPM_SOLVER, LCM, SOLVER_KINDS

from .client import ServiceClient
from .engines import EngineConfig
from .oblivious import UNPROTECTED_POLICIES, TransformConfig
from .pipeline import GenerationConfig, GenerationResult, Method, describe_sent

_G = GenerationConfig()
_E = EngineConfig()


def error_kind(error: BaseException) -> type[ObclipError] | None:
    """The kind of an error a command reports (runtime/errors.py), or None for a bug."""
    return kind_of(error)


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose what is generated and how (the same on every generating command)."""
    p.add_argument("prompt")
    p.add_argument("--out", default="out/obclip.png", type=Path, help="PNG to write (default %(default)s)")
    p.add_argument("--method", default="obclip", choices=[m.value for m in Method],
                   help="obclip (private, default), vanilla-og (private), device-only (sends nothing), "
                        "hybrid-sd and cloud-only (NOT private: for comparison)")
    p.add_argument("--solver", default=DPM_SOLVER, choices=list(SOLVER_KINDS),
                   help="the sampler, the same on cloud and device: dpmsolver++ (DPM-Solver++(2M), default) or "
                        "lcm (latent consistency sampling, for LCM-distilled models)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"T, total solver steps (default {_G.num_inference_steps}; "
                        f"{LCM_PAPER_STEPS} with --solver lcm)")
    p.add_argument("--switch-step", "-k", type=int, default=None,
                   help="k, steps run in the cloud (default: the acceleration preset's k, else 10)")
    p.add_argument("--device-timestep-shift", type=int, default=_G.device_timestep_shift, metavar="DT",
                   help="dt: the device's UNet is given timestep t + dt on its steps (the paper's best for "
                        "LCM-SDXL: 8; default %(default)s)")
    p.add_argument("--acceleration", default=None,
                   help="server-side acceleration preset: paper-k5 (k=5,r=3,s=3), paper-k10 (k=10,r=4,s=6), "
                        "lean-k10 (fewer server MACs than paper-k10; docs/benchmarks.md 'Server cost'), "
                        "paper-lcm-k4 (k=4,r=2,s=2; with --solver lcm --steps 8) "
                        "or none-k<k>; default: every cloud step a full pass")
    p.add_argument("--skip-variant", default=None, choices=[v.value for v in SkipVariant],
                   help="what the preset's block-skip steps recompute (default: the preset's own; deepcache "
                        "drifts less, and under --solver lcm on the embedded model faster-diffusion breaks: "
                        "docs/method.md 7.9)")
    p.add_argument("--negative-prompt", default=_G.negative_prompt, metavar="TEXT",
                   help="what the image should not show (the unconditional text on cloud and device); sent only "
                        "if the device vouches for every word of it, else --unprotected decides (docs/privacy.md)")
    p.add_argument("--guidance", type=float, default=_G.guidance_scale,
                   help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: a fresh random one)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--wire-dtype", default=_G.wire_dtype, choices=["float32", "float16"],
                   help="handoff precision; float16 halves the download")
    p.add_argument("--schema", default=None,
                   help="attribute schema: a shipped name (person, shapes) or a JSON file "
                        "(default: the one the model was trained for, else person)")
    p.add_argument("--max-candidates", type=int, default=_G.transform.max_candidates,
                   help="refuse sets larger than this (default %(default)s)")
    p.add_argument("--decoder", default=_E.decoder, choices=list(DECODERS),
                   help="full: the model's VAE decoder (default); tiny: the AutoencoderTiny (TAESD) exported "
                        "beside it (python export/build_engines.py --tiny-decoder DIR; the embedded pair ships "
                        "one), faster and less exact (docs/engines.md 'Tiny decoder')")
    p.add_argument("--engine-memory", default=_E.memory, choices=list(MEMORY_MODES),
                   help="how the device's onnxruntime sessions allocate: shared+no-pattern (one arena for the text "
                        "encoder, UNet and decoder, default), arena (one per session, onnxruntime's own), "
                        "+shrink (free memory returned at every run's end, slower), none (no arena); "
                        "docs/engines.md 'Device memory'")
    p.add_argument("--unprotected", default=_G.transform.unprotected, choices=list(UNPROTECTED_POLICIES),
                   help="a word the device cannot vouch for (a name, 'latina', 'in her 40s', a typo; "
                        "docs/privacy.md): send nothing and generate on the device alone (device-only, "
                        "default), or refuse the prompt; unsafe-send sends it as typed (UNSAFE, research only)")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the flags added by ``add_generation_flags``; InputError if invalid."""
    try:
        acceleration = preset(args.acceleration) if args.acceleration else None
    except ValueError as e:   # an unknown preset name: the flag's value
        raise InputError(f"--acceleration: {e}") from None
    if args.skip_variant is not None:
        if acceleration is None:
            raise InputError("--skip-variant changes an acceleration preset's skip steps; name the preset with "
                             "--acceleration (e.g. --acceleration paper-lcm-k4 --skip-variant deepcache)")
        acceleration = dataclasses.replace(acceleration, skip_variant=SkipVariant(args.skip_variant))
    steps = args.steps
    if steps is None:
        steps = LCM_PAPER_STEPS if args.solver == LCM else _G.num_inference_steps
    return GenerationConfig(
        method=Method(args.method), num_inference_steps=steps, switch_step=args.switch_step,
        guidance_scale=args.guidance, height=args.size, width=args.size, seed=args.seed,
        wire_dtype=args.wire_dtype, acceleration=acceleration, solver=args.solver,
        device_timestep_shift=args.device_timestep_shift, negative_prompt=args.negative_prompt,
        transform=TransformConfig(max_candidates=args.max_candidates, schema_path=args.schema,
                                  unprotected=args.unprotected),
    )


def run_reported(work: Callable[[], int]) -> int:
    """Run a command's work; an obclip error becomes its message on stderr and its kind's exit code
    (2 input, 3 service, 4 untrusted answer, 5 artifact). Anything else is a bug: its traceback shows."""
    try:
        return work()
    except ObclipError as e:
        kind = error_kind(e)
        assert kind is not None
        if kind is UntrustedAnswerError:
            print(f"\nerror: {UntrustedAnswerError.summary}\n  {e}", file=sys.stderr)
        else:
            print(f"\nerror: {e}", file=sys.stderr)
        return kind.exit_code


class ProgressBar:
    """``on_step`` callback: a plain-text bar on a stream (no dependencies)."""

    def __init__(self, label: str = "device steps", width: int = 30, stream: TextIO | None = None):
        self.label, self.width = label, width
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, i: int, n: int) -> None:
        filled = self.width * i // max(n, 1)
        self.stream.write(f"\r  {self.label} [{'#' * filled}{'.' * (self.width - filled)}] {i}/{n}")
        if i >= n:
            self.stream.write("\n")
        self.stream.flush()


def report_lines(result: GenerationResult, config: GenerationConfig, client: ServiceClient | None) -> list[str]:
    """What a run did, for the CLIs: the options, what the server received, and the time split
    (cloud compute / queue + transfer from the service's Server-Timing, device steps, decode)."""
    acc = config.acceleration
    acc_text = "none" if acc is None else f"r={acc.cache_step} s={acc.skip_step} reuse={acc.batch_reuse} " \
        f"cache={acc.attention_cache} skip={acc.block_skip}"
    shift = f" dt={config.device_timestep_shift}" if config.device_timestep_shift else ""
    lines = [f"method: {config.method.value}  solver: {config.solver}{shift}  T={config.num_inference_steps}  "
             f"k={config.k}  acceleration: {acc_text}  "
             f"seed={result.prepared.seed}  size={result.prepared.height}x{result.prepared.width}  "
             f"wire: {config.wire_dtype}"]
    lines += describe_sent(result, config)
    t = result.timings
    call = client.last_call if client is not None else None
    if result.prepared.request is not None and call is not None and call.server_run_s is not None:
        cloud = (f"cloud compute {call.server_run_s:.2f} s, queue + transfer "
                 f"{max(0.0, call.total_s - call.server_run_s):.2f} s ({call.attempts} attempt(s))")
    else:
        cloud = f"cloud {t['cloud']:.2f} s"
    lines.append(f"time: {cloud}, device steps {t['device_steps']:.2f} s, decode {t['decode']:.2f} s; "
                 f"bytes sent {result.bytes_sent}, received {result.bytes_received}")
    return lines


def report_and_save(result: GenerationResult, config: GenerationConfig, client: ServiceClient | None,
                    out: Path) -> None:
    """Print the report, write the PNG (its folder made if needed) and say where."""
    print("\n".join(report_lines(result, config, client)))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save_png(out)
    print(f"wrote {out}")


