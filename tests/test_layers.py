"""The import graph of the package: no cycles, imports only downward, none hidden in functions.

The layer order, bottom first (README, "Where things live"). A module may
import modules of its own package unit or of a lower layer; two units of one
layer (data and parallel) know nothing of each other.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    ["jobconfig"],               # the config base: errors, strict loader, overrides, presets, curriculum, sections
    ["data", "parallel"],        # the batch contract and data sources; generic distributed machinery
    ["pretrain.model"],          # Video-GPT itself: plain single-device PyTorch
    ["pretrain.checkpoint"],     # one checkpoint component: manager, integrity, storage, DeepSpeed files, export
    ["pretrain.training"],       # objective, optimizer, parallelize, metrics, the Trainer
    ["pretrain.evaluation"],     # video metrics, scoring, held-out loss, figures
    ["pretrain.inference"],      # the next-clip sampler and the video pipeline
    ["orchestration"],           # every `vgpt` verb, Ray jobs, launch files, sweeps, fault injection
]
UNITS = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
OURS = {unit.split(".")[0] for unit in UNITS}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The longest layer unit that is a prefix of `module` (a bare package goes with its first unit)."""
    hits = [u for u in UNITS if module == u or module.startswith(u + ".")]
    if hits:
        return max(hits, key=len)
    return next(u for u in UNITS if u.startswith(module + "."))


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in sorted(OURS) for p in sorted((REPO / top).rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import of our packages in `path`."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import module` imports that module; `from module import symbol`, the module
            names = [f"{node.module}.{a.name}" for a in node.names]
        found += [(n, id(node) in nested, node.lineno) for n in names if n.split(".")[0] in OURS]
    return found


def resolve(name: str, known: dict[str, Path]) -> str:
    """The module `name` refers to: itself, or the module it is a symbol of."""
    return name if name in known else name.rpartition(".")[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {resolve(n, known) for n, _, _ in imports(p)} - {m} for m, p in known.items()}


def test_every_module_belongs_to_a_layer():
    for m in modules():
        assert unit_of(m), f"{m} is in no layer of {LAYERS}"


def test_imports_only_run_downward():
    bad = []
    for m, deps in graph().items():
        mine = unit_of(m)
        for d in deps:
            theirs = unit_of(d)
            if theirs != mine and UNITS[theirs] >= UNITS[mine]:
                bad.append(f"{m} ({mine}, layer {UNITS[mine]}) imports {d} ({theirs}, layer {UNITS[theirs]})")
    assert not bad, "upward or sideways imports:\n  " + "\n  ".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [m, d]) if d in stack else f"{m} -> {d}")
            elif d in g and d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_no_import_of_our_packages_inside_a_function():
    """Verb modules are imported lazily by the CLI, so nothing of ours needs hiding in a function."""
    hidden = [f"{m}:{line} imports {n}" for m, p in modules().items() for n, nested, line in imports(p) if nested]
    assert not hidden, "imports inside functions:\n  " + "\n  ".join(hidden)


def test_the_model_package_imports_nothing_distributed():
    known = modules()
    forbidden = ("torch.distributed", "deepspeed", "megatron")
    closure, todo = set(), [m for m in known if unit_of(m) == "pretrain.model"]
    while todo:  # the model and everything of ours it imports, transitively
        m = todo.pop()
        if m not in closure:
            closure.add(m)
            todo += [d for d in graph()[m] if d in known]
    offenders = []
    for m in sorted(closure):
        tree = ast.parse(known[m].read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{m}:{node.lineno} imports {n}" for n in names if n.startswith(forbidden)]
    assert not offenders, "\n".join(offenders)
    # and at run time: building and running the model loads no distributed library
    code = ("import sys, torch\nfrom jobconfig.loader import load_config\n"
            "from pretrain.model.videogpt import build_model\n"
            "build_model(load_config(None).model)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_every_module_imports():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    out = subprocess.run([sys.executable, "-c", code, *sorted(m for m in modules() if not m.endswith("__main__"))], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
