"""The package's shape, drawn from its imports: floors point down, no circles, small rooms, a short top level."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cityseg"
# floor of each room (a module path relative to cityseg/, or a folder/ for all its modules); higher imports lower
FLOORS = {
    "entry": (5, ["__main__.py", "cli.py", "commands.py", "bench/"]),
    "loops": (4, ["train/loop.py", "evaluation/evaluate.py", "evaluation/predict.py", "api.py"]),
    "setup": (3, ["train/setup.py", "train/preflight.py", "observe/trackers.py"]),
    "parts": (2, ["train/", "model/", "data/", "evaluation/", "distributed/", "observe/", "checkpoint.py"]),
    # tables that import nothing: the config's schema and the names it checks against (classes, architectures)
    "leaves": (1, ["config/", "labels.py", "model/names.py", "__init__.py"]),
}
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_TOP_MODULES = 400, 60, 8


def floor_of(room: str) -> tuple[int, str]:
    """The most specific entry wins: train/loop.py is on the loops floor, the rest of train/ on the parts floor."""
    best = None
    for name, (level, places) in FLOORS.items():
        for place in places:
            if room == place or (place.endswith("/") and room.startswith(place)):
                if best is None or len(place) > best[0]:
                    best = (len(place), level, name)
    assert best is not None, f"cityseg/{room}: on no floor of tests/test_house.py: give it one"
    return best[1], best[2]


def rooms() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        room = path.relative_to(PACKAGE).as_posix()
        if room.endswith("/__init__.py"):
            assert not ast.parse(path.read_text()).body[1:], f"cityseg/{room}: a folder's __init__ holds a docstring only"
            continue
        found[room] = path
    return found


def module_room(module: str, known: dict[str, Path]) -> str | None:
    """cityseg.train.loop -> train/loop.py; cityseg.train (a folder) -> None."""
    if module != "cityseg" and not module.startswith("cityseg."):
        return None
    parts = module.split(".")[1:]
    candidate = "/".join(parts) + ".py" if parts else "__init__.py"
    return candidate if candidate in known else None


def arrows() -> dict[str, set[str]]:
    """room -> the rooms it imports (also imports inside functions: they are arrows all the same)."""
    known = rooms()
    graph = {room: set() for room in known}
    for room, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                imported = module_room(target, known)
                if imported and imported != room:
                    graph[room].add(imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one room (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    assert cycles(arrows()) == []


def test_imports_point_down_the_floors():
    upward = []
    for room, targets in arrows().items():
        level, name = floor_of(room)
        for target in targets:
            target_level, target_name = floor_of(target)
            if target_level > level:
                upward.append(f"{room} ({name}) imports {target} ({target_name})")
    assert upward == []


def test_leaves_import_only_leaves():
    graph = arrows()
    leaves = [room for room in graph if floor_of(room)[1] == "leaves"]
    above = {room: sorted(target for target in graph[room] if floor_of(target)[1] != "leaves") for room in leaves}
    assert leaves and not any(above.values()), above


def test_top_level_holds_entry_points_and_the_public_api_only():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_rooms_are_small_and_say_what_they_are():
    problems = []
    for room, path in rooms().items():
        text = path.read_text()
        tree = ast.parse(text)
        if len(text.splitlines()) > MAX_FILE_LINES:
            problems.append(f"cityseg/{room}: {len(text.splitlines())} lines")
        if ast.get_docstring(tree) is None:
            problems.append(f"cityseg/{room}: no module docstring")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"cityseg/{room}:{node.lineno} {node.name}: {length} lines")
    assert problems == []


def test_the_checks_see_a_circle_and_an_upward_arrow():
    """The checks above on a drawn graph: a circle and an arrow from the parts floor up to the loops floor."""
    assert cycles({"a.py": {"b.py"}, "b.py": {"a.py"}, "c.py": set()}) == [["a.py", "b.py"]]
    assert floor_of("train/loop.py")[0] > floor_of("train/step.py")[0] > floor_of("config/schema.py")[0]
