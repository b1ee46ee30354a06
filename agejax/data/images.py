"""Any PIL image -> 8-bit RGB, without clipping deeper images to white.

`Image.convert("RGB")` clips 16-bit and 32-bit greyscale (PNG `I;16`, mode `I`, float
`F`) to 255, so a 16-bit scan becomes a white square that still gets a confident age.
`to_rgb8` scales them to 8 bits, composites transparency on white, and converts the
rest (palette, CMYK, LA, 16-bit RGB, which Pillow already reads as 8-bit RGB) as
Pillow does. Used by `predict` (via `agejax.faces.read_photo`), the input pipeline
and the dataset builders alike.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_DEEP_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb8(img: Image.Image) -> np.ndarray:
  """(H, W, 3) uint8 RGB of `img`.

  16-bit greyscale is divided by 257 (65535 -> 255); mode I (32-bit integers) and F
  (floats) by the full range their values use: 1.0 for floats up to 1, 255 for values
  up to 255, else 65535.
  """
  if img.mode in _DEEP_GREY:
    a = np.asarray(img, np.float64)
    if img.mode.startswith("I;16"):
      top = 65535.0
    else:
      peak = float(a.max()) if a.size else 0.0
      top = 1.0 if (img.mode == "F" and peak <= 1.0) else 255.0 if peak <= 255 else 65535.0
    grey = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.split()[-1])
    return np.asarray(background)
  return np.asarray(img.convert("RGB"))
