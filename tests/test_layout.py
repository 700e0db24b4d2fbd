"""The layout of the package: no two modules import each other, directly or through others, so
that each one imports on its own and its import block shows what it stands on."""
import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "evo_jax"


def evo_imports(path: pathlib.Path):
  """The evo_jax modules a file imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == "evo_jax":
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("evo_jax."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("evo_jax.")}
  return found


def test_no_import_cycles():
  modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
  graph = {m: evo_imports(PACKAGE / f"{m}.py") & modules for m in modules}
  done, path = set(), []

  def visit(m):
    if m in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
    if m in done:
      return
    path.append(m)
    for n in sorted(graph[m]):
      visit(n)
    path.pop()
    done.add(m)

  for m in sorted(modules):
    visit(m)
