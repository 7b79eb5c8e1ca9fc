"""lm-eval is an optional extra: only megatron_minitron/evaluation/ imports it (lm.py and run.py, lazily in
run.py), so every other subcommand works without it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_minitron"


def lm_eval_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of each `import lm_eval...` / `from lm_eval... import` in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "lm_eval" or n.startswith("lm_eval.") for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_only_the_evaluation_package_imports_lm_eval():
    importers = {p.relative_to(PACKAGE).as_posix(): lm_eval_imports(p) for p in PACKAGE.rglob("*.py")}
    importers = {name: found for name, found in importers.items() if found}
    assert set(importers) == {"evaluation/lm.py", "evaluation/run.py"}, importers
    assert not any(at_top for _, at_top in importers["evaluation/run.py"]), "run.py must import lm_eval lazily"
