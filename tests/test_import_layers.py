"""Imports point down: no module of bit_keras imports one of a higher layer (CONTRIBUTING.md, "Which way imports
point"), at module level or inside a function. Read from the source with `ast`, nothing imported."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bit_keras"
# Layer of each part of the package. The base's modules import one another; training and serving share a layer and
# must not import each other.
LAYERS = {
    "defaults": 0,
    "checks": 0,
    "files": 0,
    "startup": 0,
    "options": 0,
    "models": 1,
    "weights": 1,
    "data": 2,
    "training": 3,
    "serving": 3,
    "detection": 4,
    "cli": 5,
    "": 5,  # bit_keras/__init__.py: the public names
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """`bit_keras.models.zoo` -> "models"; `bit_keras` -> ""."""
    return module.split(".")[1] if "." in module else ""


def imports(path: pathlib.Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every bit_keras module `path` imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "bit_keras"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bit_keras":
            for alias in node.names:  # `from bit_keras.models import zoo` imports bit_keras.models.zoo
                full = f"{node.module}.{alias.name}"
                found.append((node.lineno, full if full in modules else node.module))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path) for path in SOURCES}


def violations(sources=SOURCES, modules=MODULES) -> list[str]:
    found = []
    for path in sources:
        importer = module_name(path)
        for line, imported in imports(path, modules):
            mine, theirs = part(importer), part(imported)
            if mine == theirs or (imported == "bit_keras" and importer == "bit_keras.cli"):
                continue  # within a package; the command loads the package's public names
            if LAYERS[theirs] > LAYERS[mine] or LAYERS[theirs] == LAYERS[mine] > 0:  # the base is one layer
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} imports {imported}")
    return found


def test_every_part_has_a_layer():
    assert {part(m) for m in MODULES} <= set(LAYERS)


def test_imports_point_down():
    assert violations() == []


def test_an_upward_import_is_caught(tmp_path):
    low = tmp_path / "bit_keras" / "models" / "planted.py"
    low.parent.mkdir(parents=True)
    low.write_text("def f():\n    from bit_keras.serving import predict\n")
    side = tmp_path / "bit_keras" / "serving" / "planted.py"
    side.parent.mkdir(parents=True)
    side.write_text("import bit_keras.training.engine\n")
    modules = MODULES | {"bit_keras.serving.predict"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "bit_keras"
    try:
        found = violations([low, side], modules)
    finally:
        PACKAGE = saved
    assert found == [
        "bit_keras/models/planted.py:2: bit_keras.models.planted imports bit_keras.serving.predict",
        "bit_keras/serving/planted.py:1: bit_keras.serving.planted imports bit_keras.training.engine",
    ]


@pytest.mark.parametrize("module", ["bit_keras.models.zoo", "bit_keras.models.bit", "bit_keras.serving.export"])
def test_no_module_imports_itself_back(module):
    """The modules that once formed loops (bit <-> zoo, serving -> detection) reach nothing that imports them."""
    graph = {module_name(p): {m for _, m in imports(p, MODULES) if m in MODULES} for p in SOURCES}
    seen, todo = set(), list(graph[module])
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += graph.get(current, ())
    assert module not in seen
