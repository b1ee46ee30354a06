"""The grain input pipeline: TFDS array_record source -> decoded, resized uint8 batches.

Training chain (MaxText's, over `tfds` data sources):
  MapDataset.source -> shuffle(seed) -> repeat (reshuffled each epoch)
  -> [process_index::process_count] -> decode + resize -> batch(global // processes)
  -> to_iter_dataset -> mp_prefetch(workers)
Every step is index based, so the iterator's state is a few integers: it goes
into the checkpoint and a resumed run sees exactly the batches it would have seen.

Host work is JPEG decoding and resizing only (PIL, with JPEG DCT scaling). The
random augmentation runs on the accelerator inside the jitted step
(`agejax.data.augment`): on GPU/TPU hosts, whose CPUs are few per chip, that
keeps the host from being the bottleneck; on CPU it costs the same either way.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np
from PIL import Image, ImageOps

from agejax.data.images import to_rgb8

LABEL_KEYS = ("age", "sigma", "gender", "race", "age_group", "label_conflict")


def decode_face(data: bytes, size: int) -> np.ndarray:
  """JPEG bytes -> (size, size, 3) uint8: shorter side resized to `size`, centre crop."""
  with Image.open(io.BytesIO(data)) as img:
    img.draft("RGB", (size, size))  # decode at the smallest DCT scale still >= size
    img = Image.fromarray(to_rgb8(img))
    return np.asarray(ImageOps.fit(img, (size, size), Image.BILINEAR))


@dataclasses.dataclass(frozen=True)
class Decode(grain.transforms.Map):
  size: int
  extra_keys: tuple[str, ...] = ()  # per-record arrays attached by `_with_index`

  def map(self, ex: dict[str, Any]) -> dict[str, np.ndarray]:
    try:
      image = decode_face(ex["image"], self.size)
    except Exception as e:  # PIL's many errors for damaged bytes
      name = ex.get("filename", b"?")
      raise DamagedRecordError(f"record {int(ex.get('index', -1))} ({name.decode(errors='replace')}): the stored "
                               f"image does not decode ({type(e).__name__}: {e}); check the dataset with "
                               "python -m agejax.data.build NAME --verify.") from None
    out = {"image": image}
    for k in LABEL_KEYS + ("index",) + self.extra_keys:
      if k in ex:
        out[k] = np.asarray(ex[k])
    return out


class DamagedRecordError(ValueError):
  """A built dataset's record that cannot be read or decoded; the message names the files and how to rebuild."""


def describe_source(source) -> tuple[str, str]:
  """(what, rebuild hint) for messages: "utkface train (/data/utkface/default/1.1.0)"."""
  info = getattr(source, "dataset_info", None)
  if info is None:
    return "the dataset", "rebuild it"
  name, split, where = info.name, getattr(source, "split", "?"), info.data_dir
  return (f"{name} {split} ({where}/*-{split}.array_record*)",
          f"check every record with: python -m agejax.data.build {name} --verify; rebuild with --rebuild")


def read_record(source, i: int) -> dict:
  """source[i], or DamagedRecordError naming the dataset's files and the record."""
  try:
    return source[i]
  except Exception as e:  # array_record raises RuntimeError("Corrupted Riegeli/records file ...")
    what, hint = describe_source(source)
    raise DamagedRecordError(f"record {i} of {what} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); the file is damaged: {hint}.") from None


def as_data_error(e: BaseException, files: list[str]) -> BaseException:
  """A data-iterator failure as one clear error: DamagedRecordError as it is; a storage error grain
  re-raised without the record (a damaged file) as DamagedRecordError naming `files`; others unchanged."""
  if isinstance(e, DamagedRecordError):
    return e
  text = str(e)
  if "DamagedRecordError" in text:  # re-raised from a worker process: keep the original message
    return DamagedRecordError(text.split("DamagedRecordError:")[-1].strip().splitlines()[0])
  if "Corrupted" in text or "Riegeli" in text:
    return DamagedRecordError(f"a training record cannot be read ({text.splitlines()[0][:200]}); the dataset "
                              f"files are damaged: {', '.join(files) or 'see the data_dir'}. Check them with "
                              "python -m agejax.data.build NAME --verify and rebuild with --rebuild.")
  return e


def label_array(source, key: str) -> np.ndarray:
  """One label of every record of `source`, in record order (reads the records, decodes no image)."""
  return np.asarray([source[i][key] for i in range(len(source))])


def _with_index(source, per_record: dict[str, np.ndarray] | None = None, offset: int = 0, source_id: int = 0):
  """Attach each record's index plus `offset` (to join predictions back to file names; in a mixture
  unique over all sources), its `source` number, and its row of every `per_record` array
  (len(source) rows each: e.g. a teacher's distributions)."""
  per_record = per_record or {}
  for k, v in per_record.items():
    if len(v) != len(source):
      raise ValueError(f"per-record {k!r} has {len(v)} rows for a split of {len(source)} records.")
  return grain.MapDataset.range(len(source)).map(
      lambda i: {**read_record(source, int(i)), "index": np.int32(offset + i), "source": np.int32(source_id),
                 **{k: v[int(i)] for k, v in per_record.items()}})


def train_iterator(source, *, size: int, global_batch: int, seed: int, workers: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   per_record: dict[str, np.ndarray] | None = None, weights: list[float] | None = None):
  """An infinite, checkpointable iterator of this process's share of each global batch.

  Rows carry their record `index`; augmentation keys derive from it, so a
  global batch is augmented the same however it is split over processes. Each array of
  `per_record` (indexed by record) adds its rows to the batches under its key.

  A mixture: `source` a list of data sources and `weights` their sampling weights. Each source is
  shuffled (seed + its position) and repeated on its own, then `grain.MapDataset.mix` interleaves
  them by weight; rows carry `source` (the position in the list) and an `index` offset by the
  sizes of the sources before it. The iterator state stays one position, which fixes every source's.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise ValueError(f"global batch {global_batch} is not divisible by the {pc} processes.")
  if weights is None:
    if len(source) < global_batch:
      raise ValueError(f"The training split has {len(source)} images, fewer than one batch of {global_batch}.")
    ds = _with_index(source, per_record).shuffle(seed=seed).repeat(None)
  else:
    if per_record:
      raise ValueError("per-record arrays (a teacher's distributions) are not supported with a dataset mixture.")
    if len(weights) != len(source):
      raise ValueError(f"{len(weights)} weights for {len(source)} sources.")
    offsets = np.cumsum([0] + [len(s) for s in source])
    parts = [_with_index(s, offset=int(offsets[k]), source_id=k).shuffle(seed=seed + k).repeat(None)
             for k, s in enumerate(source)]
    ds = grain.MapDataset.mix(parts, list(weights))
  ds = ds[pi::pc].map(Decode(size, ("source",) + tuple(per_record or ()))).batch(global_batch // pc,
                                                                                 drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=4))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return iter(it)


def eval_batches(source, *, size: int, global_batch: int, process_index: int | None = None,
                 process_count: int | None = None, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every record once, as this process's share of padded global batches.

  All processes yield the same number of batches (collectives must match);
  padding rows have `valid` 0. Each row carries its record `index`.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n = len(source) if limit is None else min(limit, len(source))
  local_batch = global_batch // pc
  per_process = math.ceil(n / pc)
  num_batches = math.ceil(per_process / local_batch)
  ds = _with_index(source)[:n][pi::pc].map(Decode(size))
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
  for _ in range(num_batches):
    rows = []
    for _ in range(local_batch):
      try:
        rows.append(next(it))
      except StopIteration:
        break
    yield pad_batch(rows, local_batch, size)


def pad_batch(rows, batch: int, size: int) -> dict[str, np.ndarray]:
  out = {"image": np.zeros((batch, size, size, 3), np.uint8), "valid": np.zeros((batch,), np.float32),
         "index": np.full((batch,), -1, np.int32)}
  for k in LABEL_KEYS:
    out[k] = np.zeros((batch,), np.float32 if k in ("age", "sigma") else np.int32)
  for i, r in enumerate(rows):
    out["valid"][i] = 1
    out["index"][i] = r["index"]
    out["image"][i] = r["image"]
    for k in LABEL_KEYS:
      out[k][i] = r[k]
  return out
