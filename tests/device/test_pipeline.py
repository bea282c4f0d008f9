"""The device pipeline: what it sends, what it refuses, and the baselines."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obclip.device.oblivious import ObliviousError, TransformConfig
from obclip.device.pipeline import GenerationConfig, Method
from obclip.runtime.plan import preset
from obclip.runtime.protocol import StepsRequest
from obclip.runtime.tokenizer import PromptTooLongError

TEMPLATES = [
    "{age} {eth} {gender} in hat Fashion portrait photo",
    "High-quality, face portrait photo of a {age} {eth} {gender}, wearing glasses",
    "a {age} {gender} reading a book in a park",
    "portrait of a {eth} {gender} smiling",
]
AGES = ["young", "middle-aged", "old", "elderly", "senior"]
ETHS = ["caucasian", "african", "asian", "indian", "european"]
GENDERS = ["man", "woman", "lady", "gentleman"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(TEMPLATES), age=st.sampled_from(AGES), eth=st.sampled_from(ETHS),
       gender=st.sampled_from(GENDERS), seed=st.integers(0, 2**63 - 1))
def test_request_bytes_do_not_depend_on_the_real_candidate(device_pipeline, template, age, eth, gender, seed):
    prompt = template.format(age=age, eth=eth, gender=gender)
    config = GenerationConfig(seed=seed, num_inference_steps=25, switch_step=10)
    prepared = device_pipeline.prepare(prompt, config)
    sent = prepared.request_bytes
    seen_indices = set()
    for member in prepared.candidate_set.candidates:
        other = device_pipeline.prepare(member, config)
        assert other.request_bytes == sent
        seen_indices.add(other.real_index)
    assert seen_indices == set(range(prepared.request.n))  # each member finds itself
    assert prepared.candidate_set.candidates[prepared.real_index] in prepared.request.candidates


@pytest.mark.parametrize("prompt", ["a photo of an elderly lady", "portrait of an asian man smiling"])
def test_lcm_request_bytes_do_not_depend_on_the_real_candidate(device_pipeline, prompt):
    config = GenerationConfig(seed=3, num_inference_steps=8, switch_step=4, solver="lcm", device_timestep_shift=8,
                              acceleration=preset("paper-lcm-k4"))
    prepared = device_pipeline.prepare(prompt, config)
    assert prepared.request.solver == "lcm" and prepared.request.device_timestep_shift == 8
    for member in prepared.candidate_set.candidates:
        assert device_pipeline.prepare(member, config).request_bytes == prepared.request_bytes


def test_the_request_holds_nothing_but_the_candidate_set_and_options(device_pipeline):
    prepared = device_pipeline.prepare("a photo of an elderly lady", GenerationConfig(seed=5))
    sent = StepsRequest.from_bytes(prepared.request_bytes)
    assert "elderly" not in prepared.request_bytes.decode() and "lady" not in prepared.request_bytes.decode()
    assert sent.candidates == prepared.candidate_set.candidates
    assert sent.seed == 5 and sent.switch_step == 10


def test_fresh_seed_when_none_given(device_pipeline):
    a = device_pipeline.prepare("a photo of a man", GenerationConfig())
    b = device_pipeline.prepare("a photo of a man", GenerationConfig())
    assert a.seed != b.seed


def test_baselines_send_what_they_should(device_pipeline):
    prompt = "a photo of an elderly woman"
    obclip = device_pipeline.prepare(prompt, GenerationConfig(method="obclip", switch_step=5, seed=1))
    og = device_pipeline.prepare(prompt, GenerationConfig(method="vanilla-og", seed=1))
    hybrid = device_pipeline.prepare(prompt, GenerationConfig(method="hybrid-sd", switch_step=5, seed=1))
    cloud_only = device_pipeline.prepare(prompt, GenerationConfig(method="cloud-only", seed=1))
    device_only = device_pipeline.prepare(prompt, GenerationConfig(method="device-only", seed=1))
    assert obclip.request.n == 6 and obclip.request.switch_step == 5
    assert og.request.candidates == obclip.request.candidates and og.request.switch_step == 25
    assert hybrid.request.candidates == (prompt,) and hybrid.request.switch_step == 5
    assert cloud_only.request.candidates == (prompt,) and cloud_only.request.switch_step == 25
    assert device_only.request is None and device_only.request_bytes is None
    assert not Method.HYBRID_SD.private and Method.OBCLIP.private


def test_every_method_runs_end_to_end(device_pipeline, cloud_runner):
    for method in Method:
        result = device_pipeline.generate("a photo of an old man", cloud_runner.handle,
                                          GenerationConfig(method=method, num_inference_steps=4, switch_step=2,
                                                           seed=0))
        size = device_pipeline.engines.manifest.default_image_size
        assert result.image.shape == (size, size, 3) and result.image.dtype == np.uint8
        assert (result.bytes_sent == 0) == (method is Method.DEVICE_ONLY)


def test_device_only_never_calls_the_cloud(device_pipeline):
    def cloud(_):
        raise AssertionError("device-only must not contact the server")

    result = device_pipeline.generate("a photo of a woman", cloud, GenerationConfig(method="device-only",
                                                                                     num_inference_steps=3, seed=0))
    assert result.bytes_received == 0


@pytest.mark.parametrize("prompt, config, error, msg", [
    ("", GenerationConfig(), ValueError, "empty"),
    ("   ", GenerationConfig(), ValueError, "empty"),
    ("a photo of a man " + "very " * 80, GenerationConfig(), PromptTooLongError, "limit of 77"),
    ("a photo of a man", GenerationConfig(height=30, width=30), ValueError, "multiple of"),
])
def test_bad_inputs_are_refused_clearly(device_pipeline, prompt, config, error, msg):
    with pytest.raises(error, match=msg):
        device_pipeline.prepare(prompt, config)


def test_k_over_T_is_refused():
    with pytest.raises(ValueError, match="switch_step k=30 must be in 0..T=25"):
        GenerationConfig(switch_step=30)


def test_bad_solver_or_shift_is_refused():
    with pytest.raises(ValueError, match="unknown solver 'euler'"):
        GenerationConfig(solver="euler")
    with pytest.raises(ValueError, match="device_timestep_shift must be an int"):
        GenerationConfig(device_timestep_shift=8.0)


def test_candidate_cap_is_refused_before_sending(device_pipeline):
    with pytest.raises(ObliviousError, match="gender|age|ethnicity"):
        device_pipeline.prepare("a young asian woman", GenerationConfig(transform=TransformConfig(max_candidates=4)))


def test_length_limit_is_decided_on_the_whole_candidate_set(device_pipeline):
    """A prompt whose real wording fits but whose longest candidate does not is
    refused whichever member is real, so refusing cannot leak the real value."""
    tok = device_pipeline.engines.tokenizer
    base = "a photo of a young man"
    config = GenerationConfig(seed=0)
    filler = "very "
    prompt = base
    while True:  # grow until the longest candidate no longer fits
        candidates = device_pipeline._transform(config.transform)(prompt).candidates
        if max(tok.count(c) for c in candidates) > tok.max_length:
            break
        prompt = prompt + " " + filler.strip()
    cset = device_pipeline._transform(config.transform)(prompt)
    outcomes = set()
    for member in cset.candidates:
        try:
            device_pipeline.prepare(member, config)
            outcomes.add("sent")
        except PromptTooLongError:
            outcomes.add("refused")
    assert outcomes == {"refused"}


def test_finish_candidates_is_finish_row_for_row(device_pipeline, cloud_runner):
    """The batched evaluation helper runs the same device steps as finish() for each candidate as if real."""
    import dataclasses

    config = GenerationConfig(seed=3, num_inference_steps=6, switch_step=2)
    prepared = device_pipeline.prepare("a portrait of a young asian woman", config)
    answer = cloud_runner.handle(prepared.request_bytes)
    n = prepared.request.n
    picked = [n - 1, 0, 1]
    batched = device_pipeline.finish_candidates(prepared, answer, config, picked)
    assert batched.shape[0] == 3
    for row, i in zip(batched, picked):
        text = prepared.candidate_set.candidates[i]
        one = device_pipeline.finish(dataclasses.replace(prepared, prompt=text, real_index=i), answer, config)
        np.testing.assert_allclose(row, one[0], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        device_pipeline.finish_candidates(prepared, answer, config, [n])
    hybrid = device_pipeline.prepare("a photo", GenerationConfig(method="hybrid-sd", seed=1, switch_step=2,
                                                                 num_inference_steps=6))
    with pytest.raises(ValueError, match="ObCLIP request"):
        device_pipeline.finish_candidates(hybrid, answer, config, [0])
