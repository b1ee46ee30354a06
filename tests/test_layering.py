"""The package's layering, read from its source (every `import`, also inside functions): no import
cycles; the pure core (ldl, losses, metrics, objectives, summaries) imports only itself and the
label names; models never import the trainer, evaluation, data or the command-line tools; the XLA:CPU
code (agejax.cpu) imports no other part of agejax and is entered through its package only."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agejax")
CORE = {"agejax.ldl", "agejax.losses", "agejax.metrics", "agejax.objectives", "agejax.summaries"}
ABOVE_MODELS = ("agejax.train_lib", "agejax.evaluate_lib", "agejax.experiments", "agejax.export", "agejax.cli",
                "agejax.predict_lib", "agejax.demo", "agejax.video", "agejax.data.builders", "agejax.data.pipeline")


def _modules():
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
  return out


def _graph():
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
    graph[name] = {d for d in deps if d in mods and d != name}
  return graph


def _cycles(graph):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        found.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_cycles():
  graph = _graph()
  assert "agejax.evaluate_lib" in graph and "agejax.cpu.conv" in graph
  assert _cycles(graph) == []
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_the_core_and_the_models_import_nothing_above_them():
  graph = _graph()
  for name in CORE:
    assert graph[name] <= CORE | {"agejax.data.labels", "agejax.data"}, (name, graph[name] - CORE)
  for name, deps in graph.items():
    if name.startswith("agejax.models"):
      above = {d for d in deps if d.startswith(ABOVE_MODELS)}
      assert not above, f"{name} imports {above}"


def test_models_stand_beside_the_data_and_above_the_cpu_boundary():
  graph = _graph()
  for name, deps in graph.items():
    if name.startswith("agejax.models"):
      assert not {d for d in deps if d.startswith("agejax.data")}, f"{name} imports the data package"
      assert not {d for d in deps if d.startswith("agejax.cpu.")}, f"{name} reaches inside agejax.cpu"
    if name.startswith("agejax.cpu"):
      assert {d for d in deps if not d.startswith("agejax.cpu")} == set(), f"{name} imports {deps}"
    else:
      inside = {d for d in deps if d.startswith("agejax.cpu.")}
      assert not inside, f"{name} imports {inside}: agejax.cpu's entry points are in its package"
  assert "agejax.cpu" in graph["agejax.models.ops"]
