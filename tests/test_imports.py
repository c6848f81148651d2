"""Dependencies point one way: config <- kernels <- model <- parallel <- train / inference / interop.

Walks every module of `longcat_jax` and `pallas_kernels` (source, not runtime: nothing is
imported) and fails on an import that points up the order, on an import cycle between modules,
and on a project import inside a function (a late import that would hide a cycle).
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rank of each room; a module may import its own room and lower ranks only.
RANKS = {
    "longcat_jax.presets_v2": 0,  # preset tables, filled into `config.base_config()` by config.py
    "longcat_jax.platforms": 0,   # process start-up settings (JAX platforms, host allocator): imports only jax
    "longcat_jax.config": 1,
    "pallas_kernels": 2,
    "longcat_jax.model": 3,
    "longcat_jax.parallel": 4, "longcat_jax.data": 4, "longcat_jax.params": 4,
    "longcat_jax.inference": 5, "longcat_jax.interop": 5,
    "longcat_jax.train": 6,
    "longcat_jax": 7,            # the package's public API and its command-line modules
}


def room(module: str) -> str:
  parts = module.split(".")
  for n in (2, 1):
    if ".".join(parts[:n]) in RANKS:
      return ".".join(parts[:n])
  raise KeyError(module)


def project_modules(root=ROOT):
  out = {}
  for pkg in ("longcat_jax", "pallas_kernels"):
    for d, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(d, f)
          mod = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[mod.removesuffix(".__init__")] = path
  return out


def imports(path: str, module: str, modules) -> list[tuple[str, int, bool]]:
  """(imported project module, line, inside a function) for each import in the file."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          pkg = module.split(".") if is_pkg else module.split(".")[:-1]
          base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
      for n in names:
        while n and n not in modules:
          n = n.rpartition(".")[0]
        if n and n != module:
          found.append((n, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return found


def problems_in(root=ROOT) -> list[str]:
  modules = project_modules(root)
  graph, problems = {}, []
  for mod, path in sorted(modules.items()):
    graph[mod] = set()
    for dep, line, late in imports(path, mod, modules):
      where = f"{os.path.relpath(path, root)}:{line}"
      graph[mod].add(dep)
      if late:
        problems.append(f"{where}: late import of {dep} inside a function")
      a, b = room(mod), room(dep)
      if a != b and RANKS[b] >= RANKS[a]:
        problems.append(f"{where}: {mod} ({a}, rank {RANKS[a]}) imports {dep} ({b}, rank {RANKS[b]})")
  # Cycles (a package importing its own submodules is its __init__ re-exporting: not an edge back).
  state = {}

  def dfs(m, stack):
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if d.startswith(m + "."):
        continue
      if state.get(d) == 1:
        problems.append("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      elif not state.get(d):
        dfs(d, stack + [d])
    state[m] = 2

  for m in sorted(graph):
    if not state.get(m):
      dfs(m, [m])
  return problems


def test_imports_point_one_way_without_cycles():
  problems = problems_in()
  assert not problems, "\n".join(problems)


def test_the_check_finds_upward_late_and_cyclic_imports(tmp_path):
  files = {
      "longcat_jax/__init__.py": "",
      "longcat_jax/model/__init__.py": "",
      "longcat_jax/model/moe.py": "from longcat_jax.parallel import sharding\n",
      "longcat_jax/model/attention.py": "def f():\n  from longcat_jax.model import moe\n",
      "longcat_jax/parallel/__init__.py": "",
      "longcat_jax/parallel/sharding.py": "from longcat_jax.model import moe\n",
      "pallas_kernels/__init__.py": "",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  found = "\n".join(problems_in(str(tmp_path)))
  assert "longcat_jax/model/moe.py:1: longcat_jax.model.moe (longcat_jax.model, rank 3) imports" in found
  assert "longcat_jax/model/attention.py:2: late import of longcat_jax.model.moe" in found
  assert "import cycle: longcat_jax.model.moe -> longcat_jax.parallel.sharding -> longcat_jax.model.moe" in found
