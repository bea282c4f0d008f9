"""Oblivious transform (device side of ObCLIP, METHOD.md "The scheme", step 1).

The user's prompt may reveal sensitive attributes (by default gender, age,
ethnicity). The device turns it into N candidate prompts that differ only in
those attributes; the cloud runs all N and cannot tell which one is real.

What the proof needs (METHOD.md "Our reading"): the candidate set must be a
function of the *non-sensitive* content only, so that every member p' of
candidates(p) gives candidates(p') == candidates(p) byte for byte. Hence:

* Every value is written with ONE canonical word per word class, whatever the
  user typed ("elderly"/"senior" -> "old", "lady" -> "woman").
* Words that agree with an attribute (he/she, his/her, father/mother, ...)
  are part of it and are rewritten in every candidate.
* A mention of a person ("young Asian woman", "girl", "grandmother") is
  re-rendered as a whole from the attributes it carries, in a fixed order:
  [age] [ethnicity] [gender adjective] [head noun]. A head noun that carries
  an attribute other than the one it varies by ("girl" = female + young,
  "grandmother" = female + old) makes that attribute occur and renders it as
  an explicit adjective ("young woman", "old grandmother"); an explicit
  adjective wins over such an implied value ("young grandmother").
* Pronouns are bound to people by position, never by gender.
* Candidates are every combination of the values, in canonical order, never
  depending on which value is real; the N cap is decided on that whole set.

The schema (attributes, surface forms, canonical words) is data:
device/schemas/person.json by default, replaceable with --schema.
Pure standard library on purpose: this runs on the user's device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from obclip.runtime.locations import schemas_dir

DEFAULT_SCHEMA = "person"


def schema_file(name_or_path: str | Path | None) -> Path:
    """A schema shipped with obclip by name ("person", "shapes"), or a JSON file by path."""
    if name_or_path is None:
        name_or_path = DEFAULT_SCHEMA
    text = str(name_or_path)
    shipped = schemas_dir() / f"{text}.json"
    if "/" not in text and "\\" not in text and not text.endswith(".json") and shipped.is_file():
        return shipped
    return Path(name_or_path)

# A word: letters, optionally joined by hyphens ("middle-aged" is one word,
# "woman's" is "woman" followed by "'s", which stays untouched).
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")
_ARTICLES = ("a", "an")
# Characters that end a sentence: a capital right after them belongs to the
# sentence, not to the word.
_SENTENCE_END = ".!?\n\r"
_OPENERS = " \t\"'([{\u201c\u2018"


class ObliviousError(ValueError):
    """A prompt or schema the transform refuses, with a message for the user."""


# --------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Modifier:
    """Canonical adjective of one attribute: value -> (singular, plural)."""

    attribute: str
    forms: Mapping[str, tuple[str, str]]


@dataclass(frozen=True)
class HeadFamily:
    """A person noun that takes a different form per value of `varies`."""

    name: str
    varies: tuple[str, ...]
    forms: Mapping[tuple[str, ...], tuple[str, str]]  # values of `varies` -> (singular, plural)


@dataclass(frozen=True)
class Pronouns:
    attribute: str
    cases: Mapping[str, Mapping[str, str]]  # case -> value -> word
    determiner_case: str | None
    non_noun_words: frozenset[str]


@dataclass(frozen=True)
class Entry:
    """What one surface form (possibly several tokens) means."""

    kind: str  # "modifier" or "head"
    key: str  # attribute name (modifier) or family name (head)
    values: Mapping[str, str]  # attribute -> value this word carries
    plural: bool


@dataclass(frozen=True)
class Schema:
    name: str
    attributes: tuple[Attribute, ...]
    modifier_order: tuple[str, ...]
    modifiers: Mapping[str, Modifier]
    heads: Mapping[str, HeadFamily]
    pronouns: Pronouns | None
    # Derived lookup tables, built by from_dict.
    lexicon: Mapping[tuple[str, ...], Entry] = field(repr=False, compare=False)
    pronoun_words: Mapping[str, tuple[tuple[str, str], ...]] = field(repr=False, compare=False)
    max_phrase: int = field(default=1, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Schema:
        """Load a schema by shipped name or file path; None gives the default person schema."""
        path = schema_file(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ObliviousError(f"cannot read schema file {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ObliviousError(f"schema file {str(path)!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def values(self, attribute: str) -> tuple[str, ...]:
        return next(a.values for a in self.attributes if a.name == attribute)

    def attribute_order(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    @classmethod
    def from_dict(cls, data: Mapping) -> Schema:
        """Validate a parsed schema; every problem raises ObliviousError."""
        return _SchemaBuilder(data).build()


def _fail(msg: str):
    raise ObliviousError(f"schema: {msg}")


def _tokens_of(word: str, where: str) -> tuple[str, ...]:
    if not isinstance(word, str) or not word.strip():
        _fail(f"{where}: expected a non-empty word, got {word!r}")
    if word != word.lower():
        _fail(f"{where}: {word!r} must be lowercase (matching ignores case; casing follows the user)")
    toks = tuple(word.split())
    if not all(_WORD.fullmatch(t) for t in toks):
        _fail(f"{where}: {word!r} must be letters, hyphens and single spaces")
    return toks


class _SchemaBuilder:
    """Checks a schema dict and builds the lookup tables (one place for every rule)."""

    def __init__(self, data):
        if not isinstance(data, Mapping):
            _fail("top level must be a JSON object")
        self.data = data
        self.lexicon: dict[tuple[str, ...], Entry] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def build(self) -> Schema:
        attrs = self._attributes()
        self.space = {a.name: a.values for a in attrs}
        modifiers = self._modifiers()
        order = self._modifier_order(modifiers)
        heads = self._heads(modifiers)
        pronouns, pronoun_words = self._pronouns()
        if pronouns is not None:
            clash = sorted(w for w in pronouns.non_noun_words if (w,) in self.lexicon)
            if clash:
                _fail(f"pronouns.non_noun_words must not contain attribute words: {clash}")
        return Schema(
            name=str(self.data.get("name", "unnamed")),
            attributes=attrs,
            modifier_order=order,
            modifiers=modifiers,
            heads=heads,
            pronouns=pronouns,
            lexicon=dict(self.lexicon),
            pronoun_words=pronoun_words,
            max_phrase=max((len(k) for k in self.lexicon), default=1),
        )

    def _add(self, word: str, entry: Entry, where: str) -> None:
        toks = _tokens_of(word, where)
        if toks in self.lexicon and self.lexicon[toks] != entry:
            _fail(f"{where}: {word!r} is already defined by {self.origin[toks]}; a word may mean only one thing")
        self.lexicon[toks] = entry
        self.origin[toks] = where

    def _value(self, attr: str, value, where: str) -> str:
        if value not in self.space[attr]:
            _fail(f"{where}: {value!r} is not a value of {attr!r} (values: {list(self.space[attr])})")
        return value

    def _attr(self, name, where: str) -> str:
        if name not in self.space:
            _fail(f"{where}: unknown attribute {name!r} (attributes: {list(self.space)})")
        return name

    def _attributes(self) -> tuple[Attribute, ...]:
        raw = self.data.get("attributes")
        if not isinstance(raw, list) or not raw:
            _fail("'attributes' must be a non-empty list of {name, values}")
        out, seen = [], set()
        for i, a in enumerate(raw):
            if not isinstance(a, Mapping) or not isinstance(a.get("name"), str) or not a["name"]:
                _fail(f"attributes[{i}] must be an object with a non-empty 'name'")
            name, values = a["name"], a.get("values")
            if name in seen:
                _fail(f"attribute {name!r} is defined twice")
            # One value would rewrite every prompt to it and protect nothing.
            if (not isinstance(values, list) or len(values) < 2
                    or not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values)):
                _fail(f"attribute {name!r} needs a list of at least 2 distinct non-empty values")
            seen.add(name)
            out.append(Attribute(name, tuple(values)))
        return tuple(out)

    def _forms(self, raw, where: str, need_plural: bool) -> tuple[str, str]:
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not 1 <= len(raw) <= 2:
            _fail(f"{where}: expected [singular] or [singular, plural]")
        if need_plural and len(raw) != 2:
            _fail(f"{where}: a noun needs [singular, plural]")
        sing = raw[0]
        plur = raw[1] if len(raw) == 2 else raw[0]
        _tokens_of(sing, where)
        _tokens_of(plur, where)
        return sing, plur

    def _modifiers(self) -> dict[str, Modifier]:
        raw = self.data.get("modifiers", {})
        if not isinstance(raw, Mapping):
            _fail("'modifiers' must be an object: attribute -> {forms, aliases}")
        out = {}
        for attr, spec in raw.items():
            where = f"modifiers.{attr}"
            self._attr(attr, where)
            if not isinstance(spec, Mapping) or not isinstance(spec.get("forms"), Mapping):
                _fail(f"{where} must have 'forms': value -> [singular, plural?]")
            forms = {}
            for value in self.space[attr]:
                if value not in spec["forms"]:
                    _fail(f"{where}.forms has no canonical word for value {value!r}")
            for value, f in spec["forms"].items():
                self._value(attr, value, f"{where}.forms")
                sing, plur = self._forms(f, f"{where}.forms.{value}", need_plural=False)
                forms[value] = (sing, plur)
                self._add(sing, Entry("modifier", attr, {attr: value}, False), f"{where}.forms.{value}")
                if plur != sing:
                    self._add(plur, Entry("modifier", attr, {attr: value}, True), f"{where}.forms.{value}")
            self._distinct([f[0] for f in forms.values()], where)
            aliases = spec.get("aliases", {})
            if not isinstance(aliases, Mapping):
                _fail(f"{where}.aliases must be an object: value -> [words]")
            for value, words in aliases.items():
                self._value(attr, value, f"{where}.aliases")
                if not isinstance(words, list):
                    _fail(f"{where}.aliases.{value} must be a list of words")
                for w in words:
                    self._add(w, Entry("modifier", attr, {attr: value}, False), f"{where}.aliases.{value}")
            out[attr] = Modifier(attr, forms)
        return out

    def _modifier_order(self, modifiers) -> tuple[str, ...]:
        order = self.data.get("modifier_order", [a for a in self.space if a in modifiers])
        if not isinstance(order, list) or sorted(order) != sorted(modifiers):
            _fail(f"'modifier_order' must list each attribute with modifiers exactly once: {sorted(modifiers)}")
        return tuple(order)

    def _heads(self, modifiers) -> dict[str, HeadFamily]:
        raw = self.data.get("heads", [])
        if not isinstance(raw, list):
            _fail("'heads' must be a list of noun families")
        out = {}
        for i, fam in enumerate(raw):
            where = f"heads[{i}]"
            if not isinstance(fam, Mapping) or not isinstance(fam.get("family"), str):
                _fail(f"{where} must be an object with a 'family' name")
            name = fam["family"]
            where = f"heads[{name!r}]"
            if name in out:
                _fail(f"{where} is defined twice")
            varies = fam.get("varies", [])
            if not isinstance(varies, list):
                _fail(f"{where}.varies must be a list of attributes")
            varies = tuple(self._attr(a, f"{where}.varies") for a in varies)
            implies = fam.get("implies", {})
            if not isinstance(implies, Mapping):
                _fail(f"{where}.implies must be an object: attribute -> value")
            implies = {self._attr(a, f"{where}.implies"): v for a, v in implies.items()}
            for a, v in implies.items():
                self._value(a, v, f"{where}.implies")
            raw_forms = fam.get("forms")
            if not isinstance(raw_forms, Mapping):
                _fail(f"{where}.forms must be an object: 'v1|v2' (values of varies) -> [singular, plural]")
            forms = {}
            for combo in itertools.product(*(self.space[a] for a in varies)):
                key = "|".join(combo)
                if key not in raw_forms:
                    _fail(f"{where}.forms has no entry for {key!r}")
                sing, plur = self._forms(raw_forms[key], f"{where}.forms.{key}", need_plural=True)
                forms[combo] = (sing, plur)
                carried = {**implies, **dict(zip(varies, combo))}
                self._add(sing, Entry("head", name, carried, False), f"{where}.forms.{key}")
                self._add(plur, Entry("head", name, carried, True), f"{where}.forms.{key}")
            if len(raw_forms) != len(forms):
                _fail(f"{where}.forms has keys that are not value combinations of {list(varies)}")
            self._distinct([f[0] for f in forms.values()], where)
            for j, al in enumerate(fam.get("aliases", [])):
                aw = f"{where}.aliases[{j}]"
                if not isinstance(al, Mapping) or not isinstance(al.get("values", {}), Mapping):
                    _fail(f"{aw} must be an object with 'values', 'singular', 'plural'")
                vals = {self._attr(a, aw): self._value(a, v, aw) for a, v in al.get("values", {}).items()}
                missing = [a for a in varies if a not in vals]
                if missing:
                    _fail(f"{aw} must give a value for {missing} (the family varies by it)")
                carried = {**implies, **vals}
                for plural in (False, True):
                    words = al.get("plural" if plural else "singular", [])
                    if not isinstance(words, list):
                        _fail(f"{aw} singular/plural must be lists of words")
                    for w in words:
                        self._add(w, Entry("head", name, carried, plural), aw)
            # A value carried but not varied is rendered as an adjective, so
            # that adjective must exist.
            for toks, e in self.lexicon.items():
                if e.kind == "head" and e.key == name:
                    for a in e.values:
                        if a not in varies and a not in modifiers:
                            _fail(f"{where}: {' '.join(toks)!r} implies {a!r} but {a!r} has no modifiers to render it")
            out[name] = HeadFamily(name, varies, forms)
        return out

    def _pronouns(self):
        raw = self.data.get("pronouns")
        if raw is None:
            return None, {}
        if not isinstance(raw, Mapping) or not isinstance(raw.get("cases"), Mapping) or not raw["cases"]:
            _fail("'pronouns' must be an object with 'attribute' and 'cases'")
        attr = self._attr(raw.get("attribute"), "pronouns.attribute")
        det = raw.get("determiner_case")
        if det is not None and det not in raw["cases"]:
            _fail(f"pronouns.determiner_case {det!r} is not one of the cases")
        words: dict[str, list[tuple[str, str]]] = {}
        cases = {}
        for case, table in raw["cases"].items():
            where = f"pronouns.cases.{case}"
            if not isinstance(table, Mapping) or sorted(table) != sorted(self.space[attr]):
                _fail(f"{where} must give one word for each value of {attr!r}: {list(self.space[attr])}")
            for value, w in table.items():
                if len(_tokens_of(w, where)) != 1:
                    _fail(f"{where}: pronoun {w!r} must be a single word")
                if (w,) in self.lexicon:
                    _fail(f"{where}: {w!r} is also an attribute word")
                words.setdefault(w, []).append((case, value))
            self._distinct(list(table.values()), where)
            cases[case] = dict(table)
        for w, opts in words.items():
            if len({v for _, v in opts}) > 1:
                _fail(f"pronoun {w!r} stands for several values of {attr!r}")
            # The only ambiguity we can resolve from context is determiner vs
            # one other case ("her hat" vs "see her").
            non_det = {c for c, _ in opts if c != det}
            if len(non_det) > 1:
                _fail(f"pronoun {w!r} is ambiguous between cases {sorted(non_det)}; "
                      "only determiner/other can be told apart")
        nn = raw.get("non_noun_words", [])
        if not isinstance(nn, list) or not all(isinstance(w, str) for w in nn):
            _fail("pronouns.non_noun_words must be a list of words")
        pron = Pronouns(attr, cases, det, frozenset(w.lower() for w in nn))
        return pron, {w: tuple(opts) for w, opts in words.items()}

    @staticmethod
    def _distinct(words, where):
        if len(set(words)) != len(words):
            _fail(f"{where}: canonical words must differ between values, got {words}")


# --------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformConfig:
    max_candidates: int = 32
    schema_path: str | None = None

    def __post_init__(self):
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ObliviousError(f"max_candidates must be an integer >= 1, got {self.max_candidates!r}")


@dataclass(frozen=True)
class CandidateSet:
    candidates: tuple[str, ...]
    assignments: tuple[dict, ...]
    real_index: int  # DEVICE-ONLY: never send this anywhere
    slots: dict

    @property
    def n(self) -> int:
        return len(self.candidates)

    @property
    def protected(self) -> bool:
        return bool(self.slots)

    @property
    def message(self) -> str:
        if not self.protected:
            return "no sensitive attribute found: the prompt is its only candidate (N = 1), nothing is hidden"
        parts = ", ".join(f"{s} ({len(v)})" for s, v in self.slots.items())
        return f"{self.n} candidates, varying {parts}"

    def public_summary(self) -> dict:
        """What may leave the device: the whole set, never which one is real."""
        return {
            "candidates": list(self.candidates),
            "n": self.n,
            "attributes": {s: list(v) for s, v in self.slots.items()},
        }


# --------------------------------------------------------------------------
# Casing and articles
# --------------------------------------------------------------------------


def _style(word: str) -> str:
    letters = [c for c in word if c.isalpha()]
    if len(letters) >= 2 and all(c.isupper() for c in letters):
        return "upper"
    if letters and letters[0].isupper():
        return "title"
    return "lower"


def _apply_style(word: str, style: str) -> str:
    if style == "upper":
        return word.upper()
    if style == "title":
        return word[:1].upper() + word[1:]
    return word


# Vowel letters that sound like consonants, and silent h's.
_A_BEFORE = ("eu", "uni", "use", "usu", "one", "once")
_AN_BEFORE = ("hour", "honest", "honor", "honour", "heir")


def _wants_an(word: str) -> bool:
    w = word.lower()
    if w.startswith(_AN_BEFORE):
        return True
    if w.startswith(_A_BEFORE):
        return False
    return w[:1] in "aeiou"


def _article(typed: str, next_word: str) -> str:
    style = _style(typed)
    # "A" alone could be Capitalised or UPPER; read any capital article the
    # same way whatever its length, so the choice survives re-rendering.
    if style != "lower":
        style = "upper" if _style(next_word) == "upper" else "title"
    return _apply_style("an" if _wants_an(next_word) else "a", style)


# --------------------------------------------------------------------------
# Parsing a prompt
# --------------------------------------------------------------------------


@dataclass
class _Token:
    text: str
    start: int
    end: int


@dataclass
class _Word:
    """One matched attribute word or phrase in the prompt."""

    entry: Entry
    start: int
    end: int
    text: str
    style: str


@dataclass
class _Span:
    """One person mention: adjacent attribute words, closed by a head noun."""

    words: list[_Word]
    article: _Token | None = None
    sentence_cap: bool = False  # first word capitalised only because a sentence starts there
    head: _Word | None = None
    values: dict = field(default_factory=dict)  # attribute -> typed value
    styles: dict = field(default_factory=dict)  # attribute -> casing of its rendered adjective
    plural: bool = False

    @property
    def start(self) -> int:
        return self.words[0].start

    @property
    def end(self) -> int:
        return self.words[-1].end

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


@dataclass
class _Pronoun:
    token: _Token
    case: str
    value: str
    style: str
    person: int = -1


@dataclass
class _Person:
    position: int
    span: _Span | None
    values: dict = field(default_factory=dict)  # attribute -> typed value (span + pronouns)
    label: str = ""


def _tokenize(prompt: str) -> list[_Token]:
    return [_Token(m.group(), m.start(), m.end()) for m in _WORD.finditer(prompt)]


def _only_space(prompt: str, a: int, b: int) -> bool:
    return prompt[a:b].strip() == "" and a <= b


def _at_sentence_start(prompt: str, pos: int) -> bool:
    before = prompt[:pos].rstrip(_OPENERS)
    return not before or before[-1] in _SENTENCE_END


class _Parser:
    def __init__(self, schema: Schema, prompt: str):
        self.schema = schema
        self.prompt = prompt
        self.tokens = _tokenize(prompt)

    def parse(self) -> list[_Person]:
        spans, pronouns = self._scan()
        for span in spans:
            self._resolve_span(span)
        persons = [_Person(s.start, s, dict(s.values), s.text) for s in spans]
        self._bind(persons, pronouns)
        self.pronouns = pronouns
        return persons

    # -- finding attribute words, grouping them into mentions ---------------

    def _match(self, i: int) -> tuple[Entry, int] | None:
        """Longest lexicon phrase starting at token i (tokens separated by spaces only)."""
        toks = self.tokens
        for k in range(min(self.schema.max_phrase, len(toks) - i), 0, -1):
            if k > 1 and not all(_only_space(self.prompt, toks[j].end, toks[j + 1].start) for j in range(i, i + k - 1)):
                continue
            key = tuple(t.text.lower() for t in toks[i:i + k])
            if key in self.schema.lexicon:
                return self.schema.lexicon[key], k
        return None

    def _scan(self) -> tuple[list[_Span], list[_Pronoun]]:
        spans: list[_Span] = []
        pronouns: list[_Pronoun] = []
        open_span: _Span | None = None
        i = 0
        while i < len(self.tokens):
            tok = self.tokens[i]
            hit = self._match(i)
            if hit is None:
                open_span = None
                if tok.text.lower() in self.schema.pronoun_words:
                    pronouns.append(self._pronoun(i))
                i += 1
                continue
            entry, k = hit
            end_tok = self.tokens[i + k - 1]
            text = self.prompt[tok.start:end_tok.end]
            word = _Word(entry, tok.start, end_tok.end, text, _style(text))
            # Adjacent words (only spaces between) describe one person; a head
            # noun ends the mention ("man woman" is two people).
            if open_span is not None and _only_space(self.prompt, open_span.end, word.start):
                open_span.words.append(word)
            else:
                open_span = _Span([word])
                spans.append(open_span)
            if entry.kind == "head":
                open_span = None
            i += k
        return spans, pronouns

    def _pronoun(self, i: int) -> _Pronoun:
        tok = self.tokens[i]
        pr = self.schema.pronouns
        word = tok.text.lower()
        det_ctx = self._noun_follows(tok)
        case = self._case(word, det_ctx)
        value = dict(self.schema.pronoun_words[word])[case]
        # Every value's form must be read back as the same case here, or the
        # candidates would parse differently from the real prompt.
        for v in self.schema.values(pr.attribute):
            other = pr.cases[case][v]
            if self._case(other, det_ctx) != case:
                nxt = self._next_word(tok)
                raise ObliviousError(
                    f"{tok.text!r} followed by {nxt!r} cannot be protected: its {v} form {other!r} would read as "
                    f"a different pronoun here ({other} {nxt}). Rephrase so that no noun-like word directly "
                    f"follows it, e.g. 'gave flowers to him' instead of 'gave him flowers'."
                )
        return _Pronoun(tok, case, value, _style(tok.text))

    def _case(self, word: str, det_ctx: bool) -> str:
        opts = {c for c, _ in self.schema.pronoun_words[word]}
        det = self.schema.pronouns.determiner_case
        if len(opts) == 1:
            return next(iter(opts))
        if det_ctx and det in opts:
            return det
        return next(iter(opts - {det}))

    def _next_word(self, tok: _Token) -> str:
        rest = self.prompt[tok.end:]
        m = re.match(r"\s*(\S+)", rest)
        return m.group(1) if m else ""

    def _noun_follows(self, tok: _Token) -> bool:
        """Does a noun-like word directly follow (so 'her' is a determiner)?"""
        rest = self.prompt[tok.end:]
        m = re.match(r"\s+|", rest)
        rest = rest[m.end():]
        if rest[:1].isdigit() and m.end() > 0:
            return True  # "her 2 cats"
        w = _WORD.match(rest)
        if not w or m.end() == 0:
            return False  # punctuation or end: "see her." / "her's"
        nxt = w.group().lower()
        return nxt not in self.schema.pronouns.non_noun_words and nxt not in self.schema.pronoun_words

    def _resolve_span(self, span: _Span) -> None:
        explicit: dict[str, tuple[str, _Word]] = {}
        implied: dict[str, str] = {}
        for w in span.words:
            if w.entry.kind == "head":
                span.head = w
                fam = self.schema.heads[w.entry.key]
                for a, v in w.entry.values.items():
                    if a in fam.varies:
                        self._set(explicit, a, v, w)
                    else:
                        implied[a] = v
            else:
                self._set(explicit, w.entry.key, w.entry.values[w.entry.key], w)
            span.plural = span.plural or w.entry.plural
        # An adjective the user typed wins over a value the noun implies
        # ("young grandmother").
        span.values = {**implied, **{a: v for a, (v, _) in explicit.items()}}
        # Article directly before the mention agrees with its first word.
        idx = next(j for j, t in enumerate(self.tokens) if t.start == span.start)
        if idx > 0:
            prev = self.tokens[idx - 1]
            if prev.text.lower() in _ARTICLES and _only_space(self.prompt, prev.end, span.start):
                span.article = prev
        # A capital at the start of a sentence belongs to the sentence.
        first = span.words[0]
        span.sentence_cap = (span.article is None and _at_sentence_start(self.prompt, span.start)
                             and first.style == "title")
        styles = {id(w): ("lower" if (w is first and span.sentence_cap) else w.style) for w in span.words}
        for a in span.values:
            src = explicit[a][1] if a in explicit and explicit[a][1].entry.kind == "modifier" else span.head
            span.styles[a] = styles[id(src)]
        span.styles["__head__"] = styles[id(span.head)] if span.head else "lower"

    @staticmethod
    def _set(explicit, attr, value, word):
        if attr in explicit and explicit[attr][0] != value:
            prev = explicit[attr][1]
            raise ObliviousError(
                f"{prev.text!r} and {word.text!r} give the same person two different {attr} values "
                f"({explicit[attr][0]}, {value}); keep only one of them."
            )
        explicit.setdefault(attr, (value, word))

    # -- binding pronouns to people by position -----------------------------

    def _bind(self, persons: list[_Person], pronouns: list[_Pronoun]) -> None:
        if not pronouns:
            return
        attr = self.schema.pronouns.attribute
        if not persons:
            # Only pronouns ("he smiles"): they all describe one unnamed person.
            persons.append(_Person(pronouns[0].token.start, None, {}, f"{pronouns[0].token.text!r}"))
        for p in pronouns:
            before = [k for k, person in enumerate(persons) if person.span is None or person.span.end <= p.token.start]
            if before:
                k = before[-1]
            elif len(persons) == 1:
                k = 0
            else:
                raise ObliviousError(
                    f"{p.token.text!r} comes before any person and the prompt mentions {len(persons)} people, so it "
                    f"cannot be tied to one of them. Pronouns are bound to the nearest person before them (never "
                    f"by gender, which would reveal it); move the pronoun after the person it refers to, or name "
                    f"the person instead."
                )
            person = persons[k]
            p.person = k
            have = person.values.get(attr)
            if have is None:
                person.values[attr] = p.value
            elif have != p.value:
                raise ObliviousError(
                    f"{p.token.text!r} is bound to {person.label!r} (the nearest person before it), but its "
                    f"{attr} ({p.value}) disagrees with that person's ({have}). Pronouns are bound by position, "
                    f"never by {attr}, so that the candidates do not depend on the real values; rephrase so "
                    f"each pronoun follows its own person (e.g. 'a man with his dog and a woman'), or repeat "
                    f"the noun."
                )


# --------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------


class ObliviousTransform:
    """prompt -> CandidateSet (every combination of the attributes that occur)."""

    def __init__(self, config: TransformConfig = TransformConfig(), schema: Schema | None = None):
        self.config = config
        self.schema = schema if schema is not None else Schema.load(config.schema_path)

    def __call__(self, prompt: str) -> CandidateSet:
        if not isinstance(prompt, str):
            raise ObliviousError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ObliviousError("empty prompt: describe the image you want to generate")
        parser = _Parser(self.schema, prompt)
        persons = parser.parse()
        pronouns = parser.pronouns

        # Slots: persons in order of appearance, attributes in schema order.
        order = self.schema.attribute_order()
        with_attrs = [p for p in persons if p.values]
        slots: dict[str, list[str]] = {}
        slot_of: list[list[tuple[str, str]]] = []  # per person: (attribute, slot name)
        for person in persons:
            named = []
            if person.values:
                n = with_attrs.index(person) + 1
                for a in order:
                    if a in person.values:
                        name = a if len(with_attrs) == 1 else f"person{n}.{a}"
                        slots[name] = list(self.schema.values(a))
                        named.append((a, name))
            slot_of.append(named)

        self._check_cap(slots)
        if not slots:
            return CandidateSet((prompt,), ({},), 0, {})

        names = list(slots)
        assignments = [dict(zip(names, combo)) for combo in itertools.product(*slots.values())]
        real = {name: persons[k].values[a] for k, named in enumerate(slot_of) for a, name in named}
        candidates = tuple(self._render(prompt, persons, pronouns, slot_of, asg) for asg in assignments)
        if len(set(candidates)) != len(candidates):  # defensive: the schema validation should make this impossible
            raise ObliviousError("internal: two candidates render identically; check the schema's canonical words")
        return CandidateSet(candidates, tuple(assignments), assignments.index(real), slots)

    def _check_cap(self, slots: dict[str, list[str]]) -> None:
        n = math.prod(len(v) for v in slots.values())
        if n > self.config.max_candidates:
            parts = " x ".join(f"{s} ({len(v)} values)" for s, v in slots.items())
            raise ObliviousError(
                f"{n} candidate prompts needed, more than the cap of {self.config.max_candidates}: {parts}. "
                f"Protection is never dropped silently: mention fewer people, or use a narrower schema "
                f"(--schema with fewer attributes or values; an attribute left out of the schema is sent as "
                f"typed), or raise --max-candidates."
            )

    def _render(self, prompt, persons, pronouns, slot_of, asg) -> str:
        edits: list[tuple[int, int, str]] = []
        for person, named in zip(persons, slot_of):
            values = {a: asg[name] for a, name in named}
            span = person.span
            if span is not None and span.values:
                words = self._render_span(span, values)
                edits.append((span.start, span.end, " ".join(words)))
                if span.article is not None:
                    art = span.article
                    edits.append((art.start, art.end, _article(art.text, words[0])))
        for p in pronouns:
            value = {a: asg[name] for a, name in slot_of[p.person]}[self.schema.pronouns.attribute]
            word = self.schema.pronouns.cases[p.case][value]
            edits.append((p.token.start, p.token.end, _apply_style(word, p.style)))
        out, pos = [], 0
        for start, end, text in sorted(edits):
            out.append(prompt[pos:start])
            out.append(text)
            pos = end
        out.append(prompt[pos:])
        return "".join(out)

    def _render_span(self, span: _Span, values: dict) -> list[str]:
        """[age] [ethnicity] [gender adjective] [head], from the values alone."""
        head_fam = self.schema.heads[span.head.entry.key] if span.head else None
        by_head = set(head_fam.varies) if head_fam else set()
        parts: list[tuple[tuple[str, str], str]] = []  # ((singular, plural), style)
        for a in self.schema.modifier_order:
            if a in span.values and a not in by_head:
                parts.append((self.schema.modifiers[a].forms[values[a]], span.styles[a]))
        if head_fam is not None:
            key = tuple(values[a] for a in head_fam.varies)
            parts.append((head_fam.forms[key], span.styles["__head__"]))
        words = []
        for j, ((sing, plur), style) in enumerate(parts):
            # Number sits on the last word: the head, or the adjective used as one.
            word = plur if (span.plural and j == len(parts) - 1) else sing
            words.append(_apply_style(word, style))
        if span.sentence_cap:
            words[0] = _apply_style(words[0], "title") if _style(words[0]) == "lower" else words[0]
        return words


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m obclip.device.oblivious",
        description="Turn a prompt into the oblivious candidate set the cloud may see (JSON on stdout).",
    )
    ap.add_argument("prompt")
    ap.add_argument("--schema", default=None, help="attribute schema JSON (default: device/schemas/person.json)")
    ap.add_argument("--max-candidates", type=int, default=TransformConfig.max_candidates)
    args = ap.parse_args(argv)
    try:
        config = TransformConfig(max_candidates=args.max_candidates, schema_path=args.schema)
        result = ObliviousTransform(config)(args.prompt)
    except ObliviousError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.public_summary(), indent=2, ensure_ascii=False))
    if not result.protected:
        print(f"note: {result.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
