"""Benchmark tables in docs/*.md, generated from the benchmarks' own JSON output.

    python benchmarks/report.py            # rewrite every marked table from its JSON file
    python benchmarks/report.py --check    # exit 1 if a marked table is not what its JSON gives
    python benchmarks/report.py --list     # each table: its JSON file and the command that writes it

A table lives between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in a page of docs/;
NAME is a key of TABLES. The JSON files are committed (docs/data/, and the quality benchmark's own
docs/quality/ and docs/sweep/), so a table always says what a run printed: after rerunning a
benchmark with the command TABLES names, run this script. Tables whose benchmark has --json but
no marker in docs yet are rendered generically (``--print NAME``) until a page quotes them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import quality_report  # noqa: E402

DOCS = REPO_ROOT / "docs"


@dataclass(frozen=True)
class Table:
    json: str                          # the JSON file, relative to the repository
    command: str                       # the command that writes it
    render: Callable[[object], list[str]]


# -- renderers: JSON document -> Markdown lines ---------------------------------------------------
def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def flops_presets(doc: dict) -> list[str]:
    """Named presets at N = 6: server T MACs (paper convention) and the multiple of Hybrid SD's."""
    rows = [p for p in doc["presets"] if p["n"] == 6]
    lines = [f"| preset | k | r | s | T MACs (paper) | x Hybrid SD ({rows[0]['hybrid_sd_paper_tmacs']:.2f} T) |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in sorted(rows, key=lambda p: p["paper_tmacs"]):
        lines.append(f"| {p['preset']} | {p['k']} | {p['r']} | {p['s']} | {p['paper_tmacs']:.2f} | "
                     f"{p['ratio_to_hybrid_sd']:.2f} |")
    return lines


FLOPS_ROWS = ("cloud_only", "hybrid", "vanilla_og", "obclip", "cache", "cache_reuse", "exact",
              "total:bk-sdm-small")
FLOPS_COLUMNS = (("paper-k5", 4), ("paper-k5", 6), ("paper-k10", 4), ("paper-k10", 6))


def flops_rows(doc: dict) -> list[str]:
    """The paper's FLOPs rows at its two presets and N = 4, 6: ours / paper's (ratio), T MACs."""
    ks = {(b["preset"], b["N"]): b["k"] for b in doc["blocks"]}
    blocks = {(b["preset"], b["N"]): {r["key"]: r for r in b["rows"]} for b in doc["blocks"]}
    lines = ["| row | " + " | ".join(f"k={ks[c]} N={c[1]}" for c in FLOPS_COLUMNS) + " |",
             "|---|" + "---|" * len(FLOPS_COLUMNS)]
    for key in FLOPS_ROWS:
        label = blocks[FLOPS_COLUMNS[0]][key]["label"]
        cells = []
        for column in FLOPS_COLUMNS:
            r = blocks[column][key]
            ours = f"{r['paper_macs_T']:.2f}"
            cells.append(f"{ours} / {r['paper_T']:.2f} ({r['ratio']:.3f})" if r["paper_T"] else f"**{ours}**")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def quality(doc: dict) -> list[str]:
    return quality_report.quality_table(doc)


def sweep(doc: dict) -> list[str]:
    return quality_report.sweep_table(doc)


def rows_table(doc: object) -> list[str]:
    """Any benchmark's rows (a list, or a document's "rows" / "summary"): one column per scalar field."""
    rows = doc if isinstance(doc, list) else next(doc[k] for k in ("rows", "summary") if k in doc)  # type: ignore[index]
    keys = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))]
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows])


TABLES = {
    "flops-presets": Table("docs/data/flops.json", "python benchmarks/flops.py --json > docs/data/flops.json",
                           flops_presets),
    "flops-rows": Table("docs/data/flops.json", "python benchmarks/flops.py --json > docs/data/flops.json",
                        flops_rows),
    "quality": Table("docs/quality/quality.json", "python benchmarks/quality.py --prompts 120 --threads 1",
                     quality),
    "sweep": Table("docs/sweep/sweep.json", "python benchmarks/quality.py --sweep benchmarks/sweeps/issue16.json "
                   "--prompts 120 --threads 1 --out docs/sweep", sweep),
    # --json, not yet quoted by a page (their numbers are in the prose beside their commands):
    "latency": Table("docs/data/latency.json", "python benchmarks/latency.py --json > docs/data/latency.json",
                     rows_table),
    "fidelity": Table("docs/data/fidelity.json", "python benchmarks/fidelity.py --json > docs/data/fidelity.json",
                      rows_table),
    "device": Table("docs/data/device.json", "python benchmarks/device.py --json > docs/data/device.json",
                    rows_table),
}

MARKER = re.compile(r"(<!-- report:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)


def render(name: str) -> str:
    table = TABLES[name]
    doc = json.loads((REPO_ROOT / table.json).read_text())
    return "\n".join(table.render(doc)) + "\n"


def rewrite(text: str) -> str:
    """The page with every marked table rendered again from its JSON."""
    def one(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r} in a report marker; known: {sorted(TABLES)}")
        return m.group(1) + render(name) + m.group(4)

    return MARKER.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a marked table differs from its JSON")
    p.add_argument("--list", action="store_true", help="print each table, its JSON file and its command")
    p.add_argument("--print", dest="show", metavar="NAME", help="print one table (e.g. one not quoted yet)")
    p.add_argument("--docs", type=Path, default=DOCS, help="the pages' folder (default docs/)")
    args = p.parse_args(argv)
    if args.list:
        for name, t in TABLES.items():
            there = "" if (REPO_ROOT / t.json).is_file() else "  (no JSON yet: run the command)"
            print(f"{name}: {t.json} <- {t.command}{there}")
        return 0
    if args.show:
        print(render(args.show), end="")
        return 0
    stale, tables = [], 0
    for page in sorted(args.docs.glob("*.md")):
        text = page.read_text()
        tables += len(MARKER.findall(text))
        new = rewrite(text)
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("tables out of date with their JSON: " + ", ".join(str(p) for p in stale)
              + "; run python benchmarks/report.py", file=sys.stderr)
        return 1
    if args.check or not stale:
        print(f"{tables} marked table(s) in {args.docs}: up to date with their JSON")
    else:
        print("rewrote " + ", ".join(p.name for p in stale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
