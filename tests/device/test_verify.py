"""Device-side verification of the cloud's whole answer (device/verify.py), through the real
DevicePipeline with fake engines and a malicious fake transport: fast, no model needed."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from obclip.device.pipeline import DevicePipeline, GenerationConfig
from obclip.device.verify import VerificationError, VerifyConfig, config_for, envelope, verify_answer
from obclip.runtime.errors import UntrustedAnswerError
from obclip.runtime.protocol import Handoff, StepsRequest, decode_handoff, encode_handoff
from obclip.runtime.solver import SD14_SOLVER_CONFIG, make_schedule

T, K, SIZE = 10, 4, 32
SHAPE = (4, SIZE // 8, SIZE // 8)


class FakeTokenizer:
    max_length = 77

    def count(self, text):
        return len(text.split()) + 2

    def check_fits(self, texts, what="prompt"):
        pass


class FakeEngines:
    """Just enough of DeviceEngines for prepare/finish: eps = 0, a black image."""

    def __init__(self):
        self.manifest = SimpleNamespace(scheduler_config=SD14_SOLVER_CONFIG.to_dict(), model_id="fake", verification={},
                                        schema=None, default_image_size=SIZE, vae_scale_factor=8)
        self.tokenizer = FakeTokenizer()
        self.unet_calls = 0

    def latent_shape(self, height, width):
        return (4, height // 8, width // 8)

    def encode_text(self, prompts):
        return np.zeros((len(prompts), 77, 8), np.float32)

    def condition(self, prompts, height, width, guidance_scale):
        return self.encode_text(prompts), {}

    def unet(self, x, t, text):
        self.unet_calls += 1
        return np.zeros_like(x)

    def decode(self, latent):
        return np.zeros((latent.shape[0], SIZE, SIZE, 3), np.uint8)


def plausible(request, seed=0):
    """Latents as a real model leaves them after K steps: x_k = alpha_k x0 + sigma_k eps, unit-variance x0."""
    s = make_schedule(SD14_SOLVER_CONFIG, T)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((request.n, *SHAPE)).astype(np.float32)
    eps = rng.standard_normal((request.n, *SHAPE)).astype(np.float32)
    lat = (s.alpha_t[K] * x0 + s.sigma_t[K] * eps).astype(np.float32)
    return lat, x0, s.timesteps


def answer(request_bytes, poison=None, member=0, as_handoff=False):
    req = StepsRequest.from_bytes(request_bytes)
    lat, x0, timesteps = plausible(req)
    if poison == "nan":
        lat[member, 0, 0, 0] = np.nan
    elif poison == "huge":
        lat[member] = 3e38
    elif poison == "10x":
        lat[member] *= 10
    elif poison == "x0-10x":
        x0[member] *= 10
    data = encode_handoff(req, lat, x0, lower_order_nums=1, step_index=K, timesteps=timesteps, cloud_model="fake")
    if as_handoff:  # what ServiceClient hands over: already decoded (its checks may differ)
        if poison == "nan":  # decode_handoff refuses NaN bytes itself; a transport might not
            return Handoff(lat, x0, 1, K, tuple(int(t) for t in timesteps), req.sha256(), "fake", {})
        return decode_handoff(data, req, SHAPE)
    return data


@pytest.fixture
def pipeline():
    return DevicePipeline(FakeEngines())


CONFIG = GenerationConfig(num_inference_steps=T, switch_step=K, seed=7, height=SIZE, width=SIZE)
PROMPT = "a photo of an old man"


def test_an_honest_answer_passes(pipeline):
    calls = []

    def cloud(body):
        calls.append(body)
        return answer(body)

    result = pipeline.generate(PROMPT, cloud, CONFIG)
    assert result.image.shape == (SIZE, SIZE, 3) and len(calls) == 1


@pytest.mark.parametrize("as_handoff", [False, True])
@pytest.mark.parametrize("poison", ["nan", "huge", "10x", "x0-10x"])
def test_poisoning_one_member_refuses_identically_whichever_is_real(pipeline, poison, as_handoff):
    members = pipeline.prepare(PROMPT, CONFIG).candidate_set.candidates
    assert len(members) == 6
    for target in range(len(members)):  # the member the server poisons
        errors = set()
        for typed in members:  # every member as the real one
            calls = []

            def cloud(body, calls=calls, target=target):
                calls.append(body)
                return answer(body, poison, target, as_handoff)

            with pytest.raises(UntrustedAnswerError) as err:   # HandoffError (bytes) or VerificationError
                pipeline.generate(typed, cloud, CONFIG)
            assert len(calls) == 1, "never retried after a failed verification"
            errors.add((type(err.value), str(err.value)))
        assert len(errors) == 1, f"the error depends on which member is real: {errors}"
    assert pipeline.engines.unet_calls == 0, "no device step may run on a refused answer"


def test_envelope_follows_the_schedule():
    s = make_schedule(SD14_SOLVER_CONFIG, T)
    env = [envelope(s, k) for k in range(T + 1)]
    # Noisier steps have the tighter latent bound (x_k is mostly unit noise); every latent bound stays
    # under 10x the expected per-element rms of ~1, so a 10x latent always fails.
    assert env[0].latent_rms_max < env[T].latent_rms_max <= 4.5
    assert all(1.2 < e.latent_rms_max < 10 for e in env)
    # prev_x0 is a data prediction made at step k-1: its error is the noise estimate's, amplified by
    # that step's sigma/alpha, so the bound shrinks as k grows, to about the latent's at k = T.
    bounds = [e.prev_x0_rms_max for e in env[1:]]
    assert all(a > b for a, b in zip(bounds, bounds[1:])) and bounds[-1] < 5
    assert env[K].prev_x0_rms_max < 10  # the x0-10x poisoning below fails at the tests' k


def test_envelope_grows_with_guidance_only_above_the_reference():
    s = make_schedule(SD14_SOLVER_CONFIG, 25)
    for k in (5, 10, 25):
        low, ref, high = (envelope(s, k, guidance_scale=g) for g in (1.0, 7.5, 50.0))
        assert low.latent_rms_max == ref.latent_rms_max < high.latent_rms_max
        assert low.prev_x0_rms_max < ref.prev_x0_rms_max < high.prev_x0_rms_max
    # Honest answers of the trained mini pair (device/verify.py's docstring): all inside, with room.
    assert envelope(s, 5).prev_x0_rms_max > 1.5 * 7.0  # 11.4
    assert envelope(s, 5, guidance_scale=15).prev_x0_rms_max > 1.5 * 8.0
    assert envelope(s, 10, guidance_scale=50).latent_rms_max > 1.5 * 2.5
    with pytest.raises(ValueError, match="guidance_scale"):
        envelope(s, 5, guidance_scale=float("nan"))


def test_verify_answer_unit():
    s = make_schedule(SD14_SOLVER_CONFIG, T)
    req = StepsRequest(candidates=("a", "b"), seed=1, num_inference_steps=T, switch_step=K, guidance_scale=7.5,
                       height=SIZE, width=SIZE)
    lat, x0, timesteps = plausible(req)
    h = decode_handoff(encode_handoff(req, lat, x0, lower_order_nums=1, step_index=K, timesteps=timesteps,
                                      cloud_model="f"), req, SHAPE)
    verify_answer(h, s, K)
    with pytest.raises(VerificationError, match="step 4, not at the k=3"):
        verify_answer(h, s, 3)
    lat[1] *= 10
    bad = decode_handoff(encode_handoff(req, lat, x0, lower_order_nums=1, step_index=K, timesteps=timesteps,
                                        cloud_model="f"), req, SHAPE)
    with pytest.raises(VerificationError, match="Do not resend"):
        verify_answer(bad, s, K)
    verify_answer(bad, s, K, VerifyConfig(statistics=False))  # finite-only for random-weight test models
    with pytest.raises(ValueError):
        VerifyConfig(margin=0)


def test_the_manifest_says_how_to_verify(engines_dir, tmp_path):
    """Written at export from the model's own files: random weights -> finite checks only; an older
    manifest without it -> the full envelope (fail closed); bounds the export recorded are used."""
    import json
    import shutil

    from obclip.export.staging import verification_settings as verification_for
    from obclip.runtime.manifest import Manifest, ManifestFormatError

    m = Manifest.load(engines_dir)
    assert m.verification == verification_for("random")  # the test models have random weights
    assert config_for(m).statistics is False
    assert config_for(replace(m, verification={})) == VerifyConfig()
    assert config_for(replace(m, verification=verification_for("trained"))) == VerifyConfig()
    assert config_for(replace(m, verification=verification_for("unknown"))).statistics is True
    tighter = {**verification_for("trained"), "envelope": {"margin": 1.2}}
    assert config_for(replace(m, verification=tighter)).margin == 1.2
    with pytest.raises(ManifestFormatError, match="not a VerifyConfig"):
        config_for(replace(m, verification={**tighter, "envelope": {"no_such_bound": 1.0}}))
    shutil.copytree(engines_dir, tmp_path / "device")
    d = json.loads((tmp_path / "device" / "manifest.json").read_text())
    d["verification"] = {"weights": "random", "statistics": "no", "envelope": {}}
    (tmp_path / "device" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestFormatError, match="verification must be"):
        Manifest.load(tmp_path / "device")


def test_a_copied_engines_folder_verifies_the_same_without_its_model(model_dirs, tmp_path):
    """Export, copy the folder elsewhere, delete the model it came from: the copy opens, names no
    path of the build machine, and gets the same verification settings."""
    import shutil

    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline
    from obclip.export.device_engines import build_device_engines

    model = tmp_path / "build-machine" / "my-device-model"
    shutil.copytree(model_dirs[1], model)
    build_device_engines(str(model), tmp_path / "build-machine" / "out")
    built = DevicePipeline(DeviceEngines(EngineConfig(str(tmp_path / "build-machine" / "out" / "device"))))
    shutil.copytree(tmp_path / "build-machine" / "out", tmp_path / "app" / "engines")
    shutil.rmtree(tmp_path / "build-machine")
    copied = DevicePipeline(DeviceEngines(EngineConfig(str(tmp_path / "app" / "engines" / "device"))))
    assert copied.verify_config == built.verify_config and copied.verify_config.statistics is False
    manifest_text = (tmp_path / "app" / "engines" / "device" / "manifest.json").read_text()
    assert "build-machine" not in manifest_text and str(tmp_path) not in manifest_text
    assert copied.engines.manifest.model_id == "my-device-model"


def test_a_long_typed_prompt_is_judged_by_its_candidates_only(pipeline):
    # The typed wording is longer than the candidates ("elderly" -> "old" is not, but a long alias
    # list is); only the candidates are checked, the device's own encoding truncates.
    long_prompt = "an elderly man " + "x " * 100
    fit = pipeline._fit(long_prompt)
    assert pipeline.engines.tokenizer.count(fit) <= 77 and long_prompt.startswith(fit)
