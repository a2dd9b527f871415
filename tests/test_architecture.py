"""Architecture rules for the packages model/, pipeline/ and data_prep/, checked on their AST.

1. No private access across modules: no ``from a import _b`` / ``import a._b`` (inside functions
   and ``if TYPE_CHECKING:`` blocks too), and no ``x._y`` (nor ``getattr(x, "_y")``) where ``x``
   is another module's object. Third-party privates (``torch._C``) count too; the few with no
   public alternative are in ``ALLOWED_PRIVATE`` with the reason.
2. No import cycle: the graph of imports between the project's modules (function-level and
   ``TYPE_CHECKING`` imports included) has no strongly connected component of two or more.
3. Sizes: no file over ``MAX_FILE_LINES`` lines, no function (methods and nested ones too) over
   ``MAX_FUNCTION_LINES`` lines, except an argparse definition (``is_argparse_definition``).

The unit tests at the end feed each checker a small synthetic package with one violation, so a
checker that silently finds nothing fails here.
"""

from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass
from pathlib import Path

# (file relative to the repository root, the reported expression) -> why it is allowed. A failing
# test prints each violation as `path:line: expression`; the key is (path, expression).
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {
    ("pipeline/train/__main__.py", "os._exit"): (
        "documented public API: exit without interpreter teardown"
    ),
    ("pipeline/train/objectives.py", "value._fields"): "namedtuple's documented field list",
    ("model/compilation.py", "torch._dynamo"): (
        "recompile_limit lives only in torch._dynamo.config (torch.compile's documented knob)"
    ),
    ("pipeline/train/dry_run.py", "torch.utils._python_dispatch"): (
        "TorchDispatchMode has no public module; torch.utils.flop_counter itself uses it"
    ),
    ("pipeline/train/dry_run.py", "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu"): (
        "an aten operator's name (the CPU fused attention), not an attribute of ours"
    ),
    ("pipeline/train/dry_run.py", "p.untyped_storage()._cdata"): (
        "meta tensors have data_ptr() 0: the storage handle is their only identity"
    ),
    ("pipeline/train/dry_run.py", "storage._cdata"): "the same storage identity",
    ("pipeline/train/engines.py", "engine._config"): (
        "DeepSpeed reads load_universal_checkpoint from it and has no public setter"
    ),
    ("pipeline/data/yuv.py", "torch.UntypedStorage._new_shared"): (
        "shared memory in one allocation (share_memory_() copies); default_collate uses it too"
    ),
}

PACKAGES = ("model", "pipeline", "data_prep")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
ARGPARSE_CALLS = frozenset(
    {
        "add_argument",
        "add_argument_group",
        "add_mutually_exclusive_group",
        "add_parser",
        "add_subparsers",
        "set_defaults",
    }
)
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Module:
    name: str
    """Dotted module name; a package is its ``__init__``: ``pipeline.data``."""
    path: str
    """Relative to the scanned root, with forward slashes."""
    is_package: bool
    tree: ast.Module
    num_lines: int


def load_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Module]:
    """Every .py file under ``root/<package>`` (subpackages included), parsed."""
    modules = {}
    for package in packages:
        for directory, subdirs, files in os.walk(root / package):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for file in sorted(f for f in files if f.endswith(".py")):
                path = Path(directory, file)
                relative = path.relative_to(root)
                parts = list(relative.with_suffix("").parts)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts.pop()
                text = path.read_text(encoding="utf-8")
                name = ".".join(parts)
                modules[name] = Module(
                    name=name,
                    path=relative.as_posix(),
                    is_package=is_package,
                    tree=ast.parse(text, filename=str(relative)),
                    num_lines=len(text.splitlines()),
                )
    return modules


@functools.cache
def project_modules() -> dict[str, Module]:
    return load_modules(REPO, PACKAGES)


@functools.cache
def project_private_access() -> list[tuple[str, int, str]]:
    return private_access(project_modules())


# ---- 1. private access --------------------------------------------------------------------


def is_private(name: str) -> bool:
    """``_x`` and ``__x`` are private; ``__x__`` (dunder) is not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_base(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None  # beyond the top-level package
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _annotation_names(annotation: ast.expr | None) -> set[str]:
    """The bare names an annotation mentions, string annotations included."""
    if annotation is None:
        return set()
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return set()
    return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}


def _private_hop(expression: ast.expr) -> bool:
    """Whether an attribute chain (``a._b.c``) already holds a private hop, reported on its own."""
    while isinstance(expression, ast.Attribute):
        if is_private(expression.attr):
            return True
        expression = expression.value
    return False


class _PrivateAccess(ast.NodeVisitor):
    """Collects (line, expression) of each private access to another module's objects.

    Allowed receivers of ``x._y``: ``self``, ``cls``, ``super()``, ``type(self)``; a class
    defined in this module (at any depth) or a module-level function of it; a module-level name
    assigned an instance of such a class (``_STATE = _State()``); a parameter or variable
    annotated with such a class (``def __eq__(self, other: Point)``). Everything else, imported
    names included, is another module's object. Only the first private hop is reported:
    ``torch._C._nn`` gives ``torch._C``. Reads, writes and ``getattr(x, "_y")`` alike.
    """

    def __init__(self, module: Module) -> None:
        self.module = module
        self.found: list[tuple[int, str]] = []
        tree = module.tree
        self.local_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.module_names = self.local_classes | {
            n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id in self.local_classes
            ):
                self.module_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        self.scopes: list[set[str]] = [set()]

    def _own(self, receiver: ast.expr) -> bool:
        if isinstance(receiver, ast.Name):
            return (
                receiver.id in ("self", "cls")
                or receiver.id in self.module_names
                or any(receiver.id in scope for scope in self.scopes)
            )
        if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name):
            if receiver.func.id == "super":
                return True
            if receiver.func.id == "type" and len(receiver.args) == 1:
                return self._own(receiver.args[0])
        return False

    def _annotated_own(self, annotation: ast.expr | None) -> bool:
        return bool(_annotation_names(annotation) & self.local_classes)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        own = {a.arg for a in every if a is not None and self._annotated_own(a.annotation)}
        self.scopes.append(own)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if isinstance(node.target, ast.Name) and self._annotated_own(node.annotation):
            self.scopes[-1].add(node.target.id)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if any(is_private(part) for part in alias.name.split(".")):
                self.found.append((node.lineno, alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = import_base(self.module, node) or "." * node.level + (node.module or "")
        if any(is_private(part) for part in base.split(".") if part):
            self.found.append((node.lineno, base))
            return
        for alias in node.names:
            if is_private(alias.name):
                self.found.append((node.lineno, f"{base}.{alias.name}"))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if is_private(node.attr) and not self._own(node.value) and not _private_hop(node.value):
            self.found.append((node.lineno, ast.unparse(node)))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Name)
            and func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
            and not self._own(node.args[0])
            and not _private_hop(node.args[0])
        ):
            self.found.append((node.lineno, f"{ast.unparse(node.args[0])}.{node.args[1].value}"))
        self.generic_visit(node)


def private_access(modules: dict[str, Module]) -> list[tuple[str, int, str]]:
    """(path, line, expression) of each private access to another module's objects."""
    found = []
    for module in modules.values():
        visitor = _PrivateAccess(module)
        visitor.visit(module.tree)
        found += [(module.path, line, expr) for line, expr in visitor.found]
    return sorted(found)


# ---- 2. import cycles ---------------------------------------------------------------------


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, tuple[str, int]]]:
    """module -> {imported project module: (path, line) of its first import there}.

    ``import a.b`` and ``from a.b import c`` are edges to ``a.b`` (and to ``a.b.c`` when that is a
    module); ``from a import c`` is an edge to the package ``a``'s ``__init__`` and, when ``c`` is
    a submodule, to ``a.c``. Parent packages are not implied; imports of the module itself (a
    package's ``from . import x``) give no self-edge.
    """
    graph: dict[str, dict[str, tuple[str, int]]] = {name: {} for name in modules}
    for module in modules.values():
        edges = graph[module.name]
        for node in ast.walk(module.tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = import_base(module, node)
                if base is None:
                    continue
                targets = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
            for target in targets:
                if target in modules and target != module.name:
                    if target not in edges or node.lineno < edges[target][1]:
                        edges[target] = (module.path, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, object]]) -> list[list[str]]:
    """Tarjan's strongly connected components of two or more nodes, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def describe_cycle(graph: dict[str, dict[str, tuple[str, int]]], component: list[str]) -> str:
    """A shortest cycle through the component's first module, then every import inside the
    component (each with its `path:line`): the edges to choose from when breaking it."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in parents:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor in members and successor not in parents:
                    parents[successor] = node
                    following.append(successor)
        frontier = following
    path = [start]
    while len(path) == 1 or path[-1] != start:
        path.append(parents[path[-1]])
    path.reverse()
    edges = [
        f"    {a} -> {b}  ({graph[a][b][0]}:{graph[a][b][1]})"
        for a in component
        for b in sorted(graph[a])
        if b in members
    ]
    return (
        f"cycle among {', '.join(component)}: {' -> '.join(path)}\n  imports inside it:\n"
        + "\n".join(edges)
    )


# ---- 3. sizes -----------------------------------------------------------------------------


def _simple_statements(body: list[ast.stmt]):
    """The leaf statements of a body, through if/for/while/with/try/match, not into defs."""
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        children = [
            getattr(statement, attr, [])
            for attr in ("body", "orelse", "finalbody")
            if isinstance(getattr(statement, attr, None), list)
        ]
        children += [h.body for h in getattr(statement, "handlers", [])]
        children += [c.body for c in getattr(statement, "cases", [])]
        if children:
            for child in children:
                yield from _simple_statements(child)
        else:
            yield statement


def is_argparse_definition(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """More than half of the function's leaf statements (docstring excepted, nested defs not
    counted) are argparse calls: ``x.add_argument(...)`` (or another of ``ARGPARSE_CALLS``) as an
    expression statement or as the value of an assignment (``group = p.add_argument_group(...)``).
    """
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    statements = list(_simple_statements(body))

    def argparse_call(statement: ast.stmt) -> bool:
        value = (
            getattr(statement, "value", None)
            if isinstance(statement, (ast.Expr, ast.Assign))
            else None
        )
        return (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr in ARGPARSE_CALLS
        )

    return sum(map(argparse_call, statements)) * 2 > len(statements)


def size_violations(modules: dict[str, Module]) -> list[str]:
    """`path: N lines` of each file too long, `path:line: name is N lines` of each function."""
    found = []
    for module in modules.values():
        if module.num_lines > MAX_FILE_LINES:
            found.append((module.path, 0, f"{module.num_lines} lines (at most {MAX_FILE_LINES})"))
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not is_argparse_definition(node):
                    message = f"{node.name} is {length} lines (at most {MAX_FUNCTION_LINES})"
                    found.append((module.path, node.lineno, message))
    return [f"{p}{f':{line}' if line else ''}: {message}" for p, line, message in sorted(found)]


# ---- the rules on the project -------------------------------------------------------------


def test_no_private_access_across_modules():
    found = project_private_access()
    bad = [f"{p}:{line}: {expr}" for p, line, expr in found if (p, expr) not in ALLOWED_PRIVATE]
    assert not bad, (
        f"{len(bad)} private names used from another module (use a public name, or add "
        "(path, expression) with a reason to ALLOWED_PRIVATE in tests/test_architecture.py):\n"
        + "\n".join(bad)
    )


def test_private_allowlist_is_current():
    used = {(p, expr) for p, _, expr in project_private_access()}
    stale = [f"{p}: {expr}" for p, expr in ALLOWED_PRIVATE if (p, expr) not in used]
    assert not stale, "ALLOWED_PRIVATE entries that match nothing (remove or fix them):\n" + (
        "\n".join(stale)
    )


def test_no_import_cycles():
    graph = import_graph(project_modules())
    cycles = [describe_cycle(graph, c) for c in strongly_connected(graph)]
    assert not cycles, f"{len(cycles)} import cycles:\n" + "\n".join(cycles)


def test_file_and_function_sizes():
    found = size_violations(project_modules())
    assert not found, "too long (split it):\n" + "\n".join(found)


def test_every_package_is_scanned():
    names = project_modules()
    assert all(package in names for package in PACKAGES), sorted(names)[:10]


# ---- the checkers find what they should ---------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_modules(tmp_path, ("pkg",))


def _private(tmp_path: Path, source: str) -> list[str]:
    modules = _package(tmp_path, {"pkg/__init__.py": "", "pkg/m.py": source})
    return [expr for _, _, expr in private_access(modules)]


def test_checker_private_imports(tmp_path):
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from os import _exit\n"
        "import torch._dynamo\n"
        "from .sibling import _helper\n"
        "from pkg._impl import thing\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.other import _Hidden\n"
        "def f():\n"
        "    from pkg.other import _late\n"
        "from pkg.other import __version__, public\n"
    )
    assert _private(tmp_path, source) == [
        "os._exit",
        "torch._dynamo",
        "pkg.sibling._helper",
        "pkg._impl",
        "pkg.other._Hidden",
        "pkg.other._late",
    ]


def test_checker_private_attributes(tmp_path):
    source = (
        "import torch\n"
        "class Point:\n"
        "    _count = 0\n"
        "    def __init__(self):\n"
        "        self._x = Point._count + type(self)._count\n"
        "        super()._setup()\n"
        "    def __eq__(self, other: 'Point | None'):\n"
        "        return self._x == other._x\n"
        "    @classmethod\n"
        "    def make(cls):\n"
        "        return cls._count\n"
        "    def engine(self):\n"
        "        pass\n"
        "_DEFAULT = Point()\n"
        "def use(engine, p):\n"
        "    engine._config.x = _DEFAULT._x + p.__dict__['a']\n"
        "    q: Point = p\n"
        "    return torch._C._nn, q._x, getattr(engine, '_state'), getattr(self, '_ok')\n"
    )
    assert _private(tmp_path, source) == ["engine._config", "engine._state", "torch._C"]


def test_checker_cycles(tmp_path):
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\nfrom . import c\n",
            "pkg/a.py": "from pkg.b import B\n",
            "pkg/b.py": "def f():\n    from .a import A\n",  # a function-level import
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n",
            "pkg/d.py": "from pkg import c\n",  # d -> pkg (the __init__) and d -> c
            "pkg/sub/__init__.py": "from .e import E\n",
            "pkg/sub/e.py": "import os\nfrom ..a import A\n",  # no cycle: a does not import sub
        },
    )
    graph = import_graph(modules)
    assert graph["pkg.sub.e"] == {"pkg.a": ("pkg/sub/e.py", 2)}
    assert graph["pkg.d"].keys() == {"pkg", "pkg.c"}
    assert strongly_connected(graph) == [["pkg", "pkg.c", "pkg.d"], ["pkg.a", "pkg.b"]]
    text = describe_cycle(graph, ["pkg.a", "pkg.b"])
    assert text.startswith("cycle among pkg.a, pkg.b: pkg.a -> pkg.b -> pkg.a\n")
    assert "pkg.a -> pkg.b  (pkg/a.py:1)" in text and "pkg.b -> pkg.a  (pkg/b.py:2)" in text
    acyclic = {name: edges for name, edges in graph.items() if name not in ("pkg.b", "pkg.d")}
    assert strongly_connected(acyclic) == []


def _lines(template: str, count: int, indent: str) -> str:
    return "".join(f"{indent}{template.format(i=i)}\n" for i in range(count))


def test_checker_sizes(tmp_path):
    arguments = _lines("parser.add_argument('--a{i}')", 40, "    ")
    others = _lines("y{i} = {i}", 40, "    ")
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # a method of 61 lines (the def and 60 statements), a function of 60
            "pkg/long.py": "class C:\n    def method(self):\n" + _lines("x{i} = 0", 60, " " * 8),
            "pkg/ok.py": "def fits():\n" + _lines("x{i} = 0", 59, "    "),
            # a nested function too long makes its outer function too long as well
            "pkg/nested.py": "def outer():\n    def inner():\n" + _lines("x{i} = 0", 60, " " * 8),
            # 41 of 81 statements are argparse calls: exempt; 40 of 80: not
            "pkg/cli.py": (
                'def args(parser):\n    """Doc."""\n    g = parser.add_argument_group("g")\n'
                + arguments
                + others
                + "def half(parser):\n"
                + arguments
                + others
            ),
            "pkg/big.py": "x = 1\n" * 401,
        },
    )
    assert size_violations(modules) == [
        "pkg/big.py: 401 lines (at most 400)",
        "pkg/cli.py:84: half is 81 lines (at most 60)",
        "pkg/long.py:2: method is 61 lines (at most 60)",
        "pkg/nested.py:1: outer is 62 lines (at most 60)",
        "pkg/nested.py:2: inner is 61 lines (at most 60)",
    ]
