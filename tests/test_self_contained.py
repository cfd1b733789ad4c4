"""The repository is self-contained: no file cites a document outside it, and every
citation of docs/design.md in the code names a heading that exists there.

Citations take the form ``design.md, <Heading>`` (or ``design.md §<Heading>``), the heading
written exactly and ended by punctuation (``)``, ``.``, ``,``, ``;``, ``:``, a quote) or
the end of the text: ``(design.md, Degenerate steps)``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SCANNED = ("src", "tests", "docs", "benchmarks", "scripts", "README.md")
# Written so that this file does not match itself.
FORBIDDEN = ("SPEC" + ".md", "SPEC" + " choice")
CITATION = re.compile(r"design\.md(?:,\s*|\s*§\s*)([^).,;:\"'`]*)")


def _files(roots: tuple[str, ...]) -> list[Path]:
    """The tracked files under ``roots`` (every file there without git)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *roots],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for root in roots:
            p = ROOT / root
            paths += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    this = Path(__file__).resolve()
    return [p for p in paths if p.is_file() and p.resolve() != this]


def _headings(markdown: str) -> set[str]:
    headings, fenced = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.add(line.lstrip("#").strip())
    return headings


def _unwrapped(text: str) -> str:
    """``text`` with line breaks (and a comment's ``#`` on the next line) as one space, so
    that a citation broken over two lines reads as one."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#[ \t]*)?", " ", text)


def citations(text: str) -> list[str]:
    """The headings that ``text`` cites as ``design.md, <Heading>``."""
    return [m.group(1).strip() for m in CITATION.finditer(_unwrapped(text))]


def test_no_file_cites_an_outside_spec() -> None:
    found = []
    for path in _files(SCANNED):
        data = path.read_bytes()
        for word in FORBIDDEN:
            if word.encode() in data:
                line = data[: data.index(word.encode())].count(b"\n") + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {word}")
    assert not found, "cite docs/design.md instead:\n" + "\n".join(found)


def test_design_citations_name_existing_headings() -> None:
    headings = _headings(DESIGN.read_text(encoding="utf-8"))
    bad, seen = [], 0
    for path in _files(("src", "tests", "benchmarks", "scripts")):
        if path.suffix not in (".py", ".h", ".cpp", ".sh"):
            continue
        for cited in citations(path.read_text(encoding="utf-8")):
            seen += 1
            if cited not in headings:
                bad.append(f"{path.relative_to(ROOT)}: {cited!r}")
    assert seen > 0, "no citation of design.md found: is the pattern still right?"
    assert not bad, (
        "citations of docs/design.md that name no heading of it (write `design.md, "
        "<Heading>` with the heading exactly, ended by punctuation):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(design.md, Degenerate steps)", ["Degenerate steps"]),
        ("see docs/design.md, Paper presets.", ["Paper presets"]),
        ("# (design.md,\n# Training beyond max_length)", ["Training beyond max_length"]),
        ("design.md §Padding", ["Padding"]),
        ("(design.md, No such heading)", ["No such heading"]),
        ("[docs/design.md](docs/design.md)", []),
    ],
)
def test_citation_pattern(text: str, expected: list[str]) -> None:
    assert citations(text) == expected
