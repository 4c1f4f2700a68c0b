"""The docs pages' Python snippets run as written (long fits shortened), so the pages cannot rot.

A page's snippets run in order in one namespace: a later one may use what an earlier one defined ("with the
module and data above"). A snippet that needs what this machine has not (GPUs, a W&B account) opens with
``# not run: <why>`` and is only compiled.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = {page: re.findall(r"```python\n(.*?)```", page.read_text(), re.S) for page in sorted(DOCS.rglob("*.md"))}
PAGES = {page: snippets for page, snippets in PAGES.items() if snippets}


def test_the_docs_have_snippets():
    assert sum(len(s) for s in PAGES.values()) >= 8


@pytest.mark.parametrize("page", list(PAGES), ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # W&B offline runs and Lightning logs land here
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {}
    for index, code in enumerate(PAGES[page]):
        if code.startswith("# not run:"):
            compile(code, f"{page.name} snippet {index}", "exec")  # still valid Python
            continue
        code = re.sub(r"max_steps=\d+", "max_steps=4", code)
        code = re.sub(r"max_epochs=\d+", "max_epochs=1", code)
        exec(compile(code, f"{page.name} snippet {index}", "exec"), namespace)
