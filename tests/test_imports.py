"""The package's import graph: arrows point one way, down the layers of
`LAYERS`, no module reaches into another's private names, and no two
modules share a file name.

Read from the source with `ast`, so a lazy import inside a function counts
like any other: hiding a cycle inside a function does not make it go away.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
PACKAGES = ("nettailor_tf", "exporters")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].endswith("__init__.py")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(imported module, names imported from it, local aliases of modules) of `module`."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    edges, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    edges.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in MODULES:  # a module imported from its package
                    edges.add(full)
                    aliases[alias.asname or alias.name] = full
                elif source in MODULES:
                    edges.add(source)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"from {source} import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    # A package's __init__ and its own submodules are one unit.
    edges.discard(module)
    return edges, private


GRAPH = {m: _imports(m)[0] for m in MODULES}


def test_the_graph_is_read():
    assert "nettailor_tf.stages.prune" in MODULES and "exporters.tflite" in MODULES
    assert "nettailor_tf.run.artifacts" in GRAPH["nettailor_tf.stages.prune"]


def test_no_import_cycle():
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            # A package importing its submodules to re-export them is not a
            # cycle when the submodules do not import the package back.
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


# The layers, lowest first: a module may import the modules of its own part
# and of the parts listed for it, never one above it.  A part is a
# subpackage of nettailor_tf (`model`, ...), `exporters`, or a module of its
# own at the top.  Each subpackage's __init__ says the same in words.
_BELOW_RUN = {"common", "settings", "data", "model", "latency", "exporters"}
LAYERS = {
    "common": set(),                      # errors, atomic files, quiet start-up
    "nettailor_tf.cpu_kernels": set(),    # imported first, before TensorFlow
    "nettailor_tf.decathlon": {"common"},  # the challenge's domains and score
    "data": {"common"},
    "exporters": {"common"},
    "settings": {"common", "nettailor_tf.decathlon"},
    "model": {"common", "settings"},
    "training": {"common", "settings", "data", "model"},
    "latency": {"common", "settings", "model", "exporters"},
    "run": _BELOW_RUN,
    "stages": _BELOW_RUN | {"run", "training", "nettailor_tf.decathlon"},
    "nettailor_tf.image_files": {"common"},
    "nettailor_tf.inference": {"common", "exporters", "nettailor_tf.image_files"},
}
# The commands (and the package's __init__) sit on top: they may import
# anything, and nothing imports them.
ENTRY_POINTS = {"nettailor_tf", "nettailor_tf.main", "nettailor_tf.predict",
                "nettailor_tf.decathlon_results"}


def _part(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "exporters":
        return "exporters"
    if len(parts) > 2 or (len(parts) == 2 and MODULES[module].endswith("__init__.py")):
        return parts[1]
    return module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    part = _part(module)
    assert part in LAYERS or module in ENTRY_POINTS, (
        f"{module} is in no layer: place it in a subpackage or add it to LAYERS")
    if module in ENTRY_POINTS:
        return
    upward = sorted(target for target in GRAPH[module]
                    if _part(target) != part and _part(target) not in LAYERS[part])
    assert not upward, (f"{module} ({part}) imports {upward}; {part} may import only "
                        f"{sorted(LAYERS[part])}")


def test_no_two_modules_share_a_file_name():
    """`prune.py` beside `stages/prune.py` made every importer alias one of
    them; a package counts under its folder's name."""
    owners = {}
    for module, path in MODULES.items():
        name = module.split(".")[-1]
        owners.setdefault(name, []).append(module)
    shared = {name: found for name, found in owners.items() if len(found) > 1}
    assert not shared, f"modules sharing a name: {shared}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_of_another_module(module):
    _, private = _imports(module)
    assert not private, f"{module} uses private names of other modules: {private}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    with open(MODULES[module], encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    assert lines <= 500, f"{module} has {lines} lines; split it by idea"


# Where a function may import a project module or TensorFlow: the two
# commands' start, which answers --help and flag errors before TensorFlow
# loads (seconds) and filters its start-up notices.
LAZY_START = {"nettailor_tf.main": {"main", "_strategy"}, "nettailor_tf.predict": {"main"}}
HEAVY = ("tensorflow", "keras")


def _function_imports(module: str):
    """(function, imported module) of every import inside a function."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield function.name, alias.name
            elif isinstance(node, ast.ImportFrom):
                yield function.name, _resolve(module, node)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_imports_a_project_module_or_tensorflow(module):
    """A lazy import hides a cycle or a start-up cost; fix the cause instead."""
    allowed = LAZY_START.get(module, set())
    found = [f"{function}: {target}" for function, target in _function_imports(module)
             if function not in allowed
             and (target.split(".")[0] in PACKAGES + HEAVY)]
    assert not found, f"{module} imports inside functions: {found}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_fit_in_a_readers_head(module):
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, f"{module} has functions over 80 lines: {long}; split them by step"

