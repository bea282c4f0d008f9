"""Negative prompts on the device: the prompt's policy decided on the negative prompt's words (by class,
never by value), what is sent, and the split run == the single-process reference with one."""

import json
import re

import numpy as np
import pytest

from obclip.cloud.reference import hybrid_reference_latent
from obclip.device.oblivious import ObliviousError, ObliviousTransform, Schema, TransformConfig, check_negative
from obclip.device.pipeline import GenerationConfig, Method, describe_sent
from obclip.runtime.errors import InputError
from obclip.runtime.protocol import StepsRequest

PROMPT = "a photo of an elderly woman wearing glasses"
VOUCHED = "blurry, low quality, watermark, extra fingers"
# Negative prompts the device must never send: attribute words, a pronoun, a name, a context cue,
# a place of origin, an age in numbers, a lone attribute adjective (said of the person in the picture).
SENSITIVE = ["an old man", "ugly woman", "his face", "Maria", "pregnant", "from Seoul", "45", "old",
             "asian features", "wrinkles, elderly", "white horse", "an old photograph", "middle-aged"]


@pytest.fixture(scope="module")
def transform():
    return ObliviousTransform()


@pytest.mark.parametrize("negative", [VOUCHED, "lowres, bad anatomy, deformed hands", "dark, grainy photograph",
                                      "5 fingers", "person", "a horse"])
def test_a_vouched_negative_prompt_may_be_sent_as_typed(transform, negative):
    check = check_negative(negative, transform)
    assert check.vouched and check.sendable == negative and check.reason == ""


@pytest.mark.parametrize("negative", SENSITIVE)
def test_a_sensitive_negative_prompt_is_never_sendable(transform, negative):
    check = check_negative(negative, transform)
    assert not check.vouched and check.sendable is None
    assert check.reason.startswith("the negative prompt holds")


def test_invisible_characters_are_normalised_away_before_sending(transform):
    assert check_negative("e\u200bvil", transform).sendable == "evil"
    with pytest.raises(ObliviousError, match="empty once invisible characters are removed"):
        check_negative("\u200b", transform)


TEMPLATES = ["{}", "blurry, {}", "a {} person", "{} face, low quality", "a {} horse", "{} skin, watermark",
             "a photo of a {} car"]


def _value_words():
    """Per attribute, the schema's words for each of its values (canonical modifiers), and person nouns."""
    schema = Schema.load(None)
    groups = {a: list(schema.values(a)) for a in schema.attribute_order()}
    groups["gender nouns"] = ["man", "woman"]
    groups["gender and age nouns"] = ["boy", "girl", "man", "woman"]
    return groups


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("attribute, words", list(_value_words().items()))
def test_the_outcome_is_decided_by_class_never_by_value(transform, template, attribute, words):
    """Two negative prompts that differ only in an attribute's value get the same outcome and the same
    reason, and the reason never quotes the value."""
    outcomes = {}
    for word in words:
        check = check_negative(template.format(word), transform)
        outcomes[word] = (check.vouched, check.reason)
        assert not re.search(rf"\b{re.escape(word)}\b", check.reason), check.reason
    assert len(set(outcomes.values())) == 1, f"{attribute} in {template!r}: {outcomes}"


def _prepare(device_pipeline, negative, prompt=PROMPT, **kw):
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=25, switch_step=10, seed=1234,
                              negative_prompt=negative, **kw)
    return config, device_pipeline.prepare(prompt, config)


def test_the_request_carries_the_vouched_negative_prompt_the_same_whichever_member_is_real(device_pipeline):
    _, prepared = _prepare(device_pipeline, VOUCHED)
    request = prepared.request
    assert request.negative_prompt == VOUCHED
    assert json.loads(request.to_bytes())["negative_prompt"] == VOUCHED
    # Every member of the candidate set, typed as the prompt, gives the same request bytes.
    cands = prepared.candidate_set.candidates
    for member in cands:
        _, other = _prepare(device_pipeline, VOUCHED, prompt=member)
        assert other.real_index == cands.index(member)
        assert other.request_bytes == prepared.request_bytes


def test_without_a_negative_prompt_the_request_is_as_before(device_pipeline):
    _, prepared = _prepare(device_pipeline, "")
    assert b"negative_prompt" not in prepared.request_bytes
    assert StepsRequest.from_bytes(prepared.request_bytes).negative_prompt == ""


@pytest.mark.parametrize("negative", SENSITIVE)
def test_a_sensitive_negative_prompt_sends_nothing_by_default(device_pipeline, negative):
    config, prepared = _prepare(device_pipeline, negative)
    assert prepared.request is None and prepared.request_bytes is None
    assert prepared.negative_check is not None and not prepared.negative_check.vouched


@pytest.mark.parametrize("negative", ["an old man", "Maria", "pregnant"])
def test_policy_refuse_raises_naming_the_class(device_pipeline, negative):
    with pytest.raises(ObliviousError, match="not sent: the negative prompt holds") as e:
        _prepare(device_pipeline, negative, transform=TransformConfig(unprotected="refuse"))
    assert negative not in str(e.value)   # named by its class ("a name", "a context cue for gender")


def test_unsafe_send_never_sends_an_unvouched_negative_prompt(device_pipeline):
    _, prepared = _prepare(device_pipeline, "an old man", transform=TransformConfig(unprotected="unsafe-send"))
    assert prepared.request is None


def test_non_private_methods_send_the_negative_prompt_as_typed(device_pipeline):
    config = GenerationConfig(method=Method.HYBRID_SD, num_inference_steps=25, switch_step=10, seed=1,
                              negative_prompt="an old man")
    assert device_pipeline.prepare(PROMPT, config).request.negative_prompt == "an old man"


def test_bad_negative_prompts_are_input_errors(device_pipeline):
    with pytest.raises(InputError, match="must be text"):
        GenerationConfig(negative_prompt="   ")
    with pytest.raises(InputError, match="must be text"):
        GenerationConfig(negative_prompt=5)
    with pytest.raises(InputError, match="the negative prompt is .* tokens"):
        _prepare(device_pipeline, "blurry " * 100)


def _reference(cloud_model, device_torch_model, prepared, k, negative):
    return hybrid_reference_latent(
        cloud_model, device_torch_model, cloud_prompt=prepared.candidate_set.candidates[prepared.real_index],
        device_prompt=prepared.prompt, seed=prepared.seed, num_inference_steps=25, switch_step=k,
        guidance_scale=7.5, height=prepared.height, width=prepared.width, negative_prompt=negative).numpy()


@pytest.mark.parametrize("negative, k", [(VOUCHED, 10), ("an old man", 0)])
def test_split_equals_single_process_with_a_negative_prompt(negative, k, device_pipeline, cloud_runner, cloud_model,
                                                            device_torch_model):
    """A sent negative prompt conditions both sides' unconditional rows (k = 10); an unsendable one is a
    device-only run conditioned on it (k = 0). Either way the result is the reference's, and not the
    result without the negative prompt."""
    config, prepared = _prepare(device_pipeline, negative)
    assert (prepared.request is None) == (k == 0)
    answer = None if prepared.request is None else cloud_runner.handle(prepared.request_bytes)
    latent = device_pipeline.finish(prepared, answer, config)
    want = _reference(cloud_model, device_torch_model, prepared, k, negative)
    diff = float(np.abs(latent - want).max())
    assert diff <= 1e-3, f"split run with a negative prompt differs from the single process by {diff:.2e}"
    without = _reference(cloud_model, device_torch_model, prepared, k, "")
    assert float(np.abs(latent - without).max()) > 10 * max(diff, 1e-5)


def test_the_report_says_what_was_sent(device_pipeline, cloud_runner):
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=4, switch_step=2, seed=1,
                              negative_prompt=VOUCHED)
    result = device_pipeline.generate(PROMPT, cloud_runner.handle, config)
    assert any(VOUCHED in line for line in describe_sent(result, config))
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=4, switch_step=2, seed=1,
                              negative_prompt="an old man")
    result = device_pipeline.generate(PROMPT, cloud_runner.handle, config)
    lines = describe_sent(result, config)
    assert lines[0].startswith("the server received nothing") and "old man" not in " ".join(lines)
