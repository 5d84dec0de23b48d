"""The package's shape: folders in data-flow order, each importing only from the folders
before it (or from within itself), no import cycle, no module over 350 lines. Lazy imports
inside functions and imports for type checking count: they are dependencies all the same."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "torch_tpu_estimator")
# Data-flow order, lowest first: a module may import from its own folder and from the folders
# before it. "" is the package's top level (the facade: TPUEstimator, train_and_evaluate).
LAYERS = ("common", "api", "runtime", "input", "state", "observability", "step", "export",
          "modes", "cli", "")
MAX_LINES = 350


def _modules() -> dict[str, str]:
    """Dotted module name (without the package) -> file."""
    found = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__").removesuffix("__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The package's modules that `module` imports, wherever in the file."""
    path = MODULES[module]
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = [part for part in package[:len(package) - node.level + 1] if part]
            target = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module and node.module.split(".")[0] == "torch_tpu_estimator":
            target = node.module.partition(".")[2]
        else:
            continue
        for alias in node.names:
            found.add(f"{target}.{alias.name}".strip(".") if f"{target}.{alias.name}".strip(".")
                      in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int:
    folder = module.split(".")[0] if "." in module or module in LAYERS else ""
    return LAYERS.index(folder)


def test_every_folder_has_its_place_in_the_order():
    folders = {name for name in os.listdir(PACKAGE)
               if os.path.isfile(os.path.join(PACKAGE, name, "__init__.py"))}
    assert folders == set(LAYERS) - {""}


def test_no_module_imports_from_a_later_folder():
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items()
                    for target in targets if _layer(target) > _layer(module))
    assert upward == []


def test_no_import_cycle():
    visiting, done, cycles = [], set(), []

    def visit(module: str) -> None:
        visiting.append(module)
        for target in sorted(GRAPH[module]):
            if target in visiting:
                cycles.append(" -> ".join(visiting[visiting.index(target):] + [target]))
            elif target not in done:
                visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        if module not in done:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_350_lines(module):
    with open(MODULES[module]) as handle:
        assert sum(1 for _ in handle) <= MAX_LINES


def test_importing_the_package_leaves_torch_xla_unimported():
    """Plain PyTorch users need no torch_xla, and torch_xla's import configures logging
    (logging.basicConfig): it is imported when an XLA runtime starts, not before."""
    done = subprocess.run([sys.executable, "-c", "import sys, torch_tpu_estimator; "
                           "print('torch_xla' in sys.modules)"], capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.strip() == "False"
