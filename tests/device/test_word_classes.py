"""Decisions by word class, never by value (docs/privacy.md): any two prompts that differ only in
the real value of one attribute (one word of a class for another of the same class) get the
same outcome, and when sent the same candidate set, byte for byte.

The classes come from the shipped data, not from examples: every word of each value of a
schema attribute (forms, aliases, person-only aliases), every form of each head family, the
vocabulary's words that tell ethnicity (generalised to the ethnicity slot), the lexicon's gender
pairs and every numeric age."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obclip.device.oblivious import ObliviousError, ObliviousTransform, Schema, TransformConfig
from obclip.device.oblivious.vocabulary import load_vocabulary
from obclip.device.oblivious.vouch import Context, Tok, _splits_into_vouched, _typo_of_vouched
from obclip.runtime.locations import package_path

SCHEMA = Schema.load(None)
T = ObliviousTransform()
VOCAB = load_vocabulary()


def outcome(prompt):
    try:
        r = T(prompt)
    except ObliviousError as exc:
        return ("refused", str(exc))
    return ("device-only", r.reason) if r.device_only else ("sent", r.candidates)


def modifier_words(attribute):
    """Single-token words of every value of a modifier attribute, as the schema lists them."""
    return sorted({k[0] for k, e in SCHEMA.lexicon.items() if len(k) == 1 and e.kind == "modifier"
                   and e.key == attribute and not e.plural})


def head_families():
    out = []
    for fam in SCHEMA.heads.values():
        if fam.varies:
            out.append(sorted({sing for sing, _ in fam.forms.values()}))
    return out


ETHNICITY = modifier_words("ethnicity") + sorted(
    w for w, a in VOCAB.told.items() if a == "ethnicity" and w.isalpha() and VOCAB.get(w) is not None
    and "A" in VOCAB.get(w).flags and "a" in VOCAB.get(w).pos)
AGE = modifier_words("age")
GENDER = modifier_words("gender")
PAIRS = [p for p in json.loads(package_path("device", "lexicons", "gender.json").read_text())["pairs"]]
NUMERIC = [f"{n}-year-old" for n in (3, 7, 16, 25, 34, 45, 52, 67, 81, 99)]

MODIFIER_TEMPLATES = [
    "{art} {w} nurse checking a chart in a hospital",
    "portrait of {art} {w} woman, 85mm, soft light",
    "{art} ({w}:1.2) man reading, cinematic",
    "photo of {art} {w} teacher and her students",
    "{art} {w} man, smiling, at a market",
    # A noun the vocabulary knows as a thing, doing what people do.
    "{art} {w} babushka selling sunflower seeds",
]
HEAD_TEMPLATES = [
    "a photo of a {w} in a park",
    "portrait of an old {w}, dramatic light",
    "{w} walking a dog, street photography",
    "a {w} and a dog on a beach",
]


def article(word):
    return "an" if word[:1].lower() in "aeiou" else "a"


def same(words, templates, data):
    template = data.draw(st.sampled_from(templates))
    a, b = data.draw(st.sampled_from(words)), data.draw(st.sampled_from(words))
    p1 = template.format(w=a, art=article(a))
    p2 = template.format(w=b, art=article(b))
    assert outcome(p1) == outcome(p2), (p1, p2)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_ethnicity_word_gets_the_same_outcome(data):
    same(ETHNICITY, MODIFIER_TEMPLATES, data)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_every_ethnicity_word_gets_the_same_outcome_as_a_noun_and_capitalised(data):
    words = ETHNICITY + [w.capitalize() for w in ETHNICITY]
    same(words, ["{art} {w} sitting alone on a bench", "{art} {w}, smiling, in a cafe",
                 "a woman who is {w}, reading"], data)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_age_word_gets_the_same_outcome(data):
    same(AGE + NUMERIC, MODIFIER_TEMPLATES, data)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_gender_word_gets_the_same_outcome(data):
    same(GENDER, MODIFIER_TEMPLATES, data)


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_both_words_of_a_head_family_get_the_same_outcome(data):
    family = data.draw(st.sampled_from(head_families()))
    same(family, HEAD_TEMPLATES, data)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "/".join(p))
def test_both_words_of_a_gender_pair_get_the_same_outcome(pair):
    for template in HEAD_TEMPLATES + ["a {w} party at a bar", "the {w} of the house"]:
        assert outcome(template.format(w=pair[0])) == outcome(template.format(w=pair[1])), (template, pair)


def test_the_classes_are_big():
    # The property is over the shipped data, not a handful of examples.
    assert len(ETHNICITY) > 200 and len(head_families()) > 30 and len(PAIRS) >= 10


def test_a_thing_noun_doing_what_people_do_is_an_unknown_person():
    # WordNet's babushka is a headscarf; selling takes a person as subject (its verb frames), so
    # the attribute word describes a person whose noun tells the device nothing: never sent.
    for word in ("Russian", "Asian", "white", "female", "elderly", "7-year-old"):
        assert outcome(f"a {word} babushka selling sunflower seeds")[0] == "device-only", word
    assert "only as a thing" in outcome("a Russian babushka selling sunflower seeds")[1]
    # Animals do what people do too; a thing that hangs or sits is no person.
    assert outcome("a female lion hunting at dawn")[0] == "sent"
    assert outcome("a Japanese lantern hanging from a branch")[0] == "sent"
    assert outcome("a Russian babushka on a hook")[0] == "sent"
    # A schema of things (shapes) has no slot for the person: the same fail-closed outcome.
    shapes = ObliviousTransform(TransformConfig(schema_path="shapes"))
    assert shapes("a Russian babushka selling sunflower seeds").device_only
    assert not shapes("a Russian babushka on a hook").device_only


# ---------------------------------------------------------------- things named by a people, a name, a dictionary word

# The vocabulary's words for a people that it vouches before a thing (flag A): every one of them
# but the lexicons' words that tell ethnicity anywhere ("hispanic") and hyphenated ones, which
# are kept on the device wherever they stand (docs/privacy.md, known limits).
THING_STYLE = [w for w in ETHNICITY if VOCAB.get(w) is not None and "A" in VOCAB.get(w).flags
               and w not in T.lexicons.words and "-" not in w]
THING_TEMPLATES = ["{art} {w} garden with a stone lantern", "{art} {w} rug on a wooden floor",
                   "a bowl of {w} soup, food photography"]
PERSON_TEMPLATES = ["{art} {w} woman reading in a garden", "{art} {w} chef cooking soup"]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_word_for_a_people_describing_a_thing_is_sent_as_typed_and_before_a_person_never(data):
    # "a Japanese garden", "a Persian rug", "French onion soup": with no one in the picture the word
    # is a style of the thing, for every value alike; before a person it is protected, never sent.
    word = data.draw(st.sampled_from(THING_STYLE))
    word = data.draw(st.sampled_from([word, word.capitalize()]))
    thing = data.draw(st.sampled_from(THING_TEMPLATES)).format(w=word, art=article(word))
    assert outcome(thing) == ("sent", (thing,)), thing
    person = data.draw(st.sampled_from(PERSON_TEMPLATES)).format(w=word, art=article(word))
    kind, sent = outcome(person)
    assert kind == "device-only" or (kind == "sent" and len(sent) > 1
                                     and not all(word.lower() in c.lower().split() for c in sent)), (person, sent)


def test_the_thing_style_class_is_most_of_the_ethnicity_words():
    assert len(THING_STYLE) > 0.9 * len(ETHNICITY)


NAMES = sorted(w for w, a in VOCAB.told.items() if a == "name" and w.isalpha() and len(w) > 2)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_name_a_thing_is_named_after_is_sent_only_with_no_one_in_the_picture(data):
    # "a Queen Anne chair", "a Santa Claus hat": every name alike; before a depiction ("doll")
    # it names who is depicted, and next to a person it may be theirs: kept on the device.
    name = data.draw(st.sampled_from(NAMES)).capitalize()
    thing = f"a {name} chair in a sunlit parlor"
    assert outcome(thing) == ("sent", (thing,)), thing
    assert outcome(f"a {name} doll on a shelf")[0] == "device-only"
    assert outcome(f"a woman on a {name} chair")[0] == "device-only"
    assert outcome(f"{name}'s chair in a parlor")[0] == "device-only"


@pytest.mark.parametrize("family", head_families(), ids=lambda f: "/".join(f))
def test_a_title_before_a_name_of_a_thing_gets_the_same_set_for_every_value(family):
    outs = {outcome(f"a {t.capitalize()} Anne chair in a sunlit parlor") for t in family}
    assert len(outs) == 1, outs


DICTIONARY_ONLY = sorted(w for w, e in VOCAB.words.items() if "D" in e.flags and "N" not in e.flags and w.isalpha())


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_word_of_unknown_sense_is_vouched_only_with_no_one_in_the_picture(data):
    # SCOWL's words that WordNet lacks ("ramen", "koi"): their sense is unknown to the device, so
    # they are sent only where no one is in the picture and not as what a counted noun phrase
    # names ("a hottie"); elsewhere they are read like a word the vocabulary lacks.
    word = data.draw(st.sampled_from(DICTIONARY_ONLY))
    thing = f"a bowl of {word} on a wooden table"
    assert outcome(thing) == ("sent", (thing,)), thing
    modifier = f"a {word} pond in a park"
    if VOCAB.get("pond") is not None:
        assert outcome(modifier) == ("sent", (modifier,)), modifier
    for near_a_person in (f"a woman holding a bowl of {word}", f"a {word} on the beach"):
        kind, sent = outcome(near_a_person)
        if kind == "sent":  # only as a word the vocabulary lacks may be: a run-together word or a typo
            ctx = Context([], [], frozenset(), T._schema_words, T._function_words, T._nouns)
            tok = Tok(0, len(word), word, word)
            assert _splits_into_vouched(word, VOCAB, ctx) or _typo_of_vouched(tok, VOCAB, ctx), near_a_person


def test_a_word_of_unknown_sense_the_examples():
    assert outcome("a bowl of ramen with chopsticks")[0] == "sent"
    assert outcome("a Japanese garden with a koi pond")[0] == "sent"
    assert outcome("a koi in a pond")[0] == "device-only"  # what "a ____" names may be a person
    assert outcome("emoji on a phone screen")[0] == "sent"
    assert outcome("a woman eating ramen")[0] == "device-only"
    assert len(DICTIONARY_ONLY) > 5000
