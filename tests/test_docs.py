"""The README is a map that works: short, every command in it parses against the real parsers
(the cheap ones run), every local link resolves, and the benchmark tables in docs/ are what
their JSON files say (benchmarks/report.py)."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from helpers import REPO

ROOT = REPO
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Pages other branches of issue 22/23 write; linked from here before they land.
PENDING_PAGES = {ROOT / "docs" / "privacy.md"}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, as argv (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


class Parsed(Exception):
    """Raised in place of running a command once its flags parsed."""


@pytest.fixture
def parse_only(monkeypatch):
    """argparse parses as usual, then stops the command before it does any work."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(self.prog, real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def parse(argv: list[str]) -> None:
    """Parse one README command with the parser of the program it runs; a bad flag fails here."""
    program, args = argv[0], argv[1:]
    if program == "bash":
        script = ROOT / args[0]
        assert script.is_file(), script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        if args[0] == "scripts/demo.sh":   # its arguments: prompt and output, handed to obclip-demo
            prompt = args[1] if len(args) > 1 else "x"
            parse(["obclip-demo", prompt, "--out", args[2] if len(args) > 2 else "out/obclip.png", "--seed", "0"])
        return
    name = Path(program).name
    if name in SCRIPTS:
        module, _, func = SCRIPTS[name].partition(":")
        main = getattr(__import__(module, fromlist=[func]), func)
        with pytest.raises(Parsed):
            main(args)
        return
    if name in ("python", "python3"):
        script = ROOT / args[0]
        assert script.is_file(), script
        saved = sys.argv
        sys.argv = [str(script), *args[1:]]
        try:
            with pytest.raises(Parsed):
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
        return
    raise AssertionError(f"README command {' '.join(argv)!r}: no parser known for {program!r}")


def test_the_readme_is_a_map():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv, parse_only):
    parse(argv)


def test_the_cheap_readme_commands_run():
    """obclip-candidates runs as written (device side only, no model)."""
    (argv,) = [a for a in readme_commands() if Path(a[0]).name == "obclip-candidates"]
    exe = Path(sys.executable).parent / "obclip-candidates"
    out = subprocess.run([str(exe), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"candidates"' in out.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        path = (page.parent / target).resolve()
        if path in PENDING_PAGES:
            continue
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_benchmark_tables_are_what_their_json_says():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in ("flops-presets", "flops-rows", "quality", "sweep"):
        assert f"<!-- report:{name} -->" in text, name


def test_report_check_fails_on_a_table_edited_by_hand_and_the_rewrite_restores_it(tmp_path):
    from helpers import load_benchmark

    report = load_benchmark("report")
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    start = text.index("<!-- report:flops-rows -->")
    row = text.index("| ObCLIP, no acceleration |", start)
    edited = text[:row] + text[row:].replace("14.80", "13.80", 1)   # a measurement retyped by hand
    assert edited != text
    (tmp_path / "benchmarks.md").write_text(edited)
    assert report.main(["--check", "--docs", str(tmp_path)]) == 1
    assert report.main(["--docs", str(tmp_path)]) == 0
    assert (tmp_path / "benchmarks.md").read_text() == text
    assert report.main(["--check", "--docs", str(tmp_path)]) == 0
