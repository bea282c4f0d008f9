"""benchmarks/privacy_eval.py: the scorer's logic on synthetic records and a fake transform, and the
well-formedness of every record of the labelled set (benchmarks/data/privacy/*.jsonl)."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

import pytest

from obclip.device.oblivious import ObliviousError

from helpers import BENCHMARKS, load_benchmark

pe = load_benchmark("privacy_eval")
DATA = BENCHMARKS / "data" / "privacy"


@dataclass
class FakeSet:
    candidates: tuple[str, ...]
    device_only: bool = False


class FakeTransform:
    """prompt -> a tuple (sent), "DEVICE" (device-only), a str (refused with that message), or an exception."""

    def __init__(self, table):
        self.table = table

    def __call__(self, prompt):
        answer = self.table[prompt]
        if isinstance(answer, tuple):
            return FakeSet(answer)
        if answer == "DEVICE":
            return FakeSet(("must not count as sent",), device_only=True)
        if isinstance(answer, Exception):
            raise answer
        raise ObliviousError(answer)


class NoAttribute:
    """A set without the (new) device_only attribute: counts as sent."""

    def __init__(self, candidates):
        self.candidates = candidates


def sens(rid, prompt, *labels, imp=(), rep=True, **extra):
    out = []
    for text, attr in labels:
        plain = None
        if "=" in attr:
            attr, plain = attr.split("=")
        label = {"text": text, "attribute": attr, "explicit": True}
        if plain:
            label["plain"] = [plain]
        out.append(label)
    return {"id": rid, "prompt": prompt, "style": "t", "kind": "sensitive", "sensitive": out,
            "impossible_patterns": list(imp), "representable": rep, **extra}


def clean(rid, prompt, **extra):
    return {"id": rid, "prompt": prompt, "style": "t", "kind": "clean", "sensitive": [],
            "impossible_patterns": [], "representable": False, **extra}


# --------------------------------------------------------------------------
# Leaks
# --------------------------------------------------------------------------


def test_leak_when_a_label_is_in_every_member_and_not_when_it_varies():
    rec = sens("a", "an old woman", ("old", "age"), ("woman", "gender"))
    assert [x["text"] for x in pe.find_leaks(rec, ["an old woman", "an old man"])] == ["old"]
    assert pe.find_leaks(rec, ["an old woman", "a young man", "a young woman", "an old man"]) == []


def test_leak_matching_is_whole_word_for_latin_text():
    rec = sens("a", "a man", ("man", "gender"))
    assert pe.find_leaks(rec, ["a woman", "a man"]) == []  # "man" inside "woman" is not the word
    assert pe.find_leaks(rec, ["a man's hat", "the man-eating man"]) != []
    assert pe.find_leaks(rec, ["a manta ray", "a man"]) == []


def test_leak_matching_folds_case_nfkc_and_invisible_characters():
    rec = sens("a", "a ｗｏｍａｎ", ("ｗｏｍａｎ", "gender"))
    assert pe.find_leaks(rec, ["a WOMAN", "a wo\u200bman"])  # full-width folds to "woman"; ZWSP dropped
    small = sens("b", "a ᴡᴏᴍᴀɴ", ("ᴡᴏᴍᴀɴ", "gender=woman"))  # small caps do not fold: the plain spelling does
    assert [x["found"] for x in pe.find_leaks(small, ["a woman", "a Woman"])] == ["woman"]
    assert pe.find_leaks(small, ["a woman", "a man"]) == []


def test_leak_matching_is_substring_for_scripts_without_spaces():
    rec = sens("a", "日本人の女性が", ("女性", "gender"))
    assert pe.find_leaks(rec, ["日本人の女性が歩く", "女性"])
    assert pe.find_leaks(rec, ["日本人の男性が歩く", "女性"]) == []


# --------------------------------------------------------------------------
# Outcomes, impossible members
# --------------------------------------------------------------------------


def test_outcome_kinds():
    fake = FakeTransform({"s": ("a", "b"), "d": "DEVICE", "r": "no", "e": RuntimeError("boom")})
    assert pe.run_one(fake, "s").kind == "sent"
    assert pe.run_one(fake, "s").candidates == ("a", "b")
    assert pe.run_one(fake, "d").kind == "device_only" and pe.run_one(fake, "d").candidates == ()
    refused = pe.run_one(fake, "r")
    assert refused.kind == "refused" and refused.message == "no"
    assert pe.run_one(fake, "e").kind == "error"  # a crash is not a refusal
    assert pe.run_one(lambda p: NoAttribute(("x",)), "p").kind == "sent"


def test_impossible_members_are_found_and_listed():
    rec = sens("a", "a pregnant woman", ("woman", "gender"), imp=[r"\bpregnant (?:\w+ )?(?:man|boy)\b"])
    found = pe.find_impossible(rec, ["a pregnant woman", "a pregnant man", "a pregnant young boy"])
    assert [f["member"] for f in found] == ["a pregnant man", "a pregnant young boy"]
    assert pe.find_impossible(rec, ["a pregnant woman", "a man"]) == []


# --------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------


def _group(table, *prompts_values):
    fake = FakeTransform(table)
    recs = [sens(f"g-{v}", p, (w, "gender"), group="g", value=v) for p, v, w in prompts_values]
    return pe.group_differences([pe.evaluate_record(r, fake) for r in recs])


def test_group_same_set_is_not_value_dependent():
    both = ("a god", "a goddess")
    assert _group({"a god": both, "a goddess": both},
                  ("a god", "male", "god"), ("a goddess", "female", "goddess")) == []


def test_group_differing_kinds_sets_and_order():
    kinds = _group({"a god": ("a god",), "a goddess": "refused"},
                   ("a god", "male", "god"), ("a goddess", "female", "goddess"))
    assert kinds and kinds[0].startswith("outcome kinds differ")
    sets = _group({"a god": ("a god",), "a goddess": ("a goddess",)},
                  ("a god", "male", "god"), ("a goddess", "female", "goddess"))
    assert sets and sets[0].startswith("candidate sets differ")
    order = _group({"a god": ("a god", "a goddess"), "a goddess": ("a goddess", "a god")},
                   ("a god", "male", "god"), ("a goddess", "female", "goddess"))
    assert order == ["candidate order differs (same set)"]


def test_group_refusal_messages_compared_with_own_words_masked():
    same = _group({"a maid": "'maid' reveals gender; write 'servant'",
                   "a butler": "'butler' reveals gender; write 'servant'"},
                  ("a maid", "female", "maid"), ("a butler", "male", "butler"))
    assert same == []
    differ = _group({"a maid": "'maid' reveals gender", "a butler": "'butler' reveals gender (feminine forms only)"},
                    ("a maid", "female", "maid"), ("a butler", "male", "butler"))
    assert differ and "refusal messages differ" in differ[0]


def test_group_device_only_on_every_member_is_consistent():
    assert _group({"a maid": "DEVICE", "a butler": "DEVICE"}, ("a maid", "female", "maid"),
                  ("a butler", "male", "butler")) == []


# --------------------------------------------------------------------------
# Whole evaluation: clean rate, representable share, --check
# --------------------------------------------------------------------------


def _records():
    return [
        sens("s1", "a woman reading", ("woman", "gender")),
        sens("s2", "an old man", ("old", "age"), ("man", "gender"), imp=[r"\byoung man\b"]),
        clean("c1", "a red car"),
        clean("c2", "a king cobra"),
        clean("c3", "a blue boat"),
        clean("c4", "a mermaid statue", ambiguous=True),
    ]


def test_evaluate_counts_every_category():
    fake = FakeTransform({
        "a woman reading": ("a woman reading",),  # leak, N = 1
        "an old man": ("an old man", "an old woman", "a young man", "a young woman"),  # protected but impossible
        "a red car": ("a red car",),
        "a king cobra": ("a king cobra", "a queen cobra"),  # rewritten
        "a blue boat": "refused",  # clean blocked
        "a mermaid statue": "refused",  # ambiguous: not judged
    })
    report = pe.evaluate(_records(), fake)
    assert report["leaks"]["count"] == 1 and report["leaks"]["items"][0]["id"] == "s1"
    assert report["leaks"]["by_class"] == {"gender (explicit)": 1}
    assert report["n1_sensitive"]["count"] == 1
    assert report["impossible"]["sets"] == 1 and report["impossible"]["members"] == 1
    assert report["impossible"]["items"][0]["impossible"][0]["member"] == "a young man"
    assert report["clean"]["judged"] == 3 and report["clean"]["blocked"] == 1
    assert report["clean"]["blocked_rate"] == pytest.approx(1 / 3)
    assert report["clean"]["rewritten"] == 1 and report["clean"]["rewritten_items"][0]["id"] == "c2"
    rep = report["representable"]
    assert (rep["count"], rep["sent_protected"], rep["sent_protected_sound"], rep["sent_unprotected"]) == (2, 1, 0, 1)
    assert not report["passed"]
    assert report["timing_ms"]["calls"] == 6


def _write(tmp_path, records):
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return tmp_path


def test_check_exit_code(tmp_path, capsys):
    data = _write(tmp_path, _records())
    good = FakeTransform({
        "a woman reading": "DEVICE",
        "an old man": ("an old man", "an old woman", "a middle-aged man", "a young woman"),
        "a red car": ("a red car",), "a king cobra": ("a king cobra",), "a blue boat": ("a blue boat",),
        "a mermaid statue": "refused",
    })
    assert pe.main(["--data", str(data), "--check"], transform=good) == 0
    assert "**PASS**" in capsys.readouterr().out
    bad = FakeTransform({**good.table, "a woman reading": ("a woman reading",)})
    assert pe.main(["--data", str(data), "--check"], transform=bad) == 1
    assert pe.main(["--data", str(data)], transform=bad) == 0  # a report run always exits 0
    assert "**FAIL**" in capsys.readouterr().out
    assert pe.main(["--data", str(data), "--json"], transform=bad) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["leaks"] == {"measured": 1, "bound": 0, "ok": False}


def test_clean_rate_bound_is_five_percent(tmp_path):
    records = [clean(f"c{i}", f"a red car number {i}") for i in range(20)]
    table = {r["prompt"]: (r["prompt"],) for r in records}
    table["a red car number 0"] = "refused"  # 1 of 20 = 5%: within the bound
    assert pe.main(["--data", str(_write(tmp_path, records)), "--check"], transform=FakeTransform(table)) == 0
    table["a red car number 1"] = "DEVICE"  # 2 of 20 = 10%
    assert pe.main(["--data", str(_write(tmp_path, records)), "--check"], transform=FakeTransform(table)) == 1


# --------------------------------------------------------------------------
# The labelled set itself
# --------------------------------------------------------------------------


def _data():
    records = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))
    return records


def test_labelled_set_is_well_formed():
    records = _data()
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "ids must be unique"
    for r in records:
        where = r["id"]
        assert r["kind"] in ("sensitive", "clean"), where
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), where
        assert isinstance(r.get("style"), str), where
        assert isinstance(r["representable"], bool), where
        if r["kind"] == "sensitive":
            assert r["sensitive"], f"{where}: a sensitive record needs labels"
            assert "ambiguous" not in r, where
        else:
            assert r["sensitive"] == [] and not r["representable"], where
        for label in r["sensitive"]:
            assert label["text"] and label["text"] in r["prompt"], f"{where}: {label['text']!r} not in the prompt"
            assert label["attribute"] in pe.ATTRIBUTES, where
            assert isinstance(label["explicit"], bool), where
            assert all(isinstance(p, str) and p for p in label.get("plain", [])), where
        folded = unicodedata.normalize("NFKC", r["prompt"])
        folded = "".join(ch for ch in folded if unicodedata.category(ch) != "Cf")
        for pattern in r["impossible_patterns"]:
            compiled = re.compile(pattern, re.IGNORECASE)
            assert not compiled.search(folded), f"{where}: {pattern!r} matches the real prompt"


def test_labelled_set_groups():
    groups = {}
    for r in _data():
        if "group" in r:
            assert r.get("value"), f"{r['id']}: a group member needs its value"
            groups.setdefault(r["group"], []).append(r)
    for gid, members in groups.items():
        assert len(members) >= 2, f"group {gid} has one member"
        values = [m["value"] for m in members]
        assert len(set(values)) == len(values), f"group {gid}: values repeat"
        assert len({m["prompt"] for m in members}) == len(members), gid


def test_labelled_set_size_meets_the_issue():
    records = _data()
    sensitive = [r for r in records if r["kind"] == "sensitive" and "group" not in r]
    judged_clean = [r for r in records if r["kind"] == "clean" and not r.get("ambiguous")]
    groups = {r["group"] for r in records if "group" in r}
    assert len(sensitive) >= 320 and len(judged_clean) >= 60 and len(groups) >= 45
    styles = {r["style"] for r in sensitive}
    assert {"sd", "caption", "multi", "pronoun", "role", "age", "ethnic", "name", "lang", "typo", "leet",
            "unicode", "hashtag", "lora", "context", "attrnoun", "cue"} <= styles
