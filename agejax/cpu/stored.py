"""Keep a value stored where XLA:CPU would recompute it inside every consumer.

XLA fuses cheap elementwise producers into each of their consumers, so a value
read by several fusions is recomputed in each, and, when a consumer is a
transpose, recomputed in strided order from the tensors behind it. On XLA:CPU
that recomputation cost more than storing the value once (docs/CPU.md).
XLA does not duplicate a float division into several consumers, and
x / (1 + 0 x) is exactly x for every finite x (denormals aside, which XLA:CPU
flushes in every op anyway), so dividing once makes XLA compute x inside the
fusion that produces it and store it there; the consumers read the stored
result. Other backends get x back untouched: they need no workaround.
"""

from __future__ import annotations

import jax


def stored(x: jax.Array) -> jax.Array:
  """x, stored once on the CPU backend instead of recomputed in each consumer; bitwise x."""
  if jax.default_backend() != "cpu":
    return x
  return x / (1 + 0 * jax.lax.stop_gradient(x))


@jax.custom_vjp
def stored_input(x: jax.Array) -> jax.Array:
  """Identity; under differentiation `stored(x)`, so a convolution's kernel gradient reads x stored.

  The kernel gradient of an XLA convolution transposes its input to batch-minor
  order, and XLA:CPU fuses x's producers (BatchNorm, ReLU, residual adds) into that
  transpose. Not differentiated (inference) this is a plain identity; its gradient is the identity.
  """
  return x


stored_input.defvjp(lambda x: (stored(x), None), lambda _, g: (g,))
