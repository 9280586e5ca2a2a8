"""The README's Python snippets run as written (those that need an export are run by test_export)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = [s for s in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "from_pretrained" not in s]


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.splitlines()[-1][:40])
def test_a_readme_snippet_runs_as_written(snippet):
    exec(compile(snippet, "README.md", "exec"), {})
