"""Small generated files in each dataset's official layout (no real images in the repo)."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 40, fmt: str = "JPEG") -> bytes:
  rng = np.random.RandomState(seed)
  base = rng.randint(0, 255, (4, 4, 3)).astype(np.uint8)
  img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
  out = io.BytesIO()
  img.save(out, format=fmt)
  return out.getvalue()


def write_image(path: str, seed: int, size: int = 40, fmt: str = "JPEG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(jpeg_bytes(seed, size, fmt))


def utkface_archive(manual_dir: str, names: list[str], extra: dict[str, bytes] | None = None):
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "UTKFace.tar.gz"), "w:gz") as tar:
    items = [(n, jpeg_bytes(i)) for i, n in enumerate(names)] + list((extra or {}).items())
    for name, data in items:
      info = tarfile.TarInfo(f"UTKFace/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def chalearn16(manual_dir: str, n: int = 4):
  for split, folder in (("train", "train"), ("valid", "valid"), ("test", "test")):
    rows = ["image,mean,stdv"]
    for i in range(n):
      name = f"{i:06d}.jpg"
      write_image(os.path.join(manual_dir, folder, name), i)
      rows.append(f"{name},{20 + i + 0.5},{1.5 + i}")
    open(os.path.join(manual_dir, f"{split}_gt.csv"), "w").write("\n".join(rows) + "\n")


def chalearn15(manual_dir: str, n: int = 4):
  for split in ("Train", "Validation"):
    rows = []
    for i in range(n):
      name = f"image_{i}.jpg"
      write_image(os.path.join(manual_dir, split, name), 10 + i)
      rows.append(f"{name};{30 + i};{2.0 + i / 2}")
    open(os.path.join(manual_dir, f"{split}.csv"), "w").write("\n".join(rows) + "\n")


def morph_lists(manual_dir: str, n: int = 5):
  for split in ("train", "test"):
    rows = []
    for i in range(n):
      name = f"{i + (0 if split == 'train' else 500):06d}_{i}M{20 + i}.JPG"  # MORPH's names: subject first
      write_image(os.path.join(manual_dir, "images", name), i)
      rows.append(f"{name},{20 + i},{2.0}")
    open(os.path.join(manual_dir, f"morph_{split}.csv"), "w").write("\n".join(rows) + "\n")


def morph_metadata(manual_dir: str, n: int = 20):
  rows = ["id_num,picture_num,dob,doa,race,gender,facial_hair,age,age_diff,glasses,photo"]
  for i in range(n):
    rel = f"Album2/{i:06d}_00M{20 + i}.JPG"
    write_image(os.path.join(manual_dir, "images", rel), i)
    rows.append(f"{i:06d},0,1/1/1980,1/1/2000,{'BWAHO'[i % 5]},{'MF'[i % 2]},0,{20 + i},0,0,{rel}")
  open(os.path.join(manual_dir, "morph.csv"), "w").write("\n".join(rows) + "\n")


ADIENCE_HEADER = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"


def adience(manual_dir: str, per_fold: int = 3):
  ages = ["(0, 2)", "(25, 32)", "(60, 100)", "35", "None", "(38, 43)"]
  for fold in range(5):
    rows = [ADIENCE_HEADER]
    for i in range(per_fold + 1):  # one extra row with a "None" age per fold
      user = f"user{fold}"
      orig = f"img{i}.jpg"
      age = ages[4] if i == per_fold else ages[(fold + i) % 6 if (fold + i) % 6 != 4 else 0]
      write_image(os.path.join(manual_dir, "aligned", user, f"landmark_aligned_face.{i}.{orig}"), fold * 10 + i)
      rows.append(f"{user}\t{orig}\t{i}\t{age}\t{'mfu'[i % 3]}\t0\t0\t10\t10\t0\t0\t50")
    open(os.path.join(manual_dir, f"fold_{fold}_data.txt"), "w").write("\n".join(rows) + "\n")


def folder(manual_dir: str, n: int = 24, with_split: bool = True, size: int = 40):
  rows = ["path,age,sigma,gender,race,split"]
  for i in range(n):
    rel = f"faces/{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
    write_image(os.path.join(manual_dir, rel), i, size=size, fmt="PNG" if i % 5 == 0 else "JPEG")
    split = ("train" if i % 4 else "test") if i % 8 else "validation"
    rows.append(f"{rel},{5 + (i * 7) % 80},{0 if i % 2 else 2.5},{i % 2},{i % 5},{split if with_split else ''}")
  open(os.path.join(manual_dir, "labels.csv"), "w").write("\n".join(rows) + "\n")


def built_folder(root, n: int = 24, size: int = 40, with_split: bool = True):
  """A prepared `folder` dataset under root/data from images generated in root/manual; returns the builder."""
  import tensorflow_datasets as tfds
  from agejax.data import builders
  folder(os.path.join(str(root), "manual"), n=n, with_split=with_split, size=size)
  b = builders.get_builder("folder", None, os.path.join(str(root), "data"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.path.join(str(root), "manual")))
  return b


def smoke_exported(config, out_dir: str, steps: int = 3, onnx: bool = False, check_faces=None):
  """Trains `config` for `steps` steps and exports the state to `out_dir` (with model.onnx where
  `onnx`, checked on `check_faces`): (trainer, state, path)."""
  from agejax import export, train_lib
  trainer = train_lib.Trainer(config)
  state = trainer.init_state()
  it = trainer.train_iterator()
  for _ in range(steps):
    state, _ = trainer.train_step(state, trainer.global_batch(next(it)))
  return trainer, state, export.export_state(trainer, state, out_dir, onnx=onnx, check_faces=check_faces)


# Where a 300x340 AAF photo's 49 landmarks lie in the fakes: eyes at y=150, 80 px apart, nose below.
def aaf_points(dx: float = 0.0) -> np.ndarray:
  pts = np.zeros((49, 2))
  pts[0:10] = [[95 + 12 * i + dx, 120] for i in range(10)]                  # eyebrows
  pts[10:19] = [[150 + dx, 150 + 8 * i] for i in range(9)]                  # nose; 16 its base
  pts[16] = [150 + dx, 205]
  pts[19:25] = [[100 + 6 * i + dx, 150] for i in range(6)]                  # image-left eye: 19 outer, 22 inner
  pts[19], pts[22] = [100 + dx, 150], [130 + dx, 150]
  pts[25:31] = [[170 + 6 * i + dx, 150] for i in range(6)]                  # image-right eye: 25 inner, 28 outer
  pts[25], pts[28] = [170 + dx, 150], [200 + dx, 150]
  pts[31:49] = [[120 + 3 * i + dx, 240] for i in range(18)]                 # mouth
  return pts


def aaf_archive(manual_dir: str, names: list[str], ages: dict[str, int] | None = None,
                drop_points: tuple[str, ...] = ()):
  """AAF-train.tar.gz (noise photos: no detector finds a face, so the landmarks align them) and labels.csv."""
  os.makedirs(manual_dir, exist_ok=True)
  rows = ["file_name,age,gender,group_id,group_size,label_conflict"]
  with tarfile.open(os.path.join(manual_dir, "AAF-train.tar.gz"), "w:gz") as tar:
    for i, name in enumerate(names):
      data = jpeg_bytes(i, size=300)
      info = tarfile.TarInfo(f"original images/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
      if name not in drop_points:
        text = "\n".join(f"{x:.3f} {y:.3f}" for x, y in aaf_points(i % 3)).encode()
        info = tarfile.TarInfo(f"key points/{name[:-4]}.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
      age = (ages or {}).get(name, int(name[6:8]))
      rows.append(f"{name},{age},{'female' if int(name[:5]) < 7381 else 'male'},{name},1,{i % 7 == 0:d}")
  open(os.path.join(manual_dir, "labels.csv"), "w").write("\n".join(rows) + "\n")


def aaf_names(per_split: dict[str, int]) -> list[str]:
  """The first names of each split of agejax's shipped AAF split table."""
  from agejax.data.builders import aaf
  table = aaf.split_table()
  out = []
  for split, n in per_split.items():
    out += [k for k, v in sorted(table.items()) if v == split][:n]
  return out


def built_utkface(root, per_split: dict[str, int]):
  """A prepared fake `utkface` under root/data (generated chips named from agejax's split table)."""
  from agejax.data import builders
  from agejax.data.builders import utkface
  names = []
  table = utkface.split_table()
  for split, n in per_split.items():
    names += [k for k, r in sorted(table.items()) if r["split"] == split and utkface.NAME_RE.match(k)][:n]
  utkface_archive(os.path.join(str(root), "utk_manual"), names)
  return builders.ensure_built("utkface", None, os.path.join(str(root), "data"), os.path.join(str(root), "utk_manual"))
