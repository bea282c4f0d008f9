import json
import struct

import numpy as np
import pytest

from obclip.runtime.protocol import (
    HANDOFF_FORMAT,
    HandoffError,
    ProtocolError,
    StepsRequest,
    canonical_json,
    decode_handoff,
    encode_handoff,
)

SHAPE = (4, 8, 8)


def make_request(**kw):
    base = dict(candidates=("a photo of a man", "a photo of a woman"), seed=7, num_inference_steps=25,
                switch_step=10, guidance_scale=7.5, height=64, width=64)
    base.update(kw)
    return StepsRequest(**base)


def make_handoff(request, **kw):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((request.n, *SHAPE)).astype(np.float32)
    x0 = rng.standard_normal((request.n, *SHAPE)).astype(np.float32)
    args = dict(lower_order_nums=2, step_index=request.switch_step, timesteps=list(range(999, 0, -40))[:25],
                cloud_model="test")
    args.update(kw)
    return lat, x0, encode_handoff(request, lat, x0, **args)


def test_request_bytes_are_canonical_and_round_trip():
    r = make_request()
    data = r.to_bytes()
    assert data == canonical_json(json.loads(data))
    assert b" " not in data.replace(b"a photo of a ", b"")  # fixed separators
    assert StepsRequest.from_bytes(data) == r
    assert StepsRequest.from_bytes(data).to_bytes() == data
    assert make_request(guidance_scale=7.5).to_bytes() == make_request(guidance_scale=7.50).to_bytes()


@pytest.mark.parametrize("kw, msg", [
    (dict(candidates=()), "no candidates"),
    (dict(candidates=("a", "a")), "distinct"),
    (dict(candidates=("a", " ")), "non-empty"),
    (dict(switch_step=0), "k = 0"),
    (dict(switch_step=26), "must be in 1..T=25"),
    (dict(seed=-1), "seed"),
    (dict(guidance_scale=float("nan")), "finite"),
    (dict(wire_dtype="int8"), "wire_dtype"),
    (dict(height=0), "image size"),
])
def test_request_validation(kw, msg):
    with pytest.raises(ProtocolError, match=msg):
        make_request(**kw)


@pytest.mark.parametrize("data, msg", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1,2]", "JSON object"),
    (b'{"candidates": ["a"]}', "missing fields"),
    (b'{"evil": 1}', "unknown fields"),
])
def test_request_from_bad_bytes(data, msg):
    with pytest.raises(ProtocolError, match=msg):
        StepsRequest.from_bytes(data)


def test_handoff_round_trip_fp32_exact():
    r = make_request()
    lat, x0, data = make_handoff(r)
    h = decode_handoff(data, r, SHAPE)
    np.testing.assert_array_equal(h.latents, lat)
    np.testing.assert_array_equal(h.prev_x0, x0)
    assert (h.lower_order_nums, h.step_index, h.cloud_model) == (2, 10, "test")
    assert h.metadata["format"] == HANDOFF_FORMAT


def test_handoff_fp16_halves_the_bytes():
    r32, r16 = make_request(), make_request(wire_dtype="float16")
    _, _, d32 = make_handoff(r32)
    lat, _, d16 = make_handoff(r16)
    tensor_bytes = 2 * r32.n * int(np.prod(SHAPE))
    assert len(d32) - len(d16) == tensor_bytes * 2  # 4 -> 2 bytes per value
    h = decode_handoff(d16, r16, SHAPE)
    assert h.latents.dtype == np.float32
    assert np.abs(h.latents - lat).max() < 1e-2


def test_handoff_rejects_corruption():
    r = make_request()
    lat, x0, data = make_handoff(r)
    with pytest.raises(HandoffError, match="truncated"):
        decode_handoff(data[:-10], r, SHAPE)
    with pytest.raises(HandoffError, match="too short"):
        decode_handoff(data[:5], r, SHAPE)
    with pytest.raises(HandoffError, match="truncated"):
        decode_handoff(data[:40], r, SHAPE)
    with pytest.raises(HandoffError, match="different request"):
        decode_handoff(data, make_request(seed=8), SHAPE)
    with pytest.raises(HandoffError, match="shape"):
        decode_handoff(data, r, (4, 16, 16))
    with pytest.raises(HandoffError, match="schedule"):
        decode_handoff(data, r, SHAPE, expected_timesteps=list(range(25)))
    bad = lat.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(HandoffError, match="non-finite"):
        decode_handoff(encode_handoff(r, bad, x0, lower_order_nums=2, step_index=10,
                                      timesteps=list(range(25)), cloud_model="x"), r, SHAPE)


def test_handoff_rejects_wrong_version_and_counts():
    r = make_request()
    _, _, data = make_handoff(r)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])

    def with_meta(tensor_dtype=None, **kv):
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(kv)
        if tensor_dtype:
            h["prev_x0"]["dtype"] = tensor_dtype
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]

    assert decode_handoff(with_meta(), r, SHAPE).step_index == 10  # the rebuild itself is sound
    with pytest.raises(HandoffError, match="format"):
        decode_handoff(with_meta(format="obclip.handoff.v0"), r, SHAPE)
    with pytest.raises(HandoffError, match="n=3"):
        decode_handoff(with_meta(n="3"), r, SHAPE)
    with pytest.raises(HandoffError, match="lower_order_nums"):
        decode_handoff(with_meta(lower_order_nums="99"), r, SHAPE)
    with pytest.raises(HandoffError, match="prev_x0 dtype 'F16' != requested float32"):
        decode_handoff(with_meta(tensor_dtype="F16"), r, SHAPE)
    with pytest.raises(HandoffError, match="dtype 'float16', requested 'float32'"):
        decode_handoff(with_meta(dtype="float16"), r, SHAPE)
    with pytest.raises(HandoffError, match="not an integer"):
        decode_handoff(with_meta(switch_step="ten"), r, SHAPE)


def test_equal_handoffs_are_equal_bytes():
    """The safetensors writer orders metadata by hash; the handoff header is written canonically."""
    from obclip.runtime.protocol import StepsRequest, decode_handoff, encode_handoff

    req = StepsRequest(("a red circle", "a blue circle"), 1, 10, 4, 7.5, 64, 64)
    x = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    encoded = {encode_handoff(req, x, x * 2, lower_order_nums=1, step_index=4, timesteps=range(10),
                              cloud_model="m") for _ in range(20)}
    assert len(encoded) == 1
    (data,) = encoded
    out = decode_handoff(data, req, (4, 16, 16), np.arange(10))
    assert np.array_equal(out.latents, x) and np.array_equal(out.prev_x0, x * 2)


# --- the solver and the device timestep shift -------------------------------------------------


def test_solver_and_shift_are_in_the_bytes_and_the_plan():
    default = make_request()
    # At their defaults the new fields are left out: the bytes (and hash) of a DPM request are unchanged.
    assert b"solver" not in default.to_bytes() and b"device_timestep_shift" not in default.to_bytes()
    assert make_request(solver="dpmsolver++", device_timestep_shift=0).to_bytes() == default.to_bytes()
    lcm = make_request(num_inference_steps=8, switch_step=4, solver="lcm", device_timestep_shift=8)
    assert json.loads(lcm.to_bytes())["solver"] == "lcm" and json.loads(lcm.to_bytes())["device_timestep_shift"] == 8
    assert StepsRequest.from_bytes(lcm.to_bytes()) == lcm
    assert lcm.sha256() != make_request(num_inference_steps=8, switch_step=4, solver="lcm").sha256()
    assert lcm.sha256() != make_request(num_inference_steps=8, switch_step=4, device_timestep_shift=8).sha256()
    assert lcm.plan.solver == "lcm" and lcm.plan.device_timestep_shift == 8
    assert [s.timestep_shift for s in lcm.plan.steps] == [0] * 4 + [8] * 4


@pytest.mark.parametrize("kw, msg", [
    (dict(solver="euler"), "solver 'euler' must be one of"),
    (dict(solver=None), "solver None must be one of"),
    (dict(device_timestep_shift=1.5), "device_timestep_shift must be an integer"),
    (dict(device_timestep_shift=True), "device_timestep_shift must be an integer"),
    (dict(device_timestep_shift=1000), "device_timestep_shift 1000 must be in"),
])
def test_solver_and_shift_validation(kw, msg):
    with pytest.raises(ProtocolError, match=msg):
        make_request(**kw)
    body = json.loads(make_request().to_bytes())
    body.update(kw)
    with pytest.raises(ProtocolError, match=msg):
        StepsRequest.from_bytes(json.dumps(body).encode())


def test_lcm_handoff_carries_no_multistep_counter():
    r = make_request(num_inference_steps=8, switch_step=4, solver="lcm")
    _, _, good = make_handoff(r, lower_order_nums=0, timesteps=list(range(999, 0, -125))[:8])
    assert decode_handoff(good, r, SHAPE).lower_order_nums == 0
    _, _, bad = make_handoff(r, lower_order_nums=2, timesteps=list(range(999, 0, -125))[:8])
    with pytest.raises(HandoffError, match="lcm solver, which keeps no multistep counter"):
        decode_handoff(bad, r, SHAPE)


# --- the negative prompt --------------------------------------------------------------------------

# The bytes and SHA-256 of make_request() as main wrote them before the negative prompt existed.
V1_REQUEST_BYTES = (b'{"acceleration":null,"candidates":["a photo of a man","a photo of a woman"],'
                    b'"format":"obclip.steps-request.v1","guidance_scale":7.5,"height":64,"num_inference_steps":25,'
                    b'"seed":7,"switch_step":10,"width":64,"wire_dtype":"float32"}')
V1_REQUEST_SHA256 = "07e64b495bf35f7e4cfe316eb2295ac9cede14da7b02fe578e3ed251dd18565a"


def test_no_negative_prompt_leaves_the_bytes_and_hash_unchanged():
    r = make_request()
    assert r.to_bytes() == V1_REQUEST_BYTES and r.sha256() == V1_REQUEST_SHA256
    assert make_request(negative_prompt="").to_bytes() == V1_REQUEST_BYTES
    assert StepsRequest.from_bytes(V1_REQUEST_BYTES).negative_prompt == ""


def test_negative_prompt_is_one_field_for_every_candidate():
    r = make_request(negative_prompt="blurry, low quality")
    body = json.loads(r.to_bytes())
    assert body["negative_prompt"] == "blurry, low quality"
    assert StepsRequest.from_bytes(r.to_bytes()) == r
    assert r.sha256() != V1_REQUEST_SHA256
    # Whichever candidate is real, the request is the same bytes (the candidates are in canonical order,
    # the negative prompt is not per candidate).
    again = make_request(candidates=("a photo of a man", "a photo of a woman"), negative_prompt="blurry, low quality")
    assert again.to_bytes() == r.to_bytes()


@pytest.mark.parametrize("value, msg", [
    (5, "negative_prompt must be a string"),
    (None, "negative_prompt must be a string"),
    (["blurry"], "negative_prompt must be a string"),
    ("   ", "negative_prompt is only whitespace"),
    ("\ud800", "negative_prompt is not valid Unicode"),
])
def test_negative_prompt_validation(value, msg):
    with pytest.raises(ProtocolError, match=msg):
        make_request(negative_prompt=value)
    body = json.loads(make_request().to_bytes())
    body["negative_prompt"] = value
    with pytest.raises(ProtocolError, match=msg):
        StepsRequest.from_bytes(json.dumps(body).encode())


def test_negative_prompt_is_held_to_the_prompt_limits():
    from obclip.runtime.protocol import LimitExceeded, RequestLimits

    limits = RequestLimits(max_prompt_chars=20)
    limits.check(make_request(negative_prompt="blurry"))
    with pytest.raises(LimitExceeded, match="the negative prompt in characters") as e:
        limits.check(make_request(negative_prompt="blurry " * 4))
    assert e.value.limit["name"] == "max_prompt_chars"
    with pytest.raises(LimitExceeded, match="the negative prompt in tokens"):
        RequestLimits().check(make_request(negative_prompt="blurry " * 8), lambda text: len(text.split()) + 2, 7)
