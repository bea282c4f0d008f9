"""A negative prompt under the prompt's policy (docs/privacy.md, "Negative prompts").

A negative prompt is user text and leaks like the prompt, but it is one text for every candidate:
it cannot be protected by varying it. So it may leave the device only when the transform, run
on it as on a prompt, finds nothing to protect and nothing it cannot vouch for: every word
vouched (the shipped vocabulary), no attribute word (a slot the candidates would vary), no
pronoun, no context cue or place next to a person, and (stricter than for a prompt) no attribute
word at all, even before a thing ("white horse", "asian features"). Then it is sent as the transform read it
(normalised; equal to the text as typed for plain text), the same in every candidate's request.
It is read as said of a person in the picture (a
negative prompt is sent beside candidates that may describe one: "old" or "pregnant" there says
"this person is not"), so a context cue, a lone attribute adjective or a number that could be
an age is not sent either. Otherwise the whole request takes the prompt's policy: nothing is sent (device-only) or an
ObliviousError (refuse); ``unsafe-send`` covers the prompt's words only and never sends an
unvouched negative prompt.

The decision reads the transform's word classes only, never an attribute's value: two negative
prompts that differ only in a value ("an old man", "a young man") get the same outcome.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from ..sensitive import Finding, generalize_emoji, normalize
from .schema import ObliviousError
from .transform import ObliviousTransform, describe
from .vouch import tokens


@dataclass(frozen=True)
class NegativeCheck:
    """What the device may do with a negative prompt. Device-only: the typed text itself."""

    typed: str            # DEVICE ONLY: as typed; the device's own steps use it
    sendable: str | None  # the text the request may carry (None: it must not leave the device)
    reason: str = ""      # why not, in word classes only (the same whichever value is typed)

    @property
    def vouched(self) -> bool:
        return self.sendable is not None


def check_negative(negative_prompt: str, transform: ObliviousTransform) -> NegativeCheck:
    """Run ``transform``'s rules (its schema and learned detector) on a negative prompt and say
    whether it may be sent. The transform's own policy is not applied here (the caller applies it
    to the whole request); any error of the rules means it is not sent."""
    if not isinstance(negative_prompt, str):
        raise ObliviousError(f"the negative prompt must be a string, got {type(negative_prompt).__name__}")
    if not generalize_emoji(normalize(negative_prompt))[0].strip():
        raise ObliviousError("the negative prompt is empty once invisible characters are removed; give text, "
                             "or none")
    # The same rules with a device-only outcome and a cap of one candidate: a negative prompt with
    # an attribute word would need candidates, so it is over the cap before any is rendered.
    rules = _device_only_twin(transform)
    try:
        result = rules(PERSON_CONTEXT + negative_prompt)
    except ObliviousError:
        return NegativeCheck(negative_prompt, None, "the negative prompt holds a word that tells a sensitive "
                                                    "attribute (one the candidates would have to vary)")
    if result.device_only:
        findings = "; ".join(dict.fromkeys(describe(f) for f in result.unprotected))
        return NegativeCheck(negative_prompt, None, "the negative prompt holds " + (findings or result.reason))
    if result.slots or result.n != 1 or not result.candidates[0].startswith(PERSON_CONTEXT):
        # Defensive: the cap of 1 stops any set with slots, and normalising leaves the context as it is.
        return NegativeCheck(negative_prompt, None, "the negative prompt holds a word that tells an attribute")
    text = result.candidates[0][len(PERSON_CONTEXT):]
    # Stricter than for a prompt: no attribute word at all, not even before a thing ("asian features",
    # "white horse"): whatever it describes, it is said of the picture the candidates share.
    told = attribute_words(text, transform)
    if told:
        return NegativeCheck(negative_prompt, None,
                             "the negative prompt holds " + "; ".join(dict.fromkeys(describe(f) for f in told)))
    return NegativeCheck(negative_prompt, text)


def attribute_words(text: str, transform: ObliviousTransform) -> list[Finding]:
    """The words of ``text`` (and of its hyphenated words' parts) that tell an attribute: the
    vocabulary's attribute words and the schema's words that carry a value, by attribute."""
    vocab, lexicon = transform.vocabulary, transform.schema.lexicon
    out = []
    for tok in tokens(text):
        for word in dict.fromkeys([tok.word, *tok.word.split("-")]):
            base = word[:-2] if word.endswith("'s") else word
            entry = vocab.get(base)
            schema_entry = lexicon.get((base,))
            attribute = vocab.told.get(word) or vocab.told.get(base)
            if attribute is None and schema_entry is not None and schema_entry.values:
                attribute = "/".join(sorted(schema_entry.values))
            if attribute is None and entry is not None and "A" in entry.flags:
                attribute = "an attribute"
            if attribute is not None:
                out.append(Finding(tok.start, tok.end, tok.text, attribute, "tells " + attribute,
                                   "a word that names no attribute"))
                break
    return out


# The negative prompt is read as said of a person: it is sent beside candidates that may describe one,
# so "pregnant", "old" or "from Seoul" in it tell as much as next to a person in the prompt.
PERSON_CONTEXT = "person, "


@lru_cache(maxsize=16)
def _device_only_twin(transform: ObliviousTransform) -> ObliviousTransform:
    """``transform``'s schema and detector with policy device-only and a cap of 1."""
    config = dataclasses.replace(transform.config, max_candidates=1, unprotected="device-only")
    return ObliviousTransform(config, schema=transform.schema)


def refusal(check: NegativeCheck) -> ObliviousError:
    """The error of policy ``refuse`` for a negative prompt the device cannot send."""
    return ObliviousError(f"not sent: {check.reason}. Rephrase the negative prompt with common words that "
                          "name no person's attributes, drop it, or let the device generate alone "
                          "(--unprotected device-only, the default)")
