"""The import graph follows the layering drawn in docs/ARCHITECTURE.md: every import of a project
module (top-level or inside a function) points to the same or a lower layer, and no two project
modules import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "shards", "stages", "trainer", "sim", "bench", "tests")
# Lowest first. A module's layer is its own entry, else its package's.
LAYERS = (
    ("core", ("pipeline",)),                              # errors, io, config, runner, media, ...
    ("contract", ("shards",)),                            # vocabulary, bin codec, VQ-GAN, shard format
    ("stages", ("stages",)),                              # raw readers and data stages
    ("trainer", ("trainer",)),                            # model, training, inference, evaluation
    ("sim", ("sim",)),                                    # environments, rollouts, demo task
    ("app", ("pipeline.cli", "pipeline.workflow")),       # orchestration: commands, workflows
    ("outside", ("bench", "tests")),                      # benchmarks and tests
)


def layer_of(module: str) -> int:
    """The layer index of a dotted module name (its own entry beats its package's)."""
    package = module.split(".")[0]
    for exact in (True, False):
        for index, (_, names) in enumerate(LAYERS):
            if (module in names) if exact else (package in names):
                return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def project_modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES
            for p in sorted((ROOT / pkg).glob("*.py")) if p.stem != "__init__"}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body (`from pkg import mod` included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        out |= {".".join(n.split(".")[:2]) for n in names if ".".join(n.split(".")[:2]) in modules}
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_import_points_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph().items() for t in sorted(targets)
              if layer_of(t) > layer_of(m)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    """Each back edge of a depth-first search, as the cycle it closes ("a -> b -> a")."""
    state: dict[str, int] = {}            # 1: on the current path, 2: finished
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from trainer import policy\n")
    assert imports_of(bad, {"trainer.policy": bad}) == {"trainer.policy"}
    assert layer_of("pipeline.cli") > layer_of("trainer.policy") > layer_of("pipeline.io")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
