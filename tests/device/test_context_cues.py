"""device/lexicons/context_cues.json: words that agree with one value of an attribute. Next to a
person they keep the prompt on the device (no member the rest of the prompt makes impossible is
ever sent); without a person they describe a thing and are no reason to keep it."""

import json

import pytest

from obclip.device.oblivious import ObliviousError, ObliviousTransform, Schema, TransformConfig
from obclip.runtime.locations import package_path

DATA = json.loads(package_path("device", "lexicons", "context_cues.json").read_text(encoding="utf-8"))
CUES = DATA["cues"]
T = ObliviousTransform()
REFUSE = ObliviousTransform(TransformConfig(unprotected="refuse"))
PERSON = [("a", "woman"), ("a", "man"), ("an", "old man"), ("a", "young girl"), ("an", "Asian woman")]


def test_the_file_is_well_formed():
    attributes = set(Schema.load(None).attribute_order())
    assert DATA["description"] and len(CUES) >= 100
    for cue, spec in CUES.items():
        assert cue == cue.lower().strip() and "  " not in cue, cue
        assert set(spec) == {"attribute", "implies"} and spec["attribute"] in attributes, cue
        assert isinstance(spec["implies"], str) and spec["implies"], cue


@pytest.mark.parametrize("cue", sorted(CUES))
def test_a_cue_next_to_a_person_is_never_sent(cue):
    for art, person in PERSON:
        for prompt in (f"{art} {person} with {cue} in a park", f"{art} {person}, {cue}, smiling",
                       f"portrait of {art} {person} ({cue}:1.2)"):
            r = T(prompt)
            assert r.device_only and r.candidates == (), prompt
            assert any(f.why == "context cue" for f in r.unprotected), prompt
            with pytest.raises(ObliviousError):
                REFUSE(prompt)


@pytest.mark.parametrize("cue", ["pregnant", "beard", "niqab", "school uniform", "wrinkles", "saris"])
def test_the_reason_names_the_class_whatever_the_value(cue):
    reasons = {T(f"a {p} in a {cue}").reason for p in ("man", "woman", "young man", "old woman")}
    assert len(reasons) == 1


@pytest.mark.parametrize("prompt", ["a bald eagle on a branch", "a kimono displayed in a shop window",
                                    "a crib in a pastel nursery", "a pregnant cat asleep on a sofa"])
def test_without_a_person_a_cue_describes_a_thing(prompt):
    r = T(prompt)
    assert not r.device_only and r.n == 1, (prompt, r.reason)
