"""The study and launch packages are layered: no module imports one that imports it back, directly or through
others (imports inside functions count), and the launcher knows nothing of studies."""

from __future__ import annotations

import ast
from pathlib import Path

import colorize_dist

PACKAGE = Path(colorize_dist.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every colorize_dist module → the colorize_dist modules it imports, wherever in the file."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_study_or_launch_module_imports_itself_back() -> None:
    graph = import_graph()
    ours = [name for name in graph if name.startswith(("colorize_dist.study.", "colorize_dist.launch."))]
    assert "colorize_dist.study.status" in ours and "colorize_dist.launch.slurm" in ours
    cycles = {name: sorted(target for target in graph[name] if name in reachable(graph, target)) for name in ours}
    assert {name: back for name, back in cycles.items() if back} == {}


def test_the_launcher_imports_nothing_of_studies() -> None:
    graph = import_graph()
    launch = [name for name in graph if name.startswith("colorize_dist.launch")]
    assert {name: sorted(target for target in reachable(graph, name) if target.startswith("colorize_dist.study"))
            for name in launch} == {name: [] for name in launch}
