"""The SDXL family (SDXL, Koala-700m/1B, LCM-SDXL) on small random-weight models of the same topology:
loading and text conditioning as diffusers' SDXL pipeline computes them, and every step mode on SDXL's
blocks through ``run_mode`` (what each mode may and may not change, as tests/test_acceleration.py
checks for SD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obclip.cloud.models import build_unet, write_random_model
from obclip.cloud.modes import mode_spec
from obclip.cloud.step_modes import ModeInputs, run_mode, unet_conditioning
from obclip.runtime.conditioning import TEXT_EMBEDS, TIME_IDS, TIMESTEP_COND, Conditioning, guidance_embedding
from obclip.runtime.errors import InputError
from obclip.runtime.plan import CLOUD, PRESETS, AccelerationConfig, PlannedStep, SkipVariant, StepMode, preset

from helpers import ModeSteps

N = 3
G = 7.5
TINY = ("sdxl-tiny", "koala-700m-tiny", "koala-1b-tiny", "lcm-sdxl-tiny")


@pytest.fixture(scope="module")
def unets():
    out = {}
    for name in TINY:
        torch.manual_seed(0)
        out[name] = build_unet(name).eval()
    return out


def _inputs(unet, n=N, seed=1):
    """cond [n, L, D], uncond [1, L, D], x, and the added inputs one row per text ([empty, cands])."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    cond = torch.randn(n, 77, c.cross_attention_dim, generator=g)
    uncond = torch.randn(1, 77, c.cross_attention_dim, generator=g)
    x = torch.randn(n, 4, 16, 16, generator=g)
    conditioning = unet_conditioning(unet)
    added = {TEXT_EMBEDS: torch.randn(n + 1, conditioning.pooled_dim, generator=g)}
    added.update({k: torch.from_numpy(v) for k, v in conditioning.request_added(n + 1, 128, 128, G).items()})
    return cond, uncond, x, added


def _diffusers_eps(unet, x, t, cond, uncond, added):
    """The guided eps from diffusers' own forward (SDXL pipeline's way), or LCM's conditional eps."""
    n = x.shape[0]
    if not unet_conditioning(unet).guided:
        return unet(x, t, encoder_hidden_states=cond, timestep_cond=added[TIMESTEP_COND][1:],
                    added_cond_kwargs={k: v[1:] for k, v in added.items()}).sample

    def rows(a):
        return torch.cat([a[:1].expand(n, *a.shape[1:]), a[1:]])

    out = unet(torch.cat([x, x]), t, encoder_hidden_states=rows(torch.cat([uncond, cond])),
               added_cond_kwargs={k: rows(v) for k, v in added.items()}).sample
    u, c = out.chunk(2)
    return u + G * (c - u)


def _steps(unet, config, modes, x_shift=0.0, t=500, n=N):
    cond, uncond, x, added = _inputs(unet, n)
    with ModeSteps(unet, config, cond=cond, uncond=uncond, guidance_scale=G, added=added) as acc:
        return [acc.guided_eps(x + x_shift, torch.tensor(t), PlannedStep(i, CLOUD, m)) for i, m in enumerate(modes)]


# --- the family ------------------------------------------------------------------------


def test_conditioning_is_read_from_the_unet_config(unets):
    assert unet_conditioning(unets["sdxl-tiny"]).added_inputs == (TEXT_EMBEDS, TIME_IDS)
    assert unet_conditioning(unets["lcm-sdxl-tiny"]).added_inputs == (TEXT_EMBEDS, TIME_IDS, TIMESTEP_COND)
    assert not unet_conditioning(unets["lcm-sdxl-tiny"]).guided
    assert Conditioning.from_unet_config(build_unet("mini").config) == Conditioning()
    with pytest.raises(InputError, match="addition_embed_type='image'"):
        Conditioning.from_unet_config({"addition_embed_type": "image"})
    with pytest.raises(InputError, match="no micro-conditioning"):
        from obclip.runtime.conditioning import MicroConditioning
        Conditioning().request_added(2, 64, 64, G, MicroConditioning(original_size=(32, 32)))


def test_time_ids_and_guidance_embedding_are_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    ids = Conditioning("sdxl", 32).request_added(2, 1024, 768, G)[TIME_IDS]
    assert ids.tolist() == [[1024, 768, 0, 0, 1024, 768]] * 2   # _get_add_time_ids' defaults
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([G - 1.0]), 256)[0]
    # diffusers computes in float32: its sin of arguments up to 6500 rad is off by up to ~1e-3
    assert np.allclose(guidance_embedding(G, 256), want.numpy(), atol=2e-3)
    exact = [np.sin(6500.0 * np.exp(-np.log(10000.0) / 127 * i)) for i in range(128)]
    assert np.allclose(guidance_embedding(G, 256)[:128], exact, atol=1e-6)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return write_random_model("sdxl-tiny", tmp_path_factory.mktemp("sdxl") / "cloud", seed=0)


def test_text_conditioning_equals_the_sdxl_pipelines(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    from obclip.cloud.models import load_text_to_latent

    lm = load_text_to_latent(str(sdxl_dir))
    assert lm.conditioning.family == "sdxl" and lm.conditioning.zero_uncond
    assert lm.tokenizer_2 is not None and lm.tokenizer_2.pad_token_id == 0   # "!": SDXL's tokenizer_2
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    prompts = ["a photo of a woman", "a photo of an old man, 4k"]
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
    hidden, added = lm.encode_texts([*prompts, ""])
    assert torch.equal(hidden[:2], cond) and torch.equal(added[TEXT_EMBEDS][:2], pooled)
    # force_zeros_for_empty_prompt: the empty prompt conditions as zeros
    assert torch.equal(hidden[2:], uncond[:1]) and torch.equal(added[TEXT_EMBEDS][2:], pooled_uncond[:1])
    assert not hidden[2].any()
    rows = lm.added_inputs([*prompts, ""], added, 128, 128, G)
    assert sorted(rows) == [TEXT_EMBEDS, TIME_IDS] and rows[TIME_IDS].shape == (3, 6)


# --- the step modes on SDXL's blocks ------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_full_mode_is_diffusers_forward_with_the_added_conditions(unets, name):
    unet = unets[name]
    cond, uncond, x, added = _inputs(unet)
    (eps,) = _steps(unet, AccelerationConfig.none(1), [StepMode.FULL])
    with torch.no_grad():
        assert torch.equal(eps, _diffusers_eps(unet, x, torch.tensor(500), cond, uncond, added))


def test_the_added_inputs_must_be_the_unets(unets):
    unet = unets["sdxl-tiny"]
    cond, uncond, x, added = _inputs(unet)
    text = torch.cat([uncond, cond])
    with pytest.raises(InputError, match=r"takes the added inputs \['text_embeds', 'time_ids'\], got \[\]"):
        run_mode(unet, mode_spec(None, 0), ModeInputs(x=x, timestep=torch.tensor(1), text=text, guidance_scale=G), {})


@pytest.mark.parametrize("variant", list(SkipVariant))
@pytest.mark.parametrize("name", ["sdxl-tiny", "koala-700m-tiny", "lcm-sdxl-tiny"])
def test_a_cache_read_right_after_the_fill_changes_nothing(unets, name, variant):
    unet = unets[name]
    config = AccelerationConfig(5, 1, 2, skip_variant=variant, batch_reuse=False)
    full, cached, skipped = _steps(unet, config, [StepMode.FULL, StepMode.CACHE, StepMode.CACHE_SKIP])
    assert torch.equal(full, cached) and torch.equal(full, skipped)
    full, skipped = _steps(unet, config.replace(attention_cache=False), [StepMode.FULL, StepMode.SKIP])
    assert torch.equal(full, skipped)


@pytest.mark.parametrize("name", ["sdxl-tiny", "koala-1b-tiny", "lcm-sdxl-tiny"])
def test_batch_reuse_with_one_candidate_is_exact(unets, name):
    unet = unets[name]
    cond, uncond, x, added = _inputs(unet, n=1)
    (eps,) = _steps(unet, preset("paper-k5"), [StepMode.REUSE], n=1)
    with torch.no_grad():
        ref = _diffusers_eps(unet, x, torch.tensor(500), cond, uncond, added)
    assert torch.allclose(eps, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sdxl-tiny", "lcm-sdxl-tiny"])
def test_exact_extras_change_nothing(unets, name):
    unet = unets[name]
    guided = unet_conditioning(unet).guided
    cond, uncond, x0, added = _inputs(unet)
    x = x0[:1].repeat(N, 1, 1, 1)   # step 0: every row is the shared z_T
    base = AccelerationConfig(3, 2, 2, attention_cache=False, block_skip=False)
    # merge_step0_uncond merges unconditional rows, which a guidance-embedding UNet does not have
    extras = base.replace(cross_kv_once=True, merge_step0_uncond=guided)
    modes = [base.mode(i) for i in range(3)]
    for a, b in zip(_steps(unet, base, modes, x_shift=x - x0), _steps(unet, extras, modes, x_shift=x - x0)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_every_preset_runs_on_the_family(unets, name, preset_name):
    """Every named preset's cloud steps, in order, on SDXL's blocks (the last one checked for sanity)."""
    unet = unets[name]
    config = preset(preset_name)
    if not unet_conditioning(unet).guided and (config.merge_step0_uncond or config.pivot_only_steps
                                                 or config.frozen_guidance.value != "off"):
        with pytest.raises(InputError, match="guidance-embedding UNet"):
            _steps(unet, config, [config.mode(i) for i in range(config.switch_step)])
        return
    eps = _steps(unet, config, [config.mode(i) for i in range(config.switch_step)])
    assert all(bool(torch.isfinite(e).all()) for e in eps)


def test_lcm_refuses_what_changes_unconditional_rows(unets):
    unet = unets["lcm-sdxl-tiny"]
    with pytest.raises(InputError, match="merge_step0_uncond .* guidance-embedding UNet"):
        _steps(unet, AccelerationConfig.none(2).replace(merge_step0_uncond=True), [StepMode.FULL])


# --- the cloud step loop ------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", ["sdxl-tiny", "lcm-sdxl-tiny"])
def test_cloud_steps_equal_the_single_process_reference(tmp_path, spec_name):
    """The cloud's torch step loop (text encoders, added inputs, solver) over all T steps ends where the
    reference run (diffusers' forward, diffusers' scheduler) does, for every candidate."""
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.reference import hybrid_reference_latent
    from obclip.cloud.steps import CloudStepRunner
    from obclip.runtime.protocol import StepsRequest

    lm = load_text_to_latent(str(write_random_model(spec_name, tmp_path / "m", seed=0)))
    cands = ("a photo of a woman", "a photo of a man")
    request = StepsRequest(candidates=cands, seed=3, num_inference_steps=4, switch_step=4, guidance_scale=G,
                           height=64, width=64)
    result = CloudStepRunner(lm).run(request)
    for i, prompt in enumerate(cands):
        ref = hybrid_reference_latent(lm, lm, cloud_prompt=prompt, device_prompt=prompt, seed=3,
                                      num_inference_steps=4, switch_step=4, guidance_scale=G, height=64, width=64)
        diff = np.abs(result.latents[i] - ref[0].numpy()).max()
        assert diff <= 1e-4, diff
