"""The package's layers stay true: each module imports only its own layer and those below, and nothing imports in a
cycle. Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from classifier.model.pyfunc import serving_requirements

PACKAGE = Path(__file__).resolve().parents[1] / "classifier"

# From the ground up; a module may import its own layer and every layer before it. Siblings on one rung (evaluation,
# serving, tune) are separate layers that may not import each other.
LAYERS: list[set[str]] = [
    {
        "classifier",
        "classifier.errors",
        "classifier.config",
        "classifier.console",
        "classifier.stopping",
        "classifier.processes",
    },
    {"classifier.data"},
    {"classifier.measure"},
    {"classifier.nets"},
    {"classifier.tracking"},
    {"classifier.model", "classifier.pyfunc"},  # classifier.pyfunc: the alias that models of the flat layout import
    {"classifier.learn"},
    {"classifier.evaluation"},
    {"classifier.serving"},
    {"classifier.tune"},
    {"classifier.cli"},
]
SIBLINGS = {"classifier.evaluation", "classifier.serving", "classifier.tune"}
CLI = "classifier.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer a module belongs to: its longest prefix named in LAYERS."""
    names = {name for layer in LAYERS for name in layer}
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in names:
            return ".".join(parts[:end])
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS")


def rank(layer: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if layer in names)


def imports(path: Path) -> Iterator[tuple[str, bool]]:
    """The classifier modules a file imports, each with whether the import is at module level."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = list(dict.fromkeys(name if name in MODULES else node.module for name in submodules))
        for name in names:
            if name in MODULES:
                yield name, id(node) in top_level


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_no_layer_above_its_own(module):
    own = layer_of(module)
    wrong = sorted(
        name
        for name, _ in imports(MODULES[module])
        if rank(layer_of(name)) > rank(own)
        or (layer_of(name) in SIBLINGS and layer_of(name) != own and own in SIBLINGS)
    )
    assert not wrong, f"{module} ({own}) imports {', '.join(wrong)} from a layer above or beside it"


def test_nothing_imports_the_cli():
    importers = [
        module for module, path in MODULES.items() if any(name == "classifier.cli" for name, _ in imports(path))
    ]
    assert importers == []


def test_imports_form_no_cycle():
    graph = {module: {name for name, _ in imports(path) if name != module} for module, path in MODULES.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail("import cycle: " + " -> ".join(error.args[1]))


def test_the_checker_sees_lazy_imports(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("from classifier import tracking\n\n\ndef late():\n    from classifier.tune.search import search\n")
    assert list(imports(lazy)) == [("classifier.tracking", True), ("classifier.tune.search", False)]


@pytest.fixture(scope="module")
def served_model_modules() -> set[str]:
    """The modules a fresh process has loaded once it has loaded the logged model's code."""
    script = "import sys, classifier.model.served_model; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))


def test_the_served_model_imports_neither_tracking_nor_optuna(served_model_modules):
    """`mlflow models serve` installs only the serving requirements: the logged model's code must not need more."""
    assert {"classifier.tracking", "optuna"} & served_model_modules == set()


def with_dependencies(packages: set[str]) -> set[str]:
    """`packages` and everything they require when installed (no extras), by their installed metadata."""
    seen: set[str] = set()
    waiting = [canonicalize_name(name) for name in packages]
    while waiting:
        name = waiting.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # not installed here: nothing comes with it
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                waiting.append(canonicalize_name(requirement.name))
    return seen


def packages_imported_by(path: Path) -> set[str]:
    """The top-level names of every module a file imports (lazily too), other than the package itself."""
    tree = ast.parse(path.read_text(), str(path))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    return {name.split(".")[0] for name in names if name} - {"classifier"}


def test_the_serving_requirements_name_every_package_the_served_model_imports(served_model_modules):
    """A model served in a fresh environment gets only `serving_requirements()` installed: each package that the
    modules loading the model's code imports must come with them."""
    loaded = served_model_modules & set(MODULES)
    imported = set().union(*(packages_imported_by(MODULES[name]) for name in loaded))
    owners = metadata.packages_distributions()  # a namespace package (nvidia) has several; one of them is enough
    installed = with_dependencies({Requirement(line).name for line in serving_requirements()})
    missing = sorted(
        name for name in imported & set(owners) if not installed & {canonicalize_name(o) for o in owners[name]}
    )
    assert missing == []
