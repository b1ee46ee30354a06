"""python -m agejax.cpu.native: build (or find) the native CPU kernels for this machine and say so, as JSON."""

import json
import sys

from agejax.cpu import native

width = native.prepare(announce=lambda line: print(line, file=sys.stderr, flush=True))
compiler = native.find_compiler()
print(json.dumps({"vector_floats": width, "library": str(native.library_path(compiler)) if width and compiler else None,
                  "cpu_support": native.cpu_support() or "ok", "enabled": native.enabled()}))
sys.exit(0 if width else 1)
