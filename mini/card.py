"""The ObCLIP-Mini model card: mini/model_card.md filled from the training log and the package.

Every number comes from the run (its log records, the packaged files, the final evaluation);
the template holds the words. ``model_card(run, pkg)`` is called by ``mini.train`` after the
package stage, and by ``python -m mini.train ... --card`` to rewrite the card from the log alone.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from string import Template
from typing import Any

TEMPLATE = Path(__file__).with_name("model_card.md")


def last_record(records: list[dict], **match: Any) -> dict:
    """The last log record with these fields; a clear error when the stage never finished here."""
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    if not hits:
        raise RuntimeError(f"log has no record {match}; was the stage run in this --work folder?")
    return hits[-1]


def accuracy_cells(a: dict) -> str:
    # background is scored only on prompts that name one: absent when none did.
    return " | ".join(f"{100 * a[k]:.1f}%" if k in a else "-" for k in ("colour", "shape", "both", "background"))


def table(header: list[str], align: list[str], rows: list[str]) -> str:
    """A Markdown table: its header, the alignment row and the rows (already formatted)."""
    return "\n".join([f"| {' | '.join(header)} |", f"| {' | '.join(align)} |", *rows])


def _files_table(pkg: dict) -> str:
    rows = []
    for role, components in pkg["components"].items():
        for sub, e in components.items():
            dt = ", ".join(f"{k}: {v:,}" for k, v in e.get("dtypes", {}).items()) or "-"
            rows.append(f"| {role} | {sub} | {e.get('params', 0):,} | {e['bytes']:,} | {dt} |")
    return table(["dir", "component", "parameters", "bytes", "stored dtypes (parameters)"],
                 ["---", "---", "---:", "---:", "---"], rows)


def _stages_table(log: list[dict], hp: Any, vae: dict, tu: dict, di: dict) -> str:
    def final_loss(stage: str, key: str = "loss") -> str:
        recs = [r for r in log if r.get("event") == "train" and r["stage"] == stage]
        return f"{recs[-1][key]:.4f}" if recs else "n/a"

    def resumes(stage: str) -> int:
        return sum(1 for r in log if r.get("event") == "resume" and r["stage"] == stage)

    rows = [
        f"| vae | {vae['steps']} | {hp.vae_batch} ({hp.vae_crop}x{hp.vae_crop} crops) | "
        f"{vae['seconds'] / 60:.1f} min (+{vae['encode_seconds'] / 60:.1f} min encoding) | {final_loss('vae')} | "
        f"{resumes('vae')} |",
        f"| text-unet | {tu['steps']} | {tu['batch']} | {tu['seconds'] / 60:.1f} min | {final_loss('text-unet')} | "
        f"{resumes('text-unet')} |",
        f"| distil | {di['steps']} | {di['batch']} | {di['seconds'] / 60:.1f} min | {final_loss('distil')} "
        f"(task {final_loss('distil', 'task')}) | {resumes('distil')} |",
    ]
    return table(["stage", "steps", "batch", "wall time", "final training loss", "resumed"],
                 ["---", "---:", "---:", "---:", "---", "---:"], rows)


def _final_table(pkg: dict) -> str:
    rows = [f"| {name} | {accuracy_cells(a)} | {a['mmd2']:.4f} |" for name, a in pkg["final_eval"].items()]
    return table(["model", "colour", "shape", "both", "background", "MMD^2"],
                 ["---", "---:", "---:", "---:", "---:", "---:"], rows)


def _evals_table(log: list[dict]) -> str:
    rows = [f"| {r['stage']} | {r['step']} | {name} | {accuracy_cells(a)} |"
            for r in log if r.get("event") == "eval" for name, a in r.items() if isinstance(a, dict)]
    return table(["stage", "step", "model", "colour", "shape", "both", "background"],
                 ["---", "---:", "---", "---:", "---:", "---:", "---:"], rows)


def model_card(run: Any, pkg: dict) -> str:
    """The card of a finished run (``mini.train.Run``) and its package record (``stage_package``)."""
    import diffusers
    import torch
    import transformers

    log = run.read_log()
    hp = run.hp
    vae, tu, di = (last_record(log, event="done", stage=s) for s in ("vae", "text-unet", "distil"))
    iv = pkg["intervals"]
    pc = pkg["packaging_check"]
    defaults = type(hp)()
    changed = "".join(f" --set {f.name}={getattr(hp, f.name)}" for f in dataclasses.fields(hp)
                      if getattr(hp, f.name) != getattr(defaults, f.name))
    environment = (f"Budget scale {run.scale:g}; {run.threads} CPU threads on `{run.device}`; "
                   f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
                   f"{transformers.__version__}; {platform.machine()} {platform.processor() or ''}".rstrip() + ".")
    values = {
        "n_train": hp.n_train, "seed": hp.seed, "unique_captions": vae["unique_captions"],
        "files_table": _files_table(pkg),
        "cloud_bytes": f"{pkg['bytes']['cloud']:,}", "device_bytes": f"{pkg['bytes']['device']:,}",
        "total_mb": f"{pkg['total_mb']:.2f}", "max_package_mb": f"{hp.max_package_mb:g}",
        "environment": environment, "stages_table": _stages_table(log, hp, vae, tu, di),
        "vae_kl_weight": f"{hp.vae_kl_weight:g}", "vae_lr": f"{hp.vae_lr:g}",
        "posterior_std_mean": vae["posterior_std_mean"], "latent_std_raw": vae["latent_std_raw"],
        "scaling_factor": vae["scaling_factor"], "recon_psnr": vae["heldout_recon_psnr"],
        "recon_accuracy": accuracy_cells(vae["heldout_recon_accuracy"]),
        "text_params": f"{tu['text_params']:,}", "unet_params": f"{tu['unet_params']:,}",
        "lr": f"{hp.lr:g}", "weight_decay": f"{hp.weight_decay:g}", "warmup_frac": f"{hp.warmup_frac:g}",
        "final_lr_frac": f"{hp.final_lr_frac:g}", "ema_decay": hp.ema_decay,
        "caption_dropout": f"{hp.caption_dropout:g}", "offset_noise": f"{hp.offset_noise:g}",
        "min_snr_gamma": f"{hp.min_snr_gamma:g}",
        "student_params": f"{di['student_params']:,}",
        "student_share": f"{di['student_params'] / di['teacher_params']:.0%}",
        "teacher_params": f"{di['teacher_params']:,}", "init_copied": di["init_copied"],
        "init_student_tensors": di["init_student_tensors"],
        "teacher_parts_dropped": ", ".join(di["teacher_parts_dropped"]),
        "kd_out_weight": f"{hp.kd_out_weight:g}", "kd_feat_weight": f"{hp.kd_feat_weight:g}",
        "distil_lr": f"{hp.distil_lr:g}",
        "sample_steps": hp.sample_steps, "guidance": f"{hp.guidance:g}", "last_cloud_step": hp.switch_step - 1,
        "eval_prompts_final": pkg["eval_prompts"], "eval_seconds": f"{pkg['eval_seconds']:.0f}",
        "final_table": _final_table(pkg),
        "background_n": int(pkg["final_eval"]["cloud"].get("background_n", 0)),
        "wilson": "; ".join(f"{name} {100 * pkg['final_eval'][name]['both']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
                            for name, (lo, hi) in iv["both_wilson95"].items()),
        "differences": "; ".join(f"{key[5:-12]} - cloud {100 * d['diff']:+.1f} points [{100 * d['ci95'][0]:+.1f}, "
                                 f"{100 * d['ci95'][1]:+.1f}]" for key, d in iv.items()
                                 if key.endswith("_minus_cloud")),
        "packaging_fp32": accuracy_cells(pc["cloud_fp32_weights"]),
        "packaging_diff": pc["max_abs_pixel_diff_vs_fp32"],
        "eval_prompts": hp.eval_prompts, "eval_every": hp.eval_every, "training_evals_table": _evals_table(log),
        "reproduce": f"python -m mini.train --out OUT --work WORK --budget-scale {run.scale:g} "
                     f"--threads {run.threads}{changed}",
        "hyper_json": json.dumps(dataclasses.asdict(hp), indent=1),
    }
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
