"""The oblivious transform: prompt -> the candidate set the cloud may see, or nothing.

What the proof needs (docs/method.md, section 7.3): the candidate set must be a function of
the non-sensitive content only, so that every member p' of candidates(p) gives
candidates(p') == candidates(p) byte for byte. What the policy needs (docs/privacy.md): nothing
leaves the device that it cannot vouch for. Hence, per prompt:

1. normalise (NFKC, invisible characters, combining marks, look-alike letters, person emoji);
2. parse person mentions and pronouns (parse.py), open one slot per person and attribute;
3. default deny (vouch.py): every word outside a slot must be vouched (the shipped vocabulary,
   numbers that are not ages, punctuation); the lexicons (sensitive.py), the context cues and an
   optional learned detector can only add findings;
4. any finding, or a set whose members do not all give it back, gets the fail-closed outcome
   of TransformConfig.unprotected: "device-only" (default: nothing is sent, the device
   generates alone) or "refuse"; its message names word classes, never the typed value;
5. otherwise every combination of the slot values, rendered in canonical order (render.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..sensitive import Detector, Finding, Generalised, generalize_emoji, normalize
from .parse import Parser, Person, Pronoun
from .render import pronoun_attribute, render
from .schema import ObliviousError, Schema
from .vocabulary import load_vocabulary
from .vouch import Context, compound_spans, covered, unvouched

# What to do with a word the device cannot vouch for. "unsafe-send" is for research on the
# rules only: it sends such words as typed, and every CLI says so loudly.
UNPROTECTED_POLICIES = ("device-only", "refuse", "unsafe-send")
_RETIRED_POLICIES = {"warn": "unsafe-send", "allow": "unsafe-send"}


@runtime_checkable
class SpanDetector(Protocol):
    """A learned detector (e.g. a PII token classifier, device/oblivious/detector.py): the
    sensitive stretches of a text. Its findings can only add protection."""

    def find(self, text: str) -> Sequence[Finding]: ...


@dataclass(frozen=True)
class TransformConfig:
    max_candidates: int = 32
    schema_path: str | None = None
    # A word the device cannot vouch for: "device-only" (default) sends nothing and lets the
    # device generate alone; "refuse" raises ObliviousError; "unsafe-send" (research only,
    # never a default) sends it as typed and lists it in CandidateSet.unprotected.
    unprotected: str = "device-only"
    detector: SpanDetector | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ObliviousError(f"max_candidates must be an integer >= 1, got {self.max_candidates!r}")
        if self.unprotected in _RETIRED_POLICIES:
            raise ObliviousError(f"unprotected={self.unprotected!r} is gone: it sent unvouched words as typed. "
                                 f"Choose device-only (default) or refuse; for research on the rules only, "
                                 f"{_RETIRED_POLICIES[self.unprotected]!r} (UNSAFE)")
        if self.unprotected not in UNPROTECTED_POLICIES:
            raise ObliviousError(f"unprotected must be one of {', '.join(UNPROTECTED_POLICIES)}, "
                                 f"got {self.unprotected!r}")
        if self.detector is not None and not isinstance(self.detector, SpanDetector):
            raise ObliviousError(f"detector must have a find(text) method, got {type(self.detector).__name__}")


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
    candidates: tuple[str, ...]  # what the server receives; empty when device_only
    assignments: tuple[dict[str, str], ...]
    real_index: int  # DEVICE-ONLY: never send this anywhere (-1 when device_only)
    slots: dict[str, list[str]]
    # DEVICE-ONLY reports (what was protected, generalised, or not vouched):
    protected_spans: tuple[ProtectedSpan, ...] = ()
    generalised: tuple[Generalised, ...] = ()
    unprotected: tuple[Finding, ...] = ()
    # True: nothing may be sent; the device generates alone (k = 0). reason says why, in
    # word classes only, so it is the same whichever value is real.
    device_only: bool = False
    reason: str = ""

    @property
    def n(self) -> int:
        return len(self.candidates)

    @property
    def protected(self) -> bool:
        return bool(self.slots)

    @property
    def message(self) -> str:
        if self.device_only:
            return f"nothing is sent; the image is generated on the device alone: {self.reason}"
        if not self.protected:
            return "no sensitive attribute found: the prompt is its only candidate (N = 1), nothing is hidden"
        parts = ", ".join(f"{s} ({len(v)})" for s, v in self.slots.items())
        return f"{self.n} candidates, varying {parts}"

    @property
    def warnings(self) -> list[str]:
        """Words sent although the device could not vouch for them (policy unsafe-send)."""
        if self.device_only:
            return []
        return [f"UNSAFE: sent as typed although not vouched: {f.text!r} ({f.why})" for f in self.unprotected]

    def public_summary(self) -> dict[str, object]:
        """What may leave the device: the whole set, never which one is real."""
        return {
            "candidates": list(self.candidates),
            "n": self.n,
            "attributes": {s: list(v) for s, v in self.slots.items()},
            "device_only": self.device_only,
        }


@dataclass
class _Outcome:
    """One run of the rules on one prompt (before the policy)."""

    text: str
    candidates: tuple[str, ...]
    assignments: tuple[dict[str, str], ...]
    real_index: int
    slots: dict[str, list[str]]
    protected: list[ProtectedSpan]
    generalised: list[Generalised]
    findings: list[Finding]
    rewritten: list[tuple[int, int]] = field(default_factory=list)  # in candidates[0]


def describe(finding: Finding) -> str:
    """A finding as a message shows it: by its class, never by the typed value ("a word that
    tells gender" for "goddess" and for "god" alike); a word of no known class is quoted."""
    if finding.why == "context cue":
        return f"a context cue for {finding.attribute}"
    if finding.why == "numeric age":
        return "an age given in numbers"
    if finding.attribute.startswith("detector:"):
        return f"a stretch the learned detector labels {finding.attribute[len('detector:'):]}"
    if finding.attribute == "name":
        return "a name"
    if finding.attribute == "misspelling":
        return "a misspelt attribute word"
    if finding.why == "unknown person noun":
        return "a word for a person that the vocabulary knows only as a thing"
    if finding.attribute == "person":
        return "people the device cannot tell apart (two person nouns for one, or pronouns for a group)"
    if finding.why == "place of origin":
        return "a place a person comes from"
    if finding.why == "spelled-out letters":
        return "a word spelled out letter by letter"
    if finding.attribute == "unknown":
        return f"{finding.text!r} (not in the vouched vocabulary)"
    return f"a word that tells {finding.attribute}"


def fail_reason(findings: Sequence[Finding]) -> str:
    return "the prompt holds " + "; ".join(dict.fromkeys(describe(f) for f in findings))


class ObliviousTransform:
    """prompt -> CandidateSet (every combination of the attributes that occur, or device-only)."""

    def __init__(self, config: TransformConfig = TransformConfig(), schema: Schema | None = None):
        self.config = config
        self.schema = schema if schema is not None else Schema.load(config.schema_path)
        self.vocabulary = load_vocabulary()
        # Single schema words with the attributes they carry, and whether they are nouns.
        schema_words = {k[0]: ("/".join(sorted(e.values)), e.kind == "head") for k, e in self.schema.lexicon.items()
                        if len(k) == 1 and not e.person_only and e.values}
        pr = self.schema.pronouns
        function_words = (pr.non_noun_words if pr is not None else frozenset()) | set(self.schema.pronoun_words)
        self.lexicons = Detector(self.schema.attribute_order(), self.schema.mention_nouns(), schema_words,
                                 function_words)
        self._schema_words = frozenset(k[0] for k in self.schema.lexicon if len(k) == 1) | frozenset(
            self.schema.pronoun_words)
        self._function_words = (pr.non_noun_words if pr is not None else frozenset()) | self.vocabulary.function_words
        self._nouns = self.schema.mention_nouns()

    def __call__(self, prompt: str) -> CandidateSet:
        if not isinstance(prompt, str):
            raise ObliviousError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ObliviousError("empty prompt: describe the image you want to generate")
        out = self._rules(prompt)
        findings = list(out.findings)
        reason = fail_reason(findings) if findings else ""
        if not findings and out.slots and not self._self_consistent(out):
            reason = ("the device cannot build a candidate set whose members all give it back for this "
                      "wording (a server could tell the real one)")
        if not reason and self.config.detector is not None:
            learned = [f for f in self.config.detector.find(out.candidates[0])
                       if not covered(out.candidates[0], f.start, f.end, out.rewritten)]
            if learned:
                findings, reason = learned, fail_reason(learned)
        if reason and (self.config.unprotected != "unsafe-send" or not findings):
            if self.config.unprotected == "refuse":
                raise ObliviousError(f"not sent: {reason}. Rephrase with common words, or let the device generate "
                                     f"alone (--unprotected device-only, the default)")
            return CandidateSet((), (), -1, {}, tuple(out.protected), tuple(out.generalised), tuple(findings),
                                device_only=True, reason=reason)
        return CandidateSet(out.candidates, out.assignments, out.real_index, out.slots, tuple(out.protected),
                            tuple(out.generalised), tuple(findings))

    def _self_consistent(self, out: _Outcome) -> bool:
        """Does every member give back the same set, at its own index, with nothing unvouched?
        (A net under the rules: a wording the rules read differently once rewritten, such as a
        collocation one value forms, is never sent.)"""
        for i, member in enumerate(out.candidates):
            try:
                again = self._rules(member)
            except ObliviousError:
                return False
            if again.candidates != out.candidates or again.real_index != i or again.findings:
                return False
        return True

    def _rules(self, prompt: str) -> _Outcome:
        # Everything below reads the normalised text: fullwidth letters, zero-width characters
        # and look-alike letters cannot hide a word, and person emoji are neutral in every candidate.
        text, generalised = generalize_emoji(normalize(prompt))
        if not text.strip():
            raise ObliviousError("the prompt is empty once invisible characters and person emoji's gender and "
                                 "skin-tone marks are removed: describe the image you want to generate")
        parser = Parser(self.schema, text, self.vocabulary)
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
        findings = self._lexicon_findings(text, persons, pronouns, slot_of, protected)
        findings += [Finding(a, b, text[a:b], "person", "unclear people", "one person noun per person")
                     for a, b in parser.unclear]
        findings += [Finding(a, b, text[a:b], "person", "unknown person noun", "a person noun (\"person\", \"vendor\")")
                     for a, b in parser.unknown_people]
        generalised += self._generalised(persons)
        # The schema's mentions are people only in a schema of people (not "a red circle").
        ctx = Context(protected=[(s.start, s.end) for s in protected],
                      persons=[(p.span.start, p.span.end) for p in persons if p.span is not None and self.schema.people]
                      + [(p.token.start, p.token.end) for p in pronouns],
                      plain_heads=self.schema.plain_heads, schema_words=self._schema_words,
                      function_words=self._function_words, nouns=self._nouns)
        covered_by_lexicon = [(f.start, f.end) for f in findings]
        findings += [f for f in unvouched(text, self.vocabulary, ctx)
                     if not any(a <= f.start and f.end <= b for a, b in covered_by_lexicon)]
        findings.sort(key=lambda f: (f.start, f.end))
        if findings and self.config.unprotected != "unsafe-send":
            # Nothing will be sent: the cap (a limit on what is sent) does not apply.
            return _Outcome(text, (), (), -1, slots, protected, generalised, findings)
        self._check_cap(slots)
        if not slots:
            return _Outcome(text, (text,), ({},), 0, {}, protected, generalised, findings)

        names = list(slots)
        assignments = [dict(zip(names, combo)) for combo in itertools.product(*slots.values())]
        # A value the schema lacks ("Mexican": generalised) is kept as the first value: the device's
        # own steps follow the prompt as typed.
        real = {name: persons[k].values[a] or self.schema.values(a)[0]
                for k, named in enumerate(slot_of) for a, name in named}
        rendered = [render(self.schema, text, persons, pronouns, slot_of, asg) for asg in assignments]
        candidates = tuple(c for c, _ in rendered)
        if len(set(candidates)) != len(candidates):  # defensive: the schema validation should make this impossible
            raise ObliviousError("internal: two candidates render identically; check the schema's canonical words")
        return _Outcome(text, candidates, tuple(assignments), assignments.index(real), slots, protected,
                        generalised, findings, rendered[0][1])

    def audit(self, prompt: str) -> dict[str, object]:
        """One line of ``--audit`` output: what would be protected, sent, kept on the device or refused,
        with the exact words (device-local: the user's own report)."""
        record: dict[str, object] = {"prompt": prompt, "n": None, "device_only": False, "reason": None,
                                     "protected": [], "generalised": [], "refused": None, "unprotected": []}
        try:
            result = self(prompt)
        except ObliviousError as exc:
            record["refused"] = str(exc)
            try:
                found = self._rules(prompt).findings
            except ObliviousError:
                found = []
            record["unprotected"] = [f.as_dict() for f in found]
            return record
        record["n"] = result.n
        record["device_only"] = result.device_only
        record["reason"] = result.reason or None
        record["protected"] = [s.as_dict() for s in result.protected_spans]
        record["generalised"] = [{"text": g.text, "as": g.replacement, "attribute": g.attribute}
                                 for g in result.generalised]
        record["unprotected"] = [f.as_dict() for f in result.unprotected]
        return record

    @staticmethod
    def _generalised(persons: list[Person]) -> list[Generalised]:
        """Words whose value the schema lacks, rewritten to every value of their slot."""
        return [Generalised(w.text, "every value of " + a, a) for p in persons if p.span is not None
                for w in p.span.words for a, v in w.entry.values.items() if v == ""]

    def _protected(self, persons: list[Person], pronouns: list[Pronoun],
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
            names = tuple(n for a, n in slot_of[p.person] if a == pronoun_attribute(self.schema))
            table = self.schema.pronouns.cases[p.case] if self.schema.pronouns is not None else {}
            shown = "/".join(dict.fromkeys(table.values()))
            out.append(ProtectedSpan(p.token.text, p.token.start, p.token.end, names, shown))
        return sorted(out, key=lambda s: s.start)

    def _lexicon_findings(self, text: str, persons: list[Person], pronouns: list[Pronoun],
                          slot_of: list[list[tuple[str, str]]], protected: list[ProtectedSpan]) -> list[Finding]:
        """Sensitive words the lexicons find outside every protected span."""
        # What the lexicon detector reads as one opaque word each: every rewritten group of a
        # mention (its word count may change with the value: "old old" -> "young") and every pronoun.
        units = [(g[0].start, g[-1].end, any(w.entry.kind in ("head", "plain") for w in g))
                 for person, named in zip(persons, slot_of) if person.span is not None and named
                 for g in person.span.groups if any(w.entry.kind != "plain" for w in g)]
        units += [(p.token.start, p.token.end, False) for p in pronouns]
        spans = [(s.start, s.end) for s in protected] + compound_spans(text, self.vocabulary)
        return [self._masked(f, protected) for f in self.lexicons.find(text, units)
                if not covered(text, f.start, f.end, spans)]

    @staticmethod
    def _masked(finding: Finding, protected: list[ProtectedSpan]) -> Finding:
        """The finding as shown, with protected words inside it written for every value
        ("in his/her 40s"), so that what it quotes is the same whichever value is real."""
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
                f"(--schema with fewer attributes or values), or raise --max-candidates."
            )

