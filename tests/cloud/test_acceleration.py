"""Server-side acceleration: the plan's modes, and what each mode may and may not change.

Each acceleration is tested twice: it must really save work (FLOPs of the ops
that run, or blocks that do not run at all), and it must not change what it
must not (exact extras: nothing beyond float rounding; a cache read right
after the step that filled it: nothing at all).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from obclip.cloud.flops import EXTRA_FORMULAS
from obclip.cloud.models import build_unet
from obclip.cloud.modes import ModeSpec, mode_spec
from obclip.cloud.step_modes import MissingCacheError
from obclip.cloud.steps import CloudStepRunner
from obclip.cloud.torch_backend import guided_eps
from obclip.runtime.plan import (
    CLOUD,
    PRESETS,
    AccelerationConfig,
    PlannedStep,
    SkipVariant,
    StepMode,
    make_plan,
    preset,
)
from obclip.runtime.protocol import ProtocolError, StepsRequest

from helpers import ModeSteps

N = 4
G = 7.5


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    return {"mini": build_unet("mini").eval(), "mini-small": build_unet("mini-small").eval()}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(N, 77, 64, generator=g)
    uncond = torch.randn(1, 77, 64, generator=g)
    x = torch.randn(N, 4, 16, 16, generator=g)
    return cond, uncond, x


def step(i: int, mode: StepMode) -> PlannedStep:
    return PlannedStep(i, CLOUD, mode)


def run_steps(unet, config, inputs, modes, x=None, t=500, n=N):
    """guided eps for a sequence of step modes on one ModeSteps (same x and t each step)."""
    cond, uncond, x0 = inputs
    x = x0[:n] if x is None else x
    with ModeSteps(unet, config, cond=cond[:n], uncond=uncond, guidance_scale=G) as acc:
        return [acc.guided_eps(x, torch.tensor(t), step(i, m)) for i, m in enumerate(modes)]


def counted(unet, config, inputs, modes, n=N):
    """FLOPs per step, by leaf-module name suffix, for a sequence of step modes."""
    cond, uncond, x = inputs
    out = []
    with ModeSteps(unet, config, cond=cond[:n], uncond=uncond, guidance_scale=G) as acc:
        for i, m in enumerate(modes):
            # EXTRA_FORMULAS: the CPU attention kernel, which FlopCounterMode does not count by itself
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as fc:
                acc.guided_eps(x[:n], torch.tensor(500), step(i, m))
            out.append(fc)
    return out


def leaf_flops(fc: FlopCounterMode, suffix: str) -> int:
    return sum(sum(ops.values()) for name, ops in fc.get_flop_counts().items() if name.endswith(suffix))


# --- the plan and its configuration ---------------------------------------------------


def test_paper_presets_give_the_papers_step_modes():
    k5 = make_plan(25, 5, PRESETS["paper-k5"])
    assert [s.mode for s in k5.cloud_steps] == [StepMode.REUSE] * 3 + [StepMode.CACHE_SKIP] * 2
    k10 = make_plan(25, 10, preset("paper-k10"))
    assert [s.mode for s in k10.cloud_steps] == ([StepMode.REUSE] * 4 + [StepMode.CACHE] * 2
                                                 + [StepMode.CACHE_SKIP] * 4)
    assert all(s.mode is StepMode.FULL for s in k10.device_steps)
    assert preset("none-k7") == AccelerationConfig.none(7)
    assert all(s.mode is StepMode.FULL for s in make_plan(25, 7, preset("none-k7")).cloud_steps)


def test_switches_and_refresh_choose_the_modes():
    base = preset("paper-k10")
    assert [s.mode for s in make_plan(25, 10, base.replace(batch_reuse=False)).cloud_steps][:4] == [StepMode.FULL] * 4
    assert [s.mode for s in make_plan(25, 10, base.replace(attention_cache=False)).cloud_steps][4:] == \
        [StepMode.FULL] * 2 + [StepMode.SKIP] * 4
    # refresh every 2 from r = 4: full passes at 6 and 8
    modes = [s.mode for s in make_plan(25, 10, base.replace(refresh_every=2)).cloud_steps]
    assert modes[6] is StepMode.FULL and modes[8] is StepMode.FULL
    assert modes[5] is StepMode.CACHE and modes[7] is StepMode.CACHE_SKIP and modes[9] is StepMode.CACHE_SKIP


def test_refresh_in_reuse_mode_is_a_batch_reused_step_that_fills_every_cache():
    base = preset("paper-k10").replace(refresh_every=2)
    reuse = base.replace(refresh_mode="reuse")
    full_modes = [s.mode for s in make_plan(25, 10, base).cloud_steps]
    reuse_modes = [s.mode for s in make_plan(25, 10, reuse).cloud_steps]
    assert [i for i, m in enumerate(full_modes) if m != reuse_modes[i]] == [6, 8]
    assert reuse_modes[6] is reuse_modes[8] is StepMode.REUSE and full_modes[6] is StepMode.FULL
    # the refresh step writes every cache, like a reuse step before r: one graph for both
    assert mode_spec(reuse, 6) == mode_spec(reuse, 0) == ModeSpec(StepMode.REUSE, write_attention=True,
                                                                  write_skip=True)
    assert mode_spec(base, 6) == ModeSpec(StepMode.FULL, write_attention=True, write_skip=True)
    # a reuse refresh needs the token alignment even without batch reuse before r
    assert not base.replace(batch_reuse=False).reuses_attention
    assert reuse.replace(batch_reuse=False).reuses_attention
    assert not reuse.replace(batch_reuse=False, refresh_every=20).reuses_attention   # no refresh before k


def test_new_fields_round_trip_and_are_left_out_of_the_wire_at_their_default():
    for config in (preset("paper-k10").replace(refresh_every=2, refresh_mode="reuse"), preset("paper-k10")):
        assert AccelerationConfig.from_dict(config.to_dict()) == config
    assert "refresh_mode" not in preset("paper-k10").to_dict()
    assert preset("paper-k10").replace(refresh_every=2, refresh_mode="reuse").to_dict()["refresh_mode"] == "reuse"


def test_frozen_guidance_marks_the_steps_that_skip_the_unconditional_rows():
    base = preset("paper-k10")   # R R R R C C X X X X
    skip, cached = base.replace(frozen_guidance="skip"), base.replace(frozen_guidance="cached")
    assert [mode_spec(skip, i).frozen_guidance for i in range(10)] == [False] * 6 + [True] * 4
    assert [mode_spec(cached, i).frozen_guidance for i in range(10)] == [False] * 4 + [True] * 6
    # every step that computes both halves stores the residual; no step does without the option
    assert [mode_spec(skip, i).write_residual for i in range(10)] == [True] * 6 + [False] * 4
    assert not any(mode_spec(base, i).write_residual or mode_spec(base, i).frozen_guidance for i in range(10))
    assert mode_spec(skip, 6).name == "cache-skip.fd.fg" and mode_spec(skip, 0).name == "reuse.wa.ws.fd.wr"
    for config in (skip, cached):
        assert AccelerationConfig.from_dict(config.to_dict()) == config
    assert "frozen_guidance" not in base.to_dict()


def _cache_readers_and_writers(config):
    """Per step: (frozen, families it reads, families it writes), from its ModeSpec."""
    out = []
    for i in range(config.switch_step):
        spec = mode_spec(config, i)
        m = spec.mode
        reads = {"attn"} if m.attention_cached else set()
        reads |= {"skip"} if m.blocks_skipped else set()
        writes = {"attn"} if spec.write_attention and not m.attention_cached else set()
        writes |= {"skip"} if spec.write_skip and not m.blocks_skipped else set()
        reads |= {"residual"} if spec.frozen_guidance else set()
        writes |= {"residual"} if spec.write_residual else set()
        out.append((spec.frozen_guidance, reads, writes))
    return out


@pytest.mark.parametrize("frozen", ["skip", "cached"])
def test_only_frozen_steps_read_what_a_frozen_step_wrote(frozen):
    """A frozen step writes its caches with its conditional rows in both halves; that is only right
    if no step that evaluates the unconditional rows reads them. Checked over every small plan."""
    checked = 0
    for k in range(1, 9):
        for r in range(1, k + 1):
            for s in range(r, k + 1):
                for refresh in range(0, 3):
                    for cache, skip in ((True, True), (True, False), (False, True)):
                        try:
                            config = AccelerationConfig(k, r, s, refresh_every=refresh, attention_cache=cache,
                                                        block_skip=skip, frozen_guidance=frozen)
                        except ValueError:
                            continue
                        writer: dict[str, bool] = {}
                        for i, (is_frozen, reads, writes) in enumerate(_cache_readers_and_writers(config)):
                            for family in reads:
                                assert family in writer, (config, i, family)
                                assert is_frozen or not writer[family], (config, i, family)
                            for family in writes:
                                writer[family] = is_frozen
                        checked += 1
    assert checked > 100


@pytest.mark.slow
def test_frozen_guidance_halves_the_rows_and_uses_the_last_residual(unets, inputs):
    unet = unets["mini"]
    cond, uncond, x = inputs
    plain = AccelerationConfig(5, 1, 1, batch_reuse=False, attention_cache=False)
    frozen = plain.replace(frozen_guidance="skip")
    modes = [StepMode.FULL, StepMode.SKIP]
    # same x and t as the step that stored the residual: the frozen step equals it to float rounding
    ref, ref_skip = run_steps(unet, plain, inputs, modes)
    full, frozen_skip = run_steps(unet, frozen, inputs, modes)
    assert torch.equal(ref, full) and torch.equal(ref, ref_skip)
    assert torch.allclose(frozen_skip, ref_skip, atol=1e-4, rtol=1e-4)
    # the conditional rows only: exactly half of the skip step's work
    c_plain, c_frozen = counted(unet, plain, inputs, modes), counted(unet, frozen, inputs, modes)
    assert c_frozen[0].get_total_flops() == c_plain[0].get_total_flops()
    assert 2 * c_frozen[1].get_total_flops() == c_plain[1].get_total_flops() > 0
    # the residual is eps_uncond - eps_cond of the last step that computed both, per candidate
    g = torch.Generator().manual_seed(5)
    x2 = x + torch.randn(x.shape, generator=g)
    with ModeSteps(unet, frozen, cond=cond, uncond=uncond, guidance_scale=G) as acc:
        acc.guided_eps(x, torch.tensor(500), step(0, StepMode.FULL))
        first = acc.caches["guid/residual"]
        acc.guided_eps(x2, torch.tensor(400), step(1, StepMode.FULL))
        second = acc.caches["guid/residual"]
        eps = acc.guided_eps(x2, torch.tensor(400), step(2, StepMode.SKIP))
        assert acc.caches["guid/residual"] is second     # a frozen step does not overwrite it
    with ModeSteps(unet, plain, cond=cond, uncond=uncond, guidance_scale=G) as acc:
        acc.guided_eps(x2, torch.tensor(400), step(0, StepMode.FULL))
        want = acc.guided_eps(x2, torch.tensor(400), step(1, StepMode.SKIP))
    assert first.shape == second.shape == x.shape and not torch.allclose(first, second)
    assert torch.allclose(eps, want, atol=1e-4, rtol=1e-4)
    # N rows through the UNet instead of 2N
    rows: list[int] = []
    hook = unet.conv_out.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        run_steps(unet, frozen, inputs, modes)
    finally:
        hook.remove()
    assert rows == [2 * N, N]


def test_pivot_only_steps_and_the_merged_step_on_the_plan():
    config = preset("paper-k10").replace(pivot_only_steps=1, merge_step0_uncond=True, cross_kv_once=True)
    modes = [s.mode for s in make_plan(25, 10, config).cloud_steps]
    assert modes[0] is StepMode.PIVOT and modes[1:4] == [StepMode.REUSE] * 3
    assert config.merged_step == 1 and preset("paper-k10").replace(merge_step0_uncond=True).merged_step == 0
    specs = [mode_spec(config, i) for i in range(10)]
    assert [s.merged for s in specs] == [False, True] + [False] * 8
    # the pivot step writes no cache (steps over every candidate rewrite them all before r and s)
    assert specs[0] == ModeSpec(StepMode.PIVOT, cross_kv_once=True) and specs[0].name == "pivot.kv"
    assert specs[1].name == "reuse.wa.ws.fd.kv.m"
    assert AccelerationConfig.from_dict(config.to_dict()) == config
    assert "pivot_only_steps" not in preset("paper-k10").to_dict()
    # one spec (one graph name) for a pivot step whatever the skip variant
    assert mode_spec(config.replace(skip_variant="deepcache"), 0) == specs[0]
    # every step on the pivot: nothing is merged (no step evaluates every candidate)
    everything = AccelerationConfig.none(3).replace(pivot_only_steps=3, merge_step0_uncond=True)
    assert everything.merged_step is None and not any(mode_spec(everything, i).merged for i in range(3))


def test_a_pivot_only_step_runs_candidate_0_and_gives_every_candidate_its_eps(unets, inputs):
    unet = unets["mini"]
    cond, uncond, x0 = inputs
    x = x0[:1].repeat(N, 1, 1, 1)   # one shared z_T
    config = AccelerationConfig(3, 2, 2, pivot_only_steps=1, attention_cache=False, block_skip=False)
    (eps,) = run_steps(unet, config, (cond, uncond, x), [StepMode.PIVOT], x=x)
    assert all(torch.equal(eps[i], eps[0]) for i in range(N))
    ref = guided_eps(unet, x[:1], torch.tensor(500), cond[:1], uncond, G)
    assert torch.allclose(eps[:1], ref, atol=1e-4, rtol=1e-4)
    (pivot,) = counted(unet, config, (cond, uncond, x), [StepMode.PIVOT])
    (one,) = counted(unet, config, (cond, uncond, x), [StepMode.FULL], n=1)
    (full,) = counted(unet, config, (cond, uncond, x), [StepMode.FULL])
    assert pivot.get_total_flops() == one.get_total_flops() < full.get_total_flops()


def test_pivot_only_steps_keep_the_latents_identical_and_the_merge_after_them_is_exact(cloud_runner):
    cands = ("a photo of an old man", "a photo of a middle-aged man", "a photo of a young man")
    base = AccelerationConfig(5, 2, 3, cross_kv_once=True)

    def run(config):
        return cloud_runner.run(StepsRequest(cands, 7, 10, 5, 7.5, 64, 64, acceleration=config))

    # every cloud step on the pivot: the N latents stay bit-identical
    same = run(AccelerationConfig.none(5).replace(pivot_only_steps=5))
    assert all(np.array_equal(same.latents[i], same.latents[0]) for i in range(len(cands)))
    plain = run(base.replace(pivot_only_steps=1))
    merged = run(base.replace(pivot_only_steps=1, merge_step0_uncond=True))
    err = np.abs(merged.latents - plain.latents).max() / np.abs(plain.latents).max()
    assert err <= 1e-5
    # after the pivot step every candidate's own text takes over
    assert not np.allclose(plain.latents[1], plain.latents[0])


def test_a_reuse_refresh_refills_every_cache(unets, inputs):
    """After a reuse refresh at x_b, a cached + skipped step at x_b returns the refresh's eps exactly;
    without the refresh it reads the caches of x_a and differs."""
    unet = unets["mini"]
    cond, uncond, x_a = inputs
    x_b = x_a + 0.5
    config = AccelerationConfig(5, 1, 1, refresh_every=2, refresh_mode="reuse")
    modes = [config.mode(i) for i in range(5)]
    assert modes == [StepMode.REUSE, StepMode.CACHE_SKIP, StepMode.CACHE_SKIP, StepMode.REUSE, StepMode.CACHE_SKIP]
    with ModeSteps(unet, config, cond=cond, uncond=uncond, guidance_scale=G) as acc:
        eps = [acc.guided_eps(x_a if i < 3 else x_b, torch.tensor(500), step(i, m)) for i, m in enumerate(modes)]
    assert torch.equal(eps[3], eps[4])
    no_refresh = config.replace(refresh_every=0, refresh_mode="full")
    with ModeSteps(unet, no_refresh, cond=cond, uncond=uncond, guidance_scale=G) as acc:
        other = [acc.guided_eps(x_a if i < 3 else x_b, torch.tensor(500), step(i, no_refresh.mode(i)))
                 for i in range(5)]
    assert not torch.allclose(other[4], eps[4])


@pytest.mark.parametrize("kwargs, message", [
    (dict(switch_step=5, cache_step=4, skip_step=3), "r <= skip point s <= switch point k"),
    (dict(switch_step=5, cache_step=3, skip_step=6), "r <= skip point s <= switch point k"),
    (dict(switch_step=5, cache_step=-1, skip_step=3), "must all be >= 0"),
    (dict(switch_step=5, cache_step=3, skip_step=3, refresh_every=-2), "must all be >= 0"),
    (dict(switch_step=5, cache_step=0, skip_step=3), "attention_cache needs cache_step r >= 1"),
    (dict(switch_step=5, cache_step=0, skip_step=0, attention_cache=False), "block_skip needs skip_step s >= 1"),
    (dict(switch_step=5, cache_step=3, skip_step=3, skip_variant="magic"), "skip_variant 'magic' must be one of"),
    (dict(switch_step=5, cache_step=3, skip_step=3, batch_reuse=1), "batch_reuse must be true or false"),
    (dict(switch_step=5.0, cache_step=3, skip_step=3), "switch_step must be an int"),
    (dict(switch_step=5, cache_step=3, skip_step=3, refresh_every=1, refresh_mode="half"),
     "refresh_mode 'half' must be one of"),
    (dict(switch_step=5, cache_step=3, skip_step=3, refresh_mode="reuse"), "needs refresh_every >= 1"),
    (dict(switch_step=5, cache_step=3, skip_step=3, frozen_guidance="always"), "frozen_guidance 'always' must be"),
    (dict(switch_step=5, cache_step=3, skip_step=3, frozen_guidance="skip", block_skip=False),
     "frozen_guidance 'skip' needs block_skip"),
    (dict(switch_step=5, cache_step=5, skip_step=5, frozen_guidance="cached", block_skip=False,
          attention_cache=False), "frozen_guidance 'cached' needs attention_cache or block_skip"),
    (dict(switch_step=5, cache_step=5, skip_step=5, pivot_only_steps=6, attention_cache=False, block_skip=False),
     r"pivot_only_steps p=6 must be in \[0, switch point k=5\]"),
    (dict(switch_step=5, cache_step=2, skip_step=3, pivot_only_steps=2), "pivot_only_steps p=2 must be < cache_step"),
    (dict(switch_step=5, cache_step=2, skip_step=3, pivot_only_steps=3, attention_cache=False),
     "pivot_only_steps p=3 must be < skip_step s=3"),
    (dict(switch_step=5, cache_step=2, skip_step=3, pivot_only_steps=True), "pivot_only_steps must be an int"),
])
def test_invalid_configurations_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AccelerationConfig(**kwargs)


def test_plan_and_acceleration_must_agree_on_k():
    with pytest.raises(ValueError, match="acceleration is for switch point k=5 but the plan has k=10"):
        make_plan(25, 10, PRESETS["paper-k5"])
    with pytest.raises(ValueError, match="unknown acceleration preset 'fast'"):
        preset("fast")


def test_acceleration_travels_in_the_request():
    acc = preset("paper-k5").replace(skip_variant=SkipVariant.DEEPCACHE, cross_kv_once=True)
    req = StepsRequest(("a red circle", "a blue circle"), 3, 25, 5, 7.5, 64, 64, acceleration=acc)
    back = StepsRequest.from_bytes(req.to_bytes())
    assert back == req and back.acceleration == acc and back.to_bytes() == req.to_bytes()
    with pytest.raises(ProtocolError, match="acceleration is for k=5 but the request has switch_step k=10"):
        StepsRequest(("a red circle",), 3, 25, 10, 7.5, 64, 64, acceleration=acc)
    body = req.to_bytes().replace(b'"cache_step":3', b'"cache_step":4')
    with pytest.raises(ProtocolError, match="r <= skip point s"):
        StepsRequest.from_bytes(body)
    body = req.to_bytes().replace(b'"cache_step":3', b'"cache_steps":3')
    with pytest.raises(ProtocolError, match="unknown fields"):
        StepsRequest.from_bytes(body)


# --- the written-out pass and the processors ----------------------------------------


def test_full_mode_is_the_plain_unet_and_surgery_is_undone(unets, inputs):
    unet = unets["mini"]
    cond, uncond, x = inputs
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    (eps,) = run_steps(unet, AccelerationConfig.none(1), inputs, [StepMode.FULL])
    assert torch.equal(eps, guided_eps(unet, x, torch.tensor(500), cond, uncond.expand(N, -1, -1), G))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    # also after an error inside the block
    with pytest.raises(MissingCacheError, match="no earlier step of this request computed it"):
        run_steps(unet, preset("paper-k5"), inputs, [StepMode.CACHE])
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


@pytest.mark.parametrize("variant", list(SkipVariant))
@pytest.mark.parametrize("name", ["mini", "mini-small"])  # mini-small: BK-SDM style, no mid block
def test_a_cache_read_right_after_the_fill_changes_nothing(unets, inputs, name, variant):
    """Same x and t as the step that filled the caches: cached and skipped steps must return the same eps."""
    unet = unets[name]
    config = AccelerationConfig(5, 1, 2, skip_variant=variant, batch_reuse=False)
    full, cached, skipped = run_steps(unet, config, inputs, [StepMode.FULL, StepMode.CACHE, StepMode.CACHE_SKIP])
    assert torch.equal(full, cached) and torch.equal(full, skipped)
    config = config.replace(attention_cache=False)
    full, skipped = run_steps(unet, config, inputs, [StepMode.FULL, StepMode.SKIP])
    assert torch.equal(full, skipped)


@pytest.mark.parametrize("variant, latent_enters", [(SkipVariant.FASTER_DIFFUSION, False),
                                                    (SkipVariant.DEEPCACHE, True),
                                                    (SkipVariant.DEEPCACHE_SHALLOW, True)])
def test_block_skip_variants_differ_in_whether_the_latent_enters(unets, inputs, variant, latent_enters):
    unet = unets["mini"]
    cond, uncond, x = inputs
    config = AccelerationConfig(5, 1, 1, skip_variant=variant, batch_reuse=False, attention_cache=False)
    with ModeSteps(unet, config, cond=cond, uncond=uncond, guidance_scale=G) as acc:
        acc.guided_eps(x, torch.tensor(500), step(0, StepMode.FULL))
        a = acc.guided_eps(x, torch.tensor(400), step(1, StepMode.SKIP))
        b = acc.guided_eps(x + 1.0, torch.tensor(400), step(2, StepMode.SKIP))
    assert (not torch.equal(a, b)) == latent_enters


def _run_steps(unet, config, inputs, modes, hooks, ran: set) -> set:
    """Run the modes in order, keeping in ``ran`` what the hooks saw at the last step; remove the hooks."""
    try:
        cond, uncond, x = inputs
        with ModeSteps(unet, config, cond=cond, uncond=uncond, guidance_scale=G) as acc:
            for i, m in enumerate(modes):
                ran.clear()
                acc.guided_eps(x, torch.tensor(500), step(i, m))
    finally:
        for h in hooks:
            h.remove()
    return ran


def _blocks_run(unet, config, inputs, modes):
    """Which UNet blocks ran at the last step."""
    ran: set[str] = set()
    # A block's first resnet runs whenever any of the block does (DeepCache runs
    # the first down block's resnets without its downsampler).
    hooks = [b.resnets[0].register_forward_pre_hook(lambda mod, args, name=f"{kind}.{i}": ran.add(name))
             for kind in ("down_blocks", "up_blocks") for i, b in enumerate(getattr(unet, kind))]
    hooks += [unet.conv_in.register_forward_pre_hook(lambda mod, args: ran.add("conv_in"))]
    if unet.mid_block is not None:
        hooks += [unet.mid_block.register_forward_pre_hook(lambda mod, args: ran.add("mid"))]
    return _run_steps(unet, config, inputs, modes, hooks, ran)


def test_block_skip_really_skips_the_encoder(unets, inputs):
    unet = unets["mini"]
    ups = {f"up_blocks.{i}" for i in range(len(unet.up_blocks))}
    fd = AccelerationConfig(5, 1, 1, batch_reuse=False, attention_cache=False)
    assert _blocks_run(unet, fd, inputs, [StepMode.FULL, StepMode.SKIP]) == ups
    dc = fd.replace(skip_variant=SkipVariant.DEEPCACHE)
    assert _blocks_run(unet, dc, inputs, [StepMode.FULL, StepMode.SKIP]) == {"conv_in", "down_blocks.0",
                                                                              f"up_blocks.{len(ups) - 1}"}


def _layers_run(unet, config, inputs, modes):
    """Which resnets (block kind, block, layer) ran at the last step, and conv_in / mid."""
    ran: set = set()
    hooks = []
    for kind in ("down_blocks", "up_blocks"):
        for i, b in enumerate(getattr(unet, kind)):
            for j, r in enumerate(b.resnets):
                hooks.append(r.register_forward_pre_hook(lambda mod, args, key=(kind, i, j): ran.add(key)))
    hooks.append(unet.conv_in.register_forward_pre_hook(lambda mod, args: ran.add("conv_in")))
    return _run_steps(unet, config, inputs, modes, hooks, ran)


def test_deepcache_shallowest_branch_runs_the_first_and_last_layers_only(unets, inputs):
    unet = unets["mini"]
    last = len(unet.up_blocks) - 1
    n_up = len(unet.up_blocks[last].resnets)
    shallow = AccelerationConfig(5, 1, 1, batch_reuse=False, attention_cache=False, skip_variant="deepcache-shallow")
    assert _layers_run(unet, shallow, inputs, [StepMode.FULL, StepMode.SKIP]) == {
        "conv_in", ("down_blocks", 0, 0), ("up_blocks", last, n_up - 2), ("up_blocks", last, n_up - 1)}
    deep = _layers_run(unet, shallow.replace(skip_variant="deepcache"), inputs, [StepMode.FULL, StepMode.SKIP])
    assert ("down_blocks", 0, 1) in deep and ("up_blocks", last, 0) in deep
    # the cheapest skip step of the three (Faster Diffusion runs every up block)
    costs = {v: counted(unet, shallow.replace(skip_variant=v), inputs, [StepMode.FULL, StepMode.SKIP])[1]
             .get_total_flops() for v in SkipVariant}
    assert costs[SkipVariant.DEEPCACHE_SHALLOW] < costs[SkipVariant.DEEPCACHE] < costs[SkipVariant.FASTER_DIFFUSION]
    assert mode_spec(shallow, 1).name == "skip.dcs" and mode_spec(shallow, 0).name == "full.ws.dcs"


def test_attention_cache_runs_no_attention_and_saves_flops(unets, inputs):
    unet = unets["mini"]
    config = AccelerationConfig(5, 1, 2, batch_reuse=False)
    full, cache, cache_skip = counted(unet, config, inputs, [StepMode.FULL, StepMode.CACHE, StepMode.CACHE_SKIP])
    for suffix in ("to_q", "to_k", "to_v", "to_out.0"):
        assert leaf_flops(full, suffix) > 0 and leaf_flops(cache, suffix) == 0
    assert cache.get_total_flops() < full.get_total_flops()
    assert cache_skip.get_total_flops() < cache.get_total_flops()


def test_batch_reuse_projects_queries_and_keys_for_the_pivots_only(unets, inputs):
    unet = unets["mini"]
    full, reuse = counted(unet, AccelerationConfig(5, 3, 3, attention_cache=False, block_skip=False), inputs,
                          [StepMode.FULL, StepMode.REUSE])
    # 2N rows -> one pivot per guidance group
    for suffix in ("attn1.to_q", "attn1.to_k", "attn2.to_q", "attn2.to_k"):
        assert leaf_flops(reuse, suffix) * N == leaf_flops(full, suffix) > 0
    for suffix in ("attn1.to_v", "attn2.to_v"):  # values for every row
        assert leaf_flops(reuse, suffix) == leaf_flops(full, suffix) > 0
    assert reuse.get_total_flops() < full.get_total_flops()


def test_batch_reuse_with_one_candidate_is_exact(unets, inputs):
    unet = unets["mini"]
    cond, uncond, x = inputs
    (eps,) = run_steps(unet, preset("paper-k5"), inputs, [StepMode.REUSE], n=1)
    ref = guided_eps(unet, x[:1], torch.tensor(500), cond[:1], uncond, G)
    assert torch.allclose(eps, ref, atol=1e-4, rtol=1e-4)


def test_exact_extras_change_nothing_and_save_work(unets, inputs):
    unet = unets["mini"]
    cond, uncond, x0 = inputs
    x = x0[:1].repeat(N, 1, 1, 1)  # step 0: every row is the shared z_T
    for base in (AccelerationConfig.none(3), AccelerationConfig(3, 2, 2, attention_cache=False, block_skip=False)):
        extras = base.replace(cross_kv_once=True, merge_step0_uncond=True)
        modes = [base.mode(i) for i in range(3)]
        plain = run_steps(unet, base, inputs, modes, x=x)
        exact = run_steps(unet, extras, inputs, modes, x=x)
        for a, b in zip(plain, exact):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)  # float rounding, x7.5 by guidance
        c_plain = counted(unet, base, (cond, uncond, x), modes)
        c_exact = counted(unet, extras, (cond, uncond, x), modes)
        # step 0: N + 1 rows instead of 2N; later steps: no cross-attention K/V at all
        assert c_exact[0].get_total_flops() < c_plain[0].get_total_flops()
        assert leaf_flops(c_exact[1], "attn2.to_k") == leaf_flops(c_exact[1], "attn2.to_v") == 0
        assert leaf_flops(c_plain[1], "attn2.to_k") > 0
        assert c_exact[1].get_total_flops() < c_plain[1].get_total_flops()
        if base.batch_reuse:  # reuse needs the two pivot texts' keys only, even when projected once
            assert leaf_flops(c_exact[0], "attn2.to_k") == leaf_flops(c_plain[0], "attn2.to_k") > 0


# --- token alignment for cross-attention reuse ---------------------------------------


def test_reuse_reads_the_pivot_map_through_the_alignment(unets, inputs):
    """A candidate with shifted tokens uses the pivot's map at its own positions, not the raw one."""
    from obclip.cloud.modes import TokenAlignment

    unet = unets["mini"]
    cond, uncond, x = inputs
    ident = tuple(range(77))
    shifted = tuple([0] + list(range(76)))   # candidate 2: BOS twice, then every token one column early
    shift = TokenAlignment(starts=tuple(ident if i != 2 else shifted for i in range(N)),
                           stops=tuple(tuple(c + 1 for c in (ident if i != 2 else shifted)) for i in range(N)),
                           weights=tuple(tuple([1.0] * 77) if i != 2 else tuple([0.5, 0.5] + [1.0] * 75)
                                         for i in range(N)),
                           identity=tuple(i != 2 for i in range(N)))
    config = AccelerationConfig(5, 3, 3, attention_cache=False, block_skip=False)
    with ModeSteps(unet, config, cond=cond, uncond=uncond, guidance_scale=G) as acc:
        plain = acc.guided_eps(x, torch.tensor(500), step(0, StepMode.REUSE))
    with ModeSteps(unet, config, cond=cond, uncond=uncond, guidance_scale=G, alignment=shift) as acc:
        aligned = acc.guided_eps(x, torch.tensor(500), step(0, StepMode.REUSE))
    for i in range(N):
        assert torch.equal(plain[i], aligned[i]) == (i != 2)


# --- through the cloud runner ------------------------------------------------------------


def _request(k=5, acceleration=None, candidates=("a photo of an old man", "a photo of a middle-aged man",
                                                   "a photo of a young man")):
    return StepsRequest(candidates, 7, 10, k, 7.5, 64, 64, acceleration=acceleration)


def test_runner_applies_the_plan_and_nothing_leaks_between_requests(cloud_model):
    runner = CloudStepRunner(cloud_model)
    exact = runner.run(_request())
    fast_cfg = AccelerationConfig(5, 2, 3, cross_kv_once=True, merge_step0_uncond=True)
    fast = runner.run(_request(acceleration=fast_cfg))
    assert not torch.equal(torch.from_numpy(fast.latents), torch.from_numpy(exact.latents))
    rel = float(((fast.latents - exact.latents) ** 2).sum() ** 0.5 / (exact.latents ** 2).sum() ** 0.5)
    assert rel < 0.5  # an approximation, not noise
    # a request after an accelerated one is unaffected by its caches
    again = runner.run(_request())
    assert (again.latents == exact.latents).all() and (again.prev_x0 == exact.prev_x0).all()
    assert all(type(p).__name__ != "ObClipAttnProcessor" for p in cloud_model.unet.attn_processors.values())
    # exact extras alone reproduce the plain run
    extras = runner.run(_request(acceleration=AccelerationConfig.none(5).replace(cross_kv_once=True,
                                                                                 merge_step0_uncond=True)))
    assert abs(extras.latents - exact.latents).max() < 1e-4


def test_device_sends_the_acceleration_and_the_request_stays_oblivious(device_pipeline, cloud_runner):
    from obclip.device.pipeline import GenerationConfig

    config = GenerationConfig(num_inference_steps=10, acceleration=AccelerationConfig(5, 2, 3), seed=5)
    assert config.k == 5
    prepared = device_pipeline.prepare("a photo of an old man", config)
    assert prepared.request.acceleration == AccelerationConfig(5, 2, 3)
    for member in prepared.candidate_set.candidates:
        other = device_pipeline.prepare(member, config)
        assert other.request_bytes == prepared.request_bytes
    result = device_pipeline.generate("a photo of an old man", cloud_runner.handle, config)
    assert result.image.shape == (64, 64, 3)
    with pytest.raises(ValueError, match="the acceleration is for k=5 cloud steps but method obclip runs k=3"):
        GenerationConfig(switch_step=3, acceleration=preset("paper-k5"))
    with pytest.raises(ValueError, match="device-only run sends nothing"):
        GenerationConfig(method="device-only", acceleration=preset("paper-k5"))
