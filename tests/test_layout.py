"""The package's layout holds: imports form a DAG, lazy ones included, and the layers keep to
their side (``placement`` and ``model`` never touch the network, ``net`` never touches model math,
only ``net`` imports ``torch.distributed``, rank 0's side and the stages' side never import each
other), HF hooks are put in place in one module, at most two thread-locals remain, and no module
grows past about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "torch_pp"


def module_name(path: Path) -> str:
    parts = ["torch_pp", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every torch_pp module ``name`` imports, at any depth of the file (functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # "from pkg import mod" imports the submodule; "from mod import name" the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def imports_distributed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("torch.distributed") or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            return True
    return False


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_form_a_dag():
    edges = graph()
    # the package root re-exports lazily (PEP 562): its edges are real imports too, and counted
    assert "torch_pp.pipeline" in edges["torch_pp"]
    assert "torch_pp.net.transport" in edges["torch_pp.runtime.agreement"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_layers_keep_to_their_side():
    edges = graph()
    problems = []
    for name, targets in edges.items():
        for side, forbidden in (("torch_pp.placement", ("torch_pp.net", "torch_pp.runtime", "torch_pp.model", "torch_pp.rank0")),
                                # model math knows neither rank 0's hooks nor the wire
                                ("torch_pp.model", ("torch_pp.net", "torch_pp.runtime", "torch_pp.rank0")),
                                ("torch_pp.net", ("torch_pp.model", "torch_pp.runtime", "torch_pp.placement", "torch_pp.rank0")),
                                # the stages' side never reaches into rank 0's, nor rank 0's into the stage loop
                                ("torch_pp.runtime", ("torch_pp.rank0", "torch_pp.pipeline")),
                                ("torch_pp.rank0", ("torch_pp.runtime.serve", "torch_pp.pipeline", "torch_pp.api", "torch_pp.cli")),
                                # the HTTP side sees the pipeline only through generate() (server.py is the glue)
                                ("torch_pp.api.app", ("torch_pp.net", "torch_pp.runtime", "torch_pp.model", "torch_pp.rank0")),
                                ("torch_pp.api.engine", ("torch_pp.net", "torch_pp.runtime", "torch_pp.model"))):
            if name.startswith(side):
                problems += [f"{name} imports {t}" for t in targets if t.startswith(forbidden)]
    for name, path in modules().items():
        if not name.startswith("torch_pp.net") and imports_distributed(path):
            problems.append(f"{name} imports torch.distributed (only torch_pp.net may)")
    assert problems == []


def test_no_module_is_much_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 420}
    assert long == {}


def test_hf_forwards_are_replaced_only_by_rank0_install():
    """Every HF method torch_pp replaces (a model's or module's ``forward``/``generate``) is replaced
    in ``rank0/install.py``: one place to read them all. The one other place, ``model/fusion.py``,
    replaces nothing with code of ours: it routes norms and MLPs to a compiled copy of their own
    class's ``forward`` inside captured steps."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr in ("forward", "generate"):
                        found.append(f"{name}:{node.lineno}")
    assert found and all(f.startswith("torch_pp.rank0.install:") for f in found
                         if not f.startswith("torch_pp.model.fusion:")), found
    assert sum(f.startswith("torch_pp.model.fusion:") for f in found) == 1, found


def test_at_most_two_thread_locals_each_saying_why():
    """A step's state is passed as an argument (``rank0.step``); what stays per thread says why."""
    found = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "threading.local()" in line:
                found.append(name)
                assert lines[i - 1].strip().startswith("#"), f"{name}:{i + 1}: say why this cannot be an argument"
    assert len(found) <= 2, found
