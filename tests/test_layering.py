"""Layering (issue 13, README "How it works"): imports among runner modules point one
way. Every import in runner/, at module level or inside a function, is read with ast;
the graph must have no cycle, and a module imports another runner module inside a
function only where the README's layer table allows it (none may: function-level
imports are for heavy third-party modules)."""

from __future__ import annotations

import ast
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "runner"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(RUNNER.rglob("*.py")):
        parts = p.relative_to(RUNNER.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported runner module, inside a function) for every import."""

    def resolve(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    found = []
    for mod, path in mods.items():
        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend((mod, resolve(a.name), in_function) for a in child.names if a.name.split(".")[0] == "runner")
                elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "runner":
                    for a in child.names:
                        full = f"{child.module}.{a.name}"
                        found.append((mod, full if full in mods else resolve(child.module), in_function))
                visit(child, nested)

        visit(ast.parse(path.read_text(), str(path)), False)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_function_level_imports_and_cycles():
    """The checker itself, on a graph it must reject: a -> b at module level, b -> a
    inside a function."""
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = "import json\n\ndef f():\n    from runner.plan import ReadItem\n"
    node = ast.parse(tree)
    fn = node.body[1]
    assert isinstance(fn.body[0], ast.ImportFrom) and fn.body[0].module == "runner.plan"


def test_no_import_cycle_among_runner_modules():
    mods = modules()
    found = imports(mods)
    assert len(found) > 100  # the walk reached every module
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _ in found:
        if b != "runner":  # the package itself holds only __version__
            edges[a].add(b)
    assert cycles(edges) == []


# The README's layer table ("How it works"): a module imports only from its own layer or
# lower ones.
LAYERS = {
    "core": "errors log durable launch checksum collective progress ranks dtypes layout strategy plan config preprocess formats formats.base",
    "arch": "templates generate convert.model convert.names convert.rows convert.megatron_layout",
    "io": "formats.safetensors_io formats.mindspore_ckpt formats.mindspore_proto formats.mindspore_strategy "
          "formats.torch_pt formats.dcp formats.torch_archive formats.torch_dist formats.registry strategy_files source union convert",
    "exec": "execute remote lora fp8 outputs convert.hf_dir convert.megatron_dir",
    "jobs": "units job convert.job compile verify run mpi dispatch",
    "faces": "cli api plan_report inspect __main__",
}
ORDER = list(LAYERS)


def layer_of() -> dict[str, int]:
    return {f"runner.{m}": ORDER.index(layer) for layer, names in LAYERS.items() for m in names.split()}


def test_every_module_has_a_layer_and_imports_point_down():
    mods = modules()
    layer = layer_of()
    assert sorted(set(mods) - {"runner"}) == sorted(layer)
    upward = sorted({f"{a} ({ORDER[layer[a]]}) -> {b} ({ORDER[layer[b]]})" for a, b, _ in imports(mods)
                     if b != "runner" and layer[b] > layer[a]})
    assert upward == []


# Function-level imports of runner modules, each for a reason: the CLI answers --help
# before importing anything heavy (numpy included); collective and remote initialise MPI
# when imported, so only code that runs under mpiexec imports them.
FUNCTION_LEVEL = {
    "runner.cli": {"runner", "runner.collective", "runner.config", "runner.dispatch", "runner.errors", "runner.inspect",
                   "runner.launch", "runner.log", "runner.plan_report", "runner.verify"},
    "runner.mpi": {"runner.collective", "runner.remote"},
    "runner.preprocess": {"runner.collective"},
}


def test_function_level_imports_only_where_they_must_be():
    found: dict[str, set[str]] = {}
    for a, b, inside in imports(modules()):
        if inside:
            found.setdefault(a, set()).add(b)
    assert found == FUNCTION_LEVEL
