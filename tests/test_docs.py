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


# ------------------------------------------------------------------ README commands

def _readme_commands():
  """Every `python ...` command in README.md's bash and console blocks and inline code, as token lists."""
  import re
  import shlex
  text = open(os.path.join(ROOT, "README.md")).read()
  commands = []
  blocks = re.findall(r"```(?:bash|console)\n(.*?)```", text, re.S)
  blocks += re.findall(r"`(python [^`\n]+)`", text)  # commands in tables and prose
  for block in blocks:
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.strip()
      if line.startswith("$ "):
        line = line[2:]
      line = line.split(" #")[0].split(" > ")[0].strip()
      tokens = shlex.split(line) if line else []
      while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        tokens = tokens[1:]  # VAR=value prefixes
      if tokens[:1] in (["python"], ["python3"]):
        commands.append(tokens[1:])
      elif tokens[:1] == ["agejax"] and len(tokens) > 1:  # the console script: its subcommand's module
        from agejax.__main__ import COMMANDS
        assert tokens[1] in COMMANDS, f"README runs agejax {tokens[1]}, which is not a subcommand"
        commands.append(["-m", COMMANDS[tokens[1]], *tokens[2:]])
  return commands


def _defined_flags(source_path):
  import re
  src = open(source_path).read()
  wrapped = re.search(r"from (agejax\.tools\.\w+) import run", src)
  if wrapped:  # train.py, evaluate.py, predict.py: thin wrappers of agejax.tools
    import importlib.util
    src = open(importlib.util.find_spec(wrapped.group(1)).origin).read()
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", src)) | set(re.findall(r"add_argument\(\s*\"--(\w+)\"", src))
  return names | {"help", "helpfull"}


def _check_config(spec, overrides):
  import importlib.util
  path, _, variants = spec.partition(":")
  assert os.path.exists(os.path.join(ROOT, path)), path
  module_spec = importlib.util.spec_from_file_location("readme_cfg", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variants or None)  # an unknown variant raises
  for key in overrides:
    node = config
    for part in key.split("."):
      node = node[part]  # an unknown key raises


def test_readme_commands_name_what_exists():
  import importlib.util
  commands = _readme_commands()
  assert len(commands) > 20
  for tokens in commands:
    if tokens[:2] == ["-m", "pytest"]:
      continue
    if tokens[0] == "-m":
      module = tokens[1]
      found = importlib.util.find_spec(module)
      assert found is not None, f"README runs python -m {module}, which does not exist"
      source, args = found.origin, tokens[2:]
    else:
      source, args = os.path.join(ROOT, tokens[0]), tokens[1:]
      assert os.path.exists(source), f"README runs {tokens[0]}, which does not exist"
    flags = _defined_flags(source)
    spec, overrides = None, []
    for i, token in enumerate(args):
      if not token.startswith("--"):
        continue
      name = token[2:].split("=")[0]
      if name.startswith("config."):
        overrides.append(name[len("config."):])
      elif name == "config":
        spec = token.split("=", 1)[1] if "=" in token else args[i + 1]
      else:
        assert name in flags or (name.startswith("no") and name[2:] in flags), \
            f"README: {' '.join(tokens)}: {token} is not a flag of {os.path.relpath(source, ROOT)}"
    if spec:
      _check_config(spec, overrides)
