import subprocess
import sys
from pathlib import Path

import ctdiff

PACKAGE = Path(ctdiff.__file__).parent


def test_library_never_imports_prefect():
    modules = sorted(f"ctdiff.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert "ctdiff.store" in modules and "ctdiff.dicom" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _graph(package: str) -> dict[str, tuple[str, ...]]:
    """Module -> the modules of `package` it imports anywhere (ctdiff.fingerprint's reading)."""
    from ctdiff import fingerprint

    root = Path(ctdiff.__file__).parent.parent / package
    names = [f"{package}.{p.stem}" for p in sorted(root.glob("*.py")) if p.stem != "__init__"]
    if package == "ctdiff":
        return {name: fingerprint._local_imports(name) for name in names}
    import ast

    graph = {}
    for name in names:
        tree = ast.parse((root / f"{name.split('.')[1]}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{package}."):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith(f"{package}."))
        graph[name] = tuple(sorted(found))
    return graph


def test_library_modules_import_each_other_without_cycles():
    graph = _graph("ctdiff")
    assert "ctdiff.store" not in graph["ctdiff.latents"]
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in graph.get(name, ()):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [name, nxt])}"
            if nxt not in state:
                visit(nxt, path + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


SHARED_TASK_MODULES = {"tasks.training", "tasks.progress", "tasks.runners", "tasks.checkpoints"}


def test_task_modules_of_one_step_never_import_another_step():
    for name, imports in _graph("tasks").items():
        steps = set(imports) - SHARED_TASK_MODULES
        assert not steps, f"{name} imports {sorted(steps)}: ask ctdiff.layout for paths, share via a shared module"


def test_only_the_layout_module_spells_the_work_folder():
    """Folder names of SPEC §4 appear in ctdiff.layout only, not in tasks or flows."""
    repo = Path(ctdiff.__file__).parent.parent
    for folder in ("tasks", "flows"):
        for path in (repo / folder).glob("*.py"):
            text = path.read_text()
            for name in ("checkpoints", "latents", "reports", "history.jsonl", "previews"):
                assert f'/ "{name}"' not in text, f"{path.name} builds the path of {name}: use ctdiff.layout.WorkLayout"
