"""The test suite's own layout: a test module never imports another test module (shared
helpers live in tests/mounting.py, shared fixtures in tests/conftest.py, the POSIX state
machine in tests/posix_machine.py), so that each test module can be read, run and changed
on its own."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def imports_of_test_modules(root: Path) -> list[str]:
    """Every `import test_x` / `from test_x import ...` (also `unit.test_x`) below root, as
    "file:line: module"."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module]
            else:
                continue
            for m in modules:
                if m.split(".")[-1].startswith("test_"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {m}")
    return found


def test_no_test_module_imports_another():
    assert imports_of_test_modules(TESTS) == []
