"""Finding sensitive words the attribute schema may not cover (device side, stdlib only).

The oblivious transform protects what its schema can represent. This module
finds what a careful person would also call sensitive, so that nothing leaves
the device unprotected without the user's say-so (``TransformConfig.unprotected``):

* text normalisation first: NFKC (fullwidth letters, ligatures), format
  characters removed (zero-width space/joiner inside words, soft hyphens,
  bidi marks), Cyrillic/Greek look-alike letters inside Latin words folded;
* person emoji generalised: skin-tone modifiers and gender signs dropped,
  gendered/aged people turned into the neutral person, in every candidate;
* lexicons per attribute (``device/lexicons/<attribute>.json``): ``words``
  are sensitive anywhere, ``contextual`` ones only when they describe a
  mention (directly before a person/head noun);
* numeric ages ("35-year-old", "50 years old", "in her 40s", "aged 60");
* misspellings of protected words: only words of 5+ letters that are not
  ordinary English words (the CLIP vocabulary's whole words), at one edit,
  so "the"/"she" or "can"/"man" never collide.

``Detector`` is the interface; an ONNX token classifier could implement the
same ``find`` method.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

from obclip.runtime.locations import package_path

_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")
_ZWJ = "\u200d"

# Person emoji: skin tones and gender signs carry attributes; gendered or aged
# people become the neutral adult person (U+1F9D1), in every candidate alike.
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_GENDER_SIGNS = frozenset("\u2640\u2642\u26a7")
_NEUTRAL_PERSON = "\U0001F9D1"
_EMOJI_MAP = {
    **{chr(c): _NEUTRAL_PERSON for c in (0x1F468, 0x1F469, 0x1F466, 0x1F467, 0x1F476, 0x1F9D2, 0x1F474,
                                          0x1F475, 0x1F9D3, 0x1F9D4, 0x1F9D5, 0x1F472, 0x1F483, 0x1F57A)},
    "\U0001F934": "\U0001FAC5", "\U0001F478": "\U0001FAC5",          # prince, princess -> person with crown
    "\U0001F930": "\U0001FAC4", "\U0001FAC3": "\U0001FAC4",          # pregnant woman/man -> pregnant person
    "\U0001F385": _NEUTRAL_PERSON + _ZWJ + "\U0001F384",             # Santa, Mrs Claus -> Mx Claus
    "\U0001F936": _NEUTRAL_PERSON + _ZWJ + "\U0001F384",
    "\U0001F46B": _NEUTRAL_PERSON + _ZWJ + "\U0001F91D" + _ZWJ + _NEUTRAL_PERSON,  # couples holding hands
    "\U0001F46C": _NEUTRAL_PERSON + _ZWJ + "\U0001F91D" + _ZWJ + _NEUTRAL_PERSON,
    "\U0001F46D": _NEUTRAL_PERSON + _ZWJ + "\U0001F91D" + _ZWJ + _NEUTRAL_PERSON,
}

# Numeric ages. Inside a person mention the transform protects "N-year-old" /
# "N years old" as a bucketed age; anywhere else they are findings.
_ONES = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER = (rf"(?:\d{{1,3}}|(?:{'|'.join(_TENS)})(?:[\s-]?(?:{'|'.join(_ONES[:9])}))?|{'|'.join(reversed(_ONES))}"
           r"|(?:a|one)\s+hundred)")
NUMERIC_AGE = re.compile(
    rf"\b{_NUMBER}(?:\s*-\s*|\s+)?(?:years?|yrs?)(?:\s*-\s*|\s+)old\b|\b\d{{1,3}}\s*-?\s*y\.?/?o\b\.?",
    re.IGNORECASE)
_OTHER_AGES = re.compile(
    rf"(?<![\w-])(?:aged?|age of)\s+{_NUMBER}\b"
    r"|\bin\s+(?:his|her|their|my|your|its)\s+(?:early\s+|mid\s*-?\s*|late\s+)?"
    r"(?:\d0\s*'?s|twenties|thirties|forties|fifties|sixties|seventies|eighties|nineties)\b"
    r"|\b(?:\d0|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)\s*-?\s*somethings?\b"
    rf"|\b{_NUMBER}\s*-?\s*(?:years?|yrs?)\s*-?\s*of\s+age\b",
    re.IGNORECASE)


def years_of(numeric_age: str) -> int:
    """The number of years a NUMERIC_AGE match names ("35-year-old", "forty-five years old")."""
    text = numeric_age.lower()
    digits = re.match(r"\d+", text)
    if digits:
        return int(digits.group())
    if "hundred" in text:
        return 100
    words = re.findall(r"[a-z]+", text)
    total = 0
    for w in words:
        if w in _TENS:
            total += 10 * (_TENS.index(w) + 2)
        elif w in _ONES:
            total += _ONES.index(w) + 1
        elif total:
            break
    return total


AGE_BUCKETS = ((30, "young"), (60, "middle-aged"), (1000, "old"))


def age_bucket(years: int) -> str:
    """The person schema's age value for a number of years: <30 young, <60 middle-aged, else old."""
    return next(value for limit, value in AGE_BUCKETS if years < limit)


@dataclass(frozen=True)
class Finding:
    """A sensitive word the transform did not protect (yet). Device-only."""

    start: int
    end: int
    text: str
    attribute: str
    why: str          # "lexicon", "context", "numeric age", "misspelling", ...
    instead: str      # what to write instead, for the refusal message

    def message(self) -> str:
        return (f"{self.text!r} reveals {self.attribute} ({self.why}) and cannot be protected as typed; "
                f"write {self.instead} instead")

    def as_dict(self) -> dict[str, object]:
        return {"text": self.text, "start": self.start, "end": self.end, "attribute": self.attribute,
                "why": self.why, "instead": self.instead}


@dataclass(frozen=True)
class Generalised:
    """A span replaced by a neutral form in every candidate (e.g. an emoji's skin tone)."""

    text: str
    replacement: str
    attribute: str


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------


def _is_emojiish(ch: str) -> bool:
    return bool(ch) and (unicodedata.category(ch) in ("So", "Sk") or ch in "\ufe0f\u20e3" or ord(ch) >= 0x1F000)


@cache
def confusables() -> dict[str, str]:
    """Look-alike letters -> the ASCII letter they imitate (Unicode's confusables.txt, via the
    confusable-homoglyphs package at build time: device/vocabulary/confusables.json)."""
    path = package_path("device", "vocabulary", "confusables.json")
    table: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return table


def _latin(ch: str) -> bool:
    return ("a" <= ch.lower() <= "z") or (ch.isalpha() and "LATIN" in unicodedata.name(ch, ""))


def normalize(text: str) -> str:
    """What every rule reads: NFKC (fullwidth, ligatures, mathematical letters); format
    characters removed (a zero-width joiner is kept only between emoji); combining marks on
    Latin letters removed ("wom\u0332an"; accents: "w\u00f3man" -> "woman"); look-alike letters
    (Cyrillic, Greek, small capitals, dotless i) folded to Latin inside words that hold Latin
    letters or consist of look-alikes only."""
    text = unicodedata.normalize("NFKC", text)
    out: list[str] = []
    decomposed = unicodedata.normalize("NFD", text)
    for i, ch in enumerate(decomposed):
        cat = unicodedata.category(ch)
        if cat == "Cf":
            if ch == _ZWJ and i > 0 and i + 1 < len(decomposed) and _is_emojiish(decomposed[i - 1]) \
                    and _is_emojiish(decomposed[i + 1]):
                out.append(ch)
            continue
        if cat in ("Mn", "Me") and out and _latin(out[-1]):
            continue
        out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    table = confusables()

    def fold(m: re.Match[str]) -> str:
        word = m.group()
        has_latin = any("a" <= c.lower() <= "z" for c in word)
        if any(c in table for c in word) and (has_latin or all(c in table or c == "-" for c in word)):
            return "".join(table.get(c, c) for c in word)
        return word

    return _WORD.sub(fold, text)


def generalize_emoji(text: str) -> tuple[str, list[Generalised]]:
    """Drop skin tones and gender signs, neutralise gendered/aged person emoji."""
    out: list[str] = []
    changes: list[Generalised] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _SKIN_TONES:
            changes.append(Generalised(ch, "", "ethnicity"))
            i += 1
            continue
        if ch in _GENDER_SIGNS:
            # Drop the sign with its joiner and variation selector: "🙋‍♀️" -> "🙋".
            if out and out[-1] == _ZWJ:
                out.pop()
            j = i + 1
            if j < len(text) and text[j] == "\ufe0f":
                j += 1
            changes.append(Generalised(text[i:j], "", "gender"))
            i = j
            continue
        if ch in _EMOJI_MAP:
            changes.append(Generalised(ch, _EMOJI_MAP[ch], "gender/age"))
            out.append(_EMOJI_MAP[ch])
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out), changes


# --------------------------------------------------------------------------
# Lexicons and the detector
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Lexicon:
    attribute: str
    words: Mapping[str, str]        # word -> what to write instead
    contextual: Mapping[str, str]
    unless_compound: frozenset[str] = frozenset()  # not sensitive right before a noun ("baby elephant")


@cache
def load_lexicon(attribute: str) -> Lexicon | None:
    """The shipped lexicon for an attribute, or None if there is none."""
    path = package_path("device", "lexicons") / f"{attribute}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return Lexicon(attribute, dict(data.get("words", {})), dict(data.get("contextual", {})),
                   frozenset(data.get("unless_compound", [])))


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Ordinary words: the whole-word entries of the CLIP vocabulary that ships with obclip."""
    vocab = json.loads((package_path("runtime", "data", "clip_bpe") / "vocab.json").read_text(encoding="utf-8"))
    return frozenset(k[:-4] for k in vocab if k.endswith("</w>") and k[:-4].isalpha())


def one_edit_apart(a: str, b: str) -> bool:
    """Damerau-Levenshtein distance exactly 1 (one insertion, deletion, substitution or swap)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return short[i:] == long_[i + 1:]


MIN_TYPO_LETTERS = 5


_SUFFIXES = ("ed", "er", "ing", "ly", "s", "es", "y", "ish", "ness", "ry", "dom", "hood", "ship", "ful", "less")


def typo_of(word: str, protected: Iterable[str]) -> str | None:
    """The protected word this one misspells, if it is one edit from exactly one of them.

    Only words of 5+ letters that are not ordinary English words qualify, so a
    short or real word ("she", "can", "bother") is never read as a typo. A word
    is ordinary if the CLIP vocabulary has it, or has it (or a protected word)
    without a common suffix ("widowed", "witchy"); an extra letter counts as a
    typo only of a 6+ letter word ("bridle" is not "bride").
    """
    w = word.lower()
    if len(w) < MIN_TYPO_LETTERS or w in english_words():
        return None
    targets = [p for p in protected if len(p) >= MIN_TYPO_LETTERS]
    for suffix in _SUFFIXES:
        base = w[:-len(suffix)]
        if w.endswith(suffix) and len(base) >= 3 and (base in english_words() or base in targets):
            return None
    hits = {p for p in targets if one_edit_apart(w, p) and (len(w) <= len(p) or len(p) >= 6)}
    return next(iter(hits)) if len(hits) == 1 else None


class Detector:
    """Finds sensitive words in (normalised) text for the attributes of a schema."""

    def __init__(self, attributes: Iterable[str], mention_nouns: Iterable[str] = (),
                 schema_words: Mapping[str, tuple[str, bool]] | None = None,
                 function_words: Iterable[str] = ()):
        self.lexicons = [lx for a in attributes if (lx := load_lexicon(a)) is not None]
        self.attributes = frozenset(attributes)
        self.mention_nouns = frozenset(mention_nouns)
        self.words: dict[str, tuple[str, str]] = {}
        self.contextual: dict[str, tuple[str, str]] = {}
        for lx in self.lexicons:
            for w, instead in lx.words.items():
                self.words[w] = (lx.attribute, instead)
            for w, instead in lx.contextual.items():
                self.contextual[w] = (lx.attribute, instead)
        self.typo_targets = frozenset(w for w in [*self.words, *self.contextual] if "-" not in w)
        # Schema words -> (attributes, is a noun): looked for inside hyphenated words, a noun
        # anywhere, an adjective when the word describes a mention.
        self.schema_words = dict(schema_words or {})
        self.function_words = frozenset(function_words)
        self.unless_compound = frozenset(w for lx in self.lexicons for w in lx.unless_compound)

    def knows(self, word: str) -> bool:
        return word in self.words or word in self.contextual or word in self.schema_words

    def find(self, text: str, units: Sequence[tuple[int, int, bool]] = ()) -> list[Finding]:
        """Sensitive words in text. ``units`` are stretches the caller protects (start, end,
        is_noun): they are read as one opaque word each, so that the context of a word never
        depends on which value a protected word has (e.g. "35-year-old" vs "young")."""
        out: list[Finding] = []
        if "age" in self.attributes:
            for pattern in (NUMERIC_AGE, _OTHER_AGES):
                for m in pattern.finditer(text):
                    out.append(Finding(m.start(), m.end(), m.group(), "age", "numeric age",
                                       "an age word right before the person noun ('a middle-aged woman')"))
        ages = [(m.start(), m.end(), False) for m in NUMERIC_AGE.finditer(text)]
        opaque = sorted(set(units) | set(ages))
        tokens: list[_Tok] = [_Tok(a, b, text[a:b].lower(), True, noun) for a, b, noun in opaque]
        tokens += [_Tok(m.start(), m.end(), m.group().lower(), False, False) for m in _WORD.finditer(text)
                   if not any(a <= m.start() < b for a, b, _ in opaque)]
        tokens.sort(key=lambda t: t.start)
        for i, tok in enumerate(tokens):
            if tok.opaque:
                continue
            w = tok.text
            raw = text[tok.start:tok.end]
            if w in self.words and not (w in self.unless_compound and self._compound(text, tokens, i)):
                attr, instead = self.words[w]
                out.append(Finding(tok.start, tok.end, raw, attr, "lexicon", instead))
            elif w in self.contextual and self._describes_mention(text, tokens, i):
                attr, instead = self.contextual[w]
                out.append(Finding(tok.start, tok.end, raw, attr, "describes a mention", instead))
            else:
                target = typo_of(w, self.typo_targets)
                if target is not None:
                    attr, instead = self.words.get(target) or self.contextual[target]
                    out.append(Finding(tok.start, tok.end, raw, attr, f"looks like a misspelling of "
                                       f"{target!r}", f"the word spelled out, or {instead}"))
        return sorted(out, key=lambda f: (f.start, f.end))

    def _compound(self, text: str, tokens: list[_Tok], i: int) -> bool:
        """Is token i the first half of a compound noun ("baby elephant", "baby blue")?"""
        if i + 1 >= len(tokens) or text[tokens[i].end:tokens[i + 1].start].strip(" \t"):
            return False
        nxt = tokens[i + 1]
        if nxt.opaque:
            return nxt.noun
        return not (nxt.text in self.function_words or nxt.text.endswith(("ing", "ly")))

    def _attribute_of(self, word: str) -> str:
        return (self.words.get(word) or self.contextual[word])[0]

    def _describes_mention(self, text: str, tokens: list[_Tok], i: int) -> bool:
        """Is token i (an adjective) followed, within three words joined by spaces, brackets or
        commas, by a noun that names a person (or a schema head)?"""
        for j in range(i + 1, min(i + 4, len(tokens))):
            gap = text[tokens[j - 1].end:tokens[j].start]
            if not JOINABLE.fullmatch(gap) and gap.strip() != ",":
                return False
            if tokens[j].noun or (not tokens[j].opaque and tokens[j].text in self.mention_nouns):
                return True
        return False


@dataclass(frozen=True)
class _Tok:
    start: int
    end: int
    text: str
    opaque: bool  # a protected stretch or a numeric age: one word whatever it says
    noun: bool


# Text that may separate words of one mention: spaces, brackets, quotes,
# prompt weights ("(teenage:1.3) boy").
JOINABLE = re.compile(r"(?:[\s()\[\]{}<>\"'\u201c\u201d\u2018\u2019*_]|:\s*-?\d+(?:\.\d+)?)*")
