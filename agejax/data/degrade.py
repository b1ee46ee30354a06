"""How real photos look: grayscale, sepia, blur, low resolution, darkness, JPEG damage, scan noise.

Pure JAX functions on one float32 image (H, W, 3) in [0, 255], each `fn(key, img) -> img` drawing
its strength from `key` within the ranges below. `degrade_image` applies each with the probability
its config field gives (`config.augment.<name>`, 0 = off), in the order of `DEGRADATIONS`, inside
the jitted training step (`augment.augment_image`). `apply(name, key, images)` degrades a batch
with one of them at probability 1: the robustness benchmark (`python -m agejax.robustness`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# A sepia print's tint: gray g maps to g * SEPIA (warm brown in the mid-tones; clipped at 255).
_SEPIA = np.array([1.07, 0.74, 0.43], np.float32) * 1.12


def _gray(img):
  return jnp.sum(img * _LUMA, axis=-1, keepdims=True)


def grayscale(key, img):
  """A black-and-white photo."""
  del key
  return jnp.broadcast_to(_gray(img), img.shape)


def sepia(key, img):
  """A sepia print: gray, tinted brown, contrast lowered by up to 30% (faded)."""
  fade = jax.random.uniform(key, (), minval=0.7, maxval=1.0)
  g = _gray(img)
  g = (g - 128.0) * fade + 128.0
  return jnp.clip(g * _SEPIA, 0.0, 255.0)


def _blur_1d(img, sigma, axis, radius):
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (t / sigma) ** 2)
  w = w / jnp.sum(w)
  pad = [(0, 0)] * img.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(img, pad, mode="edge")
  n = img.shape[axis]
  return sum(w[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(2 * radius + 1))


def blur(key, img):
  """Out of focus or motion-free camera shake: a Gaussian blur of sigma U(1, 3) px at 150 px
  (scaled with the image's side)."""
  scale = img.shape[0] / 150
  sigma = jax.random.uniform(key, (), minval=1.0, maxval=3.0) * scale
  radius = int(np.ceil(3 * 3.0 * scale))
  return _blur_1d(_blur_1d(img, sigma, 0, radius), sigma, 1, radius)


def low_resolution(key, img):
  """A face that was small in the photo: down to U(1/6, 1/3) of its side (antialiased), back up
  (linear). The image is edge-padded for the round trip, so no dark border comes in."""
  r = jax.random.uniform(key, (), minval=1 / 6, maxval=1 / 3)
  pad = 8
  x = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  small = jax.image.scale_and_translate(x, x.shape, (0, 1), jnp.array([r, r]), jnp.zeros(2), "linear",
                                        antialias=True)
  big = jax.image.scale_and_translate(small, x.shape, (0, 1), jnp.array([1 / r, 1 / r]), jnp.zeros(2), "linear",
                                      antialias=False)
  return big[pad:-pad, pad:-pad]


def dark(key, img):
  """Under-exposed: brightness x U(0.3, 0.6), then a gamma of U(1.1, 1.5) (shadows crushed)."""
  kb, kg = jax.random.split(key)
  b = jax.random.uniform(kb, (), minval=0.3, maxval=0.6)
  g = jax.random.uniform(kg, (), minval=1.1, maxval=1.5)
  return 255.0 * (jnp.clip(img * b, 0.0, 255.0) / 255.0) ** g


# The JPEG standard's luminance and chrominance quantisation tables (ITU T.81, Annex K).
_Q_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
_Q_CHROMA = np.full((8, 8), 99.0, np.float32)
_Q_CHROMA[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99], np.float32).reshape(4, 4)


def _dct_matrix() -> np.ndarray:
  k, n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  m = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
  m[0] /= np.sqrt(2)
  return m.astype(np.float32)


_DCT = _dct_matrix()


def jpeg(key, img):
  """JPEG damage at quality U(5, 25): YCbCr, 8x8 block DCT, the standard tables scaled by the
  quality (libjpeg's formula), rounding, back. No chroma subsampling and no entropy coding (they
  lose nothing more or are lossless), so this is the codec's loss, as a pure function."""
  q = jax.random.uniform(key, (), minval=5.0, maxval=25.0)
  scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2 * q) / 100.0
  h, w = img.shape[:2]
  ph, pw = (-h) % 8, (-w) % 8
  x = jnp.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  ycc = jnp.stack([0.299 * r + 0.587 * g + 0.114 * b,
                   -0.168736 * r - 0.331264 * g + 0.5 * b,
                   0.5 * r - 0.418688 * g - 0.081312 * b], -1)
  ycc = ycc - jnp.array([128.0, 0.0, 0.0])
  H, W = x.shape[:2]
  blocks = ycc.reshape(H // 8, 8, W // 8, 8, 3).transpose(0, 2, 4, 1, 3)  # (bh, bw, c, 8, 8)
  coef = _DCT @ blocks @ _DCT.T
  table = jnp.stack([jnp.asarray(_Q_LUMA), jnp.asarray(_Q_CHROMA), jnp.asarray(_Q_CHROMA)])
  table = jnp.clip(jnp.floor(table * scale + 0.5), 1.0, 255.0)
  coef = jnp.round(coef / table) * table
  blocks = _DCT.T @ coef @ _DCT
  ycc = blocks.transpose(0, 3, 1, 4, 2).reshape(H, W, 3) + jnp.array([128.0, 0.0, 0.0])
  y, cb, cr = ycc[..., 0], ycc[..., 1], ycc[..., 2]
  rgb = jnp.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
  return jnp.clip(rgb[:h, :w], 0.0, 255.0)


def scan(key, img):
  """A scanned print: contrast down to U(0.6, 0.85) around a lifted black level, film grain
  (Gaussian noise of sigma U(4, 12)), slightly soft (blur sigma 0.7 px at 150 px)."""
  kc, kn, ks = jax.random.split(key, 3)
  c = jax.random.uniform(kc, (), minval=0.6, maxval=0.85)
  sigma = jax.random.uniform(ks, (), minval=4.0, maxval=12.0)
  x = (img - 128.0) * c + 128.0 + 12.0
  x = _blur_1d(_blur_1d(x, 0.7 * img.shape[0] / 150, 0, 2), 0.7 * img.shape[0] / 150, 1, 2)
  noise = jax.random.normal(kn, img.shape[:2] + (1,)) * sigma  # grain is in the print, not per channel
  return jnp.clip(x + noise, 0.0, 255.0)


DEGRADATIONS = {"sepia": sepia, "blur": blur, "low_resolution": low_resolution, "dark": dark, "jpeg": jpeg,
                "scan": scan, "grayscale": grayscale}
# Config fields (`config.augment.<name>`): the probability of each in training. `grayscale` is
# augment's own field (DLDL-v2's augmentation), applied there.
CONFIG_FIELDS = tuple(n for n in DEGRADATIONS if n != "grayscale")


def degrade_image(key, img, cfg: Mapping):
  """Each degradation of CONFIG_FIELDS with probability cfg[name] (missing: 0), independently."""
  keys = jax.random.split(key, 2 * len(CONFIG_FIELDS))
  for i, name in enumerate(CONFIG_FIELDS):
    p = float(cfg.get(name, 0.0) or 0.0)
    if p > 0:
      img = jnp.where(jax.random.uniform(keys[2 * i]) < p, DEGRADATIONS[name](keys[2 * i + 1], img), img)
  return img


def apply(name: str, key, images, ids=None) -> jax.Array:
  """A batch of uint8 or float images (B, H, W, 3) degraded by `name`, as uint8: what a camera or
  scanner would have written. Image i's key is fold_in(fold_in(key, the degradation's position in
  DEGRADATIONS), ids[i]) (ids default 0..B-1), so an image's damage depends on its id alone, not
  on the batch it is in or the other degradations asked for."""
  if name not in DEGRADATIONS:
    raise ValueError(f"unknown degradation {name!r}; choose from {sorted(DEGRADATIONS)}.")
  x = jnp.asarray(images).astype(jnp.float32)
  ids = jnp.arange(x.shape[0]) if ids is None else jnp.asarray(ids)
  base = jax.random.fold_in(key, list(DEGRADATIONS).index(name))
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
  out = jax.vmap(DEGRADATIONS[name])(keys, x)
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
