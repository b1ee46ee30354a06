"""The shared base of agejax's TFDS builders: one feature schema, one validation path.

Every dataset becomes the same record: encoded JPEG bytes plus labels, so the
input pipeline and the trainer never know which dataset they read. Builders
write `array_record` files through the Python API and never import TensorFlow
(`tfds.features.Image` would: images are stored as raw bytes instead).

Bad input (corrupt or truncated images, missing files, unparsable names or CSV
rows, ages outside `AGE_LIMITS`, negative sigma, duplicate keys) raises
`BadInputError` naming the file and line, or, with `on_error="skip"`, is
skipped and counted in `builder.skipped` for the build command to report.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from agejax.data.images import to_rgb8

# Ages accepted at build time. Training maps them onto the config's label grid.
AGE_LIMITS = (0.0, 120.0)


class BadInputError(ValueError):
  """An input file or label that cannot be used; the message names where it is."""


@dataclasses.dataclass
class Record:
  """One labelled face before validation. `load` returns the image file's bytes."""
  key: str
  where: str                       # "file" or "file:line" for error messages
  load: Callable[[], bytes]
  age: float
  sigma: float = 0.0               # 0: the dataset has no per-image sigma
  gender: int = -1                 # labels.GENDER_NAMES index, -1 unknown
  race: int = -1                   # labels.RACE_NAMES index, -1 unknown
  age_group: int = -1              # Adience group index, -1 where not used
  label_conflict: int = 0          # 1 where duplicate copies disagree (UTKFace)
  subject: str = ""                # the person, where the dataset names them (MORPH id_num, Adience user_id)


HOLDOUT_FRACTION = 0.1


def split_off_holdout(records: Iterable[Record | BadInputError], fraction: float = HOLDOUT_FRACTION
                      ) -> tuple[list[Record | BadInputError], list[Record]]:
  """(train, holdout): about `fraction` of the people (or, where the dataset names none, of the
  images) moved out of a training split, for checkpoint selection apart from the reported split.

  Deterministic: the groups with the smallest MD5 of their name, at least one when there are
  two or more. Unparsable rows stay with train, so they are reported once.
  """
  records = list(records)
  group = lambda r: r.subject or r.key
  names = sorted({group(r) for r in records if isinstance(r, Record)},
                 key=lambda g: hashlib.md5(g.encode()).hexdigest())
  n = max(1, round(fraction * len(names))) if len(names) > 1 else 0
  held = set(names[:n])
  keep = [r for r in records if not isinstance(r, Record) or group(r) not in held]
  return keep, [r for r in records if isinstance(r, Record) and group(r) in held]


def features() -> tfds.features.FeaturesDict:
  scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)
  return tfds.features.FeaturesDict({
      "image": scalar(np.object_),      # encoded JPEG bytes
      "filename": scalar(np.object_),
      "age": scalar(np.float32),
      "sigma": scalar(np.float32),
      "gender": scalar(np.int32),
      "race": scalar(np.int32),
      "age_group": scalar(np.int32),
      "label_conflict": scalar(np.int32),
  })


def to_jpeg(data: bytes, where: str) -> bytes:
  """Check that `data` is a complete, decodable image; return JPEG bytes.

  JPEGs are kept byte for byte; other formats (PNG, BMP, ...) are re-encoded
  at quality 95. The full decode catches truncated files, which `verify()`
  alone does not.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      fmt = img.format
      img.draft("RGB", (img.width // 4 or 1, img.height // 4 or 1))  # fast DCT-scaled decode
      img.load()
    if fmt == "JPEG":
      return data
    with Image.open(io.BytesIO(data)) as img:
      out = io.BytesIO()
      Image.fromarray(to_rgb8(img)).save(out, format="JPEG", quality=95)
      return out.getvalue()
  except Exception as e:  # PIL raises many types for bad files
    raise BadInputError(f"{where}: not a readable image ({type(e).__name__}: {e}).") from e


class FaceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses implement `_split_records(manual_dir) -> {split: iterable of Record}`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # Subclasses list the files that must be in manual_dir, for the error message.
  REQUIRED_FILES: tuple[str, ...] = ()

  def __init__(self, *, on_error: str = "raise", **kwargs):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    self.on_error = on_error
    self.skipped: list[str] = []
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features(), supervised_keys=None,
                                          description=(self.__doc__ or "").strip())

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    return {split: self._generate_examples(records) for split, records in self._split_records(manual_dir).items()}

  def _split_records(self, manual_dir) -> dict[str, Iterable[Record]]:
    raise NotImplementedError

  def _reject(self, message: str):
    if self.on_error == "raise":
      raise BadInputError(message)
    self.skipped.append(message)

  def _generate_examples(self, records: Iterable[Record | BadInputError]) -> Iterator[tuple[str, dict]]:
    """Validate and encode records; record iterators yield a BadInputError for an unparsable row."""
    seen: dict[str, str] = {}
    skipped_before = len(self.skipped)
    for rec in records:
      if isinstance(rec, BadInputError):  # a row that could not even be parsed
        self._reject(str(rec))
        continue
      try:
        if rec.key in seen:
          raise BadInputError(f"{rec.where}: duplicate key {rec.key!r} (first seen at {seen[rec.key]}).")
        if not (math.isfinite(rec.age) and AGE_LIMITS[0] <= rec.age <= AGE_LIMITS[1]):
          raise BadInputError(f"{rec.where}: age {rec.age} is outside {AGE_LIMITS}.")
        if not (math.isfinite(rec.sigma) and rec.sigma >= 0):
          raise BadInputError(f"{rec.where}: sigma {rec.sigma} must be a finite number >= 0.")
        try:
          data = rec.load()
        except (OSError, KeyError) as e:
          raise BadInputError(f"{rec.where}: cannot read the image ({e}).") from e
        jpeg = to_jpeg(data, rec.where)
      except BadInputError as e:
        self._reject(str(e))
        continue
      seen[rec.key] = rec.where
      yield rec.key, {
          "image": jpeg, "filename": rec.key.encode(), "age": np.float32(rec.age),
          "sigma": np.float32(rec.sigma), "gender": np.int32(rec.gender), "race": np.int32(rec.race),
          "age_group": np.int32(rec.age_group), "label_conflict": np.int32(rec.label_conflict)}
    if not seen:
      skipped = self.skipped[skipped_before:]
      raise BadInputError(f"no usable records for this split ({len(skipped)} skipped"
                          + (f"; the first: {skipped[0]}" if skipped else "") + ").")


def read_csv(path, where_name: str | None = None) -> Iterator[tuple[int, list[str]]]:
  """Rows of a CSV/TSV/semicolon file as (line number, fields); the delimiter is sniffed.

  BadInputError, naming the file, for a file that is not UTF-8 or holds no rows.
  """
  raw = open(path, "rb").read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise BadInputError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "save it as UTF-8.") from None
  sample = text[:4096]
  delim = max([",", ";", "\t"], key=sample.count)
  rows = [(i, [c.strip() for c in row]) for i, row in enumerate(csv.reader(io.StringIO(text), delimiter=delim), start=1)
          if row and any(c.strip() for c in row)]
  if not rows:
    raise BadInputError(f"{path}: the file is empty.")
  yield from rows


def read_csv_with_header(path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
  """(header fields, the rows after it); BadInputError for an empty or header-only file."""
  rows = list(read_csv(path))
  if len(rows) < 2:
    raise BadInputError(f"{path}: only a header ({', '.join(rows[0][1])}), no rows.")
  return rows[0][1], iter(rows[1:])


def image_path(root: str, rel: str, where: str) -> str:
  """root/rel for a path read from a labels file; BadInputError where it leaves root
  (absolute, or through '..'), so a labels file cannot read images from elsewhere."""
  root = os.path.abspath(os.fspath(root))
  full = os.path.normpath(os.path.join(root, rel))
  if not rel or os.path.isabs(rel) or os.path.commonpath([root, full]) != root:
    raise BadInputError(f"{where}: the path {rel!r} leaves the image folder {root}; "
                        "labels files name images inside it.")
  return full


def parse_float(value: str, where: str, what: str) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise BadInputError(f"{where}: cannot parse {what} from {value!r}.") from None


def file_loader(path) -> Callable[[], bytes]:
  return lambda: open(path, "rb").read()
