"""The package's shape, drawn from its imports: floors point down, no circles, small rooms, a short top level."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cityseg"
MAP = REPO / "docs" / "architecture.md"  # the picture: its module table gives every room its floor
FLOORS = ("leaves", "parts", "setup", "loops", "entry")  # bottom to top
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_TOP_MODULES = 400, 60, 8


def mapped_floors() -> dict[str, str]:
    """room (a path under cityseg/) -> its floor, as docs/architecture.md's module table draws it."""
    rows = re.findall(r"^\|\s*`cityseg/([\w/]+\.py)`\s*\|\s*(\w+)\s*\|", MAP.read_text(), re.M)
    return dict(rows)


def floor_of(room: str) -> tuple[int, str]:
    name = mapped_floors().get(room)
    assert name in FLOORS, f"{MAP.name}: cityseg/{room} is on floor {name!r}, not one of {', '.join(FLOORS)}"
    return FLOORS.index(name), name


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
                # `from cityseg import checkpoint` names the module, not the package's __init__
                package = [node.module] if node.module != "cityseg" else []
                targets = package + [f"{node.module}.{alias.name}" for alias in node.names]
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


def test_the_map_names_every_room_and_no_other():
    on_disk, drawn = set(rooms()), set(mapped_floors())
    assert on_disk - drawn == set(), f"{MAP}: add a row | `cityseg/<room>` | <floor> | <role> | for each"
    assert drawn - on_disk == set(), f"{MAP}: rows of rooms that do not exist"


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
    """The checks above on a drawn graph (a circle) and on the map (the loop stands above its step and the config)."""
    assert cycles({"a.py": {"b.py"}, "b.py": {"a.py"}, "c.py": set()}) == [["a.py", "b.py"]]
    assert floor_of("train/loop.py")[0] > floor_of("train/setup.py")[0] > floor_of("train/step.py")[0] \
        > floor_of("config/schema.py")[0]


def untimed_waits(source: str) -> list[int]:
    """Lines of `subprocess.run/call/check_call/check_output(...)` calls without a timeout= (a hung child hangs us)."""
    waits = ("run", "call", "check_call", "check_output")
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in waits
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
            and not any(keyword.arg == "timeout" for keyword in node.keywords)]


def test_every_subprocess_wait_has_a_timeout():
    assert untimed_waits("import subprocess\nsubprocess.run(['ls'], timeout=5)\nsubprocess.run(\n  ['ls'])\n") == [3]
    found = [f"{path.relative_to(REPO)}:{line}" for folder in ("cityseg", "launch", "tests")
             for path in sorted((REPO / folder).rglob("*.py")) for line in untimed_waits(path.read_text())]
    assert found == []
