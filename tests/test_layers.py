"""The package's layering, read from the imports (ast) so that it stays as README and DESIGN describe it.

- library code never imports the CLI (`cli/` wires the library together, not the reverse);
- only `runtime/` touches megatron's `parallel_state` or creates process groups;
- `hf/` and `prune/` share the checkpoint code (`model/`) and do not depend on each other;
- no private (underscore) name is imported from another package;
- the algorithms of `plan/` and the losses run without megatron.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = "megatron_minitron"
ENTRY_POINTS = {"__main__.py"}  # `python -m` entry points may call the CLI


@dataclass(frozen=True)
class Import:
    module: str  # dotted name of the importing module
    target: str  # dotted name imported from (a module)
    names: tuple[str, ...]  # names taken from it (empty for `import x`)
    line: int


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> list[Import]:
    out = []
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out += [Import(module, alias.name, (), node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append(Import(module, node.module, tuple(a.name for a in node.names), node.lineno))
    return out


def _calls(name: str) -> list[str]:
    """Modules (with line) that call an attribute or function called `name`."""
    found = []
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if called == name:
                    found.append(f"{_module_name(path)}:{node.lineno}")
    return found


def _package(module: str) -> str:
    """The first-level package of a module of ours ('megatron_minitron.hf.files' -> 'hf')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (REPO / PACKAGE / parts[1]).is_dir()) else ""


IMPORTS = _imports()


def _where(imports) -> list[str]:
    return [f"{i.module}:{i.line} imports {i.target} {list(i.names) or ''}".rstrip() for i in imports]


def test_library_code_does_not_import_the_cli():
    bad = [i for i in IMPORTS if (i.target == f"{PACKAGE}.cli" or i.target.startswith(f"{PACKAGE}.cli."))
           and _package(i.module) != "cli" and not any(i.module.endswith(e[:-3]) for e in ENTRY_POINTS)]
    assert not bad, _where(bad)


def test_only_runtime_touches_parallel_state_or_creates_process_groups():
    bad = [i for i in IMPORTS if _package(i.module) != "runtime" and
           ("megatron.core.parallel_state" in i.target or (i.target == "megatron.core" and "parallel_state" in i.names))]
    assert not bad, _where(bad)
    creators = [c for name in ("init_process_group", "new_group", "initialize_model_parallel")
                for c in _calls(name) if _package(c.split(":")[0]) != "runtime"]
    assert not creators, creators


@pytest.mark.parametrize("a, b", [("hf", "prune"), ("prune", "hf")])
def test_hf_and_prune_do_not_depend_on_each_other(a, b):
    bad = [i for i in IMPORTS if _package(i.module) == a and i.target.startswith(f"{PACKAGE}.{b}")]
    assert not bad, _where(bad)


def test_no_private_name_is_imported_from_another_package():
    def private(i: Import) -> bool:
        return (any(n.startswith("_") for n in i.names)
                or any(p.startswith("_") and p != "__init__" for p in i.target.split(".")[2:]))

    bad = [i for i in IMPORTS if i.target.startswith(f"{PACKAGE}.") and _package(i.target + ".x") != _package(i.module)
           and private(i)]
    assert not bad, _where(bad)


@pytest.mark.parametrize("module", ["plan", "distill.losses", "training.losses", "config", "search.space"])
def test_algorithms_run_without_megatron(module):
    bad = [i for i in IMPORTS if (i.module == f"{PACKAGE}.{module}" or i.module.startswith(f"{PACKAGE}.{module}."))
           and i.target.split(".")[0] == "megatron"]
    assert not bad, _where(bad)


def test_the_checks_see_the_imports_they_judge():
    """The rules above are only as good as the import reader: it must see lazy imports inside functions."""
    lazy = [i for i in IMPORTS if i.module == f"{PACKAGE}.cli.prune" and i.target == f"{PACKAGE}.prune.rewrite"]
    assert any("prune_checkpoint" in i.names for i in lazy)
    assert any(c.startswith(f"{PACKAGE}.runtime.dist:") for c in _calls("init_process_group"))
