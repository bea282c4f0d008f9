"""Smoke test of the ObCLIP-Mini training script (mini/train.py).

Every stage runs on a tiny budget: first in a subprocess that is SIGKILLed in
the middle of stage text-unet (after a checkpoint), then again in-process,
which must resume from that checkpoint and finish. The packaged pair must load
the way the project loads models.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mini.train import Hyper, bk_teacher_name, init_student_from_teacher, main

from helpers import REPO

CKPT_EVERY, DIE_AT = 4, 6
TINY = [
    "--budget-scale", "0.002",  # of these budgets: vae 3 steps, text-unet 12, distil 6
    "--set", "vae_steps=1500", "--set", "unet_steps=6000", "--set", "distil_steps=3000",
    "--set", "n_train=128", "--set", "batch=8", "--set", "vae_batch=4",
    "--set", "eval_prompts=2", "--set", "final_eval_prompts=2", "--set", "sample_steps=3",
    "--set", "eval_every=8", "--set", f"ckpt_every_steps={CKPT_EVERY}", "--set", "log_every=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini-train")
    # One thread: tiny batches gain nothing from two, and a shared machine slows two down a lot.
    args = ["--out", str(root / "out"), "--work", str(root / "work"), "--threads", "1", *TINY]
    killed = subprocess.run([sys.executable, "-m", "mini.train", *args, "--die-at", f"text-unet:{DIE_AT}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # died by SIGKILL, as planned
    log_before = _log(root / "work")
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    return root / "out", root / "work", log_before, _log(root / "work")


def _log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]


def test_resume_continues_from_the_checkpoint(trained):
    _, work, before, after = trained
    stage = [r for r in before if r.get("stage") == "text-unet"]
    assert [r["step"] for r in stage if r["event"] == "checkpoint"] == [CKPT_EVERY]
    assert max(r["step"] for r in stage if r["event"] == "train") == DIE_AT
    assert not any(r["event"] == "done" for r in stage)

    new = after[len(before):]
    resume = [r for r in new if r["event"] == "resume"]
    assert [(r["stage"], r["step"]) for r in resume] == [("text-unet", CKPT_EVERY)]
    steps = [r["step"] for r in new if r["event"] == "train" and r["stage"] == "text-unet"]
    assert steps[0] == CKPT_EVERY + 1 and steps[-1] == 12
    # vae had finished before the kill: not run again.
    assert not any(r["stage"] == "vae" and r["event"] in ("start", "train") for r in new)
    assert {r["stage"] for r in after if r["event"] == "done"} == {"vae", "text-unet", "distil", "package"}
    assert any(r["event"] == "eval" and r["stage"] == "text-unet" for r in after)
    assert any(r["event"] == "eval" and r["stage"] == "distil" for r in after)


def test_packaged_pair_loads_like_any_model_dir(trained):
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.torch_backend import make_scheduler

    out, work, _, log = trained
    cloud, device = load_text_to_latent(str(out / "cloud")), load_text_to_latent(str(out / "device"))
    assert cloud.unet.mid_block is not None and device.unet.mid_block is None
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(device.unet) < n(cloud.unet)
    assert device.unet.config.layers_per_block == 1 and cloud.unet.config.layers_per_block == 2
    # fp16 on disk, fp32 in memory; the two dirs share the text encoder.
    assert {p.dtype for p in cloud.text_encoder.parameters()} == {torch.float32}
    prompt = ["a large red circle on a white background"]
    assert torch.equal(cloud.encode_prompts(prompt), device.encode_prompts(prompt))
    # The measured scaling factor is in the VAE config; the runtime's solver agrees with the scheduler.
    vae_done = next(r for r in log if r["event"] == "done" and r["stage"] == "vae")
    assert cloud.vae_scaling_factor == pytest.approx(vae_done["scaling_factor"], rel=1e-5)
    for model in (cloud, device):
        assert model.latent_shape(64, 64) == (4, 16, 16)
        make_scheduler(model, 25)
    for role in ("cloud", "device"):  # strict JSON: no -Infinity from diffusers' full dump
        text = (out / role / "scheduler" / "scheduler_config.json").read_text()
        config = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert config["_class_name"] == "DPMSolverMultistepScheduler" and config["beta_schedule"] == "scaled_linear"
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.parent != out)
    assert size <= Hyper().max_package_mb * 1e6


def test_device_unet_is_initialised_the_bk_sdm_way():
    from obclip.cloud.models import build_unet

    assert bk_teacher_name("up_blocks.1.resnets.1.conv1.weight") == "up_blocks.1.resnets.2.conv1.weight"
    assert bk_teacher_name("up_blocks.1.attentions.0.proj_in.weight") == "up_blocks.1.attentions.0.proj_in.weight"
    assert bk_teacher_name("down_blocks.0.resnets.0.conv1.weight") == "down_blocks.0.resnets.0.conv1.weight"
    teacher, student = build_unet("mini"), build_unet("mini-small")
    info = init_student_from_teacher(student, teacher)
    assert info["copied"] == info["student_tensors"] and not info["not_copied"]
    assert "mid_block" in info["teacher_parts_dropped"]
    assert "up_blocks.1.resnets.1" in info["teacher_parts_dropped"]  # the middle pair of an up stage
    t = teacher.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, t[bk_teacher_name(key)])


def test_model_card_is_filled_from_the_run(trained):
    out, _, _, log = trained
    card = (out / "MODEL_CARD.md").read_text()
    pkg = next(r for r in log if r["event"] == "done" and r["stage"] == "package")
    distil = next(r for r in log if r["event"] == "done" and r["stage"] == "distil")
    assert f"cloud {pkg['bytes']['cloud']:,} bytes" in card
    assert f"{distil['init_copied']} of its {distil['init_student_tensors']} tensors" in card
    assert f"{pkg['final_eval']['device']['mmd2']:.4f}" in card
    for stage in ("vae", "text-unet", "distil"):
        assert re.search(rf"\| {stage} \| \d+ \|", card), stage
    assert "| text-unet | 12 |" in card
    assert "n/a" not in card
    # Joint accuracy with Wilson intervals; hybrid and device against cloud on the same prompts.
    iv = pkg["intervals"]
    assert set(iv["both_wilson95"]) == {"cloud", "device", "hybrid_k10"}
    for name, (lo, hi) in iv["both_wilson95"].items():
        assert 0 <= lo <= pkg["final_eval"][name]["both"] <= hi <= 1
        assert f"{name} {100 * pkg['final_eval'][name]['both']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" in card
    d = iv["both_hybrid_k10_minus_cloud"]
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert f"hybrid_k10 - cloud {100 * d['diff']:+.1f} points" in card
    # Background only where the prompt names one; real renders read back exactly.
    assert pkg["final_eval"]["cloud"]["background_n"] <= 2
    assert pkg["final_eval"]["real_renders"]["both"] == 1.0


def test_work_folder_refuses_other_settings(trained, capsys):
    out, work, _, _ = trained
    with pytest.raises(SystemExit, match="other settings"):
        main(["--out", str(out), "--work", str(work), *TINY, "--set", "lr=0.1"])
    with pytest.raises(SystemExit, match="unknown field"):
        main(["--out", str(out), "--work", str(work), "--set", "no_such_field=1"])


def test_card_is_rewritten_from_the_log_alone(trained, tmp_path):
    out, work, _, _ = trained
    before = (out / "MODEL_CARD.md").read_text()
    (out / "MODEL_CARD.md").unlink()
    threads = torch.get_num_threads()
    try:
        assert main(["--out", str(out), "--work", str(work), "--threads", "1", *TINY, "--card"]) == 0
        assert (out / "MODEL_CARD.md").read_text() == before  # the same card, nothing rerun
        with pytest.raises(SystemExit, match="no finished package stage"):
            main(["--out", str(tmp_path), "--work", str(tmp_path / "w"), "--card"])
    finally:
        torch.set_num_threads(threads)
