"""The documents stay true to the code: the API page, docstrings of the pure functions, README commands.

    python -m tests.test_docs      # rewrite docs/api.md from the docstrings
"""

import inspect
import os

from agejax import ldl, losses, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PURE = (ldl, losses, metrics)


def public_functions(module):
  return [(name, fn) for name, fn in inspect.getmembers(module, inspect.isfunction)
          if not name.startswith("_") and fn.__module__ == module.__name__]


def render_api() -> str:
  lines = ["# API of the pure functions", "",
           "`agejax.ldl` (label distributions, the expectation layer), `agejax.losses` and `agejax.metrics`:",
           "pure `jax.numpy` functions of arrays, jit-able, vmap-able and differentiable, with no Flax and",
           "no state. Each docstring gives the arguments' shapes, the return value, the formula and the",
           "reference; this page lists their first lines (`help(agejax.losses.dldl_v2)` shows the rest).",
           "Regenerate it with `python -m tests.test_docs`.", ""]
  for module in PURE:
    lines += [f"## `{module.__name__}`", "", inspect.getdoc(module).splitlines()[0], "",
              "| function | what it computes |", "|---|---|"]
    for name, fn in public_functions(module):
      summary = inspect.getdoc(fn).splitlines()[0].replace("|", "\\|")
      params = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                         for p in inspect.signature(fn).parameters.values())
      lines.append(f"| `{name}({params})` | {summary} |")
    lines.append("")
  return "\n".join(lines)


def test_every_pure_function_states_args_returns_and_reference():
  for module in PURE:
    for name, fn in public_functions(module):
      doc = inspect.getdoc(fn) or ""
      sections = [s for s in ("Args:", "Returns:", "References:") if s not in doc]
      assert not sections, f"{module.__name__}.{name} lacks {sections}"
      for param in inspect.signature(fn).parameters:
        assert f"  {param}:" in doc, f"{module.__name__}.{name}: argument {param} is not described"


def test_api_page_matches_the_docstrings():
  with open(os.path.join(ROOT, "docs", "api.md")) as f:
    assert f.read() == render_api(), "docs/api.md is stale: python -m tests.test_docs"


if __name__ == "__main__":
  with open(os.path.join(ROOT, "docs", "api.md"), "w") as f:
    f.write(render_api())
