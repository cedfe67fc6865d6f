"""The house rules that a static look at the tree can check (issue 23): no import cycle among rwp_fast,
kernels and bench, counting imports inside functions too; no module under tests/ importing a test module
(what tests share lives in conftest.py or a helper module); and no Python source file over 500 lines."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("rwp_fast", "kernels", "bench")
# installed names of the folders that ship inside the package (setup.py package_dir)
ALIASES = {"rwp_fast.kernels": "kernels", "rwp_fast.bench": "bench"}
MAX_LINES = 500


def _sources():
    for root in ROOTS:
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.join(folder, f)


def _module(path):
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def import_graph():
    """{module: modules it imports}, package __init__s included (importing a.b.c runs a and a.b)."""
    paths = {_module(p): p for p in _sources()}

    def resolve(name):
        for alias, real in ALIASES.items():
            if name == alias or name.startswith(alias + "."):
                name = real + name[len(alias):]
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in paths}
    for mod, path in paths.items():
        package = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets = [f"{base}.{a.name}" for a in node.names]  # resolve() falls back to base itself
            else:
                continue
            for target in filter(None, map(resolve, targets)):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    # an ancestor package of mod is already initialising when mod runs: no edge
                    if dep in paths and dep != mod and not mod.startswith(dep + "."):
                        graph[mod].add(dep)
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    assert "rwp_fast.core" in graph["rwp_fast.config"]  # the scan sees a module-level relative import
    assert "rwp_fast.train.fast_step" in graph["rwp_fast.train.trainer"]  # and one inside a function
    graph["rwp_fast.core"].add("rwp_fast.config")  # core must import nothing from rwp_fast
    assert ["rwp_fast.config", "rwp_fast.core"] in cycles(graph)


TESTS = os.path.join(REPO, "tests")
def imported_test_modules(folder=TESTS):
    """{module: the test modules (test_*) it imports}, for every .py file under `folder`, counting imports
    inside functions too. tests/ is on sys.path when pytest runs, so a test module is imported by its bare
    name (`from test_cli import x`, `import test_cli`)."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    targets = [node.module]
                else:
                    continue
                for top in (t.split(".")[0] for t in targets):
                    if top.startswith("test_"):
                        found.setdefault(f[:-3], set()).add(top)
    return found


def test_no_test_module_imports_another():
    found = imported_test_modules()
    new = {m: sorted(t) for m, t in found.items() if t}
    assert not new, ("tests importing test modules (move what they share into conftest.py or a helper module "
                     f"without the test_ prefix): {new}")


def test_the_test_import_scan_finds_planted_imports(tmp_path):
    (tmp_path / "test_a.py").write_text("import os\nfrom test_b import helper\n")
    (tmp_path / "test_b.py").write_text("def helper():\n    import test_c.sub\n    return 1\n")
    (tmp_path / "helpers.py").write_text("from conftest import DEVICE\nimport testing_tools\n")
    assert imported_test_modules(str(tmp_path)) == {"test_a": {"test_b"}, "test_b": {"test_c"}}


@pytest.mark.parametrize("path", list(_sources()), ids=lambda p: os.path.relpath(p, REPO))
def test_no_source_file_over_500_lines(path):
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{os.path.relpath(path, REPO)}: {n} lines; split it by what its parts do"


# Who may import the oracle: the torch backend of each op (it *is* the reference), the trainer's
# `--backend reference`, the verification and the benchmarks' baselines. The fast path takes what it shares
# with the oracle from rwp_fast.core, so that a bug planted in the oracle cannot hide in both sides.
ORACLE_USERS = {"rwp_fast.ops.pgd_step", "rwp_fast.ops.lsc_loss", "rwp_fast.ops.weight_perturb",
                "rwp_fast.train.trainer"}
ORACLE_USER_PACKAGES = ("rwp_fast.reference", "rwp_fast.verify", "bench")


def test_only_the_torch_backend_and_the_checkers_import_the_oracle():
    graph = import_graph()
    users = {m for m, deps in graph.items() if "rwp_fast.reference" in deps}
    stray = sorted(m for m in users - ORACLE_USERS
                   if not any(m == p or m.startswith(p + ".") for p in ORACLE_USER_PACKAGES))
    assert not stray, f"modules importing rwp_fast.reference outside the allowed ones: {stray}"
    assert "rwp_fast.ops.pgd_step" in users  # the scan sees the torch backend's import
