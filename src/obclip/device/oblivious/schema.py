"""The attribute schema: which attributes a prompt may reveal, their values, and the words
(modifiers, head nouns, pronouns) that carry them. Data: device/schemas/<name>.json."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from obclip.runtime.errors import InputError
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
WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


# The casing of a typed word, so a rewritten word keeps it ("Woman" -> "Man", "WOMAN" -> "MAN").
def style_of(word: str) -> str:
    letters = [c for c in word if c.isalpha()]
    if len(letters) >= 2 and all(c.isupper() for c in letters):
        return "upper"
    if letters and letters[0].isupper():
        return "title"
    return "lower"


def apply_style(word: str, style: str) -> str:
    if style == "upper":
        return word.upper()
    if style == "title":
        return word[:1].upper() + word[1:]
    return word



class ObliviousError(InputError):
    """A prompt or schema the transform refuses, with a message for the user (an input error: exit 2)."""


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
    # Attributes whose modifiers make the noun after them a person ("a female lifeguard"),
    # whatever that noun is; other modifiers ("old") need a person noun.
    person_modifiers: frozenset[str] = frozenset()
    # Attributes whose other words (the vocabulary's, not the schema's: "Mexican") open the
    # attribute's slot before a person noun, their value unrepresented (docs/privacy.md).
    generalised: frozenset[str] = frozenset()
    # Attributes whose rendered words are capitalised whatever was typed ("Asian", "Caucasian").
    capitalised: frozenset[str] = frozenset()
    # False: the schema's mentions are things ("a red circle"), not people; a person the device
    # finds is then never protected by a slot (docs/privacy.md).
    people: bool = True

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
    if not all(WORD.fullmatch(t) for t in toks):
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
        person_modifiers = self.data.get("person_modifiers", [])
        if not isinstance(person_modifiers, list) or not all(isinstance(a, str) and a in modifiers
                                                              for a in person_modifiers):
            _fail(f"'person_modifiers' must be a list of attributes with modifiers: {sorted(modifiers)}")
        people = self.data.get("people", True)
        if not isinstance(people, bool):
            _fail("'people' must be true (the schema describes people) or false (things)")
        generalised = self._attribute_list("generalised_attributes", modifiers)
        capitalised = self._attribute_list("capitalised_modifiers", modifiers)
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
            person_modifiers=frozenset(person_modifiers),
            generalised=generalised,
            people=people,
            capitalised=capitalised,
            lexicon=dict(self.lexicon),
            pronoun_words=pronoun_words,
            max_phrase=max((len(k) for k in self.lexicon), default=1),
        )

    def _attribute_list(self, key: str, modifiers: Mapping[str, Modifier]) -> frozenset[str]:
        raw = self.data.get(key, [])
        if not isinstance(raw, list) or not all(isinstance(a, str) and a in modifiers for a in raw):
            _fail(f"{key!r} must be a list of attributes with modifiers: {sorted(modifiers)}")
        return frozenset(raw)

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


