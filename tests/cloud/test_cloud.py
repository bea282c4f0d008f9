"""The cloud step loop on its own: shared noise, limits, and schedule agreement with the device."""

import dataclasses

import numpy as np
import pytest

from obclip.cloud.steps import CloudStepRunner
from obclip.device.pipeline import GenerationConfig
from obclip.runtime.protocol import (
    HandoffError,
    LimitExceeded,
    ProtocolError,
    RequestLimits,
    StepsRequest,
    decode_handoff,
)

CANDIDATES = ("a photo of a man", "a photo of a woman", "a photo of a boy")


def request(**kw):
    base = dict(candidates=CANDIDATES, seed=11, num_inference_steps=10, switch_step=2, guidance_scale=7.5,
                height=64, width=64)
    base.update(kw)
    return StepsRequest(**base)


def test_one_shared_noise_for_every_candidate(cloud_runner):
    # With guidance 0 only the unconditional prediction counts, so candidates
    # that start from the same z_T must stay identical; with guidance they part.
    same = cloud_runner.run(request(guidance_scale=0.0))
    assert all(np.array_equal(same.latents[0], row) for row in same.latents[1:])
    guided = cloud_runner.run(request())
    assert not np.allclose(guided.latents[0], guided.latents[1])


def test_limits_are_checked_before_any_model_work(cloud_model):
    runner = CloudStepRunner(cloud_model, RequestLimits(max_candidates=2, max_steps=50, max_image_size=128))
    with pytest.raises(LimitExceeded, match="candidates N is 3, over the server's limit max_candidates=2"):
        runner.run(request())
    with pytest.raises(LimitExceeded, match="is 60, over the server's limit max_steps=50"):
        runner.run(request(candidates=CANDIDATES[:2], num_inference_steps=60))
    with pytest.raises(LimitExceeded, match="is 256, over the server's limit max_image_size=128"):
        runner.run(request(candidates=CANDIDATES[:2], height=256, width=256))


def test_corrupt_request_bytes_are_refused(cloud_runner):
    with pytest.raises(ProtocolError):
        cloud_runner.handle(b'{"candidates": "not a list"}')
    with pytest.raises(ProtocolError):
        cloud_runner.handle(b"\x00\x01garbage")


def test_device_refuses_a_cloud_with_another_schedule(cloud_model, device_pipeline):
    other = dataclasses.replace(cloud_model, scheduler_config={**cloud_model.scheduler_config,
                                                               "timestep_spacing": "trailing"})
    config = GenerationConfig(num_inference_steps=10, switch_step=3, seed=0)
    prepared = device_pipeline.prepare("a photo of a man", config)
    handoff = CloudStepRunner(other).handle(prepared.request_bytes)
    with pytest.raises(HandoffError, match="scheduler configs disagree"):
        device_pipeline.finish(prepared, handoff, config)


def test_handoff_size_does_not_depend_on_the_real_candidate(device_pipeline, cloud_runner):
    config = GenerationConfig(num_inference_steps=4, switch_step=2, seed=0)
    prepared = device_pipeline.prepare("a photo of an old woman", config)
    sizes = {len(cloud_runner.handle(device_pipeline.prepare(m, config).request_bytes))
             for m in prepared.candidate_set.candidates}
    assert len(sizes) == 1
    shape = device_pipeline.engines.latent_shape(prepared.height, prepared.width)
    assert decode_handoff(cloud_runner.handle(prepared.request_bytes), prepared.request, shape).latents.shape[0] == 6
