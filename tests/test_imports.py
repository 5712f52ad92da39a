"""The package's imports run one way: core <- worker <- scheduler <- plugin/store <- CLI.

Read from the source (every import statement, including ones inside functions and under
``TYPE_CHECKING``), so a loop or an upward import fails here before it is held together
by a function-local import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dask_zarr_cache

PACKAGE = Path(dask_zarr_cache.__file__).parent

#: Each module's layer; a module may import only from its own layer or lower ones.
LAYERS = {
    "_names": 0,
    "_exceptions": 0,
    "_protocol": 0,
    "_stats": 0,
    "_config": 0,
    "_keys": 0,
    "_identity": 0,
    "_invalidation": 0,
    "_admission": 0,
    "_budget": 0,
    "_shards": 0,
    "_table": 0,
    "_coalescing": 0,
    "_index": 0,
    "_index_host": 0,
    "_private_dir": 0,
    "_disk": 0,
    "_local": 0,
    "_loops": 0,
    "_departures": 0,
    "_index_client": 1,
    "_guarded_disk": 1,
    "_peers": 1,
    "_worker": 1,
    "_history": 2,
    "_prometheus": 2,
    "dashboard": 2,
    "_scheduler": 2,
    "_index_shards": 2,
    "_plugin": 3,
    "_announce": 3,
    "_store": 3,
    "_client": 3,
    "_warm": 3,
    "__init__": 3,
    "preload": 3,
    "testing": 3,
    "_placement": 2,
    "_demo": 4,
    "cli": 4,
}


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``dask_zarr_cache`` itself is ``__init__``)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "dask_zarr_cache":
                    found.add("__init__")
                elif name.startswith("dask_zarr_cache."):
                    found.add(name.split(".")[1])
        graph[path.stem] = found - {path.stem}
    return graph


def test_every_module_has_a_layer():
    assert set(package_imports()) <= set(LAYERS), set(package_imports()) - set(LAYERS)


def test_imports_never_go_up_a_layer():
    upward = [
        (module, imported)
        for module, imports in package_imports().items()
        for imported in imports
        if LAYERS[imported] > LAYERS[module]
    ]
    assert not upward, upward


def test_there_is_no_import_loop():
    graph = package_imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
