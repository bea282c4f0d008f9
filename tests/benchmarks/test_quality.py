"""Smoke test of benchmarks/quality.py on the small random pair: 2 prompts, a few methods, T = 4-6 (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from obclip.runtime.plan import AccelerationConfig

from helpers import load_benchmark

quality = load_benchmark("quality")

# k=2 on T=4: one batch-reuse step (r=1), then cache+skip (s=1), two device steps.
TINY = {2: AccelerationConfig(switch_step=2, cache_step=1, skip_step=1)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _in_unit(acc):
    return acc is not None and set(acc) == {"colour", "shape", "both"} and all(0.0 <= v <= 1.0 for v in acc.values())


def test_default_methods_are_the_table_rows():
    keys = [m.key for m in quality.default_methods()]
    assert keys == ["cloud-only", "device-only", "hybrid-k5", "hybrid-k10", "obclip-k5", "obclip-k10",
                    "obclip-k5-paper", "obclip-k10-paper", "obclip-k5-cache", "obclip-k10-cache"]
    m = {m.key: m for m in quality.default_methods()}
    assert m["obclip-k10-paper"].acceleration.batch_reuse and not m["obclip-k10-cache"].acceleration.batch_reuse
    assert m["obclip-k5"].acceleration is None  # exact


def _check_intervals(rows, records, attrs):
    """Every accuracy has its Wilson interval, computed from the kept per-prompt hits."""
    from mini.analyser import analyse
    from mini.stats import wilson_interval

    for key, rec in zip(list(rows)[1:], records):
        row = rows[key]
        got = [analyse(im) for im in rec["images"]]
        colour = [g.colour == a.colour for g, a in zip(got, attrs)]
        shape = [g.shape == a.shape for g, a in zip(got, attrs)]
        both = [c and s for c, s in zip(colour, shape)]
        assert row["hits"] == {"colour": colour, "shape": shape, "both": both}
        for name, hits in row["hits"].items():
            assert row["accuracy"][name] == sum(hits) / 2
            assert row["accuracy_ci"][name] == pytest.approx(list(wilson_interval(sum(hits), 2)))
    assert "reference" not in rows["device-only"]
    # Hybrid is paired against cloud-only (not run here); the accelerated ObCLIP row against exact ObCLIP.
    assert rows["hybrid-k2"]["reference"] is None and rows["hybrid-k2"]["vs_reference"] is None
    assert rows["obclip-k2-paper"]["reference"] is None  # obclip-k2 (exact) not run in this test


def test_paired_reference_rows():
    specs = quality.default_methods(TINY)
    ref = {m.key: quality.stats.reference_key(m, specs) for m in specs}
    assert ref["obclip-k2-paper"] == ref["obclip-k2-cache"] == "obclip-k2"
    assert ref["obclip-k2"] == ref["hybrid-k2"] == "cloud-only"
    assert ref["cloud-only"] is None and ref["device-only"] is None


def test_summary_pairs_against_the_reference():
    """Hand-built records: hits, Wilson intervals and the paired bootstrap of 'both' against the reference."""
    from mini.stats import paired_bootstrap, wilson_interval

    captions, attrs, renders = quality.heldout_prompts(4)
    blank = np.full_like(renders[0], 255)
    specs = {m.key: m for m in quality.default_methods(TINY)}

    def rec(key, images):
        return {"spec": specs[key], "steps": 4, "images": np.stack(images), "seconds": [0.1] * 4,
                "cloud_seconds": [0.0] * 4, "real_index": [1] * 4, "n_candidates": [18] * 4}

    cloud = rec("cloud-only", list(renders))                       # all right
    exact = rec("obclip-k2", [renders[0], renders[1], renders[2], blank])  # 3 of 4
    again = rec("obclip-k2-paper", list(exact["images"]))          # identical to the exact run
    summary = quality.stats.summarize([cloud, exact, again], attrs, renders, renders)
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["obclip-k2"]["accuracy"]["both"] == 0.75
    assert rows["obclip-k2"]["accuracy_ci"]["both"] == pytest.approx(list(wilson_interval(3, 4)))
    assert rows["obclip-k2"]["reference"] == "cloud-only"
    d = rows["obclip-k2"]["vs_reference"]
    want = paired_bootstrap([1, 1, 1, 0], [1, 1, 1, 1], resamples=quality.stats.BOOTSTRAP_RESAMPLES)
    assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((want.diff, want.lo, want.hi)) and d["diff"] == -0.25
    same = rows["obclip-k2-paper"]["vs_reference"]
    assert rows["obclip-k2-paper"]["reference"] == "obclip-k2" and same["diff"] == same["lo"] == same["hi"] == 0
    res = summary["resolution"]
    assert res["n"] == 4 and res["paired_interval_width"][0] == 0.0


def test_quality_loop_summary_and_files(cloud_runner, device_pipeline, tmp_path):
    captions, attrs, renders = quality.heldout_prompts(2)
    reference = quality.reference_renders(2)
    methods = [m for m in quality.default_methods(TINY) if m.key in ("device-only", "hybrid-k2", "obclip-k2-paper")]
    assert len(methods) == 3
    records = quality.run_methods(cloud_runner.handle, device_pipeline, methods, captions, steps=4,
                                  all_candidates=True)
    assert [r["spec"].key for r in records] == ["device-only", "hybrid-k2", "obclip-k2-paper"]
    for r in records:
        assert r["images"].shape == (2, 64, 64, 3) and r["images"].dtype == np.uint8
        assert len(r["seconds"]) == 2
    ob = records[2]
    assert ob["n_candidates"] == [18, 18]  # every caption names a colour and a shape: 6 x 3
    assert len(ob["candidates"]) == 2 and ob["candidates"][0]["images"].shape == (18, 64, 64, 3)
    # The real candidate's image is the one generate() returned.
    i = ob["real_index"][0]
    assert np.array_equal(ob["candidates"][0]["images"][i], ob["images"][0])

    # Same seed, same method: the same image.
    again = quality.run_methods(cloud_runner.handle, device_pipeline, methods[:1], captions[:1], steps=4)
    assert np.array_equal(again[0]["images"][0], records[0]["images"][0])

    summary = quality.stats.summarize(records, attrs, renders, reference)
    rows = {r["key"]: r for r in summary["rows"]}
    assert list(rows) == ["real", "device-only", "hybrid-k2", "obclip-k2-paper"]
    assert rows["real"]["accuracy"]["both"] == 1.0  # the analyser reads the renders back
    for r in rows.values():
        assert _in_unit(r["accuracy"]) and r["mmd2"] is not None
    assert rows["device-only"]["k"] == 0 and rows["hybrid-k2"]["k"] == 2
    _check_intervals(rows, records, attrs)

    (split,) = summary["pivot_split"]
    assert split["key"] == "obclip-k2-paper" and split["batch_reuse"]
    by = split["by_real_index"]
    assert by["pivot"]["prompts"] + by["others"]["prompts"] == 2
    for part in by.values():
        assert part["accuracy"] is None if part["prompts"] == 0 else _in_unit(part["accuracy"])
    ac = split["all_candidates"]
    assert len(ac["per_index"]) == 18 and ac["pivot"]["images"] == 2 and ac["others"]["images"] == 34
    assert _in_unit(ac["pivot"]["accuracy"]) and _in_unit(ac["others"]["accuracy"])
    assert ac["pivot_assignment"] == {"colour": "red", "shape": "circle"}

    meta = {"cloud_model": "c", "device_model": "d", "engines": "e", "cloud_weights": "random",
            "device_weights": "random", "warning": "random weights", "T": 4, "guidance": 7.5, "prompts": 2,
            "seed": quality.SEED, "schema": "shapes", "n_candidates": 18, "threads": 1,
            "machine": "test", **quality.DATA_SOURCES}
    paths = quality.report.write_outputs(tmp_path / "q", summary, meta, records, captions, attrs, renders)
    md = paths["markdown"].read_text()
    assert ("| method | k | accel | colour % [95% CI] | shape % [95% CI] | both % [95% CI] | Δ both vs ref "
            "[95% CI] | MMD² | seconds/image |") in md
    assert "Sample: n = 2 prompts per row" in md and "What n = 2 resolves" in md
    assert "WARNING" in md and "real = pivot" in md and md.count("\n| ObCLIP |") == 2
    doc = json.loads(paths["json"].read_text())
    assert len(doc["per_prompt"]) == 2 and set(doc["per_prompt"][0]["methods"]) == {m.key for m in methods}
    from PIL import Image

    with Image.open(paths["grid"]) as im:
        assert im.format == "PNG" and im.width > 2 * 128 and im.height > 4 * 128


def test_cli_json(model_dirs, engines_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = quality.main(["--cloud-model", str(model_dirs[0]), "--device-model", str(model_dirs[1]),
                       "--engines", str(engines_dir), "--prompts", "2", "--steps", "5",
                       "--methods", "device-only", "obclip-k5-paper", "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["T"] == 5 and doc["meta"]["n_candidates"] == 18 and doc["meta"]["pivot"] == "red circle"
    assert doc["meta"]["cloud_weights"] == "random" and "RANDOM" in doc["meta"]["warning"]
    assert [r["key"] for r in doc["rows"]] == ["real", "device-only", "obclip-k5-paper"]
    assert doc["pivot_split"][0]["key"] == "obclip-k5-paper" and "all_candidates" not in doc["pivot_split"][0]
    assert {p.name for p in out.iterdir()} == {"quality.md", "quality.json", "quality_grid.png"}
    # A switch point above T is refused before any work.
    assert quality.main(["--steps", "4", "--methods", "hybrid-k5", "--out", str(out)]) == 2


# --------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------


def test_sweep_grid_expands_and_skips_invalid_combinations():
    doc = [{"name": "exact", "acceleration": None},
           {"name": "tiny", "acceleration": TINY[2].to_dict()},
           {"name": "same-as-exact", "acceleration": AccelerationConfig.none(2).to_dict()},
           {"name": "future", "acceleration": {"cache_step": 1, "skip_step": 1, "no_such_option_yet": True}},
           {"name": "g", "base": {"cache_step": 1, "skip_step": 1},
            "grid": {"cache_step": [1, 2], "skip_step": [1, 2], "skip_variant": ["faster-diffusion", "deepcache"]}}]
    configs, skipped = quality.expand_sweep(doc, k=2)
    names = [c.name for c in configs]
    assert names[0] == "exact" and configs[0].is_exact and configs[0].aliases == ("same-as-exact",)
    # 2 x 2 x 2 combinations; r=2 > s=1 is refused by AccelerationConfig (both variants); r=s=1 faster-diffusion
    # is the "tiny" entry already, so it is an alias, not a second run.
    assert names == ["exact", "tiny", "g[cache_step=1,skip_step=1,skip_variant=deepcache]",
                     "g[cache_step=1,skip_step=2,skip_variant=faster-diffusion]",
                     "g[cache_step=1,skip_step=2,skip_variant=deepcache]",
                     "g[cache_step=2,skip_step=2,skip_variant=faster-diffusion]",
                     "g[cache_step=2,skip_step=2,skip_variant=deepcache]"]
    assert configs[1].aliases == ("g[cache_step=1,skip_step=1,skip_variant=faster-diffusion]",)
    assert configs[2].acceleration.skip_variant.value == "deepcache" and configs[2].acceleration.switch_step == 2
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert set(reasons) == {"future", "g[cache_step=2,skip_step=1,skip_variant=faster-diffusion]",
                            "g[cache_step=2,skip_step=1,skip_variant=deepcache]"}
    assert "no_such_option_yet" in reasons["future"] and "r <= skip point s" in reasons[
        "g[cache_step=2,skip_step=1,skip_variant=deepcache]"]
    # Another switch point than the sweep's is skipped, not silently changed.
    _, skipped = quality.expand_sweep([{"name": "k5", "acceleration": {"switch_step": 5, "cache_step": 3,
                                                                       "skip_step": 3}}], k=2)
    assert "--sweep-k" in skipped[0]["reason"]
    # A file may be one grid object; the exact run is added anyway.
    configs, skipped = quality.expand_sweep({"base": {"cache_step": 1}, "grid": {"skip_step": [0, 1]}}, k=2)
    assert [c.name for c in configs] == ["exact", "skip_step=1"] and "r <= skip point s" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="used twice"):
        quality.expand_sweep([{"name": "a", "acceleration": None}, {"name": "a", "acceleration": None}], k=2)


def test_default_sweep_files():
    from obclip.runtime.plan import preset

    sweeps = quality.REPO_ROOT / "benchmarks" / "sweeps"
    configs, skipped = quality.load_sweep(sweeps / "issue16.json", k=10)
    by = {c.name: c for c in configs}
    assert configs[0].is_exact and not skipped
    assert by["paper-k10"].acceleration == preset("paper-k10")
    # lean-k10 is the configuration the sweep measured (docs/sweep/), not a lookalike
    assert by["stacked[skip_variant=deepcache,frozen_guidance=cached]"].acceleration == preset("lean-k10")
    other = by["paper-k10-deepcache-noreuse-exactextras"].acceleration
    assert other == preset("paper-k10").replace(skip_variant="deepcache", batch_reuse=False, cross_kv_once=True,
                                                merge_step0_uncond=True)
    stacked = {(c.acceleration.skip_variant.value, c.acceleration.frozen_guidance.value) for c in configs
               if c.name.startswith("stacked[")}
    assert stacked == {(v, f) for v in ("deepcache", "deepcache-shallow") for f in ("off", "skip", "cached")}
    assert all(c.acceleration.pivot_only_steps == 1 for c in configs if c.name.startswith("stacked["))

    configs, skipped = quality.load_sweep(sweeps / "grid-k10.json", k=10)
    grid = [c for c in configs if c.name.startswith("grid[")]
    rs = {(c.acceleration.cache_step, c.acceleration.skip_step, c.acceleration.skip_variant.value) for c in grid}
    want = {(r, s, v) for r in range(2, 6) for s in range(r, 9) for v in ("faster-diffusion", "deepcache")}
    assert rs == want
    assert len(skipped) == 2 * 4 * 7 - len(want) and all("r <= skip point s" in s["reason"] for s in skipped)


def test_pareto_front():
    assert quality.stats.pareto_front([(10, 0.5), (5, 0.5), (5, 0.4), (1, 0.1), (20, 0.9), (20, 0.8)]) == [
        False, True, False, True, True, False]


def _fake_cost(config):
    """Stand-in for the meta-device FLOPs count (seconds per count): cheaper steps for cheaper modes."""
    from obclip.runtime.plan import make_plan

    price = {"full": 1.0, "reuse": 0.9, "cache": 0.8, "skip": 0.5, "cache+skip": 0.4}
    modes = [s.mode.value for s in make_plan(config.switch_step + 2, config.switch_step, config).cloud_steps]
    return {"paper_tmacs": sum(price[m] for m in modes), "tflops": 0.0, "modes": modes}


def test_sweep_run_front_and_files(cloud_runner, device_pipeline, tmp_path):
    captions, attrs, _ = quality.heldout_prompts(2)
    configs, skipped = quality.expand_sweep(
        [{"name": "exact", "acceleration": None}, {"name": "tiny", "acceleration": TINY[2].to_dict()},
         {"name": "g", "base": {}, "grid": {"cache_step": [1, 2], "skip_step": [2]}}], k=2)
    assert [c.name for c in configs] == ["exact", "tiny", "g[cache_step=1,skip_step=2]", "g[cache_step=2,skip_step=2]"]
    partial = []
    result = quality.run_sweep(cloud_runner.handle, device_pipeline, configs[:2], captions, attrs, k=2, steps=4,
                               cost=_fake_cost, checkpoint=partial.append)
    assert [len(p["configs"]) for p in partial] == [1, 2]
    rows = {r["name"]: r for r in result["configs"]}
    assert list(rows) == ["exact", "tiny"]
    ex = rows["exact"]
    assert ex["exact"] and ex["acceleration"] is None and ex["paper_tmacs"] == 2.0
    # The exact run against itself: no difference, no loss.
    d = ex["vs_exact_non_pivot"]
    assert d["diff"] == d["lo"] == d["hi"] == 0.0 and d["loss_upper95"] == 0.0 and ex["mmd2_vs_exact"] is None
    from mini.stats import wilson_interval

    for r in rows.values():
        assert len(r["hits"]) == 2 and all(len(h) == 18 for h in r["hits"])
        pivot = [h[0] for h in r["hits"]]
        others = [x for h in r["hits"] for x in h[1:]]
        assert r["pivot"]["images"] == 2 and r["pivot"]["accuracy"] == sum(pivot) / 2
        assert r["pivot"]["ci"] == pytest.approx(list(wilson_interval(sum(pivot), 2)))
        assert r["non_pivot"]["images"] == 34 and r["non_pivot"]["accuracy"] == pytest.approx(sum(others) / 34)
        assert r["non_pivot"]["ci_wilson_images"] == pytest.approx(list(wilson_interval(sum(others), 34)))
        lo, hi = r["non_pivot"]["ci"]
        assert 0.0 <= lo <= r["non_pivot"]["accuracy"] <= hi <= 1.0
        assert r["mmd2_renders"] is not None and (r["exact"] or r["mmd2_vs_exact"] is not None)
        d = r["vs_exact_non_pivot"]
        assert d["diff"] == pytest.approx(r["non_pivot"]["accuracy"] - ex["non_pivot"]["accuracy"])
        assert d["lo"] <= d["diff"] <= d["hi"] and d["loss_upper95"] >= max(0.0, -d["diff"]) - 1e-12
    front = quality.stats.pareto_front([(r["paper_tmacs"], r["non_pivot"]["accuracy"]) for r in rows.values()])
    assert [r["pareto"] for r in rows.values()] == front and any(front)
    assert rows["tiny"]["paper_tmacs"] < ex["paper_tmacs"]

    meta = {"cloud_model": "c", "device_model": "d", "cloud_weights": "random", "device_weights": "random",
            "warning": "random weights", "T": 4, "guidance": 7.5, "seed": quality.SEED, "schema": "shapes",
            **quality.DATA_SOURCES}
    result["skipped"] = [{"name": "x", "reason": "because"}]
    paths = quality.report.write_sweep(tmp_path / "s", result, meta)
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"sweep.md", "sweep.json", "sweep.png"}
    md = paths["markdown"].read_text()
    assert "WARNING" in md and "| configuration |" in md and md.count("●") == sum(front)
    assert "- `x`: because" in md and "2 x 17 = 34" in md
    doc = json.loads(paths["json"].read_text())
    assert [r["name"] for r in doc["configs"]] == list(rows) and doc["cost"]["N"] == 6
    from PIL import Image

    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG"


def test_sweep_cost_is_the_flops_benchmarks():
    """The exact k=10 run costs what the paper's unaccelerated ObCLIP row does (N=6, T=25); presets less."""
    counter = quality.flops_counter()
    exact = quality.server_cost(counter, AccelerationConfig.none(10))
    assert exact["paper_tmacs"] == pytest.approx(44.46, rel=0.01) and exact["modes"] == ["full"] * 10
    from obclip.runtime.plan import preset

    assert quality.server_cost(counter, preset("paper-k10"))["paper_tmacs"] < exact["paper_tmacs"]


def test_cli_sweep(model_dirs, engines_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"name": "exact", "acceleration": None},
                                 {"name": "tiny", "acceleration": {"cache_step": 1, "skip_step": 1}},
                                 {"name": "bad", "acceleration": {"cache_step": 2, "skip_step": 1}}]))
    args = ["--cloud-model", str(model_dirs[0]), "--device-model", str(model_dirs[1]), "--engines",
            str(engines_dir), "--prompts", "2", "--steps", "3", "--sweep", str(sweep), "--sweep-k", "2",
            "--out", str(out)]
    assert quality.main(args + ["--sweep-list"]) == 0
    err = capsys.readouterr().err
    assert "skip bad: need cache point r <= skip point s" in err and "2 configurations" in err
    assert not out.exists()
    assert quality.main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["configs"]] == ["exact", "tiny"] and doc["meta"]["T"] == 3
    assert [s["name"] for s in doc["skipped"]] == ["bad"] and not doc["meta"].get("partial")
    assert {p.name for p in out.iterdir()} == {"sweep.md", "sweep.json", "sweep.png"}
    assert quality.main(args[:-4] + ["--sweep-k", "5", "--out", str(out)]) == 2  # T = 3 < k = 5
