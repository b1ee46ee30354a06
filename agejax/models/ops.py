"""The layers every network is built from, passed in as an argument (flax's examples/imagenet style).

    Ops()              the plain Flax/XLA set: nn.Conv, nn.BatchNorm, nn.max_pool (every backend)
    select("cpu")      the same layers computed faster by XLA:CPU on one CPU device (agejax.cpu)

Both sets take the same arguments and create the same variables (names, shapes, initial
values), so a checkpoint trained with one loads into the other; their outputs and gradients
agree up to float rounding (tests/test_ops.py). `select` picks the set a model gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

ModuleDef = Any
KINDS = ("auto", "plain", "cpu")

# He-normal over fan-out, as DLDL-v2's official code (kaiming_normal_, mode="fan_out").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class Ops:
  """conv: nn.Conv's interface; norm: nn.BatchNorm's; max_pool: nn.max_pool's signature."""
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  max_pool: Callable = nn.max_pool
  name: str = "plain"


PLAIN = Ops()


def select(kind: str = "auto", platform: str = "cpu", device_count: int = 1) -> Ops:
  """The op set for a model that runs on `device_count` devices of `platform`.

  "auto": the CPU set on a single CPU device, the plain set everywhere else (several CPU
  devices shard the batch, which the CPU set's custom calls cannot); "plain" / "cpu" force one.
  """
  if kind not in KINDS:
    raise ValueError(f"ops {kind!r}: choose one of {KINDS}.")
  if kind == "plain" or (kind == "auto" and (platform != "cpu" or device_count != 1)):
    return PLAIN
  from agejax import cpu
  return Ops(**cpu.layers(), name="cpu")
