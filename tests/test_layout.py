"""The package's layout: the method (minipt/) never imports the programs built on it (minipt/apps/)."""

import ast
from pathlib import Path

import torch

from helpers import count_host_syncs, random_gpt
from minipt import PromptTuning

PACKAGE = Path(__file__).resolve().parents[1] / "minipt"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the minipt modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import apps`
    return {n for n in names if n == "minipt" or n.startswith("minipt.")}


def test_the_method_never_imports_the_apps():
    method = [p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts]
    assert len(method) > 10
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("minipt.apps"))
        for p in method
        if p.name != "__main__.py"
    }  # `python -m minipt` starts the program
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_walk_sees_relative_imports_of_apps(tmp_path):
    """The check above could pass by seeing nothing: it must resolve `from .apps.cli import main`."""
    assert "minipt.apps.cli" in imported_modules(PACKAGE / "__main__.py")
    assert "minipt.apps.recipes" in imported_modules(PACKAGE / "apps" / "demo.py")


def test_a_prompt_tuning_step_makes_at_most_two_host_syncs():
    """Forward, backward and AdamW: one host read of the input checks, and AdamW's step counter."""
    model = random_gpt(dict(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=32))
    pt = PromptTuning(model, n_prompt=4, init="uniform").train()
    optimizer = torch.optim.AdamW([pt.prompt], lr=0.1)
    idx = torch.randint(40, (3, 9))
    targets = torch.randint(40, (3, 9)).masked_fill(torch.rand(3, 9) < 0.5, -100)
    targets[:, 0] = 5  # at least one supervised position per row
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for _ in range(2):  # the second step too: AdamW's state exists from the first on
        with count_host_syncs() as syncs:
            loss = pt.loss(idx, targets, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        assert syncs.total <= 2, dict(syncs.by_op)
        assert syncs.by_op["tolist"] == 1  # the input checks, all at once


def test_the_counter_sees_each_kind_of_sync():
    t = torch.tensor([0, 1, 2])
    with count_host_syncs() as syncs:
        int(t.sum())
        bool((t > 0).any())
        t[t > 0]
        t.tolist()
    assert dict(syncs.by_op) == {"_local_scalar_dense": 2, "boolean index": 1, "tolist": 1}


# ---- no import circles -------------------------------------------------------------------------------------
# Every import statement counts, the ones inside functions too: a lazy import only hides a circle until the
# function runs. `minipt.kernels` lives in the top-level kernels/ folder (pyproject's package-dir mapping).

KERNELS = PACKAGE.parent / "kernels"


def module_files() -> dict[str, Path]:
    """minipt's module names -> their files (a package is its __init__.py)."""
    files = {}
    for root, name in ((PACKAGE, "minipt"), (KERNELS, "minipt.kernels")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            files[".".join((name, *parts))] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the minipt modules its import statements name (the most specific module of each name)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                source = ".".join(p for p in (base, node.module or "") if p)
                # `from . import apps` names a module; `from .prompt import PromptTuning` names its module
                names = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `import minipt.kernels.prompt_concat as x`, `minipt.x.attr`
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import circle."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_module_of_minipt_imports_itself_back():
    graph = import_graph()
    assert {"minipt.prompt", "minipt.apps.cli", "minipt.kernels.prompt_concat"} <= set(graph)
    assert import_circles(graph) == []


def test_peft_io_imports_neither_tuned_class():
    assert import_graph()["minipt.peft_io"] & {"minipt.prompt", "minipt.prefix"} == set()


def test_the_circle_finder_sees_lazy_and_relative_imports():
    """The walk must count an import inside a function, and find a circle of three."""
    graph = import_graph()
    assert "minipt.apps.recipes" in graph["minipt.apps.cli"]  # cli imports recipes inside its functions only
    assert "minipt.checkpoint" in graph["minipt.prompt"]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


# ---- public faces ------------------------------------------------------------------------------------------
# Modules that do not declare `__all__` yet (each is being edited elsewhere); this set only shrinks.
WITHOUT_ALL: set[str] = set()  # modules excused from declaring __all__ (none left)


def module_level(statements):
    """The statements that run at import, inside `if` / `try` blocks too, never inside a function or class."""
    for node in statements:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in (
                node.body,
                getattr(node, "orelse", []),
                getattr(node, "finalbody", []),
                *[h.body for h in getattr(node, "handlers", [])],
            ):
                yield from module_level(block)


def test_every_module_with_a_public_face_declares_it_in_all():
    """`__all__` lists what a module offers; every name in it exists (a renamed function cannot linger there)."""
    missing, stale = [], {}
    for module, path in sorted(module_files().items()):
        tree = ast.parse(path.read_text())
        statements = list(module_level(tree.body))
        defined = {
            t.id
            for n in statements
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }
        defined |= {n.name for n in statements if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {
            (a.asname or a.name).split(".")[0]
            for n in statements
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }  # a package re-exports imports
        public = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name[0] != "_"}
        declared = next(
            (
                ast.literal_eval(n.value)
                for n in tree.body
                if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
            ),
            None,
        )
        if declared is None:
            if public and module not in WITHOUT_ALL and not module.endswith("__main__"):  # a program, not a face
                missing.append(module)
        elif set(declared) - defined:
            stale[module] = sorted(set(declared) - defined)
    assert missing == [] and stale == {}
