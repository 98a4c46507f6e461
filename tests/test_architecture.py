"""The one-way flow of the packages (docs/ARCHITECTURE.md): no module imports one of a
later stage, not even inside a function, and every module has its place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "s2ft_cli"
# Stages in the order a recipe flows through them; a module may import its own stage and
# earlier ones. The adapter format comes before training, which writes adapters; export
# reads a training run's checkpoints and writes adapters, so it follows training.
STAGES = [
    ["version", "errors", "files", "tables"],  # shared by every stage
    ["data"],  # records, templates, tokenization, batches
    ["engine"],  # targets, models, selection, permutation, S² layers, conversion, state
    ["adapter"],  # fingerprint, files, PEFT format, run-time operations, combine, serving
    ["recipe"],  # the recipe's schema
    ["training"],  # trainer, checkpoints, metrics, methods, processes, quantization, plan
    ["export"],
    ["evaluation"],
    ["cli", "__main__", ""],  # "": the package's __init__ (the library API)
]
STAGE = {name: k for k, names in enumerate(STAGES) for name in names}


def stage(module: str) -> int:
    """The stage of ``s2ft_cli.x.y`` (by its first part)."""
    return STAGE[module.removeprefix("s2ft_cli").lstrip(".").split(".")[0]]


def imports_of(path: Path, package: Path = PACKAGE) -> tuple[str, list[str]]:
    """A module's dotted name and the s2ft_cli modules it imports, anywhere in it."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    home = (name if parts[-1] == "__init__" else name.rpartition(".")[0]).split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = home[: len(home) - node.level + 1]
            if node.module:
                found.append(".".join([*base, node.module]))
            else:
                found += [".".join([*base, alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("s2ft_cli"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("s2ft_cli")]
    return name, found


def test_no_module_imports_a_later_stage():
    backwards = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name, found = imports_of(path)
        for target in found:
            if stage(target) > stage(name):
                backwards.append(f"{name} imports {target}")
    assert not backwards


def root_imports(found: list[str], package: Path = PACKAGE) -> list[str]:
    """Names taken from the package root: imported targets that are no module of it (the
    checker names ``from . import __version__`` ``s2ft_cli.__version__``)."""

    def is_module(target: str) -> bool:
        path = package.parent.joinpath(*target.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    return [t for t in found if not is_module(t)]


def test_no_module_imports_the_package_root():
    """The root holds the library API, which imports every stage: a module importing it
    (even for ``__version__``) would import all the stages above its own."""
    importers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, found = imports_of(path)
        if name != "s2ft_cli" and root_imports(found):
            importers[name] = root_imports(found)
    assert importers == {}


def test_the_checker_sees_an_import_of_the_root(tmp_path):
    module = tmp_path / "s2ft_cli" / "evaluation" / "runner.py"
    module.parent.mkdir(parents=True)
    module.write_text("from .. import __version__\nfrom . import decoding\n")
    (module.parent / "decoding.py").write_text("")
    name, found = imports_of(module, tmp_path / "s2ft_cli")
    assert root_imports(found, tmp_path / "s2ft_cli") == ["s2ft_cli.__version__"]


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "s2ft_cli" / "recipe.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from .evaluation.tasks import resolve_tasks\n")
    name, found = imports_of(module, module.parent)
    assert name == "s2ft_cli.recipe" and found == ["s2ft_cli.evaluation.tasks"]
    assert stage(found[0]) > stage(name)


def test_every_module_has_a_stage():
    for path in PACKAGE.rglob("*.py"):
        name, _ = imports_of(path)
        stage(name)  # a KeyError names a module the stages do not place


def import_cycles(package: Path = PACKAGE) -> set[frozenset[str]]:
    """The strongly connected groups of modules (two or more) of the import graph: modules
    that import each other, directly or through others."""
    graph = {}
    for path in sorted(package.rglob("*.py")):
        name, found = imports_of(path, package)
        graph[name] = {t for t in found if t != name}
    index, low, stack, on_stack, groups = {}, {}, [], set(), set()

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.add(frozenset(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles():
    assert import_cycles() == set()


def test_the_cycle_finder_finds_a_cycle_through_three_modules(tmp_path):
    package = tmp_path / "s2ft_cli"
    package.mkdir()
    for name, target in (("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")):
        (package / f"{name}.py").write_text(f"def f():\n    from .{target} import x\n")
    assert import_cycles(package) == {frozenset({"s2ft_cli.a", "s2ft_cli.b", "s2ft_cli.c"})}
