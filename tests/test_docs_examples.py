"""The docs' examples run: every ```python block whose first line is "# runs on the CPU" is executed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARK = "# runs on the CPU"


def _examples() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
            code = match.group(1)
            if code.startswith(MARK):
                found.append((path.name, text[: match.start()].count("\n") + 1, code))
    return found


def test_the_serving_guide_has_runnable_examples():
    assert sum(name == "serving.md" for name, _, _ in _examples()) >= 2


@pytest.mark.parametrize("name,line,code", _examples(), ids=lambda v: str(v) if isinstance(v, (str, int)) else "")
def test_example_runs(name, line, code, capsys):
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own docs
