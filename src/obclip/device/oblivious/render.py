"""Rendering a candidate: the prompt with every protected word rewritten from one assignment
of the slot values, casing and articles following the user's. Pure functions of the parse and
the values, never of which value is real."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .schema import WORD, Schema, apply_style, style_of

if TYPE_CHECKING:
    from .parse import Person, Pronoun, Span


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


def article(typed: str, next_word: str) -> str:
    style = style_of(typed)
    # "A" alone could be Capitalised or UPPER; read any capital article the
    # same way whatever its length, so the choice survives re-rendering.
    if style != "lower":
        style = "upper" if style_of(next_word) == "upper" else "title"
    return apply_style("an" if _wants_an(next_word) else "a", style)


def pronoun_attribute(schema: Schema) -> str:
    """The attribute pronouns carry ("" when the schema has none)."""
    return schema.pronouns.attribute if schema.pronouns is not None else ""


def render(schema: Schema, prompt: str, persons: list[Person], pronouns: list[Pronoun],
           slot_of: list[list[tuple[str, str]]], asg: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """The candidate for one assignment, and the stretches of it that were rewritten."""
    edits: list[tuple[int, int, str]] = []
    for person, named in zip(persons, slot_of):
        values = {a: asg[name] for a, name in named}
        span = person.span
        if span is not None and span.values:
            edits += _render_span(schema, prompt, span, values)
    attr = pronoun_attribute(schema)
    cases = schema.pronouns.cases if schema.pronouns is not None else {}
    for p in pronouns:
        value = {a: asg[name] for a, name in slot_of[p.person]}[attr]
        edits.append((p.token.start, p.token.end, apply_style(cases[p.case][value], p.style)))
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, length = 0, 0
    for start, end, text in sorted(edits):
        out.append(prompt[pos:start])
        length += start - pos
        out.append(text)
        spans.append((length, length + len(text)))
        length += len(text)
        pos = end
    out.append(prompt[pos:])
    return "".join(out), spans


def _render_span(schema: Schema, prompt: str, span: Span, values: dict[str, str]) -> list[tuple[int, int, str]]:
    """Each group of adjacent words is rewritten in place from the values alone, so the
    words around it (and hence how a candidate parses) never change. In a group: the
    canonical adjectives [age] [ethnicity] [gender adjective] in schema order for the
    attributes its words give; the head's group also gets adjectives for values the head
    only implies ("girl" -> "young woman") and the head in its canonical form (a gender
    adjective next to a head that varies by gender is dropped: "female woman" -> "woman")."""
    head = span.head
    head_fam = schema.heads[head.entry.key] if head is not None and head.entry.kind == "head" else None
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
        attrs = [a for a in schema.modifier_order if a in here]
        words: list[str] = []
        for j, a in enumerate(attrs):
            sing, plur = schema.modifiers[a].forms[values[a]]
            # Number sits on the last word: the head, or the adjective used as one.
            last = head is None and gi == last_group and j == len(attrs) - 1
            mine = next((w for w in mods if w.entry.key == a), None)
            style = mine.style if mine is not None and mine is not span.words[0] else span.styles.get(a, "lower")
            if a in schema.capitalised and style == "lower":
                style = "title"  # "white" and "Asian" give the same set
            words.append(apply_style(plur if (span.plural and last) else sing, style))
        if head_fam is not None and has_head:
            sing, plur = head_fam.forms[tuple(values[a] for a in head_fam.varies)]
            words.append(apply_style(plur if span.plural else sing, span.styles["__head__"]))
        replaced = mods + ([head] if has_head and head_fam is not None and head is not None else [])
        if not replaced or not words:
            continue
        edits.append((replaced[0].start, replaced[-1].end, " ".join(words)))
        rendered += words
    if not rendered:
        return edits
    if span.sentence_cap and style_of(rendered[0]) == "lower":
        start, end, text = edits[0]
        edits[0] = (start, end, text[:1].upper() + text[1:])
    if span.article is not None:
        art = span.article
        edits.append((art.start, art.end, article(art.text, _word_after(prompt, art.end, edits))))
    return edits


def _word_after(prompt: str, pos: int, edits: list[tuple[int, int, str]]) -> str:
    """The first word after pos once the edits are applied (the article agrees with it)."""
    for start, end, text in sorted(edits):
        if start < pos:
            continue
        gap = WORD.search(prompt, pos, start)
        if gap is not None:
            return gap.group()
        if text:
            return text.split(" ")[0]
        pos = end
    m = WORD.search(prompt, pos)
    return m.group() if m else ""
