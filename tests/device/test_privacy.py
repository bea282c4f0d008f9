"""Protect, keep on the device, or refuse; never send an unvouched word; nothing decided by the value.

Runs the transform over the hand-labelled prompt sets in tests/data/ (labels were written from
the prompt text before the detector existed):

* privacy_prompts.jsonl: {prompt, sensitive: [words a careful person expects protected],
  expect: "protect" (the schema can represent them) | "any" (protect or refuse)}
* clean_prompts.jsonl: prompts with no sensitive content.

Under the default policy (device-only) a prompt is either sent with every labelled word
protected, or not sent at all. The data tests use max_candidates=64 so that the cap (a separate,
structural refusal) does not hide what they test.
"""

import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from obclip.device.oblivious import ObliviousError, ObliviousTransform, Schema, TransformConfig, main
from obclip.device.sensitive import generalize_emoji, normalize

from helpers import TEST_DATA

DATA = TEST_DATA
SENSITIVE = [json.loads(line) for line in (DATA / "privacy_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
CLEAN = [json.loads(line)["prompt"] for line in (DATA / "clean_prompts.jsonl").read_text(encoding="utf-8").splitlines()]

DEFAULT = ObliviousTransform(TransformConfig(max_candidates=64))
REFUSE = ObliviousTransform(TransformConfig(max_candidates=64, unprotected="refuse"))
UNSAFE = ObliviousTransform(TransformConfig(max_candidates=64, unprotected="unsafe-send"))


def test_the_data_sets_are_big_enough():
    assert len(SENSITIVE) >= 150 and len(CLEAN) >= 50
    assert all(d["sensitive"] and d["expect"] in ("protect", "any") for d in SENSITIVE)


def outcome(transform, prompt):
    """What the server sees: a set, or nothing (device-only or refused, with the message)."""
    try:
        r = transform(prompt)
    except ObliviousError as exc:
        return ("refused", str(exc))
    if r.device_only:
        return ("device-only", r.reason)
    return ("sent", r.candidates)


@pytest.mark.parametrize("prompt", [d["prompt"] for d in SENSITIVE] + CLEAN)
def test_every_member_gives_the_same_set_or_the_same_outcome(prompt):
    for transform in (DEFAULT, REFUSE):
        kind, result = outcome(transform, prompt)
        if kind == "sent":
            for i, member in enumerate(result):
                again = transform(member)
                assert again.candidates == result and again.real_index == i
            continue
        # Not sent: the set it would have had (unsafe-send) gets the same outcome and the same
        # message for every member, so the decision never depends on the real value.
        kind2, would_be = outcome(UNSAFE, prompt)
        for member in (would_be if kind2 == "sent" else (prompt,)):
            assert outcome(transform, member) == (kind, result), member


def leaked(label, candidates):
    """Output-based: is the labelled word sent as typed, i.e. present the same number of times
    (at least once) in every candidate? (A protected word varies or disappears.)"""
    word = generalize_emoji(normalize(label))[0].lower()
    if not re.search(r"\w", word):  # an emoji: sent as typed if any candidate still holds it
        return any(label in c for c in candidates)
    pattern = r"(?<![\w-])" + re.escape(word) + r"(?![\w-])"
    counts = {len(re.findall(pattern, c.lower())) for c in candidates}
    return len(counts) == 1 and counts.pop() > 0


def test_no_labelled_sensitive_word_is_sent_as_typed():
    misses, checked = [], 0
    for d in SENSITIVE:
        kind, result = outcome(DEFAULT, d["prompt"])
        if kind != "sent":
            continue
        for label in d["sensitive"]:
            checked += 1
            if leaked(label, result):
                misses.append((d["prompt"], label))
    assert checked > 150 and misses == []


def test_the_old_known_misses_are_now_kept_on_the_device():
    # Sent as typed before default deny (README "Known limits" of the lexicon detector).
    for prompt in ("a yung man on a motorbike", "an asian grandmother with her grandchildren"):
        assert outcome(DEFAULT, prompt)[0] == "device-only"


def sent_share(prompts):
    return sum(outcome(DEFAULT, p)[0] == "sent" for p in prompts) / len(prompts)


# Clean prompts kept on the device: the cost of failing closed (docs/privacy.md, "Known limits").
CLEAN_KEPT = {
    "a pile of colorful macarons": "'macarons': in neither WordNet 3.x nor SCOWL up to size 80 (SCOWL has "
                                   "'macaron' only at 95); as a typo of 'macaroons' it is near 'macaroni', "
                                   "which WordNet's first sense makes a person (a dandy)",
}


def test_clean_prompts_are_rarely_kept_on_the_device_and_never_varied_by_age():
    kept = [p for p in CLEAN if outcome(DEFAULT, p)[0] != "sent"]
    assert kept == list(CLEAN_KEPT)
    # An age word describing a thing is vouched as typed ("an old photograph of a lighthouse").
    assert DEFAULT("an old photograph of a lighthouse").n == 1


def test_most_representable_prompts_are_still_sent():
    # docs/privacy.md reports the measured share; this guards against a collapse.
    representable = [d["prompt"] for d in SENSITIVE if d["expect"] == "protect"]
    assert sent_share(representable) >= 0.6


def lexicon_groups(schema):
    """Words that mean exactly the same thing (same entry), grouped."""
    groups = {}
    for words, entry in schema.lexicon.items():
        key = (entry.kind, entry.key, tuple(sorted(entry.values.items())), entry.plural)
        groups.setdefault(key, []).append(" ".join(words))
    # Words that carry no attribute ("person"/"individual") are not rewritten, so not compared.
    return [(k, sorted(ws)) for k, ws in groups.items() if len(ws) > 1 and k[2]]


SCHEMA = Schema.load(None)


@pytest.mark.parametrize("key, words", lexicon_groups(SCHEMA), ids=lambda x: str(x)[:40])
def test_rewordings_within_a_lexicon_group_give_the_same_outcome(key, words):
    kind, attr, _, plural = key
    if kind == "modifier":
        templates = ["a photo of a {} woman in a park", "(({}:1.2)) man, portrait"]
    else:
        templates = ["a photo of {} in a park" if plural else "a photo of a {} in a park"]
    for template in templates:
        sets = {outcome(DEFAULT, template.format(w)) for w in words}
        assert len(sets) == 1, (template, words, sets)


@pytest.mark.parametrize("prompt, other", [
    # issue 12 item 1: the article is decided across brackets, quotes and weights
    ("a (teenage:1.3) boy", "an (elderly:1.3) man"),
    ("an [elderly] man", "a [young] woman"),
    ("a 'young' woman", "an 'old' man"),
    # item 2: "her" after a verb and before an adverb is the object, for both values
    ("a woman; the rain soaks her completely", "a man; the rain soaks him completely"),
    # item 3: a pronoun and noun of different genders: same set as the agreeing wording
    ("she and her husband", "he and his husband"),
    ("a girl and his mom", "a boy and his mom"),
    # item 5: numeric ages are a bucketed age, not "50 years young"
    ("a 50 years old man", "a middle-aged man"),
    ("a 35-year-old woman", "a 40 year old man"),
    # issue 22: "her" before an adjective that ends the phrase is the object
    ("make her happy", "make him happy"),
])
def test_issue_examples_do_not_depend_on_the_value(prompt, other):
    assert outcome(DEFAULT, prompt) == outcome(DEFAULT, other)
    assert outcome(DEFAULT, prompt)[0] == "sent"


def test_issue_examples_render_plausibly():
    assert "an (old:1.3) man" in DEFAULT("a (teenage:1.3) boy").candidates
    assert DEFAULT("an old photograph of a man").slots == {"gender": ["male", "female"]}
    assert all("young" not in c for c in DEFAULT("a 50 years old man").candidates if "years" in c)
    assert "make her happy" in DEFAULT("make him happy").candidates
    shapes = ObliviousTransform(TransformConfig(schema_path="shapes"))
    assert "a (red) circle" in shapes("an (orange) circle").candidates


@pytest.mark.parametrize("prompt, word, told", [
    ("a woman-owned bakery", "woman-owned", "a word that tells gender"),
    ("a young-looking man", "young-looking", "a word that tells age"),
    ("two latinas with curly hair", "latinas", "a word that tells ethnicity"),
    ("a woman in her 40s", "in his/her 40s", "an age given in numbers"),
    ("a greek goddess", "goddess", "a word that tells gender"),
    ("a baby in a crib", "baby", "a word that tells age"),
    ("a man aged 60", "aged 60", "an age given in numbers"),
    ("a man, dark-skinned", "dark-skinned", "a word that tells ethnicity"),
    ("a mexican sitting on a bench", "mexican", "a word that tells ethnicity"),
    ("Maria reading in a cafe", "Maria", "a name"),
    ("a woman with a long beard", "beard", "a context cue for gender"),
    ("a guy from Seoul in a cafe", "Seoul", "a place a person comes from"),
    ("a toddler girl in pigtails", "toddler girl", "people the device cannot tell apart"),
])
def test_unvouched_words_keep_the_prompt_on_the_device(prompt, word, told):
    result = DEFAULT(prompt)
    assert result.device_only and result.candidates == () and result.n == 0
    assert told in result.reason and word in [f.text for f in result.unprotected]
    with pytest.raises(ObliviousError) as err:
        REFUSE(prompt)
    assert told in str(err.value) and result.reason in str(err.value)
    # The message names the class, never the typed word (so it is the same for every value).
    assert repr(word) not in str(err.value)


def test_unsafe_send_sends_unvouched_words_loudly():
    result = UNSAFE("Maria, a woman with curly hair")
    assert not result.device_only and result.n == 2
    assert [f.text for f in result.unprotected] == ["Maria"]
    assert result.warnings and all(w.startswith("UNSAFE") for w in result.warnings)


@pytest.mark.parametrize("words", [("latina", "asian", "korean", "mexican", "white", "arab", "Sikh", "dark-skinned")])
def test_every_ethnicity_word_gives_the_same_set(words):
    # Words the schema has no value for are generalised: the same slot, the same set, so that
    # the server cannot tell "Mexican" from "Korean" by whether or how a request comes.
    sets = {DEFAULT(f"a {w} nurse checking a chart").candidates for w in words}
    assert len(sets) == 1 and len(next(iter(sets))) == 5
    mexican = DEFAULT("a Mexican nurse checking a chart")
    assert [g.text for g in mexican.generalised] == ["Mexican"]
    assert mexican.candidates[mexican.real_index] == "a Caucasian nurse checking a chart"  # the first value


@pytest.mark.parametrize("old", ["warn", "allow"])
def test_the_old_sending_policies_are_gone(old):
    with pytest.raises(ObliviousError, match="is gone"):
        TransformConfig(unprotected=old)


@pytest.mark.parametrize("prompt, expect", [
    ("a ｗｏｍａｎ reading", "a woman reading"),            # fullwidth
    ("a wo\u200bman with a hat", "a woman with a hat"),     # zero-width space inside the word
    ("a m\u0430n in a hat", "a man in a hat"),              # Cyrillic a
    ("a womna walking", "a woman walking"),                 # misspelling of a protected word
    ("a white man in a suit", "a Caucasian man in a suit"),
    ("a japanese woman in a raincoat", "an Asian woman in a raincoat"),
    ("a fireman rescuing a cat", "a fireman rescuing a cat"),
    ("a kid eating ice cream", "a child eating ice cream"),
    ("a forty-five-year-old woman", "a middle-aged woman"),    # numeric ages, digits or words
    ("a 25 y.o. man", "a young man"),
    ("a w\u00f3m\u00e1n reading", "a woman reading"),                 # accents
    ("a \u1d21\u1d0f\u1d0d\u1d00\u0274 reading", "a woman reading"),  # small capitals
    ("a g\u0131rl reading", "a young woman reading"),                 # dotless i
    ("a wom\u0332an reading", "a woman reading"),                     # combining mark
    ("an old-fashioned car and a man", "an old-fashioned car and a man"),
])
def test_hidden_and_wider_words_are_protected(prompt, expect):
    result = DEFAULT(prompt)
    assert result.n > 1 and result.candidates[result.real_index] == expect


def test_emoji_are_generalised_in_every_candidate():
    result = DEFAULT("a \U0001F468\U0001F3FD\u200d\U0001F373 cooking pasta next to a woman")
    for c in result.candidates:
        assert "\U0001F468" not in c and "\U0001F3FD" not in c and "\U0001F9D1\u200d\U0001F373" in c
    assert {g.attribute for g in result.generalised} == {"gender/age", "ethnicity"}


def test_short_and_ordinary_words_are_sent_as_typed():
    for prompt in ("she can see the sea", "a bother", "the rather old barn", "laughter in a cafe",
                   "a horse bridle on a wall", "a cat can jump"):
        r = DEFAULT(prompt)
        assert not r.device_only and all("misspel" not in f.why for f in r.unprotected), prompt


def test_compound_nouns_are_not_age_words():
    assert DEFAULT("a baby elephant next to a tree").n == 1
    assert DEFAULT("a baby sleeping in a crib").device_only


def test_audit_cli_writes_json_lines(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("a young asian woman\nMaria in a cafe\na red car\n", encoding="utf-8")
    assert main(["--audit", str(f)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["a young asian woman", "Maria in a cafe", "a red car"]
    for r in rows:
        assert set(r) >= {"prompt", "n", "device_only", "reason", "protected", "refused", "unprotected"}
    assert rows[0]["n"] == 30 and rows[0]["refused"] is None and len(rows[0]["protected"]) == 3
    assert rows[1]["device_only"] and rows[1]["n"] == 0 and [u["text"] for u in rows[1]["unprotected"]] == ["Maria"]
    assert rows[2] == {**rows[2], "n": 1, "device_only": False, "refused": None, "protected": [], "unprotected": []}
    assert main(["--audit", str(f), "--unprotected", "refuse"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[1]["refused"] and rows[1]["unprotected"][0]["text"] == "Maria"


# A wider fuzz than test_oblivious's: weights, brackets, quotes, numeric ages, person-only aliases,
# plain person nouns, age families, words outside the schema, typos, unvouched words.
FUZZ = ["a", "an", "A", "the", "man", "Woman", "girl", "boys", "lady", "old", "elderly", "young", "middle-aged",
        "asian", "Indian", "japanese", "white", "black", "male", "female", "he", "She", "her", "his", "him",
        "hers", "herself", "mother", "husband", "wife", "kid", "toddler", "retired", "doctor", "nurse",
        "student", "fireman", "35-year-old", "50 years old", "latina", "baby", "in her 40s", "womna",
        "completely", "flowers", "photo", "of", "with", "and", "smiling", "beautiful", "hat", "2",
        "woman-owned", "young-looking", "forty-year-old", "w\u00f3man", "teens", "elderly", "lovely", "south asian",
        "Maria", "happy", "king", "cobra", "pregnant", "lifeguard", "dog", "is", "of 45", "blacksmith"]
SEPS = [" ", " ", ", ", ". ", "; ", " (", ":1.2) ", " [", "] ", " '", "' ", "\n"]


@settings(max_examples=300, deadline=None)
# Two ethnicity words on one person: the old transform rendered a member ("white caucasian father")
# that gave a different set when typed.
@example(parts=[("white", " "), ("south asian", " "), ("mother", " ")])
@given(parts=st.lists(st.tuples(st.sampled_from(FUZZ), st.sampled_from(SEPS)), min_size=1, max_size=9))
def test_fuzz_same_set_or_same_outcome(parts):
    prompt = "".join(w + s for w, s in parts)
    if not prompt.strip():
        return
    for transform in (DEFAULT, REFUSE):
        kind, result = outcome(transform, prompt)
        if kind == "sent":
            for i, member in enumerate(result):
                again = transform(member)
                assert again.candidates == result and again.real_index == i, member
            continue
        kind2, would_be = outcome(UNSAFE, prompt)
        for member in (would_be if kind2 == "sent" else (prompt,)):
            assert outcome(transform, member) == (kind, result), member
