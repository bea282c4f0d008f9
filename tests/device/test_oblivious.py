"""Tests for device/oblivious.py: the oblivious candidate-set transform."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obclip.device.oblivious import (
    CandidateSet,
    ObliviousError,
    ObliviousTransform,
    Schema,
    TransformConfig,
    main,
)

T = ObliviousTransform()
T64 = ObliviousTransform(TransformConfig(max_candidates=64))

# Portrait templates in the style of the paper's appendix B.3. The first two
# are the examples docs/method.md quotes; the third ends "around his eyes" like the
# paper template docs/method.md mentions. $a/$A is the indefinite article,
# $his/$he the pronouns agreeing with the person.
TEMPLATES = [
    "$age $ethnicity $gender in hat Fashion portrait photo",
    "High-quality, face portrait photo of $a $age $ethnicity $gender, wearing glasses",
    "Close-up portrait photo of $a $age $ethnicity $gender with soft light around $his eyes",
    "$A $age $ethnicity $gender smiling at the camera, studio lighting",
    "Photo of $a $age $ethnicity $gender reading a book in a cafe, $he looks happy",
    "Oil painting of $a $age $ethnicity $gender standing in a wheat field",
    "$age $ethnicity $gender wearing a red scarf, street photography, 35mm",
    "Portrait of $a $age $ethnicity $gender holding $his dog in $his arms",
    "Cinematic shot of $a $age $ethnicity $gender walking in the rain. $He is alone.",
    "$a $age $ethnicity $gender in a business suit, looking at the camera, 4k",
]

AGES = ["young", "middle-aged", "old"]
GENDERS = ["male", "female"]
ETHNICITIES = ["caucasian", "african", "asian", "indian", "european"]

# Surface forms a user may type for each value (all mean the same value).
AGE_WORDS = {
    "young": ["young", "youthful", "teenage"],
    "middle-aged": ["middle-aged", "middle aged"],
    "old": ["old", "elderly", "senior", "aged"],
}
GENDER_WORDS = {  # word class -> value -> surface forms
    "noun": {"male": ["man", "guy", "gentleman"], "female": ["woman", "lady", "gal"]},
    "adjective": {"male": ["male"], "female": ["female"]},
}
PRONOUNS = {"male": {"his": "his", "he": "he"}, "female": {"his": "her", "he": "she"}}


def styled(word, style):
    return {"lower": word, "title": word[:1].upper() + word[1:], "upper": word.upper()}[style]


def fill(template, age=None, ethnicity=None, gender=None, gclass="noun", pick=0, style="lower"):
    """Fill a template; None leaves the attribute out. `pick` chooses the surface form."""
    words = {
        "$age": styled(AGE_WORDS[age][pick % len(AGE_WORDS[age])], style) if age else "",
        "$ethnicity": styled(ethnicity, style) if ethnicity else "",
        "$gender": styled(GENDER_WORDS[gclass][gender][pick % len(GENDER_WORDS[gclass][gender])], style)
        if gender else "",
    }
    g = gender or "male"
    out = template
    for key, word in words.items():
        out = out.replace(key, word)
    out = out.replace("$his", PRONOUNS[g]["his"]).replace("$He", PRONOUNS[g]["he"].title())
    out = out.replace("$he", PRONOUNS[g]["he"])
    out = re.sub(r" {2,}", " ", out).strip()
    out = re.sub(r" ,", ",", out)
    # The article is deliberately always "a": the transform must make it agree.
    out = out.replace("$A", "A").replace("$a", "a")
    return out


def words_of(text):
    return re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)*", text.lower())


# ---------------------------------------------------------------- paper templates


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize(
    "attrs,n",
    [({"gender": "female"}, 2), ({"gender": "male", "age": "old"}, 6),
     ({"gender": "female", "age": "young", "ethnicity": "asian"}, 30)],
)
def test_paper_templates_give_2_6_30(template, attrs, n):
    result = T(fill(template, **attrs))
    assert result.n == n
    assert result.protected
    assert list(result.slots) == [a for a in ("gender", "age", "ethnicity") if a in attrs]


def test_pronoun_alone_makes_gender_occur():
    # "around his eyes" reveals gender even when the mention has no gender word.
    result = T(fill(TEMPLATES[2], age="old", ethnicity="indian").replace("indian", "indian person"))
    assert result.n == 30
    assert "gender" in result.slots


def test_a_headless_ethnicity_word_stays_on_the_device():
    # "an old indian with ..." (no head noun): "white"/"black" are colours there, so no value of
    # the attribute gets a slot without a head; the word is not vouched, nothing is sent.
    results = [T(f"Close-up portrait photo of an old {e} with soft light around his eyes")
               for e in ("indian", "white", "black", "asian")]
    assert all(r.device_only and r.candidates == () for r in results)
    assert len({r.reason for r in results}) == 1 and "a word that tells ethnicity" in results[0].reason


# ---------------------------------------------------------------- the security property

template_st = st.sampled_from(TEMPLATES)
values_st = st.fixed_dictionaries({
    "age": st.one_of(st.none(), st.sampled_from(AGES)),
    "ethnicity": st.one_of(st.none(), st.sampled_from(ETHNICITIES)),
    "gender": st.sampled_from(GENDERS),
    "gclass": st.sampled_from(["noun", "adjective"]),
    "style": st.sampled_from(["lower", "title", "upper"]),
})


@settings(max_examples=60, deadline=None)
@given(template=template_st, v=values_st, pick=st.integers(0, 3))
def test_every_candidate_gives_the_same_set(template, v, pick):
    prompt = fill(template, pick=pick, **v)
    result = T(prompt)
    assert len(set(result.candidates)) == result.n
    for i, candidate in enumerate(result.candidates):
        again = T(candidate)
        assert again.candidates == result.candidates  # byte for byte
        assert again.real_index == i
        assert again.assignments == result.assignments
    # The real values are the real_index assignment.
    real = result.assignments[result.real_index]
    assert real["gender"] == v["gender"]
    if v["age"]:
        assert real["age"] == v["age"]
    if v["ethnicity"]:
        assert real["ethnicity"] == v["ethnicity"]


@settings(max_examples=60, deadline=None)
@given(template=template_st, v=values_st, picks=st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_wording_variants_give_the_same_set(template, v, picks):
    a = T(fill(template, pick=picks[0], **v))
    b = T(fill(template, pick=picks[1], **v))
    assert a.candidates == b.candidates
    assert a.real_index == b.real_index


@settings(max_examples=40, deadline=None)
@given(template=template_st, v=values_st, other_style=st.sampled_from(["lower", "title", "upper"]))
def test_capitalisation_only_changes_casing(template, v, other_style):
    a = T(fill(template, **v))
    b = T(fill(template, **{**v, "style": other_style}))
    assert [c.lower() for c in a.candidates] == [c.lower() for c in b.candidates]
    assert a.assignments == b.assignments and a.real_index == b.real_index


@settings(max_examples=40, deadline=None)
@given(template=template_st, v=values_st, other=st.sampled_from(GENDERS + AGES))
def test_set_does_not_depend_on_the_real_value(template, v, other):
    # Changing a real value moves real_index, never the set.
    changed = dict(v)
    if other in GENDERS:
        changed["gender"] = other
    elif v["age"]:
        changed["age"] = other
    a, b = T(fill(template, **v)), T(fill(template, **changed))
    assert a.candidates == b.candidates


# Free-form prompts built from attribute words, pronouns, articles, casing and
# punctuation: whatever the transform accepts must satisfy the same property.
FUZZ_WORDS = [
    "a", "an", "A", "AN", "the", "man", "Woman", "WOMEN", "girl", "Boy", "lady", "guy", "old", "Elderly",
    "senior", "young", "middle", "aged", "Middle-Aged", "asian", "EUROPEAN", "indians", "male", "Female",
    "he", "She", "her", "HIS", "him", "hers", "himself", "mother", "Dad", "grandmother", "husband", "queen",
    "person", "teenager", "actress", "hat", "red", "with", "and", "of", "eyes", "flowers", "looks", "at", "2",
]
fuzz_st = st.lists(
    st.tuples(st.sampled_from(FUZZ_WORDS), st.sampled_from([" ", " ", "  ", "", ", ", ". ", "\n"])),
    min_size=1, max_size=8,
).map(lambda parts: "".join(w + s for w, s in parts))


@settings(max_examples=300, deadline=None)
@given(prompt=fuzz_st)
def test_free_form_prompts_are_stable_or_refused(prompt):
    try:
        result = T64(prompt)
    except ObliviousError:
        return  # a refusal is allowed; a wrong candidate set is not
    assert len(set(result.candidates)) == result.n
    for i, candidate in enumerate(result.candidates):
        again = T64(candidate)
        assert again.candidates == result.candidates
        assert again.real_index == i


@pytest.mark.parametrize("pair", [
    ("an elderly man", "a senior man"), ("an old man", "an aged man"),
    ("a lady in red", "a woman in red"), ("a middle aged man", "a middle-aged man"),
    ("a girl in red", "a young woman in red"), ("a gentleman", "a guy"),
    ("the grandmother smiles", "the old grandmother smiles"),
    ("a teenage boy", "a young man"), ("an Asian girl on a bench", "a young Asian woman on a bench"),
])
def test_named_wording_variants(pair):
    assert T(pair[0]).candidates == T(pair[1]).candidates


# ---------------------------------------------------------------- rendering


def test_pronouns_agree_in_every_candidate():
    result = T("An old man with wrinkles around his eyes, he looks at himself and smiles")
    for c in result.candidates:
        w = set(words_of(c))
        if "woman" in w:
            assert not w & {"his", "he", "himself", "him", "man"}
        else:
            assert not w & {"her", "she", "herself", "hers", "woman"}


def test_her_as_object_and_determiner():
    result = T("she hands her hat to her friend and then looks at her.")
    assert result.candidates[0] == "he hands his hat to his friend and then looks at him."


def test_pronoun_case_comes_from_the_context_not_the_value():
    # Before a noun every determiner-like word is read as the determiner, whichever value was
    # typed, so "him" and "her" give the same set (issue 12: no refusal for one value only).
    assert T("he gave him flowers").candidates == T("she gave her flowers").candidates
    # An adverb is not a noun: "her" stays the object, for both values.
    assert T("a woman; the rain soaks her completely").candidates == \
        T("a man; the rain soaks him completely").candidates == \
        ("a man; the rain soaks him completely", "a woman; the rain soaks her completely")


def test_articles_agree():
    result = T("a photo of a old european man")
    assert "a photo of a young European man" in result.candidates
    assert "a photo of an old European man" in result.candidates
    assert "a photo of an old Asian man" in result.candidates
    assert "a photo of a middle-aged Indian woman" in result.candidates
    for c in result.candidates:
        assert not re.search(r"\ba (old|asian|african|indian)\b", c, re.IGNORECASE)
        assert not re.search(r"\ban (young|middle|european|caucasian)", c, re.IGNORECASE)


def test_ethnicity_is_capitalised_whatever_was_typed():
    # "white" and "Asian" are typed in different cases; the set must not tell which was typed.
    assert T("a white receptionist").candidates == T("an Asian receptionist").candidates
    assert "a Caucasian receptionist" in T("a Black receptionist").candidates


def test_casing_follows_the_user():
    assert "An Old African Man" in T("A Young Asian Woman").candidates
    assert "AN OLD MAN IN HAT" in T("A GIRL IN HAT").candidates
    # A capital that only starts the sentence stays at the start.
    assert "Old man in a hat" in T("Girl in a hat").candidates
    result = T("She smiles. HER hat is red")
    assert result.candidates == ("He smiles. HIS hat is red", "She smiles. HER hat is red")


def test_non_sensitive_text_is_untouched():
    prompt = "  a black cat and a white dog,\tnear an old   man!  "
    result = T(prompt)
    for c in result.candidates:
        assert c.startswith("  a black cat and a white dog,\tnear ")
        assert c.endswith("!  ")


def test_white_and_black_are_colours():
    result = T("a white horse next to a black car")
    assert result.n == 1 and not result.protected


def test_plural_people():
    result = T("two elderly ladies on a bench")
    assert result.n == 6
    assert "two young men on a bench" in result.candidates
    assert result.candidates[result.real_index] == "two old women on a bench"


def test_relational_nouns_and_implied_age():
    result = T("a grandmother with her grandson")
    assert list(result.slots) == ["person1.gender", "person1.age", "person2.gender"]
    assert result.candidates[result.real_index] == "an old grandmother with her grandson"
    assert "a young grandfather with his granddaughter" in result.candidates


# ---------------------------------------------------------------- several people


def test_two_people_vary_independently():
    result = T("a man and a woman")
    assert result.n == 4
    assert result.candidates == ("a man and a man", "a man and a woman", "a woman and a man", "a woman and a woman")
    assert result.assignments[result.real_index] == {"person1.gender": "male", "person2.gender": "female"}
    assert result.slots == {"person1.gender": ["male", "female"], "person2.gender": ["male", "female"]}


def test_pronouns_bind_by_position():
    result = T("a woman holding her cat next to a man with his dog")
    assert result.n == 4
    assert "a man holding his cat next to a woman with her dog" in result.candidates


def test_pronoun_before_the_only_person():
    result = T("with his hat on, an old man")
    assert "with her hat on, an old woman" in result.candidates


def test_ambiguous_binding_raises():
    with pytest.raises(ObliviousError, match="before any person"):
        T("his hat, a man and a woman")


def test_disagreeing_pronoun_is_rendered_from_its_person():
    # Refusing here would depend on the values ("his" after "a woman" refused, after "a man" sent);
    # the pronoun is bound by position and rendered from its person's slot instead.
    result = T("a man and a woman, his hat is red")
    assert result.candidates == T("a man and a woman, her hat is red").candidates
    assert "a man and a woman, her hat is red" in result.candidates
    assert T("she and her husband").candidates == T("he and his husband").candidates


def test_one_slot_per_person_and_attribute():
    # Two age words for one person give one slot (the first wins), never two disagreeing words.
    assert T("a young old man").candidates == T("a young young man").candidates == T("a young man").candidates


# ---------------------------------------------------------------- limits and refusals


def test_cap_exceeded_names_the_attributes():
    with pytest.raises(ObliviousError) as err:
        T("a young asian man and an old european woman")
    msg = str(err.value)
    assert "900" in msg and "32" in msg
    for slot in ("person1.gender (2 values)", "person1.age (3 values)", "person1.ethnicity (5 values)",
                 "person2.gender", "person2.age", "person2.ethnicity"):
        assert slot in msg
    assert "schema" in msg


def test_cap_is_configurable():
    small = ObliviousTransform(TransformConfig(max_candidates=4))
    with pytest.raises(ObliviousError, match=r"gender \(2 values\) x age \(3 values\)"):
        small("an old man")
    assert small("a man").n == 2


def test_no_sensitive_attribute():
    result = T("a photo of a cat on a sofa")
    assert result.n == 1 and not result.protected
    assert result.candidates == ("a photo of a cat on a sofa",)
    assert "no sensitive attribute" in result.message
    assert result.public_summary() == {"candidates": ["a photo of a cat on a sofa"], "n": 1, "attributes": {},
                                       "device_only": False}


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_raises(prompt):
    with pytest.raises(ObliviousError, match="empty prompt"):
        T(prompt)


def test_config_validation():
    with pytest.raises(ValueError):
        TransformConfig(max_candidates=0)


def test_public_summary_hides_the_real_index():
    result = T("an old man")
    summary = result.public_summary()
    assert set(summary) == {"candidates", "n", "attributes", "device_only"}
    assert summary == T("a young woman").public_summary()
    assert isinstance(result, CandidateSet)


# ---------------------------------------------------------------- schema


def test_default_schema_loads():
    schema = Schema.load()
    assert [a.name for a in schema.attributes] == ["gender", "age", "ethnicity"]
    assert schema.values("ethnicity") == ("caucasian", "african", "asian", "indian", "european")
    assert Schema.load(None) == schema


def test_custom_schema_file(tmp_path):
    data = {
        "attributes": [{"name": "gender", "values": ["male", "female"]}],
        "heads": [{"family": "person", "varies": ["gender"],
                   "forms": {"male": ["man", "men"], "female": ["woman", "women"]}}],
    }
    path = tmp_path / "gender.json"
    path.write_text(json.dumps(data))
    t = ObliviousTransform(TransformConfig(schema_path=str(path)))
    assert t("a happy woman").candidates == ("a happy man", "a happy woman")
    # Age and ethnicity are out of this schema, and their words are not vouched: nothing is sent.
    result = t("an old asian woman")
    assert result.device_only and result.candidates == () and "tells ethnicity" in result.reason


@pytest.mark.parametrize("bad,match", [
    ({}, "attributes"),
    ({"attributes": [{"name": "gender", "values": ["male"]}]}, "at least 2"),
    ({"attributes": [{"name": "g", "values": ["a", "b"]}],
      "modifiers": {"g": {"forms": {"a": ["x"], "b": ["z"], "c": ["y"]}}}}, "not a value"),
    ({"attributes": [{"name": "g", "values": ["a", "b"]}],
      "modifiers": {"g": {"forms": {"a": ["x"]}}}}, "no canonical word"),
    ({"attributes": [{"name": "g", "values": ["a", "b"]}],
      "modifiers": {"g": {"forms": {"a": ["x"], "b": ["x"]}}}}, "already defined"),
    ({"attributes": [{"name": "g", "values": ["a", "b"]}],
      "modifiers": {"h": {"forms": {"a": ["x"]}}}}, "unknown attribute"),
    ({"attributes": [{"name": "g", "values": ["a", "b"]}],
      "modifiers": {"g": {"forms": {"a": ["X"], "b": ["y"]}}}}, "lowercase"),
])
def test_malformed_schema_raises(bad, match):
    with pytest.raises(ObliviousError, match=match):
        Schema.from_dict(bad)


def test_missing_schema_file():
    with pytest.raises(ObliviousError, match="cannot read schema"):
        Schema.load("/nonexistent/schema.json")


# ---------------------------------------------------------------- CLI


def test_cli_prints_public_summary(capsys):
    assert main(["An elderly lady in a hat"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["n"] == 6
    assert "real_index" not in out
    assert data["attributes"] == {"gender": ["male", "female"], "age": ["young", "middle-aged", "old"]}
    assert "An old woman in a hat" in data["candidates"]


def test_cli_errors_exit_2(capsys):
    assert main(["an old man", "--max-candidates", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "age (3 values)" in err
    assert main(["  "]) == 2
