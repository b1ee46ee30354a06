"""DLDL-v2's training augmentation and test-time preprocessing as pure JAX functions.

Each takes a PRNG key and a batch of uint8 or float images (B, H, W, 3) and is
vmapped per image, so it runs inside the jitted, sharded train step (see
`pipeline` for why). Every transform is switchable from the config
(`config.augment`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from agejax.data import degrade
from agejax.preprocessing import MEAN, STD, normalize  # noqa: F401 (the test-time preprocessing)

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # numpy: importing creates no JAX backend

DEFAULTS = {"flip": 0.5, "grayscale": 0.5, "rescale": True, "rotate": 15.0, "color_jitter": 0.4, "translate": 0.0,
            **{name: 0.0 for name in degrade.CONFIG_FIELDS}}


def _gray(img):
  return jnp.sum(img * _LUMA, axis=-1, keepdims=True)


def _rescale(key, img):
  """Shorter side down to U{s/2..s} and back up: the resolution changes, the framing not."""
  s = img.shape[0]
  target = jax.random.randint(key, (), s // 2, s + 1).astype(jnp.float32)
  r = target / s
  shape = img.shape
  small = jax.image.scale_and_translate(img, shape, (0, 1), jnp.array([r, r]), jnp.zeros(2), "linear", antialias=True)
  return jax.image.scale_and_translate(small, shape, (0, 1), jnp.array([1 / r, 1 / r]), jnp.zeros(2), "linear",
                                       antialias=False)


def _rotate(key, img, max_degrees):
  """Rotation by U(-max, max) degrees about the centre, bilinear, edges replicated."""
  theta = jnp.deg2rad(jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees))
  h, w = img.shape[:2]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  cy, cx = (h - 1) / 2, (w - 1) / 2
  c, s = jnp.cos(theta), jnp.sin(theta)
  src_y = c * (yy - cy) - s * (xx - cx) + cy
  src_x = s * (yy - cy) + c * (xx - cx) + cx
  channels = [jax.scipy.ndimage.map_coordinates(img[..., ch], [src_y, src_x], order=1, mode="nearest")
              for ch in range(img.shape[-1])]
  return jnp.stack(channels, axis=-1)


def _translate(key, img, fraction):
  """Shift by whole pixels, up to `fraction` of each side in each direction, edges replicated.

  The cheap augmentation: a pad and a slice, no resampling, so it costs almost
  nothing inside the train step (rotation's bilinear gather is ~10% of a 64 px step).
  """
  h, w = img.shape[:2]
  my, mx = max(1, round(fraction * h)), max(1, round(fraction * w))
  padded = jnp.pad(img, ((my, my), (mx, mx), (0, 0)), mode="edge")
  dy, dx = jax.random.randint(key, (2,), 0, jnp.array([2 * my + 1, 2 * mx + 1]))
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), img.shape)


def _color_jitter(key, img, strength):
  """Brightness, contrast and saturation factors U(1 - s, 1 + s), applied in a random order."""
  kf, ko = jax.random.split(key)
  f = jax.random.uniform(kf, (3,), minval=1 - strength, maxval=1 + strength)
  order = jax.random.permutation(ko, 3)
  ops = (lambda x, a: x * a,                                       # brightness
         lambda x, a: (x - jnp.mean(_gray(x))) * a + jnp.mean(_gray(x)),  # contrast
         lambda x, a: (x - _gray(x)) * a + _gray(x))                # saturation
  for i in range(3):
    op = order[i]
    x_new = [ops[j](img, f[j]) for j in range(3)]
    img = jnp.select([op == 0, op == 1, op == 2], x_new)
    img = jnp.clip(img, 0.0, 255.0)
  return img


def augment_image(key, img, cfg: Mapping):
  """One image, float32 in [0, 255]."""
  k = jax.random.split(key, 6)
  if cfg.get("rescale"):
    img = _rescale(k[0], img)
  if cfg.get("rotate", 0) > 0:
    img = _rotate(k[1], img, float(cfg["rotate"]))
  if cfg.get("translate", 0) > 0:
    img = _translate(k[5], img, float(cfg["translate"]))
  if cfg.get("color_jitter", 0) > 0:
    img = _color_jitter(k[2], img, float(cfg["color_jitter"]))
  if any(float(cfg.get(name, 0) or 0) > 0 for name in degrade.CONFIG_FIELDS):  # photos' looks (`degrade`)
    img = degrade.degrade_image(jax.random.fold_in(key, 7), img, cfg)
  if cfg.get("grayscale", 0) > 0:
    gray = jnp.broadcast_to(_gray(img), img.shape)
    img = jnp.where(jax.random.uniform(k[3]) < cfg["grayscale"], gray, img)
  if cfg.get("flip", 0) > 0:
    img = jnp.where(jax.random.uniform(k[4]) < cfg["flip"], img[:, ::-1], img)
  return img


def augment(key, images, cfg: Mapping, example_ids=None) -> jax.Array:
  """Augment a batch and normalise it.

  Each image's key is `fold_in(key, example_ids[i])` (default: its position),
  so passing record indices makes the result independent of how the batch is
  ordered or sharded.
  """
  x = images.astype(jnp.float32)
  ids = jnp.arange(x.shape[0]) if example_ids is None else example_ids
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  x = jax.vmap(lambda k, i: augment_image(k, i, cfg))(keys, x)
  return normalize(x)
