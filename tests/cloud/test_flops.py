"""FLOPs counting (cloud/flops.py) and a smoke run of benchmarks/flops.py.

Full-size UNets run on the meta device: shapes only, a pass in well under a
second, no memory.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import flop_registry

from obclip.cloud.flops import EXTRA_FORMULAS, FlopBreakdown, FlopCounter, count_flops, meta_unet, unet_pass_flops
from obclip.runtime.plan import PRESETS, AccelerationConfig, make_plan

from helpers import load_benchmark


def _close(ours, ref, tol):
    return abs(ours / ref - 1) <= tol


# --- the counter against the numbers measured before -------------------------------

def test_sd14_pass_reproduces_the_reference_counts():
    f = unet_pass_flops("sd-v1.4")  # 512 px: latent 4x64x64, text 77x768, batch 1
    assert _close(f.paper_macs, 370.5e9, 0.005), f.paper_macs / 1e9
    assert _close(f.macs, 401.6e9, 0.005), f.macs / 1e9
    assert _close(f.no_attention_macs, 338.6e9, 0.005), f.no_attention_macs / 1e9
    assert f.flops == 2 * f.macs and f.other == 0
    # Op classes: 1x1 proj convs and resnets are conv, the attention projections and
    # feed-forwards linear, the two attention matmuls attention.
    assert f.conv > 0 and f.linear > 0 and f.attention > 0
    assert set(f.by_op) == {"aten.convolution", "aten.mm", "aten.addmm", "aten.bmm"}


def test_bk_sdm_small_no_attention_count():
    f = unet_pass_flops("bk-sdm-small")
    assert _close(f.no_attention_macs, 217.7e9, 0.005), f.no_attention_macs / 1e9


def test_batch_scales_linearly():
    one, three = unet_pass_flops("mini", batch=1), unet_pass_flops("mini", batch=3)
    assert three == one * 3


# --- SDPA ------------------------------------------------------------------------

def _attention_pair(device="cpu"):
    q = torch.randn(2, 4, 10, 8, device=device)
    k = torch.randn(2, 4, 7, 8, device=device)
    v = torch.randn(2, 4, 7, 6, device=device)

    def explicit():
        return torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v

    return (lambda: F.scaled_dot_product_attention(q, k, v)), explicit


@pytest.mark.parametrize("where", ["cpu", "meta", "fake"])
def test_sdpa_is_counted_like_its_two_matmuls(where):
    expected = 2 * (2 * 4 * 10 * 7 * 8) + 2 * (2 * 4 * 10 * 7 * 6)
    if where == "fake":
        with FakeTensorMode():
            sdpa, explicit = _attention_pair()
            _, a = count_flops(sdpa)
            _, b = count_flops(explicit)
    else:
        sdpa, explicit = _attention_pair(where)
        _, a = count_flops(sdpa)
        _, b = count_flops(explicit)
    assert a.attention == b.attention == expected
    assert a.flops == b.flops == expected


def test_sdpa_formula_is_local_to_the_counter():
    # The CPU kernel (real tensors and FakeTensorMode) has no formula in torch;
    # ours goes in through custom_mapping, the global registry stays as it was.
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert op in EXTRA_FORMULAS and op not in flop_registry
    sdpa, _ = _attention_pair()
    count_flops(sdpa)
    assert op not in flop_registry


# --- the ways of running agree --------------------------------------------------------

def test_real_meta_and_fake_unet_passes_count_the_same():
    from obclip.cloud.models import build_unet

    torch.manual_seed(0)
    real = build_unet("mini").eval()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny pass; spare the shared cores the thread pool's waits
    try:
        with torch.no_grad():
            _, on_cpu = count_flops(real, x, torch.tensor(10), encoder_hidden_states=text)
    finally:
        torch.set_num_threads(threads)
    on_meta = unet_pass_flops("mini", batch=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        fake = build_unet("mini").eval()
        _, faked = count_flops(fake, mode.from_tensor(x), torch.tensor(10),
                               encoder_hidden_states=mode.from_tensor(text))
    assert on_cpu == on_meta == faked
    assert on_cpu.attention > 0


def test_speedups_do_not_change_counts():
    """Shape-only shortcuts and skipping per-module attribution are exact."""
    from obclip.cloud.flops import step_flops
    from obclip.cloud.step_modes import ModeInputs

    unet = meta_unet("mini-small")
    assert unet_pass_flops(unet, batch=2) == unet_pass_flops(unet, batch=2, shortcuts=False, per_module=True)
    # An accelerated request too (index, softmax, cat, expand...), step by step.
    n, dev = 3, torch.device("meta")
    cond, uncond = torch.empty(n, 77, 64, device=dev), torch.empty(1, 77, 64, device=dev)
    x, t = torch.empty(n, 4, 16, 16, device=dev), torch.tensor(10, device=dev)
    inputs = ModeInputs(x=x, timestep=t, text=torch.cat([uncond, cond]), guidance_scale=7.5, sizes=(n,),
                        alignment=(None,))
    cfg = AccelerationConfig(4, 2, 3, cross_kv_once=True, merge_step0_uncond=True)
    runs = []
    for fast in (True, False):
        steps = make_plan(10, 4, cfg).cloud_steps
        runs.append([b for _, b in step_flops(unet, cfg, steps, inputs, shortcuts=fast, per_module=not fast)])
    assert runs[0] == runs[1]
    assert len({c.flops for c in runs[0]}) == 4  # merged-reuse step 0, reuse, cache, cache+skip


def test_per_module_table_is_available():
    unet, dev = meta_unet("mini"), torch.device("meta")
    with torch.no_grad(), FlopCounter(per_module=True) as fc:
        unet(torch.empty(1, 4, 16, 16, device=dev), torch.tensor(10, device=dev),
             encoder_hidden_states=torch.empty(1, 77, 64, device=dev))
    counts = fc.per_module_counts
    assert sum(counts["Global"].values()) == fc.breakdown.flops
    assert any(name.endswith("attn1") for name in counts)


# --- the breakdown's conventions ---------------------------------------------------------

def test_breakdown_conventions_and_arithmetic():
    a = FlopBreakdown(conv=100, linear=40, attention=20, other=0)
    assert a.flops == 160 and a.macs == 80
    assert a.no_attention_macs == 70
    assert a.attention_macs == 10
    assert a.paper_macs == 70 + 5  # conv + linear + one of the two (equal) attention matmuls
    b = FlopBreakdown(conv=2, linear=2, attention=4, other=2)
    assert (a + b).flops == 170 and sum([a, b]) == a + b
    assert (a * 3).paper_macs == 3 * a.paper_macs and 3 * a == a * 3


# --- the benchmark ----------------------------------------------------------------------

def test_benchmark_unaccelerated_rows_match_the_paper():
    bench = load_benchmark("flops")
    result = bench.compute("sd-v1.4", devices=("bk-sdm-small",), presets=("paper-k5",), ns=(4,),
                           variants=("obclip",))
    assert result["problems"] == []
    rows = {r["key"]: r for r in result["blocks"][0]["rows"]}
    for key in ("cloud_only", "hybrid", "vanilla_og", "obclip"):
        r = rows[key]
        assert r["paper_T"] is not None and abs(r["ratio"] - 1) <= 0.01, (key, r)
        assert r["check"] == "ok"
    # Device rows use BK-SDM's no-attention convention: 20 steps x 2 rows x 217.7 G.
    assert _close(rows["device:bk-sdm-small"]["paper_macs_T"], 20 * 2 * 0.2177, 0.01)
    assert result["per_pass"]["sd-v1.4"]["ratio"] == pytest.approx(1, abs=0.005)
    text = bench.format_table(result)
    assert "ObCLIP, no acceleration" in text and "MAC(paper)" in text and "FLOP(all)" in text


def test_benchmark_json_lists_every_named_preset_and_n(capsys):
    bench = load_benchmark("flops")
    assert bench.main(["--json", "--n", "6", "--devices", "bk-sdm-small"]) == 0
    out = json.loads(capsys.readouterr().out)
    entries = {(e["preset"], e["n"]): e for e in out["presets"]}
    assert set(entries) == {(name, 6) for name in PRESETS}
    paper_k10 = entries[("paper-k10", 6)]
    assert paper_k10["k"] == 10 and paper_k10["paper_tmacs"] == pytest.approx(33.57, abs=0.01)
    # The same number as the table's "+ cache + reuse (paper preset)" row.
    block = next(b for b in out["blocks"] if b["preset"] == "paper-k10" and b["N"] == 6)
    row = next(r for r in block["rows"] if r["key"] == "cache_reuse")
    assert paper_k10["paper_tmacs"] == pytest.approx(row["paper_macs_T"])
    # lean-k10: the goal, at most 2.5x Hybrid SD's server cost (18.5 T at N = 6, k = 10)
    lean = entries[("lean-k10", 6)]
    assert lean["k"] == 10 and lean["paper_tmacs"] == pytest.approx(17.81, abs=0.01)
    assert lean["paper_tmacs"] <= 2.5 * lean["hybrid_sd_paper_tmacs"]


def test_benchmark_memo_agrees_with_running_every_step():
    """Counting each (mode, N, step 0) once equals counting every step of every plan."""
    bench = load_benchmark("flops")
    preset = AccelerationConfig(4, 2, 3)  # (reuse | full) x 2, cache, cache+skip
    # "cache": step 1 has step 0's key and is not run; "exact": step 0 is its own key.
    variants = ("cache", "exact")
    totals = []
    for exhaustive in (False, True):
        counter = bench.StepCounter(exhaustive=exhaustive)
        per_variant = []
        for v in variants:
            setup, costs = counter.plan_steps("mini-small", 3, bench.variant_config(v, preset), 10)
            per_variant.append((setup, [b for _, b in costs]))
        totals.append((per_variant, counter.passes))
    (memo, memo_passes), (every, every_passes) = totals
    assert memo == every
    assert (memo_passes, every_passes) == (3 + 4, 4 + 4)


def _config_costs(bench, *configs, n=3, model="mini"):
    """Per-step paper MACs (G) and total (T) of each config, counted by the benchmark on a meta UNet."""
    result = bench.compute(model, devices=(), presets=(), ns=(n,), num_steps=10,
                           configs=[(str(i), c) for i, c in enumerate(configs)])
    assert result["problems"] == []
    return [([s["paper_macs_G"] for s in e["steps"]], e["paper_tmacs"]) for e in result["configs"]]


def test_benchmark_counts_any_config_given_as_json(capsys):
    bench = load_benchmark("flops")
    label, config = bench.parse_config('k4={"switch_step": 4, "cache_step": 2, "skip_step": 3}')
    assert (label, config) == ("k4", AccelerationConfig(4, 2, 3))
    assert bench.parse_config('{"switch_step": 4, "cache_step": 2, "skip_step": 3}')[1] == config
    with pytest.raises(ValueError, match="unknown fields"):
        bench.parse_config('{"switch_step": 4, "cache_step": 2, "skip_step": 3, "fast": true}')
    assert bench.main(["--json", "--presets", "--cloud", "mini", "--devices", "mini-small", "--n", "3",
                       "--steps", "10", "--config", 'k4={"switch_step": 4, "cache_step": 2, "skip_step": 3}']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["presets"] == [] and [(e["label"], e["n"]) for e in out["configs"]] == [("k4", 3)]
    assert [s["spec"] for s in out["configs"][0]["steps"]] == ["reuse.wa.ws.fd"] * 2 + ["cache.ws.fd",
                                                                                         "cache-skip.fd"]


def test_a_reuse_refresh_costs_a_reuse_step():
    bench = load_benchmark("flops")
    base = AccelerationConfig(6, 2, 3, refresh_every=2)
    (full_steps, full_total), (reuse_steps, reuse_total) = _config_costs(bench, base,
                                                                         base.replace(refresh_mode="reuse"))
    assert reuse_steps[4] == reuse_steps[0] < full_steps[4]     # step 4 = r + 2: the refresh
    assert reuse_total < full_total
    assert reuse_steps[:4] + reuse_steps[5:] == full_steps[:4] + full_steps[5:]


def test_frozen_guidance_halves_the_frozen_steps():
    bench = load_benchmark("flops")
    base = AccelerationConfig(6, 2, 4)   # R R C C X X
    (plain, plain_total), (skip, _), (cached, cached_total) = _config_costs(
        bench, base, base.replace(frozen_guidance="skip"), base.replace(frozen_guidance="cached"))
    assert skip[:4] == plain[:4] and skip[4:] == [g / 2 for g in plain[4:]]
    assert cached[:2] == plain[:2] and cached[2:] == [g / 2 for g in plain[2:]]
    assert cached_total < plain_total


def test_pivot_only_steps_cost_one_candidate_and_the_merge_moves_to_step_p():
    bench = load_benchmark("flops")
    n = 3
    base = AccelerationConfig(6, 3, 4, merge_step0_uncond=True)      # R R R C X X
    (plain, plain_total), (pivot, pivot_total) = _config_costs(bench, base, base.replace(pivot_only_steps=1), n=n)
    one_candidate = bench.StepCounter().plain_step("mini", 1).paper_macs / 1e9
    assert pivot[0] == pytest.approx(one_candidate)
    assert pivot[1] == plain[0] < plain[2]               # step 1 is the merged one now
    assert pivot[2:] == plain[2:] and pivot_total < plain_total


def test_deepcache_shallowest_branch_is_the_cheapest_skip_step():
    bench = load_benchmark("flops")
    base = AccelerationConfig(4, 2, 2)   # R R X X
    (fd, _), (dc, _), (dcs, _) = _config_costs(bench, *(base.replace(skip_variant=v) for v in
                                                        ("faster-diffusion", "deepcache", "deepcache-shallow")))
    assert fd[:2] == dc[:2] == dcs[:2]       # the steps that fill the caches cost the same
    assert dcs[2] < dc[2] < fd[2] and dcs[3] == dcs[2]


@pytest.mark.parametrize("config", [
    # a full refresh after reuse steps projects every text's keys (the reuse steps projected the pivots')
    AccelerationConfig(8, 3, 4, cross_kv_once=True, refresh_every=2),
    AccelerationConfig(8, 3, 4, cross_kv_once=True, refresh_every=3, attention_cache=False),
    AccelerationConfig(8, 3, 4, cross_kv_once=True, merge_step0_uncond=True, pivot_only_steps=2, refresh_every=2,
                       refresh_mode="reuse", frozen_guidance="cached", skip_variant="deepcache-shallow"),
])
def test_benchmark_memo_holds_for_the_new_options_and_text_projections(config):
    bench = load_benchmark("flops")
    counted = [bench.StepCounter(exhaustive=e).plan_steps("mini-small", 3, config, 10) for e in (False, True)]
    assert counted[0] == counted[1]


@pytest.mark.parametrize("family, cloud, guided", [("sdxl", "sdxl-tiny", True), ("lcm-sdxl", "lcm-sdxl-tiny", False)])
def test_benchmark_counts_the_sdxl_family_through_run_mode(family, cloud, guided):
    """SDXL-family UNets with their added inputs: a FULL step through run_mode costs the plain UNet's
    (no problems), the accelerations save work, every row names its family, and LCM runs one row per
    prompt (no guidance rows)."""
    bench = load_benchmark("flops")
    table = {"k4": AccelerationConfig(4, 2, 3)}
    result = bench.compute(cloud, devices=("koala-700m-tiny",), presets=("k4",), ns=(3,), num_steps=8,
                           family=family, preset_table=table)
    assert result["problems"] == [] and result["settings"]["family"] == family
    rows = {r["key"]: r for r in result["blocks"][0]["rows"]}
    assert {r["family"] for r in rows.values()} == {family}
    assert rows["cache_reuse"]["paper_macs_T"] < rows["obclip"]["paper_macs_T"]
    assert rows["exact"]["paper_macs_T"] <= rows["cache_reuse"]["paper_macs_T"]
    counter = bench.StepCounter()
    one = counter.plain_step(cloud, 1).flops
    assert counter.plain_step(cloud, 2).flops == pytest.approx(2 * one, rel=0.01)
    unet_pass = result["per_pass"][cloud]["flops_G"] * 1e9
    assert unet_pass == pytest.approx(one / (2 if guided else 1))
