"""Default deny: every word that would leave the device as typed must be one the device can
vouch for (docs/privacy.md).

Vouched: the words a slot renders (protected spans, rewritten in every candidate), the words
of the shipped vocabulary (device/vocabulary/words.tsv.gz: common English words with every
attribute-bearing word, name and near-typo of one removed), the schema's plain person nouns
that the vocabulary does not mark, collocations such as "king cobra", numbers that are not
ages, punctuation and prompt syntax (weights, "<lora:...>", "--ar 2:3"). Also vouched, by rule:
run-together words, hashtags and tag names that split into vouched words only ("#goldenhour",
"watercolor_style"), contractions of vouched words, a typo of a vouched word that is no near
spelling of an attribute word ("lighthuose"), and the names of artists a prompt cites for its
style ("by Greg Rutkowski", "Wes Anderson style"). Everything else is a Finding: a name,
another script or language, a typo of an attribute word, leetspeak, an attribute word no slot
protects, a context cue ("pregnant") next to a person, a number that is an age, a place of
origin ("a man from Seoul").

Every rule reads word classes and positions, never which value of an attribute a word has.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache

from obclip.runtime.locations import package_path

from ..sensitive import Finding
from .vocabulary import Vocabulary, Word

# A token: a decimal number ("1.3" in a prompt weight), or letters and digits with inner
# apostrophes and hyphens ("don't", "mother-of-pearl").
TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['\u2019][^\W_]+)*(?:-[^\W_]+(?:['\u2019][^\W_]+)*)*")
_NUMBER = re.compile(r"\d{1,3}(?:[.,]\d+)?(?:s|'s)?")
_ORDINAL = re.compile(r"\d{1,3}(?:th|st|nd|rd)")
_DECADE = re.compile(r"\d{4}s|\d0s|'\d0s")             # "1990s", "80s": an era, never an age
_YEAR = re.compile(r"1[89]\d\d|20\d\d")                 # "born in 1958"
_OTHER_NUMBER = re.compile(r"\d+[.,]\d+|\d{4,}")       # "3.5", "10000": never an age
_MEASURE = re.compile(r"\d+(?:[.,]\d+)?(?:k|mm|cm|m|km|px|p|d|x|fps|mp|hz|kg|g|ml|l|in|ft|gb|mb|v|w|am|pm)"
                      r"|v\d+(?:[.,]\d+)?|\d+:\d+")
_AGE_UNIT = re.compile(r"\d{1,3}(?:yo|y|yr|yrs|m|mo)")
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred".split())
_ORDINAL_WORDS = frozenset(
    "tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth "
    "twentieth thirtieth fortieth fiftieth sixtieth seventieth eightieth ninetieth hundredth".split())
# An age cue before a number ("age 52", "turned 40") or after it ("52 years old", "6 months old").
_AGE_BEFORE = frozenset("age ages aged turned turning turns birthday bday".split())
_AGE_AFTER = frozenset("yo y.o yrs-old year-old years-old".split())
_SPANS = frozenset("year years yr yrs month months week weeks day days".split())
# Nouns after an ordinal that make it a date or a place, not an age ("19th century", "5th floor").
_ORDINAL_THINGS = frozenset("century centuries floor floors street avenue st ave edition place row".split())
_CLAUSE_END = re.compile(r"[.!?;\n]")
# Text between two words of one phrase: spaces, brackets, quotes, prompt weights.
_JOIN = re.compile(r"(?:[-\s()\[\]{}<>\"'\u201c\u201d\u2018\u2019*_]|:\s*-?\d+(?:\.\d+)?)*")
# How far after an attribute word the thing it describes may come ("an old, rusty car").
_REACH = 4
# Prompt syntax: adapter tags ("<lora:name:0.8>", "embedding:name") and Midjourney parameters
# ("--ar 2:3 --v 6"). Their keywords are syntax, not words; the names inside are read as words.
_TAG_KEYWORDS = frozenset("lora lyco locon hypernet embedding ti textual_inversion".split())
_PARAMETER_KEYWORDS = frozenset("ar aspect v version niji style stylize s chaos c q quality seed sameseed "
                                "no iw tile weird w sref cref sw cw raw".split())
# Contractions: a vouched word and one of these ("we'll", "here's", "didn't").
_CONTRACTIONS = frozenset("s ll re ve d t m".split())
# Words that cite an artist for style when a name follows ("painted by", "in the style of").
_STYLE_BY = frozenset("by".split())
_STYLE_CUES = frozenset("art artwork painting painted drawing drawn illustration illustrated photo photograph "
                        "photographed photography shot sketch sketched sculpture poster directed designed made "
                        "inspired render rendered concept print engraving etching woodcut".split())
_STYLE_AFTER = frozenset("style aesthetic aesthetics".split())
# Run-together words: parts this long at least, so that "golden" is not "g" + "old" + "en".
_MIN_PART = 3
# A typo of a vouched word: this long at least ("lighthuose"); shorter ones collide with names.
_MIN_TYPO = 5
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Words for a person that are no mention ("someone in a niqab").
_SOMEONE = frozenset("someone somebody anyone anybody everyone everybody nobody whoever".split())
# Places after these tell where a person comes from ("a man from Seoul", "born in Accra").
_ORIGIN = frozenset("from".split())
_ORIGIN_PAIRS = frozenset({("born", "in"), ("raised", "in"), ("native", "of"), ("grew", "up")})
# Words that open a counted noun phrase ("a cutie", "my bestie"): a dictionary word of unknown
# sense right after one, with no noun after it, may be the word for a person.
_DETERMINERS = frozenset("a an the this that these those my your our their his her its one".split()) | _NUMBER_WORDS


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
    nouns: frozenset[str] = frozenset()  # the schema's person nouns (heads and plain heads)
    things: list[tuple[int, int]] = field(default_factory=list)  # vouched collocations (set by unvouched)
    person_present: bool = False  # someone is in the picture (set by unvouched)


def phrase_spans(text: str, phrases: frozenset[tuple[str, ...]], longest: int) -> list[tuple[int, int]]:
    """Stretches of text that are one of the phrases, longest first, words separated by single
    spaces or hyphens; a last word may carry a plural s ("grandfather clocks")."""
    toks = tokens(text)
    words = [w for t in toks for w in t.word.split("-")]
    spans = [(a, b) for t in toks for a, b in _part_spans(t)]
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        for k in range(min(longest, len(words) - i), 0, -1):
            if k > 1 and any(text[spans[j][1]:spans[j + 1][0]] not in (" ", "-") for j in range(i, i + k - 1)):
                continue
            key = words[i:i + k]
            last = key[-1]
            forms = [key] + [key[:-1] + [last[: -len(s)]] for s in ("s", "es") if last.endswith(s)]
            if any(tuple(f) in phrases for f in forms):
                out.append((spans[i][0], spans[i + k - 1][1]))
                i += k - 1
                break
        i += 1
    return out


def _part_spans(tok: Tok) -> list[tuple[int, int]]:
    out, pos = [], tok.start
    for part in tok.text.split("-"):
        out.append((pos, pos + len(part)))
        pos += len(part) + 1
    return out


def compound_spans(text: str, vocab: Vocabulary) -> list[tuple[int, int]]:
    """Stretches of text that are a vouched collocation ("king cobra", "mother-of-pearl")."""
    return phrase_spans(text, vocab.compounds, vocab.max_compound)


def unvouched(text: str, vocab: Vocabulary, ctx: Context) -> list[Finding]:
    """The words of text the device cannot vouch for, as Findings (empty: everything is vouched)."""
    toks = tokens(text)
    compound = compound_spans(text, vocab)
    ctx.things = compound
    eponyms = _eponyms(text, toks, vocab, ctx)
    ctx.person_present = _person_present(text, toks, vocab, ctx, eponyms)
    if ctx.person_present:
        eponyms = []  # near a person a name may be theirs
    out: list[Finding] = []
    if ctx.person_present:  # a cue or a place tells something only of a person in the picture
        out += [f for f in _cues(text, toks) if not covered(text, f.start, f.end, ctx.protected)]
        out += _origins(text, toks, vocab, ctx)
    for a, b in phrase_spans(text, vocab.person_compounds, vocab.max_compound):
        # The words that make it tell something: attribute words no slot rewrites, capitalised
        # where only their capitalised form tells one ("Wise Men", not "a wise man").
        telling = [t for t in toks if a <= t.start < b and t.word in vocab.told
                   and not covered(text, t.start, t.end, ctx.protected)
                   and not ("C" in getattr(vocab.get(t.word), "flags", "") and t.text == t.word)]
        if telling:
            attr = vocab.told[telling[0].word]
            out.append(Finding(a, b, text[a:b], attr, "tells " + attr, "a word from the vouched vocabulary"))
    out += _spelled_out(text, toks)
    styled = _style_names(text, toks, vocab)
    for i, tok in enumerate(toks):
        if covered(text, tok.start, tok.end, ctx.protected) or covered(text, tok.start, tok.end, compound) \
                or covered(text, tok.start, tok.end, eponyms) or i in styled or _syntax(text, tok):
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


def _person_present(text: str, toks: list[Tok], vocab: Vocabulary, ctx: Context,
                    eponyms: list[tuple[int, int]]) -> bool:
    """Is someone in the picture: a mention, a pronoun, a person noun, "someone", a name? A word
    for a people vouched before the thing it describes is no one ("a Japanese garden"), nor is
    the name of a thing ("a Queen Anne chair")."""
    if any(not covered(text, a, b, eponyms) for a, b in ctx.persons):
        return True
    for i, t in enumerate(toks):
        if covered(text, t.start, t.end, eponyms):
            continue
        entry = vocab.get(t.word)
        if t.word in _SOMEONE or t.word in ctx.plain_heads:
            return True
        if entry is not None and "P" in entry.flags and not (
                "A" in entry.flags and "C" not in entry.flags
                and _describes_a_thing(text, toks, i, entry, vocab, ctx, vocab.told.get(t.word) == "gender")):
            return True
        if t.text[:1].isupper() and t.word.isalpha() and (entry is None or "N" in entry.flags):
            return True  # perhaps a name
    return False


def _eponyms(text: str, toks: list[Tok], vocab: Vocabulary, ctx: Context) -> list[tuple[int, int]]:
    """Runs of capitalised names, perhaps after a title a slot rewrites, right before a noun that
    is first a thing and depicts no one: the name of a style, a make or a character the thing is
    named after ("a Queen Anne chair", "a Santa Claus hat", "a John Deere tractor"), vouched
    when no one is in the picture. Never before a depiction ("a Maria doll", "a Taylor Swift
    poster": who is depicted) or a person, never possessive ("Maria's cake")."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(toks):
        j, names = i, 0
        while j < len(toks) and (j == i or text[toks[j - 1].end:toks[j].start] == " "):
            t = toks[j]
            if not (t.text[:1].isupper() and t.word.isalpha()):
                break
            entry = vocab.get(t.word)
            if vocab.told.get(t.word) == "name" or (entry is not None and "N" in entry.flags):
                names += 1
            elif not (t.word in ctx.nouns and covered(text, t.start, t.end, ctx.protected)):
                break  # only a title ("Queen", "King": a slot) may stand among the names
            j += 1
        if names and j < len(toks) and text[toks[j - 1].end:toks[j].start] == " " \
                and _thing_named_after(toks[j], vocab, ctx):
            out.append((toks[i].start, toks[j - 1].end))
            i = j
        else:
            i += 1
    return out


def _thing_named_after(tok: Tok, vocab: Vocabulary, ctx: Context) -> bool:
    """A noun in lower case that is first a thing and no depiction ("chair", "hat"; not "doll",
    "portrait", "poster", "family", "girl")."""
    entry = vocab.get(tok.word)
    return tok.text == tok.word and entry is not None and entry.pos[:1] == "n" \
        and not set("PGANCDRL") & set(entry.flags) and tok.word not in ctx.function_words \
        and tok.word not in ctx.plain_heads and tok.word not in ctx.nouns


def _cues(text: str, toks: list[Tok]) -> list[Finding]:
    out = []
    words = [t.word for t in toks]
    for cue in context_cues():
        n = len(cue.words)
        for i in range(len(toks) - n + 1):
            key = words[i:i + n]
            if tuple(key) == cue.words or tuple(key[:-1] + [_singular(key[-1])]) == cue.words:
                a, b = toks[i].start, toks[i + n - 1].end
                out.append(Finding(a, b, text[a:b], cue.attribute, "context cue",
                                   f"a description that does not imply {cue.attribute}"))
    return out


def _singular(word: str) -> str:
    """A plural's singular, for matching cues in any number ("saris", "tuxedos")."""
    for suffix in ("es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)]
    return word


def _origins(text: str, toks: list[Tok], vocab: Vocabulary, ctx: Context) -> list[Finding]:
    """A place after "from" or "born in" in a prompt with a person: where someone comes from."""
    out = []
    places = phrase_spans(text, vocab.places, vocab.max_compound)
    for i, tok in enumerate(toks):
        entry = vocab.get(tok.word)
        place = entry is not None and "L" in entry.flags or any(a == tok.start for a, _ in places)
        if not place or i == 0:
            continue
        before = [t.word for t in toks[max(0, i - 2):i]]
        if before[-1:] and before[-1] in _ORIGIN or tuple(before) in _ORIGIN_PAIRS:
            out.append(Finding(tok.start, tok.end, tok.text, "ethnicity", "place of origin",
                               "no place of origin for a person"))
    return out


def _spelled_out(text: str, toks: list[Tok]) -> list[Finding]:
    """Three or more single letters in a row ("a W O M A N"; "a" and "I" are words): a word
    spelled out, never vouched."""
    out = []
    i = 0
    while i < len(toks):
        j = i
        while j < len(toks) and len(toks[j].word) == 1 and toks[j].word.isalpha() and toks[j].word not in "ai" \
                and (j == i or text[toks[j - 1].end:toks[j].start] == " "):
            j += 1
        if j - i >= 3:
            out.append(Finding(toks[i].start, toks[j - 1].end, text[toks[i].start:toks[j - 1].end], "unknown",
                               "spelled-out letters", "the word written out"))
            i = j
        else:
            i += 1
    return out


def _syntax(text: str, tok: Tok) -> bool:
    """A keyword of prompt syntax in its place: "<lora:", "embedding:", "--ar"."""
    before, after = text[max(0, tok.start - 2):tok.start], text[tok.end:tok.end + 1]
    if tok.word in _TAG_KEYWORDS and after == ":":
        return True
    return tok.word in _PARAMETER_KEYWORDS and before == "--"


def _style_names(text: str, toks: list[Tok], vocab: Vocabulary) -> set[int]:
    """Tokens of the artists a prompt cites for its style: capitalised words that are no
    vouched word, right after "by" (itself after a comma or a word of art: "painted by"), after
    "style of", or right before "style" ("Wes Anderson style"); several joined by "and" or
    commas. The artist is not in the picture, so the name tells nothing about who is."""
    out: set[int] = set()

    def name_at(j: int) -> bool:
        t = toks[j]
        entry = vocab.get(t.word)
        return t.text[:1].isupper() and t.word.isalpha() and (entry is None or "N" in entry.flags)

    def run_from(j: int) -> list[int]:
        """Names from token j on, joined by spaces, "and" or commas."""
        run: list[int] = []
        while j < len(toks) and name_at(j):
            run.append(j)
            j += 1
            if j < len(toks) and (toks[j].word == "and" or "," in text[toks[j - 1].end:toks[j].start]):
                k = j + 1 if toks[j].word == "and" else j
                if k < len(toks) and name_at(k):
                    j = k
        return run

    for i, tok in enumerate(toks):
        if tok.word in _STYLE_BY and i + 1 < len(toks):
            prev_gap = text[toks[i - 1].end:tok.start] if i > 0 else ""
            if i == 0 or "," in prev_gap or toks[i - 1].word in _STYLE_CUES:
                out.update(run_from(i + 1))
        if tok.word == "of" and i > 0 and toks[i - 1].word in _STYLE_AFTER and i + 1 < len(toks):
            out.update(run_from(i + 1))
        if tok.word in _STYLE_AFTER and i > 0:
            j = i - 1
            while j >= 0 and name_at(j) and (j == i - 1 or text[toks[j].end:toks[j + 1].start] == " "):
                out.add(j)
                j -= 1
    return out


def _check(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> Finding | None:
    tok = toks[i]
    w = tok.word
    if _is_number(w) or _ORDINAL.fullmatch(w) or w in _ORDINAL_WORDS:
        return _age(text, toks, i, vocab, ctx)
    if _AGE_UNIT.fullmatch(w):
        return Finding(tok.start, tok.end, tok.text, "age", "numeric age", "an age word before the person noun")
    if _MEASURE.fullmatch(w):
        return None
    if _word_ok(text, toks, i, tok, vocab, ctx):
        return None
    if "-" in w and w not in vocab.told:
        # A hyphenated word no list holds as a whole: each part must be vouched on its own
        # ("blue-eyed"), read with the parts after it as its context ("baby-blue").
        parts: list[Tok] = []
        pos = tok.start
        for piece in tok.text.split("-"):
            parts.append(Tok(pos, pos + len(piece), piece, piece.lower().replace("\u2019", "'")))
            pos += len(piece) + 1
        rest = parts + toks[i + 1:]
        for j, part in enumerate(parts):
            if covered(text, part.start, part.end, ctx.protected):
                continue
            if _is_number(part.word):
                bad = _age(text, rest, j, vocab, ctx)
                if bad is not None:
                    return _whole(tok, bad)
                continue
            if _object_of_participle(parts, j, vocab, ctx):
                continue
            if not _word_ok(text, rest, j, part, vocab, ctx):
                return _whole(tok, _unknown(part, vocab))
        return None
    if "'" in w:
        base, _, suffix = w.rpartition("'")
        if suffix in _CONTRACTIONS and base and (vocab.get(base) is not None
                                                 or covered(text, tok.start, tok.start + len(base), ctx.protected)):
            return None
    # Words no list holds, in lower case only (a capitalised run of letters may be a name), and
    # words of unknown sense where they are not vouched ("whiteboard" next to a person).
    entry = _entry(w, vocab)
    unknown = (entry is None or "D" in entry.flags) and w not in vocab.told and _base(w) not in vocab.told
    if unknown and w.isalpha() and tok.text == w and (_splits_into_vouched(w, vocab, ctx)
                                                      or _typo_of_vouched(tok, vocab, ctx)):
        return None
    return _unknown(tok, vocab)


def _object_of_participle(parts: list[Tok], j: int, vocab: Vocabulary, ctx: Context) -> bool:
    """A person noun that is the object of the participle after it ("man-eating"): it names
    what the thing does, not who is in the picture."""
    if j + 1 >= len(parts) or not parts[j + 1].word.endswith("ing"):
        return False
    nxt = vocab.get(parts[j + 1].word)
    return nxt is not None and "v" in nxt.pos and parts[j].word in ctx.nouns and len(parts) == j + 2


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
    if _NUMBER.fullmatch(w) or _YEAR.fullmatch(w) or _DECADE.fullmatch(w) or _OTHER_NUMBER.fullmatch(w):
        return True
    parts = w.split("-")
    return all(p in _NUMBER_WORDS or (p.endswith("ies") and p[:-3] + "y" in _NUMBER_WORDS) for p in parts)


def _entry(w: str, vocab: Vocabulary) -> Word | None:
    return vocab.get(w) or vocab.get(_base(w))


def _word_ok(text: str, toks: list[Tok], i: int, tok: Tok, vocab: Vocabulary, ctx: Context) -> bool:
    """Is this (non-number) word vouched where it stands?"""
    w = tok.word
    entry = _entry(w, vocab)
    if entry is None:
        return (w in ctx.plain_heads or _base(w) in ctx.plain_heads) and w not in vocab.told \
            and w not in ctx.schema_words
    if ("N" in entry.flags or "C" in entry.flags) and any(c.isupper() for c in tok.text):
        return False  # "Rose", "Swede": a name or an attribute word when capitalised
    if "A" in entry.flags:
        gendered = vocab.told.get(w, vocab.told.get(_base(w))) == "gender"
        return _describes_a_thing(text, toks, i, entry, vocab, ctx, gendered)
    if "D" in entry.flags:
        return _sense_cannot_matter(text, toks, i, vocab, ctx)
    return True


def _sense_cannot_matter(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> bool:
    """A word SCOWL lists but WordNet lacks (flag D: "ramen", "koi", "selfie"): the device does
    not know its sense, so it is vouched only where that sense cannot tell anything about a
    person: no one is in the picture, and the word is not what a counted noun phrase names ("a
    ____", "my ____" with no noun after it) nor the subject of a verb of people ("____ smiling").
    "a bowl of ramen" and "a koi pond" are sent; "a hottie on the beach" is not."""
    if ctx.person_present:
        return False
    nxt = toks[i + 1] if i + 1 < len(toks) and text[toks[i].end:toks[i + 1].start] == " " else None
    nxt_entry = _entry(nxt.word, vocab) if nxt is not None else None
    if nxt is not None and nxt_entry is not None and nxt.word.endswith("ing") and "H" in nxt_entry.flags \
            and "v" in nxt_entry.pos:
        return False
    determined = i > 0 and toks[i - 1].word in _DETERMINERS and _JOIN.fullmatch(text[toks[i - 1].end:toks[i].start]) \
        is not None
    modifies = nxt is not None and nxt_entry is not None and (nxt_entry.noun or "D" in nxt_entry.flags) \
        and nxt.word not in ctx.function_words
    return not determined or modifies


def _describes_a_thing(text: str, toks: list[Tok], i: int, word: Word, vocab: Vocabulary, ctx: Context,
                       gendered: bool) -> bool:
    """An attribute word about people ("old", "white", "Korean", "bachelor") is vouched only
    before the thing it describes, a noun that is no person ("an old photograph", "a white
    horse", "a Japanese garden", "an old, rusty car"), never before a person, at the end of a
    phrase or after a verb ("she is old"). A gendered person noun with no adjective sense
    ("bachelor", "bachelorette") names a person even before a thing ("a bachelor party"); an age
    noun before a thing gives the thing's age ("a baby elephant")."""
    if "P" in word.flags and "a" not in word.pos and gendered:
        return False
    for j in range(i + 1, min(i + 1 + _REACH, len(toks))):
        gap = text[toks[j - 1].end:toks[j].start]
        if not (_JOIN.fullmatch(gap) or gap.strip() == ","):
            return False
        t = toks[j]
        if any(a <= t.start < b for a, b in ctx.persons) or t.word in ctx.plain_heads:
            return False
        if any(a <= t.start < b for a, b in ctx.things):
            return True  # a vouched collocation names no person ("a white picket fence")
        entry = _entry(t.word, vocab)
        if entry is None or t.word in ctx.function_words:
            return False
        if t.word.endswith(("ing", "ed")) or (entry.pos and entry.pos[0] != "n" and "a" in entry.pos):
            continue  # another adjective or a participle: look further
        if not entry.noun or {"P", "A", "G"} & set(entry.flags) or "_" in gap:
            return False  # "korean_idol": a tag the device cannot read as a phrase
        if j + 1 < len(toks) and text[t.end:toks[j + 1].start] == " " \
                and vocab.acts_as_person(t.word, toks[j + 1].word):
            return False  # "a Russian babushka selling seeds": a person the vocabulary knows as a thing
        return not _person_compound_head(text, toks, j, vocab, ctx)
    return False


def _person_compound_head(text: str, toks: list[Tok], j: int, vocab: Vocabulary, ctx: Context) -> bool:
    """Does the noun at token j start a noun compound whose head is a person ("truck driver",
    "sushi chef")?"""
    k = j + 1
    while k < len(toks) and text[toks[k - 1].end:toks[k].start] == " ":
        t = toks[k]
        if any(a <= t.start < b for a, b in ctx.persons) or t.word in ctx.plain_heads or vocab.person_noun(t.word):
            return True
        entry = _entry(t.word, vocab)
        if entry is None or entry.pos[:1] != "n" or t.word in ctx.function_words:
            return False
        k += 1
    return False


def _typo_of_vouched(tok: Tok, vocab: Vocabulary, ctx: Context) -> bool:
    """A lower-case word one edit (a letter dropped, added, changed or two swapped) from a plain
    vouched word, and not within about two edits of any attribute word or name
    ("lighthuose"): a typo that says nothing about a person."""
    w = tok.word
    if len(w) < _MIN_TYPO or tok.text != w:
        return False
    near = vocab.near_told
    if w in near or any(w[:k] + w[k + 1:] in near for k in range(len(w))) or w in ctx.schema_words:
        return False
    return any(_plain_word(v, vocab) and len(v) >= _MIN_TYPO for v in one_edit_variants(w))


def one_edit_variants(word: str, letters: str = _LETTERS) -> set[str]:
    """Every string one deletion, substitution, insertion or swap of neighbours from word."""
    splits = [(word[:k], word[k:]) for k in range(len(word) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in letters}
    out |= {a + c + b for a, b in splits for c in letters}
    out.discard(word)
    return out


def _plain_word(w: str, vocab: Vocabulary) -> bool:
    """A vouched word with nothing to watch for: no person, name, attribute or place flag."""
    entry = vocab.get(w)
    return entry is not None and not (set(entry.flags) & set("PpNCALD"))


def _splits_into_vouched(w: str, vocab: Vocabulary, ctx: Context) -> bool:
    """A run-together word, a hashtag or a tag name ("goldenhour", "summervibes") that splits
    into vouched words of 3+ letters, and in no way into one that tells an attribute
    ("momlife", "oldman", "girlsquad"): vouched. An attribute word before a thing is fine
    ("whiteboard"), as it would be with a space."""
    n = len(w)
    if n < 2 * _MIN_PART:
        return False
    # ok[k]: w[:k] splits into parts that are all fine; bad[k]: some split of w[:k] holds an
    # attribute word. Parts that tell an attribute are told words or schema words.
    ok = [False] * (n + 1)
    bad = [False] * (n + 1)
    reach = [False] * (n + 1)
    ok[0] = reach[0] = True
    for k in range(_MIN_PART, n + 1):
        for j in range(0, k - _MIN_PART + 1):
            if not reach[j]:
                continue
            part = w[j:k]
            # A name matters from 4 letters ("maria"); "gol" in "goldenhour" is no name there.
            told = (part in vocab.told and (len(part) > 3 or vocab.told[part] != "name")) or part in ctx.schema_words
            entry = vocab.get(part)
            if told or entry is not None:
                reach[k] = True
            if told and not (entry is not None and "A" in entry.flags):
                bad[k] = True
            elif bad[j] and (told or entry is not None):
                bad[k] = True
            if ok[j] and entry is not None and _part_ok(part, entry, w[k:], vocab):
                ok[k] = True
    return ok[n] and not bad[n]


def _part_ok(part: str, entry: Word, rest: str, vocab: Vocabulary) -> bool:
    """A part of a run-together word (typed in lower case): vouched, and an attribute word only
    before a thing ("white" + "board")."""
    if "D" in entry.flags:
        return False  # a word of unknown sense is read only on its own
    if "A" in entry.flags:
        nxt = next((vocab.get(rest[:k]) for k in range(len(rest), _MIN_PART - 1, -1) if vocab.get(rest[:k])), None)
        return nxt is not None and nxt.noun and not ({"P", "A"} & set(nxt.flags))
    return True


def _age(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> Finding | None:
    """A number is an age when an age cue is next to it ("age: 52", "6 months old", "turned 40"),
    or when it stands in a clause with a person and counts nothing ("a woman, 45", "a girl of
    sixteen", "she is 34", "approaching 30", "pushing ninety", "Maria, 28"); a year in a clause
    with a person is a birth year ("born in 1958"); an ordinal is a birthday or an anniversary
    ("her 90th birthday", "their 50th anniversary") unless it dates or places a thing ("19th
    century"). A number before a noun counts it ("3 apples", "two women"); a decade ("1920s")
    is an era."""
    tok = toks[i]
    w = tok.word
    found = Finding(tok.start, tok.end, tok.text, "age", "numeric age",
                    "an age word right before the person noun ('a middle-aged woman')")
    if _DECADE.fullmatch(w) or _OTHER_NUMBER.fullmatch(w) and not _YEAR.fullmatch(w):
        return None

    def same_clause(a: int, b: int) -> bool:
        return _CLAUSE_END.search(text, a, b) is None

    for j in range(max(0, i - 2), i):
        if toks[j].word in _AGE_BEFORE and same_clause(toks[j].end, tok.start):
            return found
    after = [t.word for t in toks[i + 1:i + 3]]
    if after[:1] and after[0] in _AGE_AFTER or after[:1] and after[0] in _SPANS and after[1:] == ["old"]:
        return found
    if not _person_in_clause(text, toks, i, vocab, ctx):
        return None
    if _YEAR.fullmatch(w):
        before = [t.word for t in toks[max(0, i - 2):i]]
        return found if {"born", "since"} & set(before) or before == ["class", "of"] else None
    nxt = toks[i + 1] if i + 1 < len(toks) and _JOIN.fullmatch(text[tok.end:toks[i + 1].start]) else None
    if _ORDINAL.fullmatch(w) or w in _ORDINAL_WORDS:
        return None if nxt is not None and nxt.word in _ORDINAL_THINGS else found
    if nxt is not None and nxt.word in _SPANS:
        return found  # "a toddler (2 yrs)", "a baby, 6 months"
    if nxt is not None:
        entry = _entry(nxt.word, vocab)
        counted = entry is not None and entry.noun and nxt.word not in ctx.function_words \
            and not (nxt.word.endswith("ing") and "v" in entry.pos)  # "approaching 30 looking out"
        if counted or nxt.word in ctx.plain_heads or any(a <= nxt.start < b for a, b in ctx.persons) \
                or _MEASURE.fullmatch(nxt.word):
            return None  # "3 apples", "two women", "2 cats"
    return found


def _person_in_clause(text: str, toks: list[Tok], i: int, vocab: Vocabulary, ctx: Context) -> bool:
    """Is a person (a mention, a pronoun, a person noun or a capitalised name) in the clause of
    token i, before it?"""
    tok = toks[i]
    j = i - 1
    while j >= 0 and _CLAUSE_END.search(text, toks[j].end, tok.start) is None:
        prev = toks[j]
        if any(a <= prev.start < b for a, b in ctx.persons) or prev.word in ctx.plain_heads \
                or vocab.person_noun(prev.word):
            return True
        entry = vocab.get(prev.word)
        if prev.text[:1].isupper() and prev.word.isalpha() and (entry is None or "N" in entry.flags):
            return True  # after a name ("Maria, 28", "Rose, 28")
        j -= 1
    return False
