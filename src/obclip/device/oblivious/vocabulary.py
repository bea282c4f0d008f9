"""The vouched vocabulary the device ships (device/vocabulary/*.gz, built by
scripts/build_vocabulary.py from wordfreq, WordNet, SCOWL, names-dataset and pycountry; see its
PROVENANCE.md). Read-only lookups; loaded once per process."""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from obclip.runtime.locations import package_path


@dataclass(frozen=True)
class Word:
    pos: str    # WordNet parts of speech, most senses first (n v a r), "" for a function word
    # P: a person noun, p: may be a person, N: also a name (vouched in lower case only), C: an
    # attribute word when capitalised ("Swede"; vouched in lower case only), A: an attribute word
    # when it describes a person (vouched before a thing), L: a place name, G: a group of people,
    # F: a function word, H: a verb of people (WordNet: its first sense takes only a person as
    # subject), Z: some noun sense an animal, D: a word SCOWL lists but WordNet lacks (its sense
    # unknown: vouched only where no person is in the picture), R: first a depiction ("doll",
    # "portrait", "poster": a name before it is who is depicted)
    flags: str

    @property
    def noun(self) -> bool:
        return "n" in self.pos


@dataclass(frozen=True)
class Vocabulary:
    words: dict[str, Word]
    told: dict[str, str]                     # a word left out -> what it tells (gender, age, name, ...)
    compounds: frozenset[tuple[str, ...]]    # collocations vouched as a whole ("king cobra")
    places: frozenset[tuple[str, ...]]       # those of them that name a place ("new york")
    person_compounds: frozenset[tuple[str, ...]]  # collocations that tell an attribute ("bachelor party")
    max_compound: int

    def get(self, word: str) -> Word | None:
        return self.words.get(word)

    @cached_property
    def near_told(self) -> frozenset[str]:
        """Every word left out (attribute words, names), and each with one letter deleted: a
        word that shares one of these with a typo is too close to one for the typo to be vouched."""
        out: set[str] = set()
        for w, what in self.told.items():
            if what == "misspelling":  # a dictionary word one edit from an attribute word: already one away
                continue
            out.add(w)
            out.update(w[:k] + w[k + 1:] for k in range(len(w)))
        return frozenset(out)

    @cached_property
    def function_words(self) -> frozenset[str]:
        return frozenset(w for w, e in self.words.items() if "F" in e.flags)

    def person_noun(self, word: str) -> bool:
        w = self.words.get(word)
        return w is not None and "P" in w.flags

    def acts_as_person(self, noun: str, next_word: str) -> bool:
        """Is a noun that is not an animal followed by a participle of a verb whose subject is a
        person ("babushka selling", "robot smiling"; not "lantern hanging", "lion hunting")?"""
        n, v = self.words.get(noun), self.words.get(next_word)
        return n is not None and n.noun and "Z" not in n.flags and next_word.endswith("ing") \
            and v is not None and "H" in v.flags and "v" in v.pos


@cache
def load_vocabulary() -> Vocabulary:
    folder = package_path("device", "vocabulary")
    words: dict[str, Word] = {}
    for line in _lines(folder / "words.tsv.gz"):
        w, pos, flags = line.split("\t")
        words[w] = Word("" if pos == "-" else pos, flags)
    told = dict(line.split("\t") for line in _lines(folder / "attribute_words.tsv.gz"))
    lines = [line.split("\t") for line in _lines(folder / "compounds.txt.gz")]
    compounds = frozenset(_phrase(c[0]) for c in lines)
    places = frozenset(_phrase(c[0]) for c in lines if c[1:] == ["L"])
    person_compounds = frozenset(
        _phrase(c) for c in _lines(folder / "person_compounds.txt.gz"))
    return Vocabulary(words, told, compounds, places, person_compounds,
                      max(len(c) for c in compounds | person_compounds))


def _lines(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()


def _phrase(text: str) -> tuple[str, ...]:
    """A collocation as words: "mother-of-pearl" and "mother of pearl" alike."""
    return tuple(re.split(r"[\s-]+", text))
