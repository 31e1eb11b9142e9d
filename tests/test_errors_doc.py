"""docs/errors.md: every row names the test that proves it, and that test exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_row_names_an_existing_test():
    doc = (ROOT / "docs" / "errors.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith(("| Bad input", "|---"))]
    assert len(rows) >= 25
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row.split("|")[-2])
        assert cited, f"row without its test: {row[:80]}"
        for path, name in cited:
            assert name in _tests_in(ROOT / path), f"{path}::{name} (cited in docs/errors.md) does not exist"
