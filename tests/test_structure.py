"""The layers of the house: every import of every product module, read with ``ast`` (also the
imports inside functions and under ``TYPE_CHECKING``), goes down the layers

    contrastive_saliency → datamodules → lightning_modules → callbacks
                         → experiments, benchmarks, entry points

(a module may import its own layer and the layers to its left), and no product modules import
each other in a cycle. Failures name the offending import with its file and line."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LAYERS = {
    "contrastive_saliency": 0,
    "datamodules": 1,
    "lightning_modules": 2,
    "callbacks": 3,
    "experiments": 4,
    "benchmarks": 4,
    "train": 4,
    "evaluate": 4,
}
"""Layer of each top-level product package or entry-point module; higher may import lower."""


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``imported`` (both dotted module names) at ``file``:``line``."""

    importer: str
    imported: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.importer} imports {self.imported}"


def product_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file of every product module under ``root`` (packages by ``__init__``)."""
    modules = {}
    for top in LAYERS:
        files = [root / f"{top}.py"] if (root / f"{top}.py").is_file() else []
        files += sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []
        for path in files:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """The product modules ``name`` imports: ``import a.b`` and ``from a import b`` name the
    module ``a.b`` when it exists, else the nearest enclosing product module (a package's
    ``__init__``); relative imports are resolved against ``name``'s package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                file = str(path.relative_to(root))
                found.append(Import(name, target, file, node.lineno))
    return found


def import_graph(root: Path) -> list[Import]:
    modules = product_modules(root)
    return [
        edge for name, path in modules.items() for edge in imports_of(name, path, modules, root)
    ]


def upward_imports(edges: list[Import]) -> list[str]:
    """Imports of a module of a higher layer than the importer's, explained."""
    wrong = []
    for edge in edges:
        have, want = edge.importer.split(".")[0], edge.imported.split(".")[0]
        if LAYERS[want] > LAYERS[have]:
            wrong.append(
                f"{edge}: layer {have} ({LAYERS[have]}) must not import layer {want} "
                f"({LAYERS[want]}); move the shared code down or hand the object in from above"
            )
    return wrong


def import_cycles(edges: list[Import]) -> list[str]:
    """Each cycle of module imports, as the chain of imports that closes it (one per cycle
    through the modules of a strongly connected component, found by depth-first search)."""
    graph: dict[str, list[Import]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, []).append(edge)
    cycles, state, reported = [], {}, set()
    path: list[Import] = []

    def visit(module: str) -> None:
        state[module] = "open"
        for edge in graph.get(module, []):
            target = edge.imported
            if state.get(target) == "open":
                walk = [*path, edge]
                chain = walk[next(i for i, e in enumerate(walk) if e.importer == target) :]
                members = frozenset(e.importer for e in chain)
                if members not in reported:
                    reported.add(members)
                    cycles.append(" → ".join(str(e) for e in chain))
            elif target not in state:
                path.append(edge)
                visit(target)
                path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_imports_only_go_down_the_layers():
    wrong = upward_imports(import_graph(REPO))
    assert not wrong, "imports going up the layers:\n" + "\n".join(wrong)


def test_no_import_cycle_among_product_modules():
    cycles = import_cycles(import_graph(REPO))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_every_product_package_and_function_level_imports():
    edges = import_graph(REPO)
    importers = {edge.importer.split(".")[0] for edge in edges}
    assert set(LAYERS) <= importers  # every layer imports something of ours
    # evaluate.py imports only inside main(): found all the same
    assert any(e.importer == "evaluate" and e.imported.startswith("callbacks") for e in edges)


def test_the_checks_name_a_cycle_and_an_upward_import(tmp_path):
    """The checks themselves on a small tree with one cycle through a function-level import
    and one upward import (as main had: datamodules.quad_grid → lightning_modules.evaluation →
    … → datamodules.quad_grid)."""
    files = {
        "contrastive_saliency/__init__.py": "",
        "contrastive_saliency/core.py": "import torch\n",
        "datamodules/__init__.py": "from datamodules.grid import Grid\n",
        "datamodules/grid.py": (
            "from contrastive_saliency import core\n\n"
            "def load():\n    from lightning_modules.loading import load_model\n"
        ),
        "lightning_modules/__init__.py": "",
        "lightning_modules/loading.py": "from . import probe\n",
        "lightning_modules/probe.py": "from ..datamodules.grid import Grid\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_graph(tmp_path)
    (wrong,) = upward_imports(edges)
    assert wrong.startswith(
        "datamodules/grid.py:4: datamodules.grid imports lightning_modules.loading"
    )
    (cycle,) = import_cycles(edges)
    assert cycle.count(" imports ") == 3
    for module in ("datamodules.grid", "lightning_modules.loading", "lightning_modules.probe"):
        assert module in cycle


def test_the_evaluation_names_no_method():
    """What the evaluation must know of a method is declared on the method class
    (``batch_fields``, ``class_agnostic``, ``base_option``, ``per_call_class_set``); no callback
    compares a method's name with a literal (``spec.name != "var"``, ``.eq("var")``)."""
    from contrastive_saliency.methods import list_methods

    names = set(list_methods())
    found = []
    for path in sorted((REPO / "callbacks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in {"eq", "ne"}:
                operands = list(node.args)
            else:
                continue
            found += [
                f"{path.relative_to(REPO)}:{node.lineno}: {operand.value!r}"
                for operand in operands
                if isinstance(operand, ast.Constant) and operand.value in names
            ]
    assert not found, "callbacks name methods:\n" + "\n".join(found)


def _imports_lightning(path: Path) -> int | None:
    """The line of ``path``'s first import of ``lightning`` (or ``pytorch_lightning``), if any."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n.split(".")[0] in {"lightning", "pytorch_lightning"} for n in names):
            return node.lineno
    return None


def test_the_evaluation_engine_and_its_checks_need_no_lightning():
    """The evaluation package's engine (methods, per-batch maps and metrics), specs, target
    policies, config checks, sanity check, result keys, result assembly and tables import no
    Lightning, neither themselves nor through any product module they import; only
    ``callback.py`` (the hooks) does."""
    modules = product_modules(REPO)
    graph: dict[str, list[str]] = {}
    for edge in import_graph(REPO):
        graph.setdefault(edge.importer, []).append(edge.imported)
    found, walked = [], {}
    roots = [
        "engine",
        "checks",
        "sanity",
        "results",
        "spec",
        "target_policies",
        "tables",
        "randomisation",
        "keys",
    ]
    for root in roots:
        seen, todo = set(), [f"callbacks.evaluation.{root}"]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            line = _imports_lightning(modules[module])
            if line is not None:
                found.append(f"{modules[module].relative_to(REPO)}:{line} (from {root})")
            todo += graph.get(module, [])
        walked[root] = seen
    assert "callbacks.evaluation.spec" in walked["engine"]  # the walk follows product imports
    assert not found, "Lightning imported by the engine side:\n" + "\n".join(found)
    assert _imports_lightning(REPO / "callbacks/evaluation/callback.py") is not None


def test_the_evaluation_and_the_other_callbacks_import_no_paper_analysis():
    """The papers' analyses (``callbacks/analyses/``) sit beside the saliency evaluation: they
    may use it (the CAAP sweeps parse metric specs with ``callbacks.evaluation.spec``), but no
    other callback module imports them, so the evaluation runs without any analysis; and the
    package's ``__init__`` imports none of them, so a script that wants one analysis's figure
    builder (``experiments/channel_activity_kde.py``) loads only that module."""
    edges = import_graph(REPO)
    inside = [e for e in edges if e.importer.startswith("callbacks.analyses.")]
    assert {e.importer for e in inside} >= {
        "callbacks.analyses.channel_activity",
        "callbacks.analyses.classifier_similarity",
        "callbacks.analyses.cluscam_selection",
        "callbacks.analyses.caap_sweeps",
    }
    wrong = [
        str(e)
        for e in edges
        if e.importer.startswith("callbacks")
        and not e.importer.startswith("callbacks.analyses.")  # the package's __init__ counts
        and e.imported.startswith("callbacks.analyses")
    ]
    assert not wrong, "callbacks importing the paper analyses:\n" + "\n".join(wrong)
