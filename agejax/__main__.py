"""`agejax SUBCOMMAND ...` and `python -m agejax SUBCOMMAND ...`: one command for every tool.

    agejax predict photo.jpg                     # the age of the faces in a photo (bundled model)
    agejax train --config configs/utkface.py:face_resnet --workdir runs/face
    agejax evaluate --config ... --workdir runs/face
    agejax export --config ... --workdir runs/face --calibrate
    agejax build utkface --manual_dir DIR        # build a dataset
    agejax demo                                  # the local web page
    agejax bench --mode predict --aligned        # benchmarks (JSON lines)
    agejax robustness --datasets utkface,aaf     # a model under photo degradations

Each subcommand runs its module as `python -m MODULE` would, with the same flags (`--help`).
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "train": "agejax.tools.train", "evaluate": "agejax.tools.evaluate", "predict": "agejax.tools.predict",
    "export": "agejax.export", "build": "agejax.data.build", "demo": "agejax.demo", "bench": "agejax.bench",
    "robustness": "agejax.robustness", "experiments": "agejax.experiments", "distill": "agejax.distill",
    "preview": "agejax.data.preview",
}


def usage() -> str:
  return (__doc__ or "").strip() + "\n\nSubcommands: " + ", ".join(COMMANDS) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"agejax: unknown subcommand {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  sys.argv = [f"agejax {name}", *rest]  # what --help and errors call the program
  runpy.run_module(COMMANDS[name], run_name="__main__")
  return 0


if __name__ == "__main__":
  sys.exit(main())
