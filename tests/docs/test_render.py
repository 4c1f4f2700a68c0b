"""The API reference renders as a reader sees it: every docstring's example is a code block.

mkdocstrings reads "Example:" directly followed by ``>>>`` lines as a Google-style admonition whose body is Markdown,
where ``>>>`` is three nested blockquotes: the example came out as one grey paragraph, ``__init__`` and ``**kwargs``
eaten. ``mkdocs build --strict`` does not see it, so this test reads the built HTML.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {p.parent.name: p.read_text() for p in (site / "reference").glob("*/index.html")}


def test_every_example_in_the_api_reference_is_a_code_block(reference):
    assert len(reference) >= 8
    examples = 0
    for page, html in reference.items():
        assert "<blockquote>" not in html, f"{page}: an example rendered as blockquotes (a '>>>' read as Markdown)"
        assert "Example</summary>" not in html, f"{page}: an 'Example:' read as an admonition"
        for match in re.finditer(r"Example:</p>", html):
            examples += 1
            after = html[match.end():match.end() + 200]
            assert after.lstrip().startswith('<div class="highlight">'), f"{page}: {after[:120]!r}"
    assert examples >= 50  # every public object has one
