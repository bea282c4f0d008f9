"""Issue 12 acceptance: protect or refuse, and nothing decided by the real value.

Runs the transform over the hand-labelled prompt sets in tests/data/ (labels were written from
the prompt text before the detector existed):

* privacy_prompts.jsonl: {prompt, sensitive: [words a careful person expects protected],
  expect: "protect" (the schema can represent them) | "any" (protect or refuse)}
* clean_prompts.jsonl: prompts with no sensitive content.

The data tests use max_candidates=64 so that the cap (a separate, structural refusal) does not
hide what they test; with the default cap of 32, one labelled prompt with two fully described
people is refused by the cap.
"""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obclip.device.oblivious import ObliviousError, ObliviousTransform, Schema, TransformConfig, main
from obclip.device.sensitive import generalize_emoji, normalize

from helpers import TEST_DATA

DATA = TEST_DATA
SENSITIVE = [json.loads(line) for line in (DATA / "privacy_prompts.jsonl").read_text(encoding="utf-8").splitlines()]
CLEAN = [json.loads(line)["prompt"] for line in (DATA / "clean_prompts.jsonl").read_text(encoding="utf-8").splitlines()]

REFUSE = ObliviousTransform(TransformConfig(max_candidates=64))
ALLOW = ObliviousTransform(TransformConfig(max_candidates=64, unprotected="allow"))

# Labelled words the transform still sends as typed, with why (README "Known limits").
KNOWN_MISSES = {
    ("a yung man on a motorbike", "yung"): "4 letters, and an ordinary word in the CLIP vocabulary: not a typo",
    ("an asian grandmother with her grandchildren", "grandchildren"):
        "a gender-neutral kin noun; it implies only a generation, which the schema does not model",
}


def test_the_data_sets_are_big_enough():
    assert len(SENSITIVE) >= 150 and len(CLEAN) >= 50
    assert all(d["sensitive"] and d["expect"] in ("protect", "any") for d in SENSITIVE)


def outcome(transform, prompt):
    try:
        r = transform(prompt)
    except ObliviousError as exc:
        return ("refused", str(exc))
    return ("sent", r.candidates)


@pytest.mark.parametrize("prompt", [d["prompt"] for d in SENSITIVE] + CLEAN)
def test_every_member_gives_the_same_set_or_the_same_refusal(prompt):
    kind, result = outcome(REFUSE, prompt)
    if kind == "sent":
        for i, member in enumerate(result):
            again = REFUSE(member)
            assert again.candidates == result and again.real_index == i
        return
    # Refused: the set it would have had (sensitive words allowed) must be refused as a whole,
    # with the same message for every member, so the refusal never depends on the real value.
    kind2, would_be = outcome(ALLOW, prompt)
    members = would_be if kind2 == "sent" else (prompt,)
    for member in members:
        assert outcome(REFUSE, member) == ("refused", result), member


def leaked(label, candidates):
    """Output-based: is the labelled word sent as typed, i.e. present the same number of times
    (at least once) in every candidate? (A protected word varies or disappears.)"""
    word = generalize_emoji(normalize(label))[0].lower()
    if not re.search(r"\w", word):  # an emoji: sent as typed if any candidate still holds it
        return any(label in c for c in candidates)
    pattern = r"(?<![\w-])" + re.escape(word) + r"(?![\w-])"
    counts = {len(re.findall(pattern, c.lower())) for c in candidates}
    return len(counts) == 1 and counts.pop() > 0


def test_no_labelled_sensitive_word_is_sent_unprotected():
    misses, checked = [], 0
    for d in SENSITIVE:
        kind, result = outcome(REFUSE, d["prompt"])
        if kind == "refused":
            continue
        for label in d["sensitive"]:
            checked += 1
            if leaked(label, result) and (d["prompt"], label) not in KNOWN_MISSES:
                misses.append((d["prompt"], label))
    assert checked > 300 and misses == []


def test_known_misses_are_still_misses():
    # If one of these starts being protected, drop it from KNOWN_MISSES (and the README's list).
    for (prompt, label) in KNOWN_MISSES:
        kind, result = outcome(REFUSE, prompt)
        assert kind == "sent" and leaked(label, result)


def test_representable_prompts_are_protected_not_refused():
    refused = [(d["prompt"], outcome(REFUSE, d["prompt"])[1]) for d in SENSITIVE if d["expect"] == "protect"
               and outcome(REFUSE, d["prompt"])[0] == "refused"]
    assert refused == []


def test_clean_prompts_are_rarely_refused_and_rarely_varied():
    refused = [p for p in CLEAN if outcome(REFUSE, p)[0] == "refused"]
    varied = [p for p in CLEAN if outcome(REFUSE, p)[0] == "sent" and REFUSE(p).n > 1]
    assert len(refused) <= 0.05 * len(CLEAN), refused
    assert varied == []


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
def test_rewordings_within_a_lexicon_group_give_the_same_set(key, words):
    kind, attr, _, plural = key
    if kind == "modifier":
        templates = ["a photo of a {} woman in a park", "(({}:1.2)) man, portrait"]
    else:
        templates = ["a photo of {} in a park" if plural else "a photo of a {} in a park"]
    for template in templates:
        sets = {outcome(REFUSE, template.format(w)) for w in words}
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
])
def test_issue_examples_do_not_depend_on_the_value(prompt, other):
    assert outcome(REFUSE, prompt) == outcome(REFUSE, other)


def test_issue_examples_render_plausibly():
    assert "an (old:1.3) man" in REFUSE("a (teenage:1.3) boy").candidates
    assert REFUSE("an old photograph of a man").slots == {"gender": ["male", "female"]}
    assert all("young" not in c for c in REFUSE("a 50 years old man").candidates if "years" in c)
    shapes = ObliviousTransform(TransformConfig(schema_path="shapes"))
    assert "a (red) circle" in shapes("an (orange) circle").candidates


@pytest.mark.parametrize("prompt, word", [
    ("a woman-owned bakery", "woman-owned"), ("a young-looking man", "young-looking"),
    ("a latina woman with curly hair", "latina"), ("a woman in her 40s", "in his/her 40s"),
    ("a greek goddess", "goddess"), ("a baby in a crib", "baby"), ("a man aged 60", "aged 60"),
    ("a dark-skinned man", "dark-skinned"), ("a mexican grandmother", "mexican"),
])
def test_refusals_name_the_word_and_the_fix(prompt, word):
    with pytest.raises(ObliviousError) as err:
        REFUSE(prompt)
    assert repr(word) in str(err.value) and "instead" in str(err.value)
    warned = ObliviousTransform(TransformConfig(unprotected="warn"))(prompt)
    assert [f.text for f in warned.unprotected] == [word] and warned.warnings


@pytest.mark.parametrize("prompt, expect", [
    ("a ｗｏｍａｎ reading", "a woman reading"),            # fullwidth
    ("a wo\u200bman with a hat", "a woman with a hat"),     # zero-width space inside the word
    ("a m\u0430n in a hat", "a man in a hat"),              # Cyrillic a
    ("a womna walking", "a woman walking"),                 # misspelling of a protected word
    ("a white man in a suit", "a caucasian man in a suit"),
    ("a japanese woman in a kimono", "an asian woman in a kimono"),
    ("a fireman rescuing a cat", "a fireman rescuing a cat"),
    ("a kid eating ice cream", "a child eating ice cream"),
    ("a forty-five-year-old woman", "a middle-aged woman"),    # numeric ages, digits or words
    ("a 25 y.o. man", "a young man"),
    ("a w\u00f3m\u00e1n reading", "a woman reading"),                 # accents
    ("an old-fashioned car and a man", "an old-fashioned car and a man"),             # generalised to the age family
])
def test_hidden_and_wider_words_are_protected(prompt, expect):
    result = REFUSE(prompt)
    assert result.n > 1 and result.candidates[result.real_index] == expect


def test_emoji_are_generalised_in_every_candidate():
    result = REFUSE("a \U0001F468\U0001F3FD\u200d\U0001F373 cooking pasta next to a woman")
    for c in result.candidates:
        assert "\U0001F468" not in c and "\U0001F3FD" not in c and "\U0001F9D1\u200d\U0001F373" in c
    assert {g.attribute for g in result.generalised} == {"gender/age", "ethnicity"}


def test_short_and_ordinary_words_are_never_typos():
    for prompt in ("she can see the sea", "a bother", "the rather old barn", "a mother", "laughter in a cafe",
                   "a horse bridle on a wall", "a widowed woman", "a witchy hat"):
        r = ALLOW(prompt)
        assert all("misspelling" not in f.why for f in r.unprotected)
    assert REFUSE("a cat can jump").n == 1
    assert REFUSE("a horse bridle on a wall").n == 1


def test_compound_nouns_are_not_age_words():
    assert REFUSE("a baby elephant next to a tree").n == 1
    with pytest.raises(ObliviousError, match="'baby'"):
        REFUSE("a baby sleeping in a crib")


def test_audit_cli_writes_json_lines(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("a young asian woman\na latina woman\na red car\n", encoding="utf-8")
    assert main(["--audit", str(f)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["a young asian woman", "a latina woman", "a red car"]
    for r in rows:
        assert set(r) >= {"prompt", "n", "protected", "refused", "unprotected"}
    assert rows[0]["n"] == 30 and rows[0]["refused"] is None and len(rows[0]["protected"]) == 3
    assert rows[1]["refused"] and [u["text"] for u in rows[1]["unprotected"]] == ["latina"]
    assert rows[2] == {**rows[2], "n": 1, "refused": None, "protected": [], "unprotected": []}
    assert main(["--audit", str(f), "--unprotected", "warn"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[1]["refused"] is None and rows[1]["n"] == 2 and rows[1]["unprotected"][0]["text"] == "latina"


# A wider fuzz than test_oblivious's: weights, brackets, quotes, numeric ages, person-only aliases,
# plain person nouns, age families, words outside the schema, typos.
FUZZ = ["a", "an", "A", "the", "man", "Woman", "girl", "boys", "lady", "old", "elderly", "young", "middle-aged",
        "asian", "Indian", "japanese", "white", "black", "male", "female", "he", "She", "her", "his", "him",
        "hers", "herself", "mother", "husband", "wife", "kid", "toddler", "retired", "doctor", "nurse",
        "student", "fireman", "35-year-old", "50 years old", "latina", "baby", "in her 40s", "womna",
        "completely", "flowers", "photo", "of", "with", "and", "smiling", "beautiful", "hat", "2",
        "woman-owned", "young-looking", "forty-year-old", "w\u00f3man", "teens", "elderly", "lovely", "south asian"]
SEPS = [" ", " ", ", ", ". ", "; ", " (", ":1.2) ", " [", "] ", " '", "' ", "\n"]


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.tuples(st.sampled_from(FUZZ), st.sampled_from(SEPS)), min_size=1, max_size=9))
def test_fuzz_same_set_or_same_refusal(parts):
    prompt = "".join(w + s for w, s in parts)
    if not prompt.strip():
        return
    _same_set_or_same_refusal(prompt)


def _same_set_or_same_refusal(prompt):
    kind, result = outcome(REFUSE, prompt)
    if kind == "sent":
        for i, member in enumerate(result):
            again = REFUSE(member)
            assert again.candidates == result and again.real_index == i, member
        return
    kind2, would_be = outcome(ALLOW, prompt)
    for member in (would_be if kind2 == "sent" else (prompt,)):
        assert outcome(REFUSE, member) == ("refused", result), member
