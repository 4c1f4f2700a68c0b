"""User pages teach: short paragraphs, no history of how a figure was reached, no commit names."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
#: a commit name: 7 to 40 hex digits with at least one letter and one digit
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip() and not p.lstrip().startswith(("|", "```", "#", "!["))]


def test_the_benchmarks_page_has_short_paragraphs_and_names_no_commit():
    text = (DOCS / "benchmarks.md").read_text()
    longest = max(_paragraphs(text), key=lambda p: len(p.split()))
    assert len(longest.split()) <= 120, longest[:200]
    assert not COMMIT.findall(text)
    assert "design/benchmark-notes.md" in text  # how the figures were reached lives there
