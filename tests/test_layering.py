"""The package's layering, read from the source with `ast` (nothing is imported).

Layers, bottom to top: core -> assets -> models -> peft -> data -> objectives -> quant -> train ->
recipes -> eval -> harness -> bench -> cli. Every import counts, including those inside functions: a lazy
import that closes a cycle is still a cycle, only one that fails later and harder to read.
`config` is a leaf that reads the objectives registry late, and `eval.metrics` / `eval.robustness`
serve train/evaluate, so they are placed below train.

    python tests/test_layering.py     # prints cycles and upward imports
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxft"

LAYERS = ["core", "assets", "models", "peft", "data", "objectives", "quant", "train", "recipes",
          "eval", "harness", "bench", "cli"]
# Modules whose place is not their folder's.
PLACED = {"jaxft.eval.metrics": "objectives", "jaxft.eval.robustness": "objectives"}
# Not in the layer order: version string, `python -m jaxft`, the config leaf.
UNLAYERED = {"jaxft", "jaxft.__main__", "jaxft.config"}
MODELS_MAY_IMPORT = {"core", "assets", "models"}
# ("module", "imported module") kept on purpose -> the reason; none today.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known) -> str | None:
  """`jaxft.peft.layers.Adapter` -> `jaxft.peft.layers`: the longest known module prefix."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in known:
      return candidate
  return None


def imports_of(name: str, path: pathlib.Path, known) -> dict[str, int]:
  """Module -> {imported jaxft module: first line}. `from a import b` counts `a.b` when b is a
  submodule and `a` otherwise. Importing `jaxft.p.m` from outside package `jaxft.p` also counts
  `jaxft.p`, whose __init__ runs first (and may import the rest of the package)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  is_package = path.name == "__init__.py"
  found: dict[str, int] = {}

  def add(target, line):
    mod = _resolve(target, known)
    if mod is None:
      return
    parts = mod.split(".")
    for n in range(2, len(parts) + 1):
      dep = ".".join(parts[:n])
      inside = name == dep or name.startswith(dep + ".")
      if dep in known and not inside:
        found[dep] = min(line, found.get(dep, line))

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "jaxft":
          add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
      if base.split(".")[0] != "jaxft":
        continue
      for alias in node.names:
        if f"{base}.{alias.name}" in known:
          add(f"{base}.{alias.name}", node.lineno)
        else:
          add(base, node.lineno)
  return found


def graph() -> dict[str, dict[str, int]]:
  mods = modules()
  return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer(module: str) -> str | None:
  if module in PLACED:
    return PLACED[module]
  if module in UNLAYERED:
    return None
  return module.split(".")[1]


def find_cycles(g) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each as a cycle path."""
  index, low, on_stack, stack, sccs = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in g.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1:
        sccs.append(sorted(scc))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return [_cycle_in(g, scc) for scc in sccs]


def _cycle_in(g, scc) -> list[str]:
  """One concrete cycle through the component's first module (breadth-first back to it)."""
  members, start = set(scc), scc[0]
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(g[v]):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if w in members and w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  return scc


def _describe(g, cycle) -> str:
  return " -> ".join(f"{a} (line {g[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def upward_imports(g) -> list[tuple[str, str, str]]:
  """(module, imported module, "module:line imports target (layer -> higher layer)"); a package
  whose __init__ imports nothing (jaxft.eval on the way to jaxft.eval.metrics) is no dependency."""
  packages = {name for name, path in modules().items() if path.name == "__init__.py"}
  out = []
  for mod, targets in sorted(g.items()):
    own = layer(mod)
    for target, line in sorted(targets.items()):
      theirs = layer(target)
      if own not in LAYERS or theirs not in LAYERS or (target in packages and not g[target]):
        continue  # unplaced modules are test_every_module_has_a_layer's to report
      if LAYERS.index(theirs) > LAYERS.index(own):
        out.append((mod, target, f"{mod}:{line} imports {target} ({own} -> {theirs})"))
  return out


def test_no_import_cycles():
  g = graph()
  cycles = find_cycles(g)
  assert not cycles, "import cycles:\n" + "\n".join(_describe(g, c) for c in cycles)


def test_every_module_has_a_layer():
  """A new top-level module or folder is placed in LAYERS (or UNLAYERED) on purpose."""
  unplaced = [m for m in modules() if m not in UNLAYERED and layer(m) not in LAYERS]
  assert not unplaced, f"add these to LAYERS, PLACED or UNLAYERED: {unplaced}"


def test_no_upward_imports():
  """Rule 3: nothing imports from a layer above its own (eval.metrics / robustness, which train
  uses, count as below train, so they may not import it)."""
  bad = [text for mod, target, text in upward_imports(graph())
         if (mod, target) not in ALLOWED_UPWARD]
  assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_models_import_only_core_and_assets():
  bad = [f"{mod}:{line} imports {target}"
         for mod, targets in graph().items() if layer(mod) == "models"
         for target, line in targets.items() if layer(target) not in MODELS_MAY_IMPORT]
  assert not bad, "models reach above their layer:\n" + "\n".join(bad)


def test_core_is_a_leaf():
  bad = [f"{mod}:{line} imports {target}"
         for mod, targets in graph().items() if layer(mod) == "core"
         for target, line in targets.items() if layer(target) != "core"]
  assert not bad, "jaxft/core imports the package:\n" + "\n".join(bad)


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
  pkg = tmp_path / "jaxft" / "sub"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from jaxft.sub import b\n")
  (pkg / "b.py").write_text("from . import a\nfrom .a import f\n")
  (pkg / "c.py").write_text("import os\n\n\ndef g():\n  import jaxft.other.x\n")
  known = {"jaxft.sub", "jaxft.sub.a", "jaxft.sub.b", "jaxft.sub.c", "jaxft.other",
           "jaxft.other.x"}
  assert imports_of("jaxft.sub.a", pkg / "a.py", known) == {"jaxft.sub.b": 2}
  assert imports_of("jaxft.sub.b", pkg / "b.py", known) == {"jaxft.sub.a": 1}
  # Another package's submodule runs that package's __init__ first.
  assert imports_of("jaxft.sub.c", pkg / "c.py", known) == {"jaxft.other": 5, "jaxft.other.x": 5}
  g = {"x": {"y": 1}, "y": {"z": 1}, "z": {"x": 1}, "w": {"x": 1}}
  assert find_cycles(g) == [["x", "y", "z", "x"]]


if __name__ == "__main__":
  g = graph()
  for c in find_cycles(g):
    print("cycle:", _describe(g, c))
  for _, _, text in upward_imports(g):
    print("upward:", text)
