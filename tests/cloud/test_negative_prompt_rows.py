"""The cloud's unconditional rows follow the request's negative prompt (torch backend): a batch of
requests with different negative prompts gives each what it gets alone, in every step mode."""

import numpy as np
import pytest

from obclip.runtime.plan import preset
from obclip.runtime.protocol import StepsRequest

CANDIDATES = ("a photo of an old man", "a photo of a young man")


def _request(negative, acceleration=None, seed=7, candidates=CANDIDATES):
    return StepsRequest(candidates, seed, 10, 5, 7.5, 64, 64, acceleration=acceleration, negative_prompt=negative)


@pytest.mark.parametrize("acceleration", [None, preset("paper-k5"), preset("paper-k5").replace(
    cross_kv_once=True, merge_step0_uncond=True)], ids=["none-k5", "paper-k5", "paper-k5+exact-extras"])
def test_a_batch_with_different_negative_prompts_equals_each_request_alone(cloud_runner, acceleration):
    requests = [_request("blurry, low quality", acceleration, seed=3), _request("", acceleration, seed=3),
                _request("watermark", acceleration, seed=5, candidates=("a red square", "a blue circle")),
                _request("blurry, low quality", acceleration, seed=9)]
    alone = [cloud_runner.run(r) for r in requests]
    for a, b in zip(cloud_runner.run_batch(requests), alone):
        # To float rounding (a batch's matrix products sum in another order), as tests/cloud/test_batching.py.
        assert float(np.abs(a.latents - b.latents).max() / np.abs(b.latents).max()) <= 1e-5
    # The negative prompt changes the result (the same seed and candidates, requests 0 and 1).
    assert float(np.abs(alone[0].latents - alone[1].latents).max()) > 1e-3
