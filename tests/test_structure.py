"""The package's shape, read from its source: no import cycle, no arrow from a lower layer to a
higher one, imports at the top (unless a reason is stated), and no function over 80 lines."""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "prvr_jax"
MAX_FUNCTION_LINES = 80

# Layers, lowest first: a module imports only modules of its own layer or of lower ones (and the
# test below also forbids cycles within a layer). Keys are packages or modules; the longest
# matching key decides.
LAYERS: dict[str, int] = {
    "prvr_jax": 0, "prvr_jax.errors": 0, "prvr_jax.utils": 0, "prvr_jax.text": 0,
    "prvr_jax.data": 1, "prvr_jax.parallel": 1,
    "prvr_jax.ops": 2, "prvr_jax.clip": 2,
    "prvr_jax.losses": 3, "prvr_jax.models": 3,
    "prvr_jax.train": 4, "prvr_jax.eval": 4,
    "prvr_jax.run": 5,
    "prvr_jax.train.loop": 6, "prvr_jax.train.report": 6, "prvr_jax.search": 6,
    "prvr_jax.convert": 6,
    "prvr_jax.main": 7, "prvr_jax.extract": 7, "prvr_jax.ablation": 7, "prvr_jax.bench": 7,
}
# The rule, stated on its own: the core never imports the orchestration around it.
CORE = ("prvr_jax.data", "prvr_jax.ops", "prvr_jax.losses", "prvr_jax.models")
ORCHESTRATION = ("prvr_jax.train", "prvr_jax.eval", "prvr_jax.search", "prvr_jax.convert",
                 "prvr_jax.run")
# Imports inside a function, each with the reason it cannot be at the top (also stated where it is).
DEFERRED_IMPORTS: dict[tuple[str, str], str] = {
    ("prvr_jax.main", "prvr_jax"): "grain workers re-import __main__; after the malloc re-exec",
    ("prvr_jax.ablation", "prvr_jax.train"): "grain workers re-import __main__; after the re-exec",
    ("prvr_jax.extract", "prvr_jax"): "extract.py is __main__: JAX only after the malloc re-exec",
    ("prvr_jax.convert.torch_msc", "torch"): "torch is a test-only dependency",
    ("prvr_jax.text.tokenizer", "transformers"): "1.5 s import; the loader imports this module",
    ("prvr_jax.clip.config", "transformers"): "1.5 s import; every run imports this module",
    ("prvr_jax.search.milvus", "pymilvus"): "5-9 s import; only an index on Milvus needs it",
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
          for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
  return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> list[tuple[str, bool, int]]:
  """(imported module or name, at the top of the module, line) of every import run at run time."""
  found: list[tuple[str, bool, int]] = []

  def visit(node: ast.AST, top: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if _is_type_checking(child):
        continue  # typing-only imports never run
      if isinstance(child, ast.Import):
        found.extend((a.name, top, child.lineno) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        # `from pkg import x` imports pkg.x when that is a module, else pkg (resolved below).
        found.extend((f"{child.module}.{a.name}", top, child.lineno) for a in child.names)
      is_scope = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      visit(child, top and not is_scope)

  visit(tree, True)
  return found


def _project_imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
  """module -> the project modules it imports."""
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for name, tree in modules.items():
    for target, _, _ in _imports(tree):
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != name and target.startswith("prvr_jax"):
        graph[name].add(target)
  return graph


def _layer(module: str) -> int:
  key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
  return LAYERS[key]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

  def connect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
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
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return found


@pytest.fixture(scope="module")
def modules() -> dict[str, ast.Module]:
  return _modules()


def test_no_import_cycle(modules):
  assert _cycles(_project_imports(modules)) == []


def test_cycle_finder_finds_one():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_arrow_from_a_lower_layer_to_a_higher_one(modules):
  assert set(modules) <= {m for m in modules if any(m == k or m.startswith(k + ".") for k in LAYERS)}
  upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                  for m, targets in _project_imports(modules).items() for t in targets
                  if _layer(t) > _layer(m))
  assert upward == []
  core = sorted(f"{m} imports {t}" for m, targets in _project_imports(modules).items()
                for t in targets if m.startswith(CORE) and t.startswith(ORCHESTRATION))
  assert core == []


def test_imports_are_at_the_top_unless_a_reason_is_stated(modules):
  inner = sorted(f"{m}:{line} imports {target}" for m, tree in modules.items()
                 for target, top, line in _imports(tree)
                 if not top and not any(m == k[0] and (target == k[1] or target.startswith(k[1] + "."))
                                        for k in DEFERRED_IMPORTS))
  assert inner == []


def test_no_function_over_80_lines(modules):
  long = sorted(f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for m, tree in modules.items()
                for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES)
  assert long == []
