"""Parsing a prompt into person mentions and pronouns, with the attribute words each carries.

Every rule reads word classes (a modifier of an attribute, a head noun, a pronoun case),
never which value a word has, so that every candidate parses exactly like the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..sensitive import JOINABLE, NUMERIC_AGE, age_bucket, typo_of, years_of
from .schema import WORD, Entry, ObliviousError, Schema, style_of
from .vocabulary import Vocabulary
from .vouch import compound_spans

_ARTICLES = ("a", "an")
# Characters that end a sentence: a capital right after them belongs to the
# sentence, not to the word.
_SENTENCE_END = ".!?\n\r"
_OPENERS = " \t\"'([{\u201c\u2018"


@dataclass
class Token:
    text: str
    start: int
    end: int
    age: str | None = None  # a numeric age ("35-year-old"): its bucketed value


@dataclass
class MatchedWord:
    """One matched attribute word or phrase in the prompt."""

    entry: Entry
    start: int
    end: int
    text: str
    style: str
    token: int  # index of its first token
    last: int  # index of its last token


@dataclass
class Span:
    """One person mention: attribute words (with a head noun, if any, last), possibly in
    groups separated by other adjectives ("a young, smiling woman")."""

    words: list[MatchedWord]
    groups: list[list[MatchedWord]] = field(default_factory=list)  # runs of adjacent words
    article: Token | None = None
    sentence_cap: bool = False  # first word capitalised only because a sentence starts there
    head: MatchedWord | None = None
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
class Pronoun:
    token: Token
    case: str
    value: str
    style: str
    person: int = -1


@dataclass
class Person:
    position: int
    span: Span | None
    values: dict[str, str] = field(default_factory=dict)  # attribute -> typed value (span + pronouns)
    label: str = ""


def tokenize(prompt: str) -> list[Token]:
    """Words, and numeric ages ("35-year-old", "50 years old") as single tokens."""
    ages = [(m.start(), m.end(), years_of(m.group())) for m in NUMERIC_AGE.finditer(prompt)]
    out: list[Token] = []
    for a, b, years in ages:
        out.append(Token(prompt[a:b], a, b, age=age_bucket(years)))
    for m in WORD.finditer(prompt):
        if not any(a <= m.start() < b for a, b, _ in ages):
            out.append(Token(m.group(), m.start(), m.end()))
    return sorted(out, key=lambda t: t.start)


def only_space(prompt: str, a: int, b: int) -> bool:
    return prompt[a:b].strip() == "" and a <= b


def joinable(prompt: str, a: int, b: int) -> bool:
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


class Parser:
    def __init__(self, schema: Schema, prompt: str, vocabulary: Vocabulary | None = None):
        self.schema = schema
        self.prompt = prompt
        self.vocabulary = vocabulary
        self.tokens = tokenize(prompt)
        spans = compound_spans(prompt, vocabulary) if vocabulary is not None else []
        self.in_compound = frozenset(i for i, t in enumerate(self.tokens) if any(a <= t.start < b for a, b in spans))
        self.pronouns: list[Pronoun] = []
        # Stretches that name people the device cannot tell apart by word class ("a toddler girl":
        # two person nouns for one person; "an elderly couple, he ... she": pronouns for a group).
        self.unclear: list[tuple[int, int]] = []
        # Nouns the vocabulary knows as things that act as people ("a Russian babushka selling
        # seeds"): which attributes they tell is unknown.
        self.unknown_people: list[tuple[int, int]] = []
        pr = schema.pronouns
        self.breakers = frozenset(pr.non_noun_words if pr is not None else ()) | frozenset(schema.pronoun_words)
        # Cases a determiner-like word can stand for ("her": object/determiner, "his": determiner/possessive).
        self.det_group: frozenset[str] = frozenset()
        if pr is not None and pr.determiner_case is not None:
            det = pr.determiner_case
            self.det_group = frozenset({det} | {c for opts in schema.pronoun_words.values()
                                                if det in {o for o, _ in opts} for c, _ in opts})
        self.single_words = {k[0]: e for k, e in schema.lexicon.items() if len(k) == 1 and not e.person_only}
        self.ambiguous = frozenset(e.key for e in schema.lexicon.values() if e.person_only)

    def parse(self) -> list[Person]:
        spans, pronouns = self._scan()
        spans = self._mentions(spans)
        for span in spans:
            self._resolve_span(span)
        persons = [Person(s.start, s, dict(s.values), s.text) for s in spans]
        self._bind(persons, pronouns)
        self.pronouns = pronouns
        return persons

    # -- finding attribute words, grouping them into mentions ---------------

    def _plain(self, word: str) -> bool:
        """A person noun that carries no attribute: the schema's plain heads, and the vouched
        vocabulary's person nouns (WordNet: first sense a person) that are not schema words."""
        if word in self.schema.plain_heads:
            return True
        # "Mexican", "bachelor" are attribute words, not plain nouns.
        return self.vocabulary is not None and self.vocabulary.person_noun(word) \
            and (word,) not in self.schema.lexicon and word not in self.vocabulary.told

    def _match(self, i: int) -> tuple[Entry, int] | None:
        """Longest lexicon phrase starting at token i (tokens separated by spaces only)."""
        toks = self.tokens
        if i in self.in_compound:  # "king cobra", "mother-of-pearl": no attribute word
            return None
        if toks[i].age is not None:
            if "age" in self.schema.modifiers:
                return Entry("modifier", "age", {"age": toks[i].age or ""}, False), 1
            return None
        for k in range(min(self.schema.max_phrase, len(toks) - i), 0, -1):
            if k > 1 and not all(only_space(self.prompt, toks[j].end, toks[j + 1].start) for j in range(i, i + k - 1)):
                continue
            key = tuple(t.text.lower() for t in toks[i:i + k])
            if key in self.schema.lexicon:
                entry = self.schema.lexicon[key]
                # "white" in "a white man", and in "a white babushka selling" as "asian" is there.
                if entry.person_only and not (self._head_follows(i + k) or self._person_by_verb(i + k)):
                    continue
                return entry, k
        word = toks[i].text.lower()
        if self._plain(word):
            return Entry("plain", "", {}, False), 1
        generalised = self._generalised(i)
        if generalised is not None and (self._head_follows(i + 1) or self._person_by_verb(i + 1)):
            return generalised, 1
        if self._may_be_typo(word):
            # A misspelt schema word ("womna") is read as the word it misspells.
            target = typo_of(word, self.single_words)
            if target is not None:
                return self.single_words[target], 1
        return None

    def _may_be_typo(self, word: str) -> bool:
        """A word the vocabulary vouches is no misspelling ("papal" is not "papa"): the build
        already left out the dictionary words that are typos of attribute words."""
        return word not in self.schema.pronoun_words and (self.vocabulary is None or self.vocabulary.get(word) is None)

    def _generalised(self, i: int) -> Entry | None:
        """A vocabulary word that tells a generalised attribute but is no schema word ("Mexican",
        "Latina", "Sikh"): a modifier of that attribute whose value the schema lacks ("")."""
        if self.vocabulary is None or not self.schema.generalised:
            return None
        tok = self.tokens[i]
        word = tok.text.lower()
        attribute = self.vocabulary.told.get(word)
        if attribute not in self.schema.generalised or (word,) in self.schema.lexicon:
            return None
        entry = self.vocabulary.get(word)
        if entry is not None and "C" in entry.flags and tok.text == word:
            return None  # "swede" in lower case is a vegetable
        assert attribute is not None
        return Entry("modifier", attribute, {attribute: ""}, False, person_only=True)

    def _head_follows(self, i: int) -> bool:
        """Is a head or plain noun at token i, after joinable text, other modifiers, or up to
        _MAX_GAP_WORDS other words across a comma ("a Black, smiling woman"), as _attaches joins them?"""
        toks = self.tokens
        prev_end = toks[i - 1].end
        others = 0
        while i < len(toks) and i not in self.in_compound:
            gap = self.prompt[prev_end:toks[i].start]
            if not (joinable(self.prompt, prev_end, toks[i].start) or gap.strip() == ","):
                return False
            if toks[i].age is not None:  # a numeric age is an age modifier
                prev_end, i = toks[i].end, i + 1
                continue
            word = toks[i].text.lower()
            entry = self.schema.lexicon.get((word,))
            if entry is None and self._may_be_typo(word):
                target = typo_of(word, self.single_words)  # as _match reads it
                entry = self.single_words[target] if target is not None else None
            if self._plain(word) or (entry is not None and entry.kind == "head"):
                return True
            if entry is not None and entry.kind == "modifier" and entry.key in self.schema.person_modifiers \
                    and entry.key not in self.ambiguous:
                return True  # a gender adjective used as the noun: "a white male"
            if entry is None and self._generalised(i) is not None:
                entry = self._generalised(i)  # "a Mexican, Catholic woman"
            if entry is None:
                others += 1
                if others > _MAX_GAP_WORDS or word in self.breakers:
                    return False
                if self._thing_noun(word) and not self._noun_follows_at(i + 1):
                    return False  # "a white tiger": the colour of the tiger; "a white truck driver" reads on
            elif entry.kind != "modifier":
                return False
            prev_end, i = toks[i].end, i + 1
        return False

    def _scan(self) -> tuple[list[Span], list[Pronoun]]:
        spans: list[Span] = []
        pronouns: list[Pronoun] = []
        open_span: Span | None = None
        closed: MatchedWord | None = None  # the head noun that just ended a mention
        i = 0
        while i < len(self.tokens):
            tok = self.tokens[i]
            hit = self._match(i)
            if hit is None and open_span is not None and self._made_a_person(open_span, i):
                hit = Entry("plain", "", {}, False), 1
            elif hit is None and open_span is not None and self._described_by(open_span, i, any_attribute=True) \
                    and self._person_by_verb(i):
                # "a Russian babushka selling seeds": a noun the vocabulary knows as a thing acts as a
                # person, so which attributes it tells is unknown: never sent.
                self.unknown_people.append((open_span.start, tok.end))
                hit = Entry("plain", "", {}, False), 1
            if hit is None:
                open_span = None
                closed = None
                if tok.age is None and tok.text.lower() in self.schema.pronoun_words:
                    pronouns.append(self._pronoun(i))
                i += 1
                continue
            entry, k = hit
            end_tok = self.tokens[i + k - 1]
            text = self.prompt[tok.start:end_tok.end]
            style = style_of(text) if tok.age is None else "lower"
            word = MatchedWord(entry, tok.start, end_tok.end, text, style, i, i + k - 1)
            # Adjacent words (spaces, brackets, quotes, weights between) describe one
            # person; a head noun ends the mention ("man woman" is two people).
            if closed is not None and entry.kind != "plain" and only_space(self.prompt, closed.end, word.start) \
                    and (entry.values or closed.entry.values):
                # A person noun right before another person's words: "toddler girl", "baby boy",
                # "person young man". Which words describe whom is unclear.
                self.unclear.append((closed.start, word.end))
            closed = None
            if open_span is not None and joinable(self.prompt, open_span.end, word.start):
                open_span.words.append(word)
                if only_space(self.prompt, open_span.groups[-1][-1].end, word.start):
                    open_span.groups[-1].append(word)
                else:  # "(teenage:1.3) boy": each side is rewritten in place, brackets kept
                    open_span.groups.append([word])
            else:
                open_span = Span([word], [[word]])
                spans.append(open_span)
            if entry.kind in ("head", "plain"):
                open_span = None
                closed = word
            i += k
        return spans, pronouns

    def _noun_follows_at(self, i: int) -> bool:
        """Is token i a noun right after a space ("truck" -> "driver")?"""
        if i >= len(self.tokens) or self.prompt[self.tokens[i - 1].end:self.tokens[i].start] != " ":
            return False
        word = self.tokens[i].text.lower()
        entry = self.vocabulary.get(word) if self.vocabulary is not None else None
        return (entry is not None and entry.pos[:1] == "n") or self._plain(word) \
            or (word,) in self.schema.lexicon

    def _group_noun(self, word: str) -> bool:
        """A noun for a group of people ("couple", "family", "band")."""
        entry = self.vocabulary.get(word) if self.vocabulary is not None else None
        return entry is not None and "G" in entry.flags

    def _thing_noun(self, word: str) -> bool:
        """A word that is first a noun and names no person ("tiger", "board")."""
        if self.vocabulary is None or word.endswith(("ing", "ed")):
            return False
        entry = self.vocabulary.get(word)
        return entry is not None and entry.pos[:1] == "n" and not {"P", "p"} & set(entry.flags)

    def _described_by(self, span: Span, i: int, any_attribute: bool = False) -> bool:
        """Is the noun at token i right after a modifier of a person attribute (schema
        'person_modifiers': "female", "asian"; any attribute's, age too, with any_attribute)?"""
        last = span.words[-1]
        tok = self.tokens[i]
        if last.entry.kind != "modifier" or not (any_attribute or last.entry.key in self.schema.person_modifiers):
            return False
        if tok.age is not None or i in self.in_compound or not joinable(self.prompt, last.end, tok.start):
            return False
        return tok.text.lower() not in self.breakers and self.vocabulary is not None

    def _person_by_verb(self, i: int) -> bool:
        """Is token i a noun, not an animal, doing what people do ("babushka" in "babushka selling seeds")?"""
        toks = self.tokens
        if self.vocabulary is None or i + 1 >= len(toks) or i in self.in_compound or toks[i].age is not None:
            return False
        return self.prompt[toks[i].end:toks[i + 1].start] == " " \
            and self.vocabulary.acts_as_person(toks[i].text.lower(), toks[i + 1].text.lower())

    def _made_a_person(self, span: Span, i: int) -> bool:
        """Does a modifier of a person attribute (schema 'person_modifiers': "female", "asian")
        make the noun right after it a person ("a female lifeguard", "an asian receptionist")?"""
        if not self._described_by(span, i):
            return False
        assert self.vocabulary is not None
        entry = self.vocabulary.get(self.tokens[i].text.lower())
        # A noun that is first a person ("lifeguard", "quarterback"); "a Japanese garden", "a male
        # peacock" are not people.
        return entry is not None and entry.noun and "P" in entry.flags

    def _mentions(self, spans: list[Span]) -> list[Span]:
        """Attach adjectives to a head a few words on ("a young, smiling woman"); keep headless
        ones only where they name a person, so "an old photograph" gets no age slot."""
        out: list[Span] = []
        chain: list[Span] = []  # headless spans that may still reach a head
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

    def _attaches(self, left: Span, right: Span) -> bool:
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
            if not (joinable(self.prompt, a, b) or (gap.strip() == "," and between)):
                return False
        return not any(t.age is not None or t.text.lower() in self.breakers for t in between)

    def _is_mention(self, span: Span) -> bool:
        if any(w.entry.kind in ("head", "plain") for w in span.words) or self.schema.standalone_modifiers:
            return True
        # A word of an attribute some of whose words are colours as well ("white", "black") cannot
        # be told a person when it ends the phrase, for any of its values: no slot, so the word is
        # not vouched ("a woman who is Asian" and "... who is Black" both stay on the device).
        if span.words[-1].entry.key in self.ambiguous:
            return False
        # Headless modifiers name a person when used as a noun: plural ("two asians"), or
        # closing a phrase ("an old indian with wrinkles", "a young asian.", "an asian, smiling";
        # but "an old, rusty car" and "an old photograph" are not people).
        if any(w.entry.plural for w in span.words):
            return True
        rest = self.prompt[span.end:].lstrip(" \t()[]{}<>\"'*_")
        nxt = WORD.match(rest)
        if not rest or rest[0] in ".!?;\n" or (nxt is not None and nxt.group().lower() in self.breakers):
            return True
        # A gender or ethnicity word before a participle is a person too ("a male smiling");
        # an age word is not ("an old building").
        nouny = any(w.entry.key in self.schema.person_modifiers for w in span.words)
        return nouny and (rest[0] == "," or (nxt is not None and nxt.group().lower().endswith("ing")))

    def _pronoun(self, i: int) -> Pronoun:
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
        return Pronoun(tok, case, value, style_of(tok.text))

    def _noun_follows(self, tok: Token) -> bool:
        """Does a noun-like word directly follow (so 'her' is a determiner)?"""
        assert self.schema.pronouns is not None
        rest = self.prompt[tok.end:]
        m = re.match(r"\s*", rest)
        gap = m.end() if m else 0
        rest = rest[gap:]
        if rest[:1].isdigit() and gap > 0:
            return True  # "her 2 cats"
        w = WORD.match(rest)
        if not w or gap == 0:
            return False  # punctuation or end: "see her." / "her's"
        nxt = w.group().lower()
        nxt_index = next((j for j, t in enumerate(self.tokens) if t.start == tok.end + gap), None)
        if nxt_index is not None and self._match(nxt_index) is not None:
            return True  # an attribute word or person noun, whatever its value: "her elderly mother"
        if nxt.endswith("ly") and len(nxt) > 4 and nxt not in _LY_NOT_ADVERBS:
            return False  # an adverb: "soaks her completely"
        if self.vocabulary is not None and nxt_index is not None:
            return self._nominal_from(nxt_index)
        return nxt not in self.schema.pronouns.non_noun_words and nxt not in self.schema.pronoun_words

    def _nominal_from(self, j: int) -> bool:
        """Does a noun phrase start at token j? A word with no noun sense is an adjective only
        when a noun follows it ("her happy face", not "make her happy"); a verb is not one."""
        assert self.vocabulary is not None
        for k in range(j, min(j + _MAX_GAP_WORDS, len(self.tokens))):
            if k > j and not joinable(self.prompt, self.tokens[k - 1].end, self.tokens[k].start):
                return False
            word = self.tokens[k].text.lower()
            entry = self.vocabulary.get(word)
            if entry is None or entry.noun or self.tokens[k].age is not None:
                return True  # unknown words are read as nouns, as before
            if "a" not in entry.pos:
                return False
        return False

    def _resolve_span(self, span: Span) -> None:
        explicit: dict[str, tuple[str, MatchedWord]] = {}
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

    def _article_before(self, pos: int) -> Token | None:
        """The article governing a mention: 'a'/'an' before it, across spaces, brackets,
        quotes ("a (teenage:1.3) boy", "an [elderly] man", "a 'young' woman")."""
        idx = next(j for j, t in enumerate(self.tokens) if t.start == pos)
        if idx == 0:
            return None
        prev = self.tokens[idx - 1]
        if prev.text.lower() in _ARTICLES and joinable(self.prompt, prev.end, pos):
            return prev
        return None

    # -- binding pronouns to people by position -----------------------------

    def _bind(self, persons: list[Person], pronouns: list[Pronoun]) -> None:
        if not pronouns:
            return
        assert self.schema.pronouns is not None
        attr = self.schema.pronouns.attribute
        if not persons:
            # Only pronouns ("he smiles"): they all describe one unnamed person, unless a group of
            # people is in the prompt ("an elderly couple, he ... she"): then who is who is unclear.
            groups = [t for t in self.tokens if self._group_noun(t.text.lower())]
            if groups:
                self.unclear += [(p.token.start, p.token.end) for p in pronouns]
            persons.append(Person(pronouns[0].token.start, None, {}, f"{pronouns[0].token.text!r}"))
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
            span = persons[k].span
            group = span is not None and span.head is not None and self._group_noun(span.head.text.lower())
            if span is not None and (span.plural or group):
                self.unclear.append((p.token.start, p.token.end))  # "he" for "two men", "a family"
            # Bound by position, never by value: a pronoun that disagrees with its person
            # ("she and her husband") is rendered from the person's slot like any other, so
            # the decision to send or refuse never depends on the values.
            persons[k].values.setdefault(attr, p.value)


