"""Smoke tests of benchmarks/fidelity.py and benchmarks/latency.py on the small random pair (seconds)."""

from __future__ import annotations

import math
import time

import pytest

from obclip.runtime.plan import AccelerationConfig

from helpers import load_benchmark

fidelity = load_benchmark("fidelity")
latency = load_benchmark("latency")

# k=3, r=1, s=2 on T=4: every kind of step occurs, one device step remains.
TINY = {"tiny": AccelerationConfig(switch_step=3, cache_step=1, skip_step=2)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small, shared CPU more threads only add contention. Restored after."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fidelity_result(cloud_runner, device_pipeline):
    return fidelity.measure(cloud_runner, device_pipeline, prompts=["a woman on a bicycle"], steps=4,
                            presets=TINY, seed=7)


def test_fidelity_exact_extras_are_exact_and_accelerations_are_not(fidelity_result):
    recs = fidelity_result["records"]
    labels = [label for label, _ in fidelity.settings_for(TINY["tiny"])]
    assert {r["setting"] for r in recs} == set(labels)
    for label in labels:
        mine = [r for r in recs if r["setting"] == label]
        # Per-candidate entries: both candidates of the N = 2 set, the pivot marked.
        assert sorted(r["candidate"] for r in mine) == [0, 1]
        assert [r["pivot"] for r in sorted(mine, key=lambda r: r["candidate"])] == [True, False]
        worst = max(max(r["latent_rel_l2"], r["x0_rel_l2"]) for r in mine)
        if label == "exact extras":
            assert worst < 1e-4, (label, worst)
            assert all(r["psnr_db"] > 40 for r in mine)
        else:
            assert worst > 1e-5, (label, worst)
            assert all(math.isfinite(r["latent_rel_l2"]) and r["psnr_db"] > 0 for r in mine)


def test_fidelity_summary_separates_pivot_and_others(fidelity_result):
    rows = fidelity.summarize(fidelity_result)
    assert len(rows) == len(fidelity.settings_for(TINY["tiny"]))
    for row in rows:
        assert row["n"] == 2 and row["prompts"] == 1
        for key in ("latent_rel_l2", "x0_rel_l2", "image_mse"):
            v = row[key]
            assert v["others"] is not None
            assert v["worst"] >= max(v["pivot"], v["others"])
    reuse = next(r for r in rows if r["setting"] == "reuse only")
    # Batch reuse broadcasts the pivot's own maps: the pivot moves by rounding only.
    assert reuse["latent_rel_l2"]["pivot"] < 1e-4 < reuse["latent_rel_l2"]["others"]
    assert fidelity.modes_string(TINY["tiny"], 4) == "RCX"


def test_latency_loop_times_two_rows(cloud_runner):
    rows = [latency.Row("vanilla OG", "vanilla-og", 2, 3, None, "t"),
            latency.Row("ObCLIP", "obclip", 2, 2, AccelerationConfig.none(2), "t")]
    size = cloud_runner.model.default_image_size
    out = latency.measure(cloud_runner, rows, steps=3, size=size, repeats=1, warmup=0)
    assert [r["label"] for r in out] == ["vanilla OG", "ObCLIP"]
    for r in out:
        assert len(r["times_s"]) == 1 and r["median_s"] > 0
        assert r["speedup_vs_obclip"] > 0 and r["speedup_vs_vanilla"] > 0
        assert r["paper_v100_s"] is None  # T=3 is not the paper's T
    assert out[0]["speedup_vs_vanilla"] == 1.0 and out[1]["speedup_vs_obclip"] == 1.0


def test_latency_rows_share_baselines_and_candidates_are_distinct():
    rows = latency.build_rows(["paper-k5", "paper-k10"], [2, 4, 6], 25)
    assert len(rows) == 2 * (2 + 3 * 5)
    # vanilla OG and cloud-only requests do not depend on the preset: measured once.
    assert len({r.key for r in rows}) == 1 + 2 + 3 + 2 * 3 * 4  # cloud-only, hybrid per k, vanilla per N, ObCLIP
    for n in (1, 2, 4, 6):
        c = latency.candidates(n)
        assert len(c) == len(set(c)) == n
    paper = {(r.group, r.label, r.n): latency.PAPER_V100_S.get(
        (r.label if r.method == "obclip" else r.method, r.n, None if r.k == 25 else r.k)) for r in rows}
    assert paper[("paper-k10", "+ cache + reuse", 6)] == 1.55 and paper[("paper-k5", "vanilla OG", 4)] == 5.01


def test_latency_cuda_fails_cleanly_without_a_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert latency.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert latency.main(["--model", "sd-v1.4"]) == 2


def test_latency_flags_a_time_ratio_above_its_flops_ratio():
    # ObCLIP (k=2) sleeps 200 ms, the accelerated row 20 ms: a 10x time ratio, wide enough that a
    # loaded machine's scheduling delay (tens of ms) cannot bring it under the 3x asserted.
    class SleepyRunner:
        def run(self, request):
            time.sleep(0.02 if request.acceleration.attention_cache else 0.2)

    plain = latency.Row("ObCLIP", "obclip", 2, 2, AccelerationConfig.none(2), "t")
    fast = latency.Row("+ cache", "obclip", 2, 2, AccelerationConfig(2, 1, 2), "t")
    for flops_fast, noise in ((50.0, True), (5.0, False)):  # FLOPs ratio 2x: noise; 20x: plausible
        out = latency.measure(SleepyRunner(), [plain, fast], steps=3, size=64, repeats=3, warmup=0,
                              flops={plain.key: 100.0, fast.key: flops_fast})
        row = out[1]
        assert row["flops_ratio_vs_obclip"] == 100.0 / flops_fast
        assert row["speedup_vs_obclip"] > 3 and row["noise"] is noise
        assert out[0]["noise"] is False


def test_latency_counts_each_rows_flops(tmp_path):
    counter = latency.flops_counter()
    plain = latency.Row("ObCLIP", "obclip", 2, 2, AccelerationConfig.none(2), "t")
    cached = latency.Row("+ cache", "obclip", 2, 2, AccelerationConfig(2, 1, 1), "t")
    a, b = (latency.row_flops(counter, "mini-small", r, 3) for r in (plain, cached))
    assert a > b > 0


def test_latency_counts_flops_at_the_timed_size_for_the_config_a_model_folder_names(tmp_path):
    plain = latency.Row("ObCLIP", "obclip", 2, 2, AccelerationConfig.none(2), "t")
    native, half = (latency.row_flops(latency.flops_counter(size), "mini-small", plain, 3) for size in (None, 8))
    assert half < native / 3   # mini's native latent is 16: a quarter of the pixels
    assert latency.counted_config("mini", None) == "mini"
    folder = tmp_path / "model"
    folder.mkdir()
    assert latency.counted_config("mini", str(folder)) is None          # names nothing: no FLOPs column
    (folder / "obclip_model.json").write_text('{"spec": "sd-v1.4-narrow", "seed": 0, "weights": "random"}')
    assert latency.counted_config("mini", str(folder)) == "sd-v1.4-narrow"
    (folder / "obclip_model.json").write_text('{"schema": "shapes"}')  # a trained model: no spec
    assert latency.counted_config("mini", str(folder)) is None


def test_latency_without_baselines_keeps_only_the_obclip_rows():
    rows = latency.build_rows(["paper-k5"], [2, 4], 25, baselines=False)
    assert {r.method for r in rows} == {"obclip"} and len(rows) == 2 * 4


def test_latency_times_both_backends_side_by_side(cloud_runner):
    """Two runners (here: two torch runners under different names, the onnxruntime one needs an export)
    are timed in the same rounds, each row once per backend, with the ratio to the torch row."""
    from obclip.cloud.steps import CloudStepRunner

    rows = [latency.Row("ObCLIP", "obclip", 2, 2, AccelerationConfig.none(2), "t")]
    size = cloud_runner.model.default_image_size
    other = CloudStepRunner(cloud_runner.model)
    out = latency.measure({"torch": cloud_runner, "onnxruntime": other}, rows, steps=3, size=size, repeats=2,
                          warmup=0)
    assert [(r["backend"], r["label"]) for r in out] == [("torch", "ObCLIP"), ("onnxruntime", "ObCLIP")]
    assert out[0]["speedup_vs_torch"] is None
    assert out[1]["speedup_vs_torch"] == pytest.approx(out[0]["median_s"] / out[1]["median_s"])
    assert all(len(r["times_s"]) == 2 for r in out)


def test_latency_onnxruntime_needs_engines(capsys):
    assert latency.main(["--backend", "onnxruntime"]) == 2
    assert "--engines" in capsys.readouterr().err


def test_fidelity_new_options_are_opt_in_and_only_where_valid():
    from obclip.runtime.plan import preset

    base = [label for label, _ in fidelity.settings_for(preset("paper-k10"))]
    extra = dict(fidelity.settings_for(preset("paper-k10"), new_options=True))
    assert set(extra) - set(base) == {label for label, _ in fidelity.NEW_OPTIONS}
    assert extra["preset pivot=1 + merge"].pivot_only_steps == 1
    # k=3, r=1: no room for a pivot-only step before r
    tiny = [label for label, _ in fidelity.settings_for(TINY["tiny"], new_options=True)]
    assert "preset pivot=1 + merge" not in tiny and "preset frozen=skip" in tiny
