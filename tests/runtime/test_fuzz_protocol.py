"""Fuzzing the two wire decoders (runtime/protocol.py) with hypothesis: whatever the bytes,
``StepsRequest.from_bytes`` and ``decode_handoff`` either succeed or raise ProtocolError (a request)
or HandoffError (a handoff) naming the defect; never another exception type (a 500 on the server, a
traceback on the device)."""

from __future__ import annotations

import json
import struct

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from obclip.runtime.protocol import HandoffError, ProtocolError, StepsRequest, decode_handoff, encode_handoff

SHAPE = (4, 2, 2)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REQUEST = StepsRequest(("a photo of a man", "a photo of a woman"), 7, 6, 3, 7.5, 8, 8)
VALID = REQUEST.to_bytes()
FIELDS = sorted(json.loads(VALID))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _request_or_protocol_error(data: bytes) -> None:
    try:
        request = StepsRequest.from_bytes(data)
    except ProtocolError:
        return
    # accepted: it is a request, and its canonical bytes decode to the same request
    assert StepsRequest.from_bytes(request.to_bytes()) == request


@FUZZ
@given(st.binary(max_size=400))
@example(b'{"candidates": ["\\ud800"], "seed": 1}')
@example(b"[" * 100_000)
@example(b'{"seed": 1e999}')
@example(b'{"seed": NaN}')
def test_request_decoder_on_any_bytes(data):
    _request_or_protocol_error(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)))
def test_request_decoder_on_wrong_field_types(overrides):
    obj = json.loads(VALID)
    obj.update(overrides)
    _request_or_protocol_error(json.dumps(obj).encode())


@FUZZ
@given(st.sampled_from(FIELDS), st.sampled_from([
    "1e999", "-1e999", "Infinity", "-Infinity", "NaN", "1e308", "-0.0", "2e-320", "9" * 5000, "[]", "{}",
    '"\\ud800"', '["\\udfff"]', '["a", "\\ud83d"]', "true", "null", "[" * 5000 + "]" * 5000, '"x"',
    '{"switch_step": 3, "cache_step": 1e999, "skip_step": 3}', '{"switch_step": [], "cache_step": 1, "skip_step": 1}',
]))
def test_request_decoder_on_hostile_numbers_and_text(name, value):
    text = VALID.decode()
    obj = json.loads(text)
    obj[name] = "@@"
    _request_or_protocol_error(json.dumps(obj).replace('"@@"', value).encode())


def test_hostile_values_are_refused_with_a_name():
    obj = json.loads(VALID)
    for name, value, msg in [("candidates", ["\ud800"], "lone surrogate"),
                             ("guidance_scale", 1e308, "guidance_scale"),
                             ("guidance_scale", -1.0, "guidance_scale"),
                             ("seed", 2**64, "seed")]:
        bad = dict(obj, **{name: value})
        data = json.dumps(bad).encode()
        try:
            StepsRequest.from_bytes(data)
        except ProtocolError as e:
            assert msg in str(e)
        else:
            raise AssertionError(f"{name}={value!r} was accepted")


def _handoff() -> bytes:
    x = np.arange(REQUEST.n * int(np.prod(SHAPE)), dtype=np.float32).reshape(REQUEST.n, *SHAPE)
    return encode_handoff(REQUEST, x, -x, lower_order_nums=1, step_index=REQUEST.switch_step,
                          timesteps=list(range(900, 0, -150)), cloud_model="m")


HANDOFF = _handoff()
(HEADER_LEN,) = struct.unpack("<Q", HANDOFF[:8])
HEADER = json.loads(HANDOFF[8:8 + HEADER_LEN])


def _handoff_or_protocol_error(data: bytes) -> None:
    try:
        out = decode_handoff(data, REQUEST, SHAPE)
    except HandoffError as e:
        assert str(e)
        return
    assert out.latents.shape == (REQUEST.n, *SHAPE) and np.isfinite(out.latents).all()


def _with_header(header: object, tail: bytes | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + (HANDOFF[8 + HEADER_LEN:] if tail is None else tail)


def test_the_fuzzed_handoff_is_valid():
    assert decode_handoff(HANDOFF, REQUEST, SHAPE).step_index == REQUEST.switch_step


@FUZZ
@given(st.binary(max_size=300))
def test_handoff_decoder_on_any_bytes(data):
    _handoff_or_protocol_error(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(HANDOFF) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(HANDOFF)))
def test_handoff_decoder_on_mutated_bytes(flips, cut):
    data = bytearray(HANDOFF)
    for i, b in flips:
        data[i] = b
    _handoff_or_protocol_error(bytes(data[:cut]) if cut < len(data) // 2 else bytes(data))


@FUZZ
@given(st.sampled_from(sorted(HEADER["__metadata__"])), json_values)
def test_handoff_decoder_on_wrong_metadata_types(key, value):
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"][key] = value
    _handoff_or_protocol_error(_with_header(header))


@FUZZ
@given(st.sampled_from(["latents", "prev_x0", "__metadata__", "extra"]), json_values)
def test_handoff_decoder_on_wrong_tensor_entries(name, value):
    header = json.loads(json.dumps(HEADER))
    header[name] = value
    _handoff_or_protocol_error(_with_header(header))


def test_handoff_decoder_on_hostile_headers():
    meta = dict(HEADER["__metadata__"])
    nested = "[" * 100_000 + "]" * 100_000
    cases = [
        _with_header({"__metadata__": {"format": nested}}),
        struct.pack("<Q", 20) + b"[" * 20,
        struct.pack("<Q", 2**63) + b"{}",
        _with_header(dict(HEADER, __metadata__=dict(meta, n="Infinity"))),
        _with_header(dict(HEADER, __metadata__=dict(meta, timesteps="[1e999]"))),
        _with_header(dict(HEADER, __metadata__=dict(meta, timesteps=nested))),
        _with_header(dict(HEADER, __metadata__=dict(meta, step_index="9" * 5000))),
        _with_header(dict(HEADER, latents=dict(HEADER["latents"], data_offsets=[0, 1e999]))),
        _with_header(dict(HEADER, latents=dict(HEADER["latents"], shape="abc"))),
        _with_header(HEADER, tail=b""),
    ]
    for data in cases:
        _handoff_or_protocol_error(data)
    deep = b'"__metadata__":{"deep":' + b"[" * 50_000 + b"]" * 50_000 + b","
    raw = HANDOFF[8:8 + HEADER_LEN].replace(b'"__metadata__":{', deep, 1)
    _handoff_or_protocol_error(struct.pack("<Q", len(raw)) + raw + HANDOFF[8 + HEADER_LEN:])
