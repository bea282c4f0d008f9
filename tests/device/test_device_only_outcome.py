"""The pipeline's side of the policy: a prompt the device cannot vouch for is generated on the
device alone (k = 0, nothing sent), or refused; never sent with a note."""

import numpy as np
import pytest

from obclip.device.oblivious import ObliviousError, TransformConfig
from obclip.device.pipeline import GenerationConfig, describe_sent


def never(_):
    raise AssertionError("a device-only outcome must not contact the server")


@pytest.mark.parametrize("prompt", ["Maria, 28, smiling at the camera", "a heavily pregnant woman in a park",
                                    "a photo of my 7 year old daughter Maria, a young Korean girl"])
def test_an_unvouched_prompt_sends_nothing_and_runs_every_step_on_the_device(device_pipeline, prompt):
    config = GenerationConfig(method="obclip", num_inference_steps=3, switch_step=2, seed=0)
    prepared = device_pipeline.prepare(prompt, config)
    assert prepared.request is None and prepared.request_bytes is None
    assert prepared.candidate_set is not None and prepared.candidate_set.device_only
    result = device_pipeline.generate(prompt, never, config)
    size = device_pipeline.engines.manifest.default_image_size
    assert result.image.shape == (size, size, 3) and result.image.dtype == np.uint8
    assert result.bytes_sent == 0 and result.bytes_received == 0
    assert describe_sent(result, config)[0].startswith("the server received nothing")


def test_the_same_under_the_shapes_schema(device_pipeline):
    # The embedded model's schema has no slot for a person: the person is not sent with a note.
    config = GenerationConfig(method="obclip", num_inference_steps=3, switch_step=2, seed=0,
                              transform=TransformConfig(schema_path="shapes"))
    prompt = "a photo of my 7 year old daughter Maria, a young Korean girl"
    assert device_pipeline.prepare(prompt, config).request is None
    assert device_pipeline.generate(prompt, never, config).bytes_sent == 0


def test_refuse_raises_before_anything_is_sent(device_pipeline):
    config = GenerationConfig(method="obclip", num_inference_steps=3, switch_step=2, seed=0,
                              transform=TransformConfig(unprotected="refuse"))
    with pytest.raises(ObliviousError, match="a name"):
        device_pipeline.generate("Maria, 28, smiling at the camera", never, config)


def test_a_vouched_prompt_is_still_sent(device_pipeline):
    prepared = device_pipeline.prepare("a photo of an old man", GenerationConfig(method="obclip", seed=0))
    assert prepared.request is not None and prepared.request.n == 6


def test_an_lcm_run_with_a_timestep_shift_kept_on_the_device_has_no_shift(device_pipeline):
    # dt bridges the cloud-to-device switch; with nothing sent the device runs its own plan from
    # t = 999, where dt = 8 would leave the trained range.
    from obclip.runtime.plan import LCM_PAPER_STEPS
    from obclip.runtime.solver import LCM

    config = GenerationConfig(method="obclip", num_inference_steps=LCM_PAPER_STEPS, switch_step=4, seed=0,
                              solver=LCM, device_timestep_shift=8)
    assert config.plan(0).device_timestep_shift == 0 and config.plan().device_timestep_shift == 8
    result = device_pipeline.generate("Maria, 28, smiling at the camera", never, config)
    assert result.bytes_sent == 0 and np.isfinite(result.image).all()
