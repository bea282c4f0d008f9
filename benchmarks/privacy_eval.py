"""Privacy acceptance instrument for the oblivious transform (issue 22: fail closed).

    python benchmarks/privacy_eval.py [--data DIR] [--schema NAME|PATH] [--json] [--check] [--list N]

Runs every labelled prompt of benchmarks/data/privacy/*.jsonl (format and labelling rules in
that folder's README.md) through the device transform under its DEFAULT configuration,
``ObliviousTransform(TransformConfig())`` (``--schema`` sets only ``schema_path``), and sorts
each outcome into one of:

    refused      the transform raised ObliviousError (nothing sent)
    device_only  it returned a set whose ``device_only`` attribute is true (nothing sent)
    sent         ``cset.candidates``: the strings the server receives
    error        any other exception (a bug; nothing sent)

It then reports what the issue's acceptance asks:

    leaks            sent sets where a labelled sensitive text (or its ``plain`` spelling) occurs
                     in EVERY member, compared after NFKC, case folding and removal of invisible
                     format characters; whole words for Latin-script text, substrings otherwise
    N = 1            sensitive prompts sent as a single candidate
    value-dependent  groups (prompts that differ only in the real value of one attribute) whose
                     members get different outcome kinds, different candidate sets (sorted),
                     a different candidate order, or different refusal messages once each
                     member's own words are masked
    impossible       sent members that match one of the record's ``impossible_patterns``
    clean            clean prompts refused / device-only / errored (rate over the non-ambiguous
                     ones) and clean prompts rewritten (sent with N > 1 or a member != prompt)
    representable    what happens to person prompts a gender/age/ethnicity transform could protect
    timing           ms per transform call, median and max

Exit status is 0 for a report; with ``--check`` it is 1 when an acceptance bound is broken
(any leak, value-dependent group, impossible member or error; clean blocked rate above 5%).
Imports only the standard library and obclip.device (no torch): it runs where the device does.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obclip.device.oblivious import ObliviousError

DATA_DIR = Path(__file__).resolve().parent / "data" / "privacy"
ATTRIBUTES = ("gender", "age", "ethnicity")
KINDS = ("sent", "device_only", "refused", "error")


@dataclass(frozen=True)
class Bounds:
    """The issue's acceptance bounds (what ``--check`` enforces)."""

    leaks: int = 0
    value_dependent_groups: int = 0
    impossible_sets: int = 0
    errors: int = 0
    clean_blocked_rate: float = 0.05


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of KINDS
    candidates: tuple[str, ...] = ()  # what the server receives (empty unless sent)
    message: str = ""  # refusal or error text (device-side)
    ms: float = 0.0


@dataclass
class RecordResult:
    record: dict[str, Any]
    outcome: Outcome
    leaks: list[dict[str, Any]] = field(default_factory=list)  # labels found in every member
    impossible: list[dict[str, str]] = field(default_factory=list)  # {"member", "pattern"}


# --------------------------------------------------------------------------
# Text comparison
# --------------------------------------------------------------------------


def fold(text: str) -> str:
    """NFKC, case-folded, without invisible format characters (zero-width, soft hyphen, ...)."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf").casefold()


def _latin_only(text: str) -> bool:
    """True when every letter is Latin: such text is matched as whole words."""
    for ch in text:
        if ch.isalpha() and not (ch.isascii() or unicodedata.name(ch, "").startswith("LATIN")):
            return False
    return True


def label_regex(text: str) -> re.Pattern[str]:
    """How a labelled text is found in a folded member.

    Latin-script text: whole words where its ends are word characters ("man" is not in "woman").
    Other scripts (some write no spaces between words) and symbols: any substring.
    """
    folded = fold(text)
    body = re.escape(folded)
    if _latin_only(folded):
        if re.match(r"\w", folded[:1]):
            body = r"(?<!\w)" + body
        if re.match(r"\w", folded[-1:]):
            body = body + r"(?!\w)"
    return re.compile(body)


def label_spellings(label: dict[str, Any]) -> list[str]:
    """The labelled text and the plain spellings (a typo or trick fixed) that leak as much."""
    return [label["text"], *label.get("plain", [])]


def find_leaks(record: dict[str, Any], candidates: Sequence[str]) -> list[dict[str, Any]]:
    """Labels of which some spelling occurs in every sent member."""
    if not candidates:
        return []
    members = [fold(c) for c in candidates]
    leaked = []
    for label in record.get("sensitive", []):
        for spelling in label_spellings(label):
            pattern = label_regex(spelling)
            if all(pattern.search(m) for m in members):
                leaked.append({**label, "found": spelling})
                break
    return leaked


def find_impossible(record: dict[str, Any], candidates: Sequence[str]) -> list[dict[str, str]]:
    """Sent members the rest of the prompt rules out (the record's impossible_patterns)."""
    patterns = [re.compile(p, re.IGNORECASE) for p in record.get("impossible_patterns", [])]
    found = []
    for member in candidates:
        text = unicodedata.normalize("NFKC", member)
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        for pattern in patterns:
            if pattern.search(text):
                found.append({"member": member, "pattern": pattern.pattern})
    return found


# --------------------------------------------------------------------------
# Running the transform
# --------------------------------------------------------------------------


def run_one(transform: Callable[[str], Any], prompt: str) -> Outcome:
    start = time.perf_counter()
    try:
        cset = transform(prompt)
    except ObliviousError as exc:
        return Outcome("refused", message=str(exc), ms=(time.perf_counter() - start) * 1e3)
    except Exception as exc:  # a crash is reported, never taken for a refusal
        return Outcome("error", message=f"{type(exc).__name__}: {exc}", ms=(time.perf_counter() - start) * 1e3)
    ms = (time.perf_counter() - start) * 1e3
    if getattr(cset, "device_only", False):
        return Outcome("device_only", ms=ms)
    return Outcome("sent", candidates=tuple(cset.candidates), ms=ms)


def evaluate_record(record: dict[str, Any], transform: Callable[[str], Any]) -> RecordResult:
    outcome = run_one(transform, record["prompt"])
    result = RecordResult(record, outcome)
    if outcome.kind == "sent":
        if record["kind"] == "sensitive":
            result.leaks = find_leaks(record, outcome.candidates)
        result.impossible = find_impossible(record, outcome.candidates)
    return result


# --------------------------------------------------------------------------
# Groups: prompts that differ only in the real value
# --------------------------------------------------------------------------


def own_words(record: dict[str, Any], group: Sequence[dict[str, Any]]) -> list[str]:
    """What a refusal message may quote that differs between members: the member's own words
    (those not in every member's prompt), its labelled texts and plain spellings, its value."""
    tokens = [set(re.findall(r"\w+", fold(r["prompt"]))) for r in group]
    shared = set.intersection(*tokens)
    words = set(re.findall(r"\w+", fold(record["prompt"]))) - shared
    for label in record.get("sensitive", []):
        words.update(fold(s) for s in label_spellings(label))
    if record.get("value"):
        words.add(fold(str(record["value"])))
    return sorted(words, key=lambda w: (-len(w), w))


def masked_message(message: str, words: Iterable[str]) -> str:
    text = fold(message)
    for word in words:
        text = label_regex(word).sub("<w>", text)
    return text


def group_differences(members: Sequence[RecordResult]) -> list[str]:
    """Why a group's members are told apart by what the device does; [] when they are not."""
    records = [m.record for m in members]
    kinds = [m.outcome.kind for m in members]
    if len(set(kinds)) > 1:
        return ["outcome kinds differ: " + ", ".join(f"{r['value']}={k}" for r, k in zip(records, kinds))]
    kind = kinds[0]
    reasons = []
    if kind == "sent":
        sets = [tuple(sorted(m.outcome.candidates)) for m in members]
        if len(set(sets)) > 1:
            sizes = ", ".join(f"{r['value']}: N={len(m.outcome.candidates)}" for r, m in zip(records, members))
            reasons.append(f"candidate sets differ ({sizes})")
        elif len({m.outcome.candidates for m in members}) > 1:
            reasons.append("candidate order differs (same set)")
    if kind in ("refused", "error"):
        masked = [masked_message(m.outcome.message, own_words(m.record, records)) for m in members]
        if len(set(masked)) > 1:
            reasons.append("refusal messages differ once each member's own words are masked")
    return reasons


# --------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------


def load_records(data_dir: Path) -> list[dict[str, Any]]:
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no *.jsonl files in {data_dir}: pass --data with the labelled set's folder")
    records = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not JSON ({exc}); one record per line") from exc
            record["_file"] = path.name
            records.append(record)
    return records


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _brief(result: RecordResult) -> dict[str, Any]:
    r, o = result.record, result.outcome
    out: dict[str, Any] = {"id": r["id"], "style": r.get("style"), "prompt": r["prompt"], "outcome": o.kind}
    if o.kind == "sent":
        out["n"] = len(o.candidates)
        out["candidates"] = list(o.candidates)
    if o.message:
        out["message"] = o.message
    return out


def evaluate(records: Sequence[dict[str, Any]], transform: Callable[[str], Any],
             bounds: Bounds = Bounds()) -> dict[str, Any]:
    results = [evaluate_record(r, transform) for r in records]
    sensitive = [x for x in results if x.record["kind"] == "sensitive"]
    clean = [x for x in results if x.record["kind"] == "clean"]

    def kind_counts(rows: Sequence[RecordResult]) -> dict[str, int]:
        return {k: sum(1 for x in rows if x.outcome.kind == k) for k in KINDS}

    # Leaks, split by attribute and by explicit word vs context cue (a prompt counts once per class).
    leaked = [x for x in sensitive if x.leaks]
    by_class: dict[str, int] = {}
    for x in leaked:
        classes = {f"{lab['attribute']} ({'explicit' if lab['explicit'] else 'context'})" for lab in x.leaks}
        for name in classes:
            by_class[name] = by_class.get(name, 0) + 1
    n1 = [x for x in sensitive if x.outcome.kind == "sent" and len(x.outcome.candidates) == 1]
    impossible = [x for x in results if x.impossible]

    # Groups.
    groups: dict[str, list[RecordResult]] = {}
    for x in results:
        if x.record.get("group"):
            groups.setdefault(x.record["group"], []).append(x)
    dependent = []
    for gid, members in groups.items():
        reasons = group_differences(members)
        if reasons:
            dependent.append({"group": gid, "reasons": reasons, "members": [
                {**_brief(m), "value": m.record.get("value")} for m in members]})
    reason_counts: dict[str, int] = {}
    for g in dependent:
        for reason in g["reasons"]:
            key = reason.split(":")[0].split(" (")[0]
            reason_counts[key] = reason_counts.get(key, 0) + 1

    # Clean prompts.
    judged = [x for x in clean if not x.record.get("ambiguous")]
    blocked = [x for x in judged if x.outcome.kind != "sent"]
    rewritten = [x for x in clean if x.outcome.kind == "sent"
                 and (len(x.outcome.candidates) != 1 or x.outcome.candidates[0] != x.record["prompt"])]

    # Representable person prompts.
    rep = [x for x in sensitive if x.record.get("representable")]
    rep_protected = [x for x in rep if x.outcome.kind == "sent" and len(x.outcome.candidates) > 1]
    rep_sound = [x for x in rep_protected if not x.leaks and not x.impossible]

    # Per style.
    styles: dict[str, dict[str, int]] = {}
    for x in results:
        key = f"{x.record['kind']}:{x.record.get('style', '?')}"
        row = styles.setdefault(key, {"prompts": 0, "sent N>1": 0, "sent N=1": 0, "device_only": 0, "refused": 0,
                                      "error": 0, "leaks": 0, "impossible": 0})
        row["prompts"] += 1
        if x.outcome.kind == "sent":
            row["sent N>1" if len(x.outcome.candidates) > 1 else "sent N=1"] += 1
        else:
            row[x.outcome.kind] += 1
        row["leaks"] += bool(x.leaks)
        row["impossible"] += bool(x.impossible)

    times = [x.outcome.ms for x in results]
    errors = [x for x in results if x.outcome.kind == "error"]
    clean_rate = _share(len(blocked), len(judged))
    measured = {"leaks": len(leaked), "value_dependent_groups": len(dependent),
                "impossible_sets": len(impossible), "errors": len(errors), "clean_blocked_rate": clean_rate}
    checks = {name: {"measured": measured[name], "bound": getattr(bounds, name),
                     "ok": measured[name] <= getattr(bounds, name)} for name in measured}
    return {
        "records": {"sensitive": len(sensitive), "representable": len(rep), "clean": len(clean),
                    "clean_ambiguous": len(clean) - len(judged), "groups": len(groups),
                    "group_members": sum(len(m) for m in groups.values())},
        "outcomes": {"sensitive": kind_counts(sensitive), "clean": kind_counts(clean)},
        "sent_sensitive": sum(1 for x in sensitive if x.outcome.kind == "sent"),
        "leaks": {"count": len(leaked), "by_class": dict(sorted(by_class.items())),
                  "items": [{**_brief(x), "leaked": x.leaks} for x in leaked]},
        "n1_sensitive": {"count": len(n1), "items": [_brief(x) for x in n1]},
        "value_dependent": {"count": len(dependent), "of_groups": len(groups), "by_reason": reason_counts,
                            "items": dependent},
        "impossible": {"sets": len(impossible), "members": sum(len(x.impossible) for x in impossible),
                       "items": [{**_brief(x), "impossible": x.impossible} for x in impossible]},
        "clean": {"judged": len(judged), "blocked": len(blocked), "blocked_rate": clean_rate,
                  "blocked_items": [_brief(x) for x in blocked],
                  "rewritten": len(rewritten), "rewritten_items": [_brief(x) for x in rewritten],
                  "ambiguous_outcomes": [_brief(x) for x in clean if x.record.get("ambiguous")]},
        "representable": {"count": len(rep), **{k: sum(1 for x in rep if x.outcome.kind == k) for k in KINDS},
                          "sent_protected": len(rep_protected),
                          "sent_protected_share": _share(len(rep_protected), len(rep)),
                          "sent_protected_sound": len(rep_sound),
                          "sent_protected_sound_share": _share(len(rep_sound), len(rep)),
                          "sent_unprotected": sum(1 for x in rep if x.outcome.kind == "sent"
                                                  and len(x.outcome.candidates) == 1)},
        "errors": {"count": len(errors), "items": [_brief(x) for x in errors]},
        "by_style": dict(sorted(styles.items())),
        "timing_ms": {"median": statistics.median(times) if times else 0.0, "max": max(times, default=0.0),
                      "calls": len(times)},
        "checks": checks,
        "passed": all(c["ok"] for c in checks.values()),
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _cut(text: str, width: int = 110) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _items(lines: list[str], items: Sequence[dict[str, Any]], limit: int,
           show: Callable[[dict[str, Any]], str]) -> None:
    shown = items if limit <= 0 else items[:limit]
    for item in shown:
        lines.append(f"- {show(item)}")
    if len(shown) < len(items):
        lines.append(f"- ... {len(items) - len(shown)} more (--list 0 or --json lists all)")
    lines.append("")


def _members(item: dict[str, Any], k: int = 3) -> str:
    cands = item.get("candidates", [])
    head = " | ".join(repr(c) for c in cands[:k])
    return f"N={len(cands)}: {head}" + (" | ..." if len(cands) > k else "")


def markdown(report: dict[str, Any], schema: str, limit: int) -> str:
    rec = report["records"]
    lines = [
        "# Privacy evaluation (issue 22: fail closed)",
        "",
        f"Transform: `ObliviousTransform(TransformConfig({'' if schema == 'default' else f'schema_path={schema!r}'}))`"
        f" (schema: {schema}). Records: {rec['sensitive']} sensitive ({rec['representable']} representable), "
        f"{rec['clean']} clean ({rec['clean_ambiguous']} ambiguous, not judged), {rec['groups']} groups "
        f"({rec['group_members']} members, counted among the sensitive).",
        "",
        "## Acceptance bounds",
        "",
        "| bound | measured | limit | ok |",
        "|---|---|---|---|",
    ]
    for name, c in report["checks"].items():
        measured = f"{c['measured']:.1%}" if isinstance(c["measured"], float) else str(c["measured"])
        bound = f"{c['bound']:.0%}" if isinstance(c["bound"], float) else str(c["bound"])
        lines.append(f"| {name} | {measured} | <= {bound} | {'yes' if c['ok'] else 'NO'} |")
    lines += ["", f"**{'PASS' if report['passed'] else 'FAIL'}**", "", "## Outcomes", "",
              "| prompts | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for kind, counts in report["outcomes"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
    r = report["representable"]
    lines += [
        "",
        f"Representable person prompts ({r['count']}): sent with protection (N > 1) {r['sent_protected']} "
        f"({r['sent_protected_share']:.1%}; without a leak or impossible member {r['sent_protected_sound']}, "
        f"{r['sent_protected_sound_share']:.1%}), sent N = 1 {r['sent_unprotected']}, device-only {r['device_only']}, "
        f"refused {r['refused']}, error {r['error']}.",
        "",
        f"Timing: median {report['timing_ms']['median']:.2f} ms, max {report['timing_ms']['max']:.2f} ms per call "
        f"over {report['timing_ms']['calls']} calls.",
        "",
        "## By style",
        "",
    ]
    cols = ["prompts", "sent N>1", "sent N=1", "device_only", "refused", "error", "leaks", "impossible"]
    lines += ["| style | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for style, row in report["by_style"].items():
        lines.append(f"| {style} | " + " | ".join(str(row[c]) for c in cols) + " |")
    lk = report["leaks"]
    lines += ["", f"## Leaks: {lk['count']} of {report['sent_sensitive']} sent sensitive sets keep a labelled "
              "text in every member", "",
              "By class (a prompt counts once per class): "
              + (", ".join(f"{k} {v}" for k, v in lk["by_class"].items()) or "none"), ""]
    _items(lines, lk["items"], limit, lambda i: f"`{i['id']}` {_cut(repr(i['prompt']), 90)}: kept "
           + ", ".join(sorted({repr(x['found']) for x in i["leaked"]})) + f"; {_members(i, 2)}")
    n1 = report["n1_sensitive"]
    lines += [f"## Sensitive prompts sent with N = 1: {n1['count']}", ""]
    _items(lines, n1["items"], limit, lambda i: f"`{i['id']}` {_cut(repr(i['candidates'][0]))}")
    vd = report["value_dependent"]
    lines += [f"## Value-dependent groups: {vd['count']} of {vd['of_groups']}", "",
              "By reason: " + (", ".join(f"{k} {v}" for k, v in vd["by_reason"].items()) or "none"), ""]
    _items(lines, vd["items"], limit, lambda g: f"`{g['group']}`: {'; '.join(g['reasons'])} -- " + " / ".join(
        f"{m['value']}: {m['outcome']}" + (f" N={m['n']}" if m["outcome"] == "sent" else "") for m in g["members"]))
    im = report["impossible"]
    lines += [f"## Impossible members: {im['members']} in {im['sets']} sets", ""]
    _items(lines, im["items"], limit, lambda i: f"`{i['id']}` {_cut(repr(i['prompt']), 70)} -> "
           + _cut(repr(i["impossible"][0]["member"]), 80))
    cl = report["clean"]
    lines += [f"## Clean prompts blocked (refused, device-only or error): {cl['blocked']} of {cl['judged']} "
              f"({cl['blocked_rate']:.1%})", ""]
    _items(lines, cl["blocked_items"], limit, lambda i: f"`{i['id']}` {repr(i['prompt'])}: {i['outcome']}"
           + (f" ({_cut(i['message'], 80)})" if i.get("message") else ""))
    lines += [f"## Clean prompts rewritten: {cl['rewritten']}", ""]
    _items(lines, cl["rewritten_items"], limit, lambda i: f"`{i['id']}` {repr(i['prompt'])} -> {_members(i, 3)}")
    if report["errors"]["count"]:
        lines += [f"## Errors (exceptions other than ObliviousError): {report['errors']['count']}", ""]
        _items(lines, report["errors"]["items"], limit, lambda i: f"`{i['id']}` {_cut(i['message'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def default_transform(schema: str | None) -> Callable[[str], Any]:
    from obclip.device.oblivious import ObliviousTransform, TransformConfig

    config = TransformConfig() if schema is None else TransformConfig(schema_path=schema)
    return ObliviousTransform(config)


def main(argv: Sequence[str] | None = None, transform: Callable[[str], Any] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder of labelled *.jsonl files")
    parser.add_argument("--schema", default=None, help="schema name or JSON path (default: the transform's default)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON instead of Markdown")
    parser.add_argument("--check", action="store_true", help="exit 1 when an acceptance bound is broken")
    parser.add_argument("--list", type=int, default=30, help="items listed per failure category (0 = all)")
    args = parser.parse_args(argv)

    records = load_records(args.data)
    start = time.perf_counter()
    if transform is None:
        transform = default_transform(args.schema)
    setup_ms = (time.perf_counter() - start) * 1e3
    report = evaluate(records, transform)
    report["schema"] = args.schema or "default"
    report["setup_ms"] = setup_ms
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print(markdown(report, report["schema"], args.list))
    return 1 if args.check and not report["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
