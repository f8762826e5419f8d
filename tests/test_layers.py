"""One way down: the imports of every project file, read from the files with ast (imports inside functions too),
against README.md's file table. A file may import the rows below its own in that table (and the other files of a
glob row such as runtime/*.py), never a row above: so no layer imports a higher one, and inside a layer the order
is the table's. No import circle; nothing in the product reaches bench/ through sys.path. The table is where the
layers are written: this test reads them from it."""
import ast
import functools
import glob
import os
import re

from conftest import ROOT

ROW = re.compile(r"^\| ([a-z ]+) \| `([^`]+)` \|")


def layers():
    """{project file: (row, layer)}: README.md's table `| layer | file | ... |`, top row the highest. A row is a
    file or a glob (`runtime/*.py`: its files share the row)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().split("| layer | file | what it does |", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = [ROW.match(line).groups() for line in lines[2:]]
    out = {}
    for i, (layer, pattern) in enumerate(rows):
        paths = sorted(glob.glob(os.path.join(ROOT, pattern)))
        assert paths, f"README.md's file table names {pattern}, which matches no file"
        for path in paths:
            assert os.path.relpath(path, ROOT) not in out, f"{pattern}: {os.path.relpath(path, ROOT)} is listed twice"
            out[os.path.relpath(path, ROOT)] = (len(rows) - i, layer)
    return out


@functools.cache
def project_files():
    """Every Python file of the product and of bench/ but the packages' __init__.py, which import nothing
    (test_packages_import_nothing); tests/ and docs/ stand outside the layers."""
    found = glob.glob(os.path.join(ROOT, "*.py"))
    for folder in ("runtime", "run", "dataprep", "tools", "bench"):
        found += glob.glob(os.path.join(ROOT, folder, "*.py"))
    return tuple(sorted(os.path.relpath(p, ROOT) for p in found if not p.endswith("__init__.py")))


def module_file(name, here):
    """The project file that module `name` is, found from the repository root or beside the importing file (a
    script's own folder is on its sys.path), or None (the standard library, torch, ...)."""
    for base in (ROOT, os.path.dirname(os.path.join(ROOT, here))):
        path = os.path.join(base, *name.split("."))
        for candidate in (path + ".py", os.path.join(path, "__init__.py")):
            if os.path.isfile(candidate) and os.path.relpath(candidate, ROOT) in project_files():
                return os.path.relpath(candidate, ROOT)
    return None


def imports(path):
    """[(line, project file)] that the file at path imports, wherever the import statement stands."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [module_file(alias.name, path) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # the project uses no relative imports
            # `from tools import roofline` is tools/roofline.py; `from model import Yuan` is model.py
            targets = [module_file(f"{node.module}.{alias.name}", path) for alias in node.names]
            targets = [t for t in targets if t] or [module_file(node.module, path)]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t and t != path]
    return found


def test_every_file_has_a_layer():
    assert sorted(set(project_files()) - set(layers())) == [], "add these to README.md's file table"


def test_imports_run_one_way_down():
    """The rule, row by row (so inside a layer too), then no circle; a failure names each file, line and layer."""
    rank = layers()
    graph = {path: imports(path) for path in project_files()}
    upward = [f"{path}:{line} imports {target}, a row above it in README.md's table (layer '{rank[target][1]}' "
              f"over '{rank[path][1]}')"
              for path, targets in graph.items() for line, target in targets if rank[target][0] > rank[path][0]]
    assert not upward, "\n".join(upward)
    state, circles = {}, []

    def visit(path, trail):  # depth first: a file met again while on the trail closes a circle
        state[path] = "open"
        for _, target in graph[path]:
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[path] = "done"
    for path in graph:
        if path not in state:
            visit(path, [path])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_packages_import_nothing():
    for path in glob.glob(os.path.join(ROOT, "*", "__init__.py")):
        tree = ast.parse(open(path, encoding="utf-8").read())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], path


def test_the_product_does_not_reach_into_bench():
    """An import through a sys.path entry or importlib is hidden from the rule above: none of them names bench/."""
    hidden = re.compile(r"(sys\.path|import_module).*bench")
    found = [f"{path}:{n}" for path in project_files() if not path.startswith("bench/")
             for n, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1) if hidden.search(line)]
    assert not found, found
