"""The vouched vocabulary the device ships (device/vocabulary/, built by
scripts/build_vocabulary.py from wordfreq, WordNet, names-dataset and pycountry; see its
PROVENANCE.md). Read-only lookups; loaded once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from obclip.runtime.locations import package_path


@dataclass(frozen=True)
class Word:
    pos: str    # WordNet parts of speech, most senses first (n v a r), "" for a function word
    flags: str  # P: a person noun, p: may be a person, N: also a first name, A: an attribute word about a person

    @property
    def noun(self) -> bool:
        return "n" in self.pos


@dataclass(frozen=True)
class Vocabulary:
    words: dict[str, Word]
    told: dict[str, str]                     # a word left out -> what it tells (gender, age, name, ...)
    compounds: frozenset[tuple[str, ...]]    # collocations vouched as a whole ("king cobra")
    max_compound: int

    def get(self, word: str) -> Word | None:
        return self.words.get(word)

    def person_noun(self, word: str) -> bool:
        w = self.words.get(word)
        return w is not None and "P" in w.flags


@cache
def load_vocabulary() -> Vocabulary:
    folder = package_path("device", "vocabulary")
    words: dict[str, Word] = {}
    for line in (folder / "words.tsv").read_text(encoding="utf-8").splitlines():
        w, pos, flags = line.split("\t")
        words[w] = Word("" if pos == "-" else pos, flags)
    told = dict(line.split("\t") for line in (folder / "attribute_words.tsv").read_text(encoding="utf-8").splitlines())
    compounds = frozenset(tuple(c.split()) for c in (folder / "compounds.txt").read_text(encoding="utf-8").splitlines())
    return Vocabulary(words, told, compounds, max(len(c) for c in compounds))
