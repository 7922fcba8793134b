"""The package's import graph, read from the source with ``ast``: no cycles, and the layering rules below.

Every ``import`` / ``from ... import`` inside ``clbench`` counts, at module level and inside functions alike (a
function-level import hides a cycle from Python's import machinery, not from the design). An import of a package
(``from clbench import methods``) is an edge to its ``__init__``; ``from clbench.methods import lora`` is an edge to
``clbench.methods.lora`` when that is a module, else to ``clbench.methods``. ``if TYPE_CHECKING:`` blocks are skipped:
annotations do not run.

A rule is one line of ``RULES``: modules under a prefix never import modules under any of the forbidden prefixes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "clbench"

# The command line, and the settings (their registry and declarations, and the LLaVA setting's implementation): what
# the library below them never imports. The command line asks clbench.settings for the setting of a benchmark.
CLI = ("clbench.cli", "clbench.reports.cli", "clbench.costs.cli", "clbench.datasets.cli", "clbench.settings.mcit.cli")
SETTINGS = ("clbench.settings", "clbench.settings.mcit")
CONFIG = ("clbench.config",)
ENGINE = ("clbench.engine", "clbench.sweeps")
STORAGE = ("clbench.storage",)

# One rule a line: (modules under this prefix, never import these prefixes, except modules under these, why).
# A prefix matches the module itself and everything under it.
RULES: list[tuple[str, tuple[str, ...], tuple[str, ...], str]] = [
    ("clbench.methods", CONFIG + CLI + ENGINE + STORAGE + SETTINGS, (),
     "methods never import the configuration layer's registry, the engine, storage or a setting"),
    ("clbench.datasets", ("clbench.methods", *CONFIG, *CLI, *ENGINE, *SETTINGS), ("clbench.datasets.cli",),
     "data never imports methods, the configuration layer or a setting"),
    ("clbench.models", ("clbench.methods", *CONFIG, *CLI, *ENGINE, *SETTINGS), (),
     "models are below methods, configuration and the settings"),
    ("clbench.linalg", ("clbench.methods", "clbench.models", *CONFIG, *CLI), (), "pure linear algebra"),
    ("clbench.config", SETTINGS + CLI + ENGINE, (), "configuration never imports a setting, the engine or the CLI"),
    ("clbench.storage", SETTINGS + CLI + ENGINE + ("clbench.methods", "clbench.reports"), (),
     "storage is below the engine: files, locks and checkpoints only"),
    ("clbench.engine", SETTINGS + CLI, (), "the engine never imports a setting or the command line"),
    ("clbench.sweeps", SETTINGS + CLI, (), "the engine never imports a setting or the command line"),
    ("clbench.reports", SETTINGS + CLI, ("clbench.reports.cli",), "reports never import a setting or the CLI"),
    ("clbench.settings", ("clbench.cli",), ("clbench.settings.mcit.cli",),
     "settings never import the command line; it imports them (a setting's own command parts may use its consoles)"),
    ("clbench.settings", ("clbench.settings.mcit",), ("clbench.settings.mcit",),
     "only a setting's own declaration imports its implementation"),
]
# Targets a rule's importers may import all the same: the registry (clbench.settings) imports each setting's
# declaration, which lives beside the implementation it imports lazily.
ALLOWED = {"only a setting's own declaration imports its implementation": ("clbench.settings.mcit.setting",)}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module name -> the ``clbench`` modules it imports, anywhere in its source."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:  # `import clbench.a.b` where only clbench.a is ours
                    target = target.rpartition(".")[0]
                if target.startswith("clbench") and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rule_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer, forbidden, exempt, why in RULES:
        for module, targets in sorted(graph.items()):
            if not _under(module, importer) or any(_under(module, e) for e in exempt):
                continue
            for target in sorted(targets):
                if any(_under(target, f) for f in forbidden) and target not in ALLOWED.get(why, ()):
                    bad.append(f"{module} imports {target} ({why})")
    return sorted(bad)


def test_the_library_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_layering_rules_hold() -> None:
    bad = rule_violations(import_graph())
    assert not bad, "\n".join(bad)


def test_every_rule_names_existing_modules() -> None:
    modules = set(import_graph())
    for importer, forbidden, exempt, _ in RULES:
        for prefix in (importer, *forbidden, *exempt):
            assert any(_under(m, prefix) for m in modules), f"rule names {prefix}, which is not a clbench module"


def _write(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "clbench"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_sees_function_level_relative_and_package_imports(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "__init__.py": "",
        "config.py": "def f():\n    from clbench.methods import lora\n",
        "methods/__init__.py": "from . import lora\n",
        "methods/lora.py": "from ..config import X\n",
        "datasets/__init__.py": "",
        "datasets/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from clbench import methods\n",
        "datasets/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n"
                          "else:\n    import clbench.methods\n"),
    })
    graph = import_graph(root)
    assert graph["clbench.config"] == {"clbench.methods.lora"}
    assert graph["clbench.methods"] == {"clbench.methods.lora"}
    assert graph["clbench.methods.lora"] == {"clbench.config"}
    assert graph["clbench.datasets.a"] == set()  # typing.TYPE_CHECKING is skipped
    assert graph["clbench.datasets.b"] == {"clbench.methods"}  # the else branch runs
    assert find_cycles(graph) == [["clbench.config", "clbench.methods.lora"]]
    assert rule_violations(graph) == [
        "clbench.datasets.b imports clbench.methods (data never imports methods, the configuration layer or a "
            "setting)",
        "clbench.methods.lora imports clbench.config (methods never import the configuration layer's registry, the "
            "engine, storage or a setting)",
    ]


def test_the_settings_rules_catch_a_setting_test_in_the_engine_and_a_setting_importing_the_cli(tmp_path) -> None:
    root = _write(tmp_path, {
        "__init__.py": "", "settings/__init__.py": "from clbench.settings import clip\n",
        "settings/clip.py": "def run():\n    from clbench.cli.app import app\n",
        "settings/mcit/__init__.py": "", "settings/mcit/runner.py": "",
        "settings/mcit/setting.py": "def run():\n    from clbench.settings.mcit import runner\n",
        "settings/other.py": "def run():\n    from clbench.settings.mcit import runner\n",
        "cli/__init__.py": "", "cli/app.py": "import clbench.settings\n",
        "engine/__init__.py": "", "engine/runner.py": "def f():\n    from clbench.settings import mcit\n",
        "sweeps/__init__.py": "", "sweeps/plan.py": "def f():\n    import clbench.settings.mcit.runner\n",
    })
    bad = rule_violations(import_graph(root))
    assert [line.split(" (")[0] for line in bad] == [
        "clbench.engine.runner imports clbench.settings.mcit",
        "clbench.settings.clip imports clbench.cli.app",
        "clbench.settings.other imports clbench.settings.mcit.runner",
        "clbench.sweeps.plan imports clbench.settings.mcit.runner",
    ]


@pytest.mark.parametrize("cycle", [3])
def test_a_longer_cycle_is_one_component(tmp_path: Path, cycle: int) -> None:
    files = {"__init__.py": ""}
    for i in range(cycle):
        files[f"m{i}.py"] = f"import clbench.m{(i + 1) % cycle}\n"
    files["leaf.py"] = "import clbench.m0\n"
    graph = import_graph(_write(tmp_path, files))
    assert find_cycles(graph) == [[f"clbench.m{i}" for i in range(cycle)]]
