"""The package's imports run one way, subpackage by subpackage.

Read from the source (every import statement, including ones inside functions and under
``TYPE_CHECKING``), so a loop or an upward import fails here before it is held together
by a function-local import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dask_zarr_cache

PACKAGE = Path(dask_zarr_cache.__file__).parent

#: The subpackages, lowest first; a module may import from its own folder and lower ones.
#: The top (store, plugin, client, warmup, cli, ...) may import from every folder.
FOLDERS = ["core", "identity", "writes", "index", "worker", "observe", "scheduler"]
TOP = len(FOLDERS)


def rank(module: str) -> int:
    """Position of a module (``"index.shard"``, ``"store"``) in the one-way order."""
    folder = module.split(".")[0]
    return FOLDERS.index(folder) if folder in FOLDERS else TOP


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``dask_zarr_cache`` itself is ``__init__``)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "dask_zarr_cache":
                    found.add("__init__")
                elif name.startswith("dask_zarr_cache."):
                    inner = name.removeprefix("dask_zarr_cache.")
                    if (PACKAGE / (inner.replace(".", "/") + ".py")).exists():
                        found.add(inner)
        graph[module] = found - {module}
    return graph


def test_every_module_lives_in_a_known_place():
    folders = {m.split(".")[0] for m in package_imports() if "." in m}
    assert folders <= set(FOLDERS), folders - set(FOLDERS)


def test_imports_never_go_up():
    upward = [
        (module, imported)
        for module, imports in package_imports().items()
        for imported in imports
        if rank(imported) > rank(module)
    ]
    assert not upward, upward


def test_the_lower_folders_import_nothing_of_the_top():
    graph = package_imports()
    for module, imports in graph.items():
        if rank(module) < TOP:
            assert all(rank(i) < TOP for i in imports), (module, imports)


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


def test_the_package_top_reexports_only_the_public_names():
    public = set(dask_zarr_cache.__all__)
    assert {"ZarrCachePlugin", "ClusterCacheStore", "cluster_stats", "warm"} <= public
    assert all(not name.startswith("_") for name in public)
