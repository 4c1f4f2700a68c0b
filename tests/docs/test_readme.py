"""The README's Python snippets run as written (the WGAN one with fewer steps), so they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_example():
    assert len(BLOCKS) == 1 and "trainer.fit(" in BLOCKS[0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # W&B offline runs and Lightning logs land here
    code = BLOCKS[index].replace(
        "L.Trainer(max_steps=6000)",
        "L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False)",
    )
    exec(compile(code, f"README.md snippet {index}", "exec"), {})
