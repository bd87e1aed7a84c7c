"""The house's rules, checked on the source: modules import each other without cycles (imports inside functions
count), no private name crosses a module, no function runs over 100 lines, training does not reach the CLI, and
docs/internals.md maps every module there is."""

import ast
import re

from support.paths import ROOT

PACKAGE = ROOT / "moecli"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name) for every `from moecli... import name` and `import moecli...`, wherever it stands."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moecli":
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "moecli"]
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the moecli modules it imports (a name that is itself a module counts as that module)."""
    graph = {}
    for mod, tree in MODULES.items():
        deps = set()
        for target, name in _imports(tree):
            sub = f"{target}.{name}" if name else None
            deps.add(sub if sub in MODULES else target)
        graph[mod] = deps - {mod}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_crosses_a_module():
    crossing = [(mod, f"{target}.{name}") for mod, tree in MODULES.items() for target, name in _imports(tree)
                if name and name.startswith("_") and name != "__version__"]
    assert not crossing, crossing


def test_no_function_over_100_lines():
    long = [(mod, n.name, n.end_lineno - n.lineno + 1) for mod, tree in MODULES.items() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 100]
    assert not long, long


def test_the_layers_point_one_way():
    """Lower layers never import higher ones: the model and the MoE layer know nothing of formats, training or
    the CLI; training knows nothing of the commands or the CLI (its progress display is handed to it); only the
    CLI imports the CLI; export checks its output through the shared verification module, not upcycle."""
    graph = _graph()
    above = {"moecli.model": ("moecli.formats", "moecli.training", "moecli.commands", "moecli.cli", "moecli.data"),
             "moecli.moe": ("moecli.model", "moecli.formats", "moecli.training", "moecli.commands", "moecli.cli"),
             "moecli.parallel": ("moecli.model", "moecli.moe", "moecli.formats", "moecli.training", "moecli.commands",
                                 "moecli.cli"),
             "moecli.data": ("moecli.formats", "moecli.training", "moecli.commands", "moecli.cli"),
             "moecli.formats": ("moecli.training", "moecli.commands", "moecli.cli"),
             "moecli.training": ("moecli.commands", "moecli.cli"),
             "moecli.commands": ("moecli.cli",)}
    wrong = [(m, d) for m, deps in graph.items() for layer, banned in above.items() if m.startswith(layer + ".")
             for d in deps if d.startswith(banned)]
    assert not wrong, wrong
    assert "moecli.commands.upcycle" not in graph["moecli.commands.export"]


def test_internals_maps_every_module():
    """docs/internals.md lists each module of the tree (as `path/to/module.py`), and every module it lists exists."""
    text = (ROOT / "docs" / "internals.md").read_text()
    listed = set(re.findall(r"`(moecli/[\w/]+\.py)`", text))
    present = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert listed - present == set(), f"listed but missing: {sorted(listed - present)}"
    assert present - listed == set(), f"not in docs/internals.md: {sorted(present - listed)}"
