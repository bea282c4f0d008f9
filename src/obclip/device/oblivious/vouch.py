"""Default deny: every word that would leave the device as typed must be one the device can
vouch for (docs/privacy.md).

Vouched: the words a slot renders (protected spans, rewritten in every candidate), the words
of the shipped vocabulary (device/vocabulary/words.tsv: common English words with every
attribute-bearing word, name and near-typo of one removed), the schema's plain person nouns
that the vocabulary does not mark, collocations such as "king cobra", numbers that are not
ages, punctuation and prompt-weight syntax. Everything else is a Finding: a name, another
script or language, a typo, leetspeak, a hashtag, a LoRA or embedding name, an attribute word
no slot protects, a context cue ("pregnant"), a number next to an age cue.

Every rule reads word classes and positions, never which value of an attribute a word has.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache

from obclip.runtime.locations import package_path

from ..sensitive import Finding
from .vocabulary import Vocabulary

# A token: a decimal number ("1.3" in a prompt weight), or letters and digits with inner
# apostrophes and hyphens ("don't", "mother-of-pearl").
TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['\u2019][^\W_]+)*(?:-[^\W_]+(?:['\u2019][^\W_]+)*)*")
_NUMBER = re.compile(r"\d{1,3}(?:[.,]\d+)?(?:s|'s|th|st|nd|rd)?")
_YEARS = re.compile(r"\d{4}s?|\d+[.,]\d+|\d{5,}")  # "1990s", "3.5", "10000": never an age
_MEASURE = re.compile(r"\d+(?:[.,]\d+)?(?:k|mm|cm|m|km|px|p|d|x|fps|mp|hz|kg|g|ml|l|in|ft|gb|mb|v|w)")
_AGE_UNIT = re.compile(r"\d{1,3}(?:yo|y|yr|yrs|m|mo)")
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred".split())
# An age cue before a number ("age 52", "turned 40") or after it ("52 years old", "6 months old").
_AGE_BEFORE = frozenset("age ages aged turned turning turns birthday bday".split())
_AGE_AFTER = frozenset("yo y.o yrs-old year-old years-old".split())
_SPANS = frozenset("year years yr yrs month months week weeks day days".split())
# Words a number may sit behind and still describe the person before them ("a woman of 45",
# "she is 34", "a man who is 52", "in his early 40s").
_LINKS = frozenset("is was are were be being been of at about around approximately nearly almost who that just "
                   "only roughly early mid late aged age".split())
# Text between two words of one phrase: spaces, brackets, quotes, prompt weights.
_JOIN = re.compile(r"(?:[-\s()\[\]{}<>\"'\u201c\u201d\u2018\u2019*_]|:\s*-?\d+(?:\.\d+)?)*")
_CLAUSE_END = re.compile(r"[.!?;\n]")
# How far after an attribute word the thing it describes may come ("an old, rusty car").
_REACH = 4


@dataclass(frozen=True)
class Cue:
    words: tuple[str, ...]
    attribute: str
    implies: str


@cache
def context_cues() -> tuple[Cue, ...]:
    """device/lexicons/context_cues.json: words that agree with one value of an attribute."""
    data = json.loads(package_path("device", "lexicons", "context_cues.json").read_text(encoding="utf-8"))
    return tuple(Cue(tuple(k.split()), v["attribute"], v["implies"]) for k, v in data["cues"].items())


@dataclass(frozen=True)
class Tok:
    start: int
    end: int
    text: str   # as typed
    word: str   # lower case, typographic apostrophes straightened


def tokens(text: str) -> list[Tok]:
    return [Tok(m.start(), m.end(), m.group(), m.group().lower().replace("\u2019", "'"))
            for m in TOKEN.finditer(text)]


@dataclass
class Context:
    """What the transform knows about the prompt beyond its words."""

    protected: list[tuple[int, int]]   # stretches rewritten in every candidate
    persons: list[tuple[int, int]]     # person mentions and pronouns (protected or not)
    plain_heads: frozenset[str]        # the schema's person nouns that carry no attribute
    schema_words: frozenset[str]       # single words of the schema (attribute words, protected in a slot)
    function_words: frozenset[str]     # words that are never nouns ("in", "a", "with")


def compound_spans(text: str, vocab: Vocabulary) -> list[tuple[int, int]]:
    """Stretches of text that are a vouched collocation ("king cobra", "grandfather clocks"),
    longest first, words separated by single spaces."""
    toks = tokens(text)
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(toks):
        for k in range(min(vocab.max_compound, len(toks) - i), 0, -1):
            if k > 1 and any(text[toks[j].end:toks[j + 1].start] != " " for j in range(i, i + k - 1)):
                continue
            key = [t.word for t in toks[i:i + k]]
            last = key[-1]
            forms = [key] + [key[:-1] + [last[: -len(s)]] for s in ("s", "es") if last.endswith(s)]
            if any(tuple(f) in vocab.compounds for f in forms):
                out.append((toks[i].start, toks[i + k - 1].end))
                i += k - 1
                break
        i += 1
    return out


def unvouched(text: str, vocab: Vocabulary, ctx: Context) -> list[Finding]:
    """The words of text the device cannot vouch for, as Findings (empty: everything is vouched)."""
    toks = tokens(text)
    compound = compound_spans(text, vocab)
    out: list[Finding] = []
    out += _cues(text, toks)
    for i, tok in enumerate(toks):
        if covered(text, tok.start, tok.end, ctx.protected) or covered(text, tok.start, tok.end, compound):
            continue
        finding = _check(text, toks, i, vocab, ctx)
        if finding is not None:
            out.append(finding)
    for m in re.finditer(r"[\U0001F1E6-\U0001F1FF]+", text):  # flags name a country
        out.append(Finding(m.start(), m.end(), m.group(), "ethnicity", "flag emoji", "no flag"))
    return sorted(out, key=lambda f: (f.start, f.end))


def covered(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Is every letter and digit of text[start:end] inside the spans?"""
    return all(any(a <= i < b for a, b in spans) for i in range(start, end) if text[i].isalnum())


def _cues(text: str, toks: list[Tok]) -> list[Finding]:
    out = []
    words = [t.word for t in toks]
    for cue in context_cues():
        n = len(cue.words)
        for i in range(len(toks) - n + 1):
            if tuple(words[i:i + n]) == cue.words:
                a, b = toks[i].start, toks[i + n - 1].end
                out.append(Finding(a, b, text[a:b], cue.attribute, "context cue",
                                   f"a description that does not imply {cue.attribute}"))
    return out


def _check(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> Finding | None:
    tok = toks[i]
    w = tok.word
    if _is_number(w):
        return _age(text, toks, i, vocab, ctx) if not _YEARS.fullmatch(w) else None
    if _AGE_UNIT.fullmatch(w):
        return Finding(tok.start, tok.end, tok.text, "age", "numeric age", "an age word before the person noun")
    if _MEASURE.fullmatch(w):
        return None
    if _word_ok(text, toks, i, w, vocab, ctx):
        return None
    if "-" in w and w not in vocab.told:
        # A hyphenated word no list holds as a whole: each part must be vouched on its own
        # ("blue-eyed"), read with the parts after it as its context ("baby-blue").
        parts, pos = [], tok.start
        for part in tok.text.split("-"):
            parts.append(Tok(pos, pos + len(part), part, part.lower().replace("\u2019", "'")))
            pos += len(part) + 1
        rest = parts + toks[i + 1:]
        for j, part in enumerate(parts):
            if covered(text, part.start, part.end, ctx.protected):
                continue
            if _is_number(part.word):
                bad = _age(text, rest, j, vocab, ctx)
                if bad is not None:
                    return _whole(tok, bad)
                continue
            if not _word_ok(text, rest, j, part.word, vocab, ctx):
                return _whole(tok, _unknown(part, vocab))
        return None
    return _unknown(tok, vocab)


def _whole(tok: Tok, part: Finding) -> Finding:
    return Finding(tok.start, tok.end, tok.text, part.attribute, part.why, part.instead)


def _unknown(tok: Tok, vocab: Vocabulary) -> Finding:
    base = _base(tok.word)
    told = vocab.told.get(tok.word) or vocab.told.get(base)
    if told is not None:
        return Finding(tok.start, tok.end, tok.text, told, "tells " + told, "a word from the vouched vocabulary")
    return Finding(tok.start, tok.end, tok.text, "unknown", "not in the vouched vocabulary",
                   "common English words (names, other languages, typos and tags are never sent)")


def _base(word: str) -> str:
    for suffix in ("'s", "s'", "'"):
        if word.endswith(suffix) and len(word) > len(suffix):
            return word[: -len(suffix)]
    return word


def _is_number(w: str) -> bool:
    if _NUMBER.fullmatch(w) or _YEARS.fullmatch(w):
        return True
    parts = w.split("-")
    return all(p in _NUMBER_WORDS or (p.endswith("ies") and p[:-3] + "y" in _NUMBER_WORDS) for p in parts)


def _word_ok(text: str, toks: list[Tok], i: int, w: str, vocab: Vocabulary, ctx: Context) -> bool:
    """Is this (non-number) word vouched where it stands?"""
    entry = vocab.get(w) or vocab.get(_base(w))
    if entry is None:
        return (w in ctx.plain_heads or _base(w) in ctx.plain_heads) and w not in vocab.told \
            and w not in ctx.schema_words
    if "A" in entry.flags:
        return _describes_a_thing(text, toks, i, vocab, ctx)
    return True


def _describes_a_thing(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> bool:
    """An attribute word about people ("old", "white", "baby") is vouched only before the thing it
    describes, a noun that is no person ("an old photograph", "a white horse", "an old, rusty car"),
    never before a person, at the end of a phrase or after a verb ("she is old")."""
    for j in range(i + 1, min(i + 1 + _REACH, len(toks))):
        gap = text[toks[j - 1].end:toks[j].start]
        if not (_JOIN.fullmatch(gap) or gap.strip() == ","):
            return False
        t = toks[j]
        if any(a <= t.start < b for a, b in ctx.persons) or t.word in ctx.plain_heads:
            return False
        entry = vocab.get(t.word) or vocab.get(_base(t.word))
        if entry is None or t.word in ctx.function_words:
            return False
        if t.word.endswith(("ing", "ed")) or (entry.pos and entry.pos[0] != "n" and "a" in entry.pos):
            continue  # another adjective or a participle: look further
        return entry.noun and "P" not in entry.flags and "A" not in entry.flags
    return False


def _age(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> Finding | None:
    """A number is an age when an age cue is next to it ("age: 52", "6 months old", "turned 40")
    or when it follows a person with only linking words between ("a woman, 45", "a girl of
    sixteen", "she is 34", "Maria, 28"); elsewhere it is a count or a measure ("3 apples")."""
    tok = toks[i]
    found = Finding(tok.start, tok.end, tok.text, "age", "numeric age",
                    "an age word right before the person noun ('a middle-aged woman')")

    def same_clause(a: int, b: int) -> bool:
        return _CLAUSE_END.search(text, a, b) is None

    for j in range(max(0, i - 2), i):
        if toks[j].word in _AGE_BEFORE and same_clause(toks[j].end, tok.start):
            return found
    after = [t.word for t in toks[i + 1:i + 3]]
    if after[:1] and after[0] in _AGE_AFTER or after[:1] and after[0] in _SPANS and after[1:] == ["old"]:
        return found
    j = i - 1
    while j >= 0 and same_clause(toks[j].end, tok.start):
        prev = toks[j]
        if any(a <= prev.start < b for a, b in ctx.persons) or prev.word in ctx.plain_heads \
                or vocab.person_noun(prev.word):
            return found
        entry = vocab.get(prev.word)
        if prev.text[:1].isupper() and (entry is None or "N" in entry.flags):
            return found  # after a name ("Maria, 28", "Rose, 28")
        if prev.word not in _LINKS:
            return None
        j -= 1
    return None
