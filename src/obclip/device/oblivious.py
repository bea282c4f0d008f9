"""Oblivious transform (device side of ObCLIP, docs/method.md section 2, step 1).

The user's prompt may reveal sensitive attributes (by default gender, age,
ethnicity). The device turns it into N candidate prompts that differ only in
those attributes; the cloud runs all N and cannot tell which one is real.

What the proof needs (docs/method.md, section 7.3): the candidate set must be a
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
* Pronouns are bound to people by position, never by gender; a pronoun that
  disagrees with its person is rendered from the person's slot. Its case
  (determiner/object/possessive) comes from the word class after it, never
  from which value's word was typed.
* Adjectives are tied to a head noun across brackets, quotes, prompt weights
  and a few other adjectives ("a (teenage:1.3) boy", "a young, smiling
  woman"); the article is found across the same. Each group of adjacent words
  is rewritten in place, so a candidate parses exactly like the prompt.
* Age and ethnicity slots only on person mentions ("an old photograph" keeps
  "old"); one slot per person and attribute (the first word wins); numeric ages
  before a person noun are a bucketed age ("35-year-old" -> middle-aged).
* Candidates are every combination of the values, in canonical order, never
  depending on which value is real; the N cap is decided on that whole set.
* Protect or refuse: device/sensitive.py normalises the text (NFKC, invisible
  characters, look-alike letters, accents, person emoji) and finds sensitive
  words the schema cannot represent; TransformConfig.unprotected decides
  (refuse by default, naming the word and what to write instead). Every rule
  reads word classes, never values, so each member of a set gives the same set
  or the same refusal (tests/test_privacy.py checks it over labelled prompts).

The schema (attributes, surface forms, canonical words) is data:
device/schemas/person.json by default, replaceable with --schema.
Pure standard library on purpose: this runs on the user's device.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from obclip.runtime.locations import schemas_dir

from .sensitive import (
    JOINABLE,
    NUMERIC_AGE,
    Detector,
    Finding,
    Generalised,
    age_bucket,
    fold_accents,
    generalize_emoji,
    normalize,
    typo_of,
    years_of,
)

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

    kind: str  # "modifier", "head" or "plain" (a person noun carrying no attribute, kept as typed)
    key: str  # attribute name (modifier) or family name (head)
    values: Mapping[str, str]  # attribute -> value this word carries
    plural: bool
    person_only: bool = False  # a modifier only when a person noun follows ("white" in "a white man")


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
    # False: modifiers alone (no head noun after them) are not a mention, so
    # "an old photograph" keeps "old" as typed instead of getting an age slot.
    standalone_modifiers: bool = True
    plain_heads: frozenset[str] = frozenset()

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

    def mention_nouns(self) -> frozenset[str]:
        """Single words that end a mention: head nouns of every family and the plain person nouns."""
        heads = {" ".join(k) for k, e in self.lexicon.items() if e.kind == "head"}
        return frozenset(heads) | self.plain_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schema:
        """Validate a parsed schema; every problem raises ObliviousError."""
        return _SchemaBuilder(data).build()


def _fail(msg: str) -> NoReturn:
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

    def __init__(self, data: object) -> None:
        if not isinstance(data, Mapping):
            _fail("top level must be a JSON object")
        self.data: Mapping[str, Any] = data
        self.lexicon: dict[tuple[str, ...], Entry] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def build(self) -> Schema:
        attrs = self._attributes()
        self.space = {a.name: a.values for a in attrs}
        modifiers = self._modifiers()
        order = self._modifier_order(modifiers)
        heads = self._heads(modifiers)
        self._person_only_aliases()
        plain = self._plain_heads()
        standalone = self.data.get("standalone_modifiers", True)
        if not isinstance(standalone, bool):
            _fail("'standalone_modifiers' must be true or false")
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
            standalone_modifiers=standalone,
            plain_heads=plain,
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

    def _person_only_aliases(self) -> None:
        raw = self.data.get("person_only_aliases", {})
        if not isinstance(raw, Mapping):
            _fail("'person_only_aliases' must be an object: attribute -> value -> [words]")
        for attr, table in raw.items():
            where = f"person_only_aliases.{attr}"
            self._attr(attr, where)
            if not isinstance(table, Mapping):
                _fail(f"{where} must be an object: value -> [words]")
            for value, words in table.items():
                self._value(attr, value, where)
                if not isinstance(words, list):
                    _fail(f"{where}.{value} must be a list of words")
                for w in words:
                    self._add(w, Entry("modifier", attr, {attr: value}, False, person_only=True), where)

    def _plain_heads(self) -> frozenset[str]:
        raw = self.data.get("plain_heads", [])
        if not isinstance(raw, list):
            _fail("'plain_heads' must be a list of person nouns")
        out = set()
        for w in raw:
            toks = _tokens_of(w, "plain_heads")
            if len(toks) != 1:
                _fail(f"plain_heads: {w!r} must be one word")
            if toks not in self.lexicon:  # a schema word means more than a plain noun
                out.add(toks[0])
        return frozenset(out)

    def _value(self, attr: str, value: object, where: str) -> str:
        if value not in self.space[attr]:
            _fail(f"{where}: {value!r} is not a value of {attr!r} (values: {list(self.space[attr])})")
        assert isinstance(value, str)
        return value

    def _attr(self, name: object, where: str) -> str:
        if not isinstance(name, str) or name not in self.space:
            _fail(f"{where}: unknown attribute {name!r} (attributes: {list(self.space)})")
        return name

    def _attributes(self) -> tuple[Attribute, ...]:
        raw = self.data.get("attributes")
        if not isinstance(raw, list) or not raw:
            _fail("'attributes' must be a non-empty list of {name, values}")
        out: list[Attribute] = []
        seen: set[str] = set()
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

    def _forms(self, raw: object, where: str, need_plural: bool) -> tuple[str, str]:
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
        out: dict[str, Modifier] = {}
        for attr, spec in raw.items():
            where = f"modifiers.{attr}"
            self._attr(attr, where)
            if not isinstance(spec, Mapping) or not isinstance(spec.get("forms"), Mapping):
                _fail(f"{where} must have 'forms': value -> [singular, plural?]")
            forms: dict[str, tuple[str, str]] = {}
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

    def _modifier_order(self, modifiers: Mapping[str, Modifier]) -> tuple[str, ...]:
        order = self.data.get("modifier_order", [a for a in self.space if a in modifiers])
        if not isinstance(order, list) or sorted(order) != sorted(modifiers):
            _fail(f"'modifier_order' must list each attribute with modifiers exactly once: {sorted(modifiers)}")
        return tuple(order)

    def _heads(self, modifiers: Mapping[str, Modifier]) -> dict[str, HeadFamily]:
        raw = self.data.get("heads", [])
        if not isinstance(raw, list):
            _fail("'heads' must be a list of noun families")
        out: dict[str, HeadFamily] = {}
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
            varied = tuple(self._attr(a, f"{where}.varies") for a in varies)
            raw_implies = fam.get("implies", {})
            if not isinstance(raw_implies, Mapping):
                _fail(f"{where}.implies must be an object: attribute -> value")
            implies: dict[str, str] = {}
            for a, v in raw_implies.items():
                attr = self._attr(a, f"{where}.implies")
                implies[attr] = self._value(attr, v, f"{where}.implies")
            raw_forms = fam.get("forms")
            if not isinstance(raw_forms, Mapping):
                _fail(f"{where}.forms must be an object: 'v1|v2' (values of varies) -> [singular, plural]")
            head_forms: dict[tuple[str, ...], tuple[str, str]] = {}
            for combo in itertools.product(*(self.space[a] for a in varied)):
                key = "|".join(combo)
                if key not in raw_forms:
                    _fail(f"{where}.forms has no entry for {key!r}")
                sing, plur = self._forms(raw_forms[key], f"{where}.forms.{key}", need_plural=True)
                head_forms[combo] = (sing, plur)
                carried = {**implies, **dict(zip(varied, combo))}
                self._add(sing, Entry("head", name, carried, False), f"{where}.forms.{key}")
                self._add(plur, Entry("head", name, carried, True), f"{where}.forms.{key}")
            if len(raw_forms) != len(head_forms):
                _fail(f"{where}.forms has keys that are not value combinations of {list(varied)}")
            self._distinct([f[0] for f in head_forms.values()], where)
            for j, al in enumerate(fam.get("aliases", [])):
                aw = f"{where}.aliases[{j}]"
                if not isinstance(al, Mapping) or not isinstance(al.get("values", {}), Mapping):
                    _fail(f"{aw} must be an object with 'values', 'singular', 'plural'")
                vals = {self._attr(a, aw): self._value(a, v, aw) for a, v in al.get("values", {}).items()}
                missing = [a for a in varied if a not in vals]
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
                        if a not in varied and a not in modifiers:
                            _fail(f"{where}: {' '.join(toks)!r} implies {a!r} but {a!r} has no modifiers to render it")
            out[name] = HeadFamily(name, varied, head_forms)
        return out

    def _pronouns(self) -> tuple[Pronouns | None, dict[str, tuple[tuple[str, str], ...]]]:
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
        cases: dict[str, dict[str, str]] = {}
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
    def _distinct(words: Sequence[str], where: str) -> None:
        if len(set(words)) != len(words):
            _fail(f"{where}: canonical words must differ between values, got {words}")


# --------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------

UNPROTECTED_POLICIES = ("refuse", "warn", "allow")


@dataclass(frozen=True)
class TransformConfig:
    max_candidates: int = 32
    schema_path: str | None = None
    # What to do with a sensitive word the schema cannot protect (sensitive.py finds them):
    # "refuse" (default) raises ObliviousError naming the word and what to write instead;
    # "warn" sends it as typed and lists it in CandidateSet.unprotected (the CLIs print it);
    # "allow" sends it as typed, still listed.
    unprotected: str = "refuse"

    def __post_init__(self) -> None:
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ObliviousError(f"max_candidates must be an integer >= 1, got {self.max_candidates!r}")
        if self.unprotected not in UNPROTECTED_POLICIES:
            raise ObliviousError(f"unprotected must be one of {', '.join(UNPROTECTED_POLICIES)}, "
                                 f"got {self.unprotected!r}")


@dataclass(frozen=True)
class ProtectedSpan:
    """A stretch of the (normalised) prompt that is rewritten in every candidate. Device-only."""

    text: str
    start: int
    end: int
    attributes: tuple[str, ...]  # slot names it is rendered from
    shown: str = "..."  # how a message quotes it: the same for every value ("his/her")
    noun: bool = False  # a head noun (ends a mention)

    def as_dict(self) -> dict[str, object]:
        return {"text": self.text, "start": self.start, "end": self.end, "slots": list(self.attributes)}


@dataclass(frozen=True)
class CandidateSet:
    candidates: tuple[str, ...]
    assignments: tuple[dict[str, str], ...]
    real_index: int  # DEVICE-ONLY: never send this anywhere
    slots: dict[str, list[str]]
    # DEVICE-ONLY reports (what was protected, generalised, or sent as typed):
    protected_spans: tuple[ProtectedSpan, ...] = ()
    generalised: tuple[Generalised, ...] = ()
    unprotected: tuple[Finding, ...] = ()

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

    @property
    def warnings(self) -> list[str]:
        """Sensitive words sent as typed (policy warn/allow), for the user."""
        return [f"sent unprotected: {f.message()}" for f in self.unprotected]

    def public_summary(self) -> dict[str, object]:
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
    age: str | None = None  # a numeric age ("35-year-old"): its bucketed value


@dataclass
class _Word:
    """One matched attribute word or phrase in the prompt."""

    entry: Entry
    start: int
    end: int
    text: str
    style: str
    token: int  # index of its first token
    last: int  # index of its last token


@dataclass
class _Span:
    """One person mention: attribute words (with a head noun, if any, last), possibly in
    groups separated by other adjectives ("a young, smiling woman")."""

    words: list[_Word]
    groups: list[list[_Word]] = field(default_factory=list)  # runs of adjacent words
    article: _Token | None = None
    sentence_cap: bool = False  # first word capitalised only because a sentence starts there
    head: _Word | None = None
    values: dict[str, str] = field(default_factory=dict)  # attribute -> typed value
    styles: dict[str, str] = field(default_factory=dict)  # attribute -> casing of its rendered adjective
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
    values: dict[str, str] = field(default_factory=dict)  # attribute -> typed value (span + pronouns)
    label: str = ""


def _tokenize(prompt: str) -> list[_Token]:
    """Words, and numeric ages ("35-year-old", "50 years old") as single tokens."""
    ages = [(m.start(), m.end(), years_of(m.group())) for m in NUMERIC_AGE.finditer(prompt)]
    out: list[_Token] = []
    for a, b, years in ages:
        out.append(_Token(prompt[a:b], a, b, age=age_bucket(years)))
    for m in _WORD.finditer(prompt):
        if not any(a <= m.start() < b for a, b, _ in ages):
            out.append(_Token(m.group(), m.start(), m.end()))
    return sorted(out, key=lambda t: t.start)


def _only_space(prompt: str, a: int, b: int) -> bool:
    return prompt[a:b].strip() == "" and a <= b


def _joinable(prompt: str, a: int, b: int) -> bool:
    """Only spaces, brackets, quotes or a prompt weight between two words of one mention."""
    return a <= b and JOINABLE.fullmatch(prompt[a:b]) is not None


def _at_sentence_start(prompt: str, pos: int) -> bool:
    before = prompt[:pos].rstrip(_OPENERS)
    return not before or before[-1] in _SENTENCE_END


# -ly words that are nouns or adjectives, not adverbs ("her family", "her lovely smile": determiner).
_LY_NOT_ADVERBS = frozenset(
    "family belly lily jelly bully rally ally fly butterfly dragonfly firefly holly folly assembly supply "
    "melancholy monopoly anomaly italy emily molly sally billy kelly polly lolly reply july homily gully "
    "lovely friendly lonely ugly silly curly holy early daily costly deadly lively likely oily woolly wooly "
    "frilly burly portly homely comely scholarly orderly sickly chilly jolly smelly bubbly hilly elderly "
    "beastly bodily brotherly sisterly motherly fatherly cowardly ghostly heavenly earthly worldly".split())
# Adjectives between a modifier and its head must not cross these (word breaks a noun phrase).
_MAX_GAP_WORDS = 3


class _Parser:
    def __init__(self, schema: Schema, prompt: str):
        self.schema = schema
        self.prompt = prompt
        self.tokens = _tokenize(prompt)
        self.pronouns: list[_Pronoun] = []
        pr = schema.pronouns
        self.breakers = frozenset(pr.non_noun_words if pr is not None else ()) | frozenset(schema.pronoun_words)
        # Cases a determiner-like word can stand for ("her": object/determiner, "his": determiner/possessive).
        self.det_group: frozenset[str] = frozenset()
        if pr is not None and pr.determiner_case is not None:
            det = pr.determiner_case
            self.det_group = frozenset({det} | {c for opts in schema.pronoun_words.values()
                                                if det in {o for o, _ in opts} for c, _ in opts})
        self.single_words = {k[0]: e for k, e in schema.lexicon.items() if len(k) == 1 and not e.person_only}

    def parse(self) -> list[_Person]:
        spans, pronouns = self._scan()
        spans = self._mentions(spans)
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
        if toks[i].age is not None:
            if "age" in self.schema.modifiers:
                return Entry("modifier", "age", {"age": toks[i].age or ""}, False), 1
            return None
        for k in range(min(self.schema.max_phrase, len(toks) - i), 0, -1):
            if k > 1 and not all(_only_space(self.prompt, toks[j].end, toks[j + 1].start) for j in range(i, i + k - 1)):
                continue
            key = tuple(t.text.lower() for t in toks[i:i + k])
            if key in self.schema.lexicon:
                entry = self.schema.lexicon[key]
                if entry.person_only and not self._head_follows(i + k):
                    continue
                return entry, k
        word = toks[i].text.lower()
        if word in self.schema.plain_heads:
            return Entry("plain", "", {}, False), 1
        if word not in self.schema.pronoun_words:
            # A misspelt schema word ("womna") is read as the word it misspells.
            target = typo_of(word, self.single_words)
            if target is not None:
                return self.single_words[target], 1
        return None

    def _head_follows(self, i: int) -> bool:
        """Is token i (after joinable text) a head or plain noun, possibly after other modifiers?"""
        toks = self.tokens
        prev_end = toks[i - 1].end
        while i < len(toks) and _joinable(self.prompt, prev_end, toks[i].start):
            if toks[i].age is not None:  # a numeric age is an age modifier
                prev_end, i = toks[i].end, i + 1
                continue
            word = toks[i].text.lower()
            entry = self.schema.lexicon.get((word,))
            if entry is None and word not in self.schema.pronoun_words:
                target = typo_of(word, self.single_words)  # as _match reads it
                entry = self.single_words[target] if target is not None else None
            if word in self.schema.plain_heads or (entry is not None and entry.kind == "head"):
                return True
            if entry is None or entry.kind != "modifier":
                return False
            prev_end, i = toks[i].end, i + 1
        return False

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
                if tok.age is None and tok.text.lower() in self.schema.pronoun_words:
                    pronouns.append(self._pronoun(i))
                i += 1
                continue
            entry, k = hit
            end_tok = self.tokens[i + k - 1]
            text = self.prompt[tok.start:end_tok.end]
            style = _style(text) if tok.age is None else "lower"
            word = _Word(entry, tok.start, end_tok.end, text, style, i, i + k - 1)
            # Adjacent words (spaces, brackets, quotes, weights between) describe one
            # person; a head noun ends the mention ("man woman" is two people).
            if open_span is not None and _joinable(self.prompt, open_span.end, word.start):
                open_span.words.append(word)
                if _only_space(self.prompt, open_span.groups[-1][-1].end, word.start):
                    open_span.groups[-1].append(word)
                else:  # "(teenage:1.3) boy": each side is rewritten in place, brackets kept
                    open_span.groups.append([word])
            else:
                open_span = _Span([word], [[word]])
                spans.append(open_span)
            if entry.kind in ("head", "plain"):
                open_span = None
            i += k
        return spans, pronouns

    def _mentions(self, spans: list[_Span]) -> list[_Span]:
        """Attach adjectives to a head a few words on ("a young, smiling woman"); keep headless
        ones only where they name a person, so "an old photograph" gets no age slot."""
        out: list[_Span] = []
        chain: list[_Span] = []  # headless spans that may still reach a head
        for span in spans:
            if chain and not self._attaches(chain[-1], span):
                out += chain  # never reached a head: each judged on its own
                chain = []
            chain.append(span)
            if span.words[-1].entry.kind in ("head", "plain"):
                merged = chain[0]
                for other in chain[1:]:
                    merged.words += other.words
                    merged.groups += other.groups
                out.append(merged)
                chain = []
        out += chain
        return [s for s in out if self._is_mention(s)]

    def _attaches(self, left: _Span, right: _Span) -> bool:
        if left.words[-1].entry.kind in ("head", "plain"):
            return False
        first, last = left.words[-1].last + 1, right.words[0].token
        between = self.tokens[first:last]
        if len(between) > _MAX_GAP_WORDS:
            return False
        ends = [left.end] + [t.end for t in between]
        starts = [t.start for t in between] + [right.start]
        for a, b in zip(ends, starts):
            gap = self.prompt[a:b]
            if not (_joinable(self.prompt, a, b) or (gap.strip() == "," and between)):
                return False
        return not any(t.age is not None or t.text.lower() in self.breakers for t in between)

    def _is_mention(self, span: _Span) -> bool:
        if any(w.entry.kind in ("head", "plain") for w in span.words) or self.schema.standalone_modifiers:
            return True
        # Headless modifiers name a person when used as a noun: plural ("two asians"), or
        # closing a phrase ("an old indian with wrinkles", "a young asian.", "an asian, smiling";
        # but "an old, rusty car" and "an old photograph" are not people).
        if any(w.entry.plural for w in span.words):
            return True
        rest = self.prompt[span.end:].lstrip(" \t()[]{}<>\"'*_")
        nxt = _WORD.match(rest)
        if not rest or rest[0] in ".!?;\n" or (nxt is not None and nxt.group().lower() in self.breakers):
            return True
        # A gender or ethnicity word before a participle is a person too ("a male smiling");
        # an age word is not ("an old building").
        nouny = any(w.entry.key != "age" for w in span.words)
        return nouny and (rest[0] == "," or (nxt is not None and nxt.group().lower().endswith("ing")))

    def _pronoun(self, i: int) -> _Pronoun:
        tok = self.tokens[i]
        pr = self.schema.pronouns
        assert pr is not None
        word = tok.text.lower()
        # The case comes from the context alone, never from which value's word was typed:
        # before a noun every determiner-like word is the determiner ("gave him flowers" is
        # read like "gave her flowers"), elsewhere "her" is the object and "his" the possessive.
        opts = {c for c, _ in self.schema.pronoun_words[word]}
        det = pr.determiner_case
        if det is not None and self._noun_follows(tok) and opts & self.det_group:
            case = det
        elif len(opts) == 1:
            case = next(iter(opts))
        else:
            case = sorted(opts - {det})[0]
        value = next(v for c, v in self.schema.pronoun_words[word] if c == case or case == det)
        return _Pronoun(tok, case, value, _style(tok.text))

    def _noun_follows(self, tok: _Token) -> bool:
        """Does a noun-like word directly follow (so 'her' is a determiner)?"""
        assert self.schema.pronouns is not None
        rest = self.prompt[tok.end:]
        m = re.match(r"\s*", rest)
        gap = m.end() if m else 0
        rest = rest[gap:]
        if rest[:1].isdigit() and gap > 0:
            return True  # "her 2 cats"
        w = _WORD.match(rest)
        if not w or gap == 0:
            return False  # punctuation or end: "see her." / "her's"
        nxt = w.group().lower()
        nxt_index = next((j for j, t in enumerate(self.tokens) if t.start == tok.end + gap), None)
        if nxt_index is not None and self._match(nxt_index) is not None:
            return True  # an attribute word or person noun, whatever its value: "her elderly mother"
        if nxt.endswith("ly") and len(nxt) > 4 and nxt not in _LY_NOT_ADVERBS:
            return False  # an adverb: "soaks her completely"
        return nxt not in self.schema.pronouns.non_noun_words and nxt not in self.schema.pronoun_words

    def _resolve_span(self, span: _Span) -> None:
        explicit: dict[str, tuple[str, _Word]] = {}
        implied: dict[str, str] = {}
        for w in span.words:
            if w.entry.kind == "plain":
                span.head = w
            elif w.entry.kind == "head":
                span.head = w
                fam = self.schema.heads[w.entry.key]
                for a, v in w.entry.values.items():
                    if a in fam.varies:
                        explicit.setdefault(a, (v, w))
                    else:
                        implied[a] = v
            else:
                # One slot per person and attribute: the first word that gives a value wins,
                # whatever the values are (a disagreeing second word is re-rendered from it).
                explicit.setdefault(w.entry.key, (w.entry.values[w.entry.key], w))
            span.plural = span.plural or w.entry.plural
        # An adjective the user typed wins over a value the noun implies
        # ("young grandmother").
        span.values = {**implied, **{a: v for a, (v, _) in explicit.items()}}
        span.article = self._article_before(span.start)
        # A capital at the start of a sentence belongs to the sentence.
        first = span.words[0]
        span.sentence_cap = (span.article is None and _at_sentence_start(self.prompt, span.start)
                             and first.style == "title")
        styles = {id(w): ("lower" if (w is first and span.sentence_cap) else w.style) for w in span.words}
        head_style = styles[id(span.head)] if span.head else "lower"
        for a in span.values:
            src = explicit[a][1] if a in explicit and explicit[a][1].entry.kind == "modifier" else span.head
            span.styles[a] = styles[id(src)] if src is not None else head_style
        span.styles["__head__"] = head_style

    def _article_before(self, pos: int) -> _Token | None:
        """The article governing a mention: 'a'/'an' before it, across spaces, brackets,
        quotes ("a (teenage:1.3) boy", "an [elderly] man", "a 'young' woman")."""
        idx = next(j for j, t in enumerate(self.tokens) if t.start == pos)
        if idx == 0:
            return None
        prev = self.tokens[idx - 1]
        if prev.text.lower() in _ARTICLES and _joinable(self.prompt, prev.end, pos):
            return prev
        return None

    # -- binding pronouns to people by position -----------------------------

    def _bind(self, persons: list[_Person], pronouns: list[_Pronoun]) -> None:
        if not pronouns:
            return
        assert self.schema.pronouns is not None
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
            p.person = k
            # Bound by position, never by value: a pronoun that disagrees with its person
            # ("she and her husband") is rendered from the person's slot like any other, so
            # the decision to send or refuse never depends on the values.
            persons[k].values.setdefault(attr, p.value)


# --------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------


class ObliviousTransform:
    """prompt -> CandidateSet (every combination of the attributes that occur)."""

    def __init__(self, config: TransformConfig = TransformConfig(), schema: Schema | None = None):
        self.config = config
        self.schema = schema if schema is not None else Schema.load(config.schema_path)
        # Single schema words with the attributes they carry, and whether they are nouns.
        schema_words = {k[0]: ("/".join(sorted(e.values)), e.kind == "head") for k, e in self.schema.lexicon.items()
                        if len(k) == 1 and not e.person_only and e.values}
        pr = self.schema.pronouns
        function_words = (pr.non_noun_words if pr is not None else frozenset()) | set(self.schema.pronoun_words)
        self.detector = Detector(self.schema.attribute_order(), self.schema.mention_nouns(), schema_words,
                                 function_words)

    def __call__(self, prompt: str) -> CandidateSet:
        if not isinstance(prompt, str):
            raise ObliviousError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ObliviousError("empty prompt: describe the image you want to generate")
        # Everything below reads the normalised text: fullwidth letters, zero-width characters
        # and look-alike letters cannot hide a word, and person emoji are neutral in every candidate.
        text, generalised = generalize_emoji(normalize(prompt))
        text = fold_accents(text, lambda w: self.detector.knows(w) or w in self.schema.pronoun_words)
        if not text.strip():
            raise ObliviousError("the prompt is empty once invisible characters and person emoji's gender and "
                                 "skin-tone marks are removed: describe the image you want to generate")
        parser = _Parser(self.schema, text)
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

        protected = self._protected(persons, pronouns, slot_of)
        # What the detector reads as one opaque word each: every rewritten group of a mention
        # (its word count may change with the value: "old old" -> "young") and every pronoun.
        units = [(g[0].start, g[-1].end, any(w.entry.kind in ("head", "plain") for w in g))
                 for person, named in zip(persons, slot_of) if person.span is not None and named
                 for g in person.span.groups if any(w.entry.kind != "plain" for w in g)]
        units += [(p.token.start, p.token.end, False) for p in pronouns]
        unprotected = self._unprotected(text, protected, units)
        self._check_cap(slots)
        if not slots:
            return CandidateSet((text,), ({},), 0, {}, (), tuple(generalised), tuple(unprotected))

        names = list(slots)
        assignments = [dict(zip(names, combo)) for combo in itertools.product(*slots.values())]
        real = {name: persons[k].values[a] for k, named in enumerate(slot_of) for a, name in named}
        candidates = tuple(self._render(text, persons, pronouns, slot_of, asg) for asg in assignments)
        if len(set(candidates)) != len(candidates):  # defensive: the schema validation should make this impossible
            raise ObliviousError("internal: two candidates render identically; check the schema's canonical words")
        return CandidateSet(candidates, tuple(assignments), assignments.index(real), slots,
                            tuple(protected), tuple(generalised), tuple(unprotected))

    def audit(self, prompt: str) -> dict[str, object]:
        """One line of ``--audit`` output: what would be protected, refused, or sent as typed."""
        record: dict[str, object] = {"prompt": prompt, "n": None, "protected": [], "generalised": [],
                                     "refused": None, "unprotected": []}
        try:
            result = self(prompt)
        except ObliviousError as exc:
            record["refused"] = str(exc)
            lenient = ObliviousTransform(dataclasses.replace(self.config, unprotected="allow"), self.schema)
            try:
                found = lenient(prompt).unprotected
            except ObliviousError:
                found = ()
            record["unprotected"] = [f.as_dict() for f in found]
            return record
        record["n"] = result.n
        record["protected"] = [s.as_dict() for s in result.protected_spans]
        record["generalised"] = [{"text": g.text, "as": g.replacement, "attribute": g.attribute}
                                 for g in result.generalised]
        record["unprotected"] = [f.as_dict() for f in result.unprotected]
        return record

    def _protected(self, persons: list[_Person], pronouns: list[_Pronoun],
                   slot_of: list[list[tuple[str, str]]]) -> list[ProtectedSpan]:
        out = []
        for person, named in zip(persons, slot_of):
            span = person.span
            if span is not None and named:
                for w in span.words:
                    if w.entry.kind != "plain":
                        names = tuple(n for a, n in named if a in w.entry.values)
                        out.append(ProtectedSpan(w.text, w.start, w.end, names, noun=w.entry.kind == "head"))
        for p in pronouns:
            names = tuple(n for a, n in slot_of[p.person] if a == p_attr(self.schema))
            table = self.schema.pronouns.cases[p.case] if self.schema.pronouns is not None else {}
            shown = "/".join(dict.fromkeys(table.values()))
            out.append(ProtectedSpan(p.token.text, p.token.start, p.token.end, names, shown))
        return sorted(out, key=lambda s: s.start)

    def _unprotected(self, text: str, protected: list[ProtectedSpan],
                     units: list[tuple[int, int, bool]]) -> list[Finding]:
        """Sensitive words outside every protected span; refused under the default policy."""
        # Covered only if every letter and digit of it is inside protected words: "in her 40s"
        # is not protected by "her".
        def covered(f: Finding) -> bool:
            return all(any(s.start <= i < s.end for s in protected)
                       for i in range(f.start, f.end) if text[i].isalnum())

        found = [self._masked(f, protected) for f in self.detector.find(text, units) if not covered(f)]
        if found and self.config.unprotected == "refuse":
            words = "; ".join(f.message() for f in found)
            raise ObliviousError(
                f"the prompt holds sensitive words the schema cannot protect, and they would be sent as "
                f"typed: {words}. (To send them anyway, choose --unprotected warn or allow.)")
        return found

    def _masked(self, finding: Finding, protected: list[ProtectedSpan]) -> Finding:
        """The finding as shown, with protected words inside it written for every value
        ("in his/her 40s"), so that the message is the same whichever value is real."""
        inside = [s for s in protected if finding.start <= s.start and s.end <= finding.end]
        if not inside:
            return finding
        out, pos = [], finding.start
        for s in inside:
            out.append(finding.text[pos - finding.start:s.start - finding.start])
            out.append(s.shown)
            pos = s.end
        out.append(finding.text[pos - finding.start:])
        return dataclasses.replace(finding, text="".join(out))

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

    def _render(self, prompt: str, persons: list[_Person], pronouns: list[_Pronoun],
                slot_of: list[list[tuple[str, str]]], asg: dict[str, str]) -> str:
        edits: list[tuple[int, int, str]] = []
        for person, named in zip(persons, slot_of):
            values = {a: asg[name] for a, name in named}
            span = person.span
            if span is not None and span.values:
                edits += self._render_span(prompt, span, values)
        attr = p_attr(self.schema)
        cases = self.schema.pronouns.cases if self.schema.pronouns is not None else {}
        for p in pronouns:
            value = {a: asg[name] for a, name in slot_of[p.person]}[attr]
            edits.append((p.token.start, p.token.end, _apply_style(cases[p.case][value], p.style)))
        out, pos = [], 0
        for start, end, text in sorted(edits):
            out.append(prompt[pos:start])
            out.append(text)
            pos = end
        out.append(prompt[pos:])
        return "".join(out)

    def _render_span(self, prompt: str, span: _Span, values: dict[str, str]) -> list[tuple[int, int, str]]:
        """Each group of adjacent words is rewritten in place from the values alone, so the
        words around it (and hence how a candidate parses) never change. In a group: the
        canonical adjectives [age] [ethnicity] [gender adjective] in schema order for the
        attributes its words give; the head's group also gets adjectives for values the head
        only implies ("girl" -> "young woman") and the head in its canonical form (a gender
        adjective next to a head that varies by gender is dropped: "female woman" -> "woman")."""
        head = span.head
        head_fam = self.schema.heads[head.entry.key] if head is not None and head.entry.kind == "head" else None
        by_head = set(head_fam.varies) if head_fam else set()
        given = {w.entry.key for w in span.words if w.entry.kind == "modifier"}
        last_group = len(span.groups) - 1

        edits: list[tuple[int, int, str]] = []
        rendered: list[str] = []
        for gi, g in enumerate(span.groups):
            mods = [w for w in g if w.entry.kind == "modifier"]
            has_head = head is not None and head in g
            here = {w.entry.key for w in mods}
            if has_head:
                here = (here - by_head) | {a for a in span.values if a not in by_head and a not in given}
            attrs = [a for a in self.schema.modifier_order if a in here]
            words: list[str] = []
            for j, a in enumerate(attrs):
                sing, plur = self.schema.modifiers[a].forms[values[a]]
                # Number sits on the last word: the head, or the adjective used as one.
                last = head is None and gi == last_group and j == len(attrs) - 1
                mine = next((w for w in mods if w.entry.key == a), None)
                style = mine.style if mine is not None and mine is not span.words[0] else span.styles.get(a, "lower")
                words.append(_apply_style(plur if (span.plural and last) else sing, style))
            if head_fam is not None and has_head:
                sing, plur = head_fam.forms[tuple(values[a] for a in head_fam.varies)]
                words.append(_apply_style(plur if span.plural else sing, span.styles["__head__"]))
            replaced = mods + ([head] if has_head and head_fam is not None and head is not None else [])
            if not replaced or not words:
                continue
            edits.append((replaced[0].start, replaced[-1].end, " ".join(words)))
            rendered += words
        if not rendered:
            return edits
        if span.sentence_cap and _style(rendered[0]) == "lower":
            start, end, text = edits[0]
            edits[0] = (start, end, text[:1].upper() + text[1:])
        if span.article is not None:
            art = span.article
            edits.append((art.start, art.end, _article(art.text, self._word_after(prompt, art.end, edits))))
        return edits

    @staticmethod
    def _word_after(prompt: str, pos: int, edits: list[tuple[int, int, str]]) -> str:
        """The first word after pos once the edits are applied (the article agrees with it)."""
        for start, end, text in sorted(edits):
            if start < pos:
                continue
            gap = _WORD.search(prompt, pos, start)
            if gap is not None:
                return gap.group()
            if text:
                return text.split(" ")[0]
            pos = end
        m = _WORD.search(prompt, pos)
        return m.group() if m else ""


def p_attr(schema: Schema) -> str:
    """The attribute pronouns carry ("" when the schema has none)."""
    return schema.pronouns.attribute if schema.pronouns is not None else ""


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="obclip-candidates",
        description="Turn a prompt into the oblivious candidate set the cloud may see (JSON on stdout), "
                    "or audit a file of prompts (--audit FILE: JSON Lines on stdout).",
    )
    ap.add_argument("prompt", nargs="?")
    ap.add_argument("--audit", metavar="FILE", default=None,
                    help="read prompts one per line ('-' for stdin) and write one JSON line each: prompt, n, "
                         "protected (spans), refused (reason or null), unprotected (sensitive words sent as typed)")
    ap.add_argument("--schema", default=None, help="attribute schema JSON (default: device/schemas/person.json)")
    ap.add_argument("--max-candidates", type=int, default=TransformConfig.max_candidates)
    ap.add_argument("--unprotected", choices=UNPROTECTED_POLICIES, default="refuse",
                    help="a sensitive word the schema cannot protect: refuse the prompt (default), warn and "
                         "send it as typed, or allow it")
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.audit is None):
        ap.error("give either a prompt or --audit FILE")
    try:
        config = TransformConfig(max_candidates=args.max_candidates, schema_path=args.schema,
                                 unprotected=args.unprotected)
        transform = ObliviousTransform(config)
        if args.audit is not None:
            return _audit(transform, args.audit)
        result = transform(args.prompt)
    except ObliviousError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.public_summary(), indent=2, ensure_ascii=False))
    if not result.protected:
        print(f"note: {result.message}", file=sys.stderr)
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _audit(transform: ObliviousTransform, path: str) -> int:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ObliviousError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        if line.strip():
            print(json.dumps(transform.audit(line), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
