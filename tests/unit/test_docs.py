"""The docs name the tests that hold their rules (docs/architecture.md, "Concurrency
invariants"); a renamed or deleted test must not leave a rule pointing at nothing."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["docs/architecture.md", "docs/reliability.md", "docs/layers.md", "docs/design-many-processes.md"]
QUALIFIED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)")
BARE = re.compile(r"`(test_\w+)`")


def _tests_defined() -> dict[str, set[str]]:
    """Test function names per test file (module-level and in classes)."""
    out: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(), str(path))
        out[str(path.relative_to(ROOT))] = {n.name for n in ast.walk(tree)
                                            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                                            and n.name.startswith("test_")}
    return out


def test_every_test_the_docs_name_exists():
    defined = _tests_defined()
    everywhere = set().union(*defined.values())
    missing = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.exists():
            continue
        text = path.read_text()
        for file, name in QUALIFIED.findall(text):
            if name not in defined.get(file, set()):
                missing.append(f"{doc}: {file}::{name}")
        for name in BARE.findall(text):
            if name not in everywhere:
                missing.append(f"{doc}: {name}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)
