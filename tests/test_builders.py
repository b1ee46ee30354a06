import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from agejax.data import builders
from agejax.data.builders import utkface
from tests import fakes

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "utkface")


def build(name, manual, data_dir, config=None, on_error=None):
  kwargs = {"on_error": on_error} if on_error else {}
  b = builders.get_builder(name, config, str(data_dir), **kwargs)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return b


def rows(b, split):
  src = b.as_data_source(split)
  return sorted((src[i] for i in range(len(src))), key=lambda r: r["filename"])


MALFORMED = ["24_0_1_20170116220224657 .jpg.chip.jpg", "39_1_20170116174525125.jpg.chip.jpg",
             "55_0_0_20170116232725357jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg",
             "61_1_20170109150557335.jpg.chip.jpg"]


def test_utkface_name_parsing_including_the_five_malformed():
  assert utkface.parse_name("100_0_0_20170112213500903.jpg.chip.jpg") == (100, 0, 0)
  assert [utkface.parse_name(n) for n in MALFORMED] == [(24, 0, 1), (39, 1, -1), (55, 0, 0), (61, 1, -1), (61, 1, -1)]
  with pytest.raises(builders.BadInputError, match="not a UTKFace name"):
    utkface.parse_name("hello.jpg")


def test_utkface_split_table_is_duplicate_safe():
  table = utkface.split_table()
  assert len(table) == 23708
  groups = {}
  for r in table.values():
    groups.setdefault(r["group"], set()).add(r["split"])
  assert all(len(s) == 1 for s in groups.values())


def test_utkface_generated_archive(tmp_path):
  table = utkface.split_table()
  by_split = {}
  for name, r in table.items():
    by_split.setdefault(r["split"], []).append(name)
  names = by_split["train"][:4] + by_split["val"][:2] + by_split["test"][:3] + MALFORMED[:2]
  fakes.utkface_archive(tmp_path / "manual", names)
  b = build("utkface", tmp_path / "manual", tmp_path / "data", "default")
  counts = {k: v.num_examples for k, v in b.info.splits.items()}
  assert counts == {"train": 6, "validation": 2, "test": 3}
  train = {r["filename"].decode(): r for r in rows(b, "train")}
  assert train[MALFORMED[1]]["race"] == -1 and train[MALFORMED[1]]["age"] == 39
  assert train[MALFORMED[0]]["race"] == 1
  assert train[MALFORMED[0]]["image"][:2] == b"\xff\xd8"  # JPEG bytes kept


def test_utkface_unknown_file_is_reported(tmp_path):
  fakes.utkface_archive(tmp_path / "manual", [], extra={"1_0_0_2017.jpg.chip.jpg": fakes.jpeg_bytes(0)})
  with pytest.raises(builders.BadInputError, match="not in agejax's UTKFace split table"):
    build("utkface", tmp_path / "manual", tmp_path / "data")


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "UTKFace.tar.gz")), reason="real UTKFace not present")
def test_utkface_real_archive(tmp_path):
  b = build("utkface", SHARED, tmp_path / "data", "default")
  counts = {k: v.num_examples for k, v in b.info.splits.items()}
  assert counts == {"train": 18951, "validation": 2426, "test": 2331}
  src = b.as_data_source("test")
  ages = np.array([src[i]["age"] for i in range(len(src))])
  races = np.array([src[i]["race"] for i in range(len(src))])
  assert ages.min() >= 1 and ages.max() <= 116
  assert set(np.unique(races)) <= {-1, 0, 1, 2, 3, 4}
  conflicts = sum(int(src[i]["label_conflict"]) for i in range(len(src)))
  assert 0 < conflicts < len(src)
  # CORAL 2019 assignment: as published, validation carved from its train.
  table = utkface.split_table()
  coral = [utkface._split_of(r, "coral2019") for r in table.values()]
  assert coral.count("test") == 3287
  assert coral.count("train") + coral.count("validation") == 13147 and coral.count("validation") > 1000


def test_chalearn16(tmp_path):
  fakes.chalearn16(tmp_path / "m")
  b = build("chalearn16", tmp_path / "m", tmp_path / "d")
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 3, "holdout": 1, "validation": 4,
                                                                  "test": 4}
  r = rows(b, "test")[1]
  assert r["age"] == pytest.approx(21.5) and r["sigma"] == pytest.approx(2.5)
  both = b.as_data_source("train+validation")
  assert len(both) == 7


def test_chalearn15_semicolons_no_header(tmp_path):
  fakes.chalearn15(tmp_path / "m")
  b = build("chalearn15", tmp_path / "m", tmp_path / "d")
  r = rows(b, "validation")[2]
  assert r["age"] == 32 and r["sigma"] == pytest.approx(3.0)


def test_morph_lists_and_metadata(tmp_path):
  fakes.morph_lists(tmp_path / "a")
  b = build("morph", tmp_path / "a", tmp_path / "d1")
  assert b.info.splits["train"].num_examples == 4 and b.info.splits["holdout"].num_examples == 1
  assert rows(b, "test")[0]["sigma"] == 2.0
  fakes.morph_metadata(tmp_path / "b")
  b = build("morph", tmp_path / "b", tmp_path / "d2")
  n = sum(b.info.splits[s].num_examples for s in ("train", "holdout", "test"))
  assert n == 20 and 0 < b.info.splits["test"].num_examples < 10 and b.info.splits["holdout"].num_examples >= 1
  r = rows(b, "train")
  assert {x["gender"] for x in r} <= {0, 1} and {x["race"] for x in r} <= {0, 1, 2, 4}


def test_adience_folds(tmp_path):
  fakes.adience(tmp_path / "m")
  b = build("adience", tmp_path / "m", tmp_path / "d", "fold1")
  assert b.info.splits["test"].num_examples == 3
  assert b.info.splits["train"].num_examples == 9 and b.info.splits["holdout"].num_examples == 3  # one user of four
  assert len(b.skipped) == 5 and all("no age label" in s for s in b.skipped)  # one "None" row per fold
  r = rows(b, "test")
  assert all(0 <= x["age_group"] < 8 for x in r)
  assert {x["gender"] for x in r} <= {-1, 0, 1}
  from agejax.data.builders.adience import parse_age_group
  assert parse_age_group("(25, 32)") == 4 and parse_age_group("36") == 5 and parse_age_group("None") is None


def test_folder_with_png_and_splits(tmp_path):
  fakes.folder(tmp_path / "m", n=16)
  b = build("folder", tmp_path / "m", tmp_path / "d")
  counts = {k: v.num_examples for k, v in b.info.splits.items()}
  assert sum(counts.values()) == 16 and set(counts) == {"train", "validation", "test"}
  for r in rows(b, "validation"):
    assert r["image"][:2] == b"\xff\xd8"  # PNG re-encoded as JPEG


# ---------------------------------------------------------------- bad input

def _folder_with(tmp_path, mutate):
  fakes.folder(tmp_path / "m", n=8, with_split=False)
  mutate(tmp_path / "m")
  return tmp_path / "m"


def _replace_line(path, line_no, text):
  lines = open(path).read().splitlines()
  lines[line_no - 1] = text
  open(path, "w").write("\n".join(lines) + "\n")


BAD_CASES = {
    "corrupt": (lambda m: open(m / "faces/001.jpg", "wb").write(b"not an image"), r"labels.csv:3 .*not a readable image"),
    "truncated": (lambda m: open(m / "faces/002.jpg", "wb").write(fakes.jpeg_bytes(2, 64)[:300]), r"labels.csv:4 .*not a readable image"),
    "missing": (lambda m: os.remove(m / "faces/003.jpg"), r"labels.csv:5 .*cannot read the image"),
    "unparsable": (lambda m: _replace_line(m / "labels.csv", 6, "faces/004.jpg,forty,0,0,0,"), r"labels.csv:6: cannot parse the age"),
    "age_outside": (lambda m: _replace_line(m / "labels.csv", 7, "faces/006.jpg,150,0,0,0,"), r"labels.csv:7 .*age 150.0 is outside"),
    "negative_sigma": (lambda m: _replace_line(m / "labels.csv", 8, "faces/007.jpg,30,-1,0,0,"), r"labels.csv:8 .*sigma -1.0"),
    "duplicate": (lambda m: _replace_line(m / "labels.csv", 9, "faces/001.jpg,30,0,0,0,"), r"labels.csv:9 .*duplicate key 'faces/001.jpg'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_naming_file_and_line(tmp_path, case):
  mutate, pattern = BAD_CASES[case]
  m = _folder_with(tmp_path, mutate)
  with pytest.raises(builders.BadInputError, match=pattern):
    build("folder", m, tmp_path / "d")
  # The interrupted build does not leave a dataset that looks complete.
  assert not builders.get_builder("folder", None, str(tmp_path / "d")).is_prepared()


@pytest.mark.parametrize("case", ["corrupt", "unparsable", "duplicate"])
def test_bad_input_skip_is_counted(tmp_path, case):
  mutate, _ = BAD_CASES[case]
  m = _folder_with(tmp_path, mutate)
  b = build("folder", m, tmp_path / "d", on_error="skip")
  assert len(b.skipped) == 1 and b.info.splits["train"].num_examples == 7


def test_interrupted_build_then_rebuild(tmp_path):
  fakes.folder(tmp_path / "m", n=8, with_split=False)
  os.remove(tmp_path / "m" / "faces/006.jpg")
  with pytest.raises(builders.BadInputError):
    build("folder", tmp_path / "m", tmp_path / "d")
  fakes.write_image(str(tmp_path / "m" / "faces/006.jpg"), 6)
  b = build("folder", tmp_path / "m", tmp_path / "d")
  assert b.is_prepared() and b.info.splits["train"].num_examples == 8


def test_missing_dataset_says_where_to_put_files(tmp_path):
  with pytest.raises(builders.DatasetNotFoundError, match=r"missing UTKFace.tar.gz.*python -m agejax.data.build utkface"):
    builders.ensure_built("utkface", None, str(tmp_path / "d"), str(tmp_path / "empty"))


def test_build_command_reports_counts_and_skips(tmp_path):
  import json
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fakes.folder(str(tmp_path / "m"), n=8, with_split=False)
  open(tmp_path / "m" / "faces/001.jpg", "wb").write(b"broken")
  args = [sys.executable, "-m", "agejax.data.build", "folder", f"--manual_dir={tmp_path / 'm'}",
          f"--data_dir={tmp_path / 'd'}"]
  p = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1 and "labels.csv:3" in p.stderr and "not a readable image" in p.stderr
  p = subprocess.run(args + ["--skip_bad"], cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  summary = json.loads(p.stdout.strip().splitlines()[-1])
  assert summary["splits"] == {"train": 7} and summary["skipped"] == 1
  assert "skipped: labels.csv:3" in p.stderr


# ------------------------------------------- labels files that cannot be read, paths that leave the root

LABEL_FILE_CASES = {
    "empty": (b"", r"labels.csv: the file is empty"),
    "header_only": (b"path,age\n", r"labels.csv: only a header \(path, age\), no rows"),
    "not_utf8": ("path,age\nfaces/001.jpg,3\xe9\n".encode("latin-1"), r"labels.csv: not UTF-8 text \(byte 24"),
    "bad_header": (b"file,years\nfaces/001.jpg,30\n", r"labels.csv:1: the header must name columns path and age"),
}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("case", sorted(LABEL_FILE_CASES))
def test_unreadable_labels_files_name_the_file(tmp_path, case, on_error):
  content, pattern = LABEL_FILE_CASES[case]
  m = _folder_with(tmp_path, lambda m: open(m / "labels.csv", "wb").write(content))
  with pytest.raises(builders.BadInputError, match=pattern):
    builders.ensure_built("folder", None, str(tmp_path / "d"), str(m), on_error=on_error)


def test_skipping_every_row_is_an_error(tmp_path):
  m = _folder_with(tmp_path, lambda m: [open(f, "wb").write(b"x") for f in (m / "faces").iterdir()])
  with pytest.raises(builders.BadInputError, match=r"no usable records for this split \(8 skipped; the first: labels.csv:2"):
    build("folder", m, tmp_path / "d", on_error="skip")


@pytest.mark.parametrize("path", ["../outside.jpg", "faces/../../outside.jpg", "/etc/hostname"])
def test_paths_that_leave_the_image_folder_are_refused(tmp_path, path):
  fakes.write_image(str(tmp_path / "outside.jpg"), 1)
  m = _folder_with(tmp_path, lambda m: _replace_line(m / "labels.csv", 3, f"{path},30,0,0,0,"))
  with pytest.raises(builders.BadInputError, match=r"labels.csv:3: the path .* leaves the image folder"):
    build("folder", m, tmp_path / "d")
  b = build("folder", m, tmp_path / "d2", on_error="skip")
  assert b.info.splits["train"].num_examples == 7 and "leaves the image folder" in b.skipped[0]


def test_next_build_removes_what_an_interrupted_one_left(tmp_path):
  fakes.folder(tmp_path / "m", n=8, with_split=False)
  os.remove(tmp_path / "m" / "faces/006.jpg")
  with pytest.raises(builders.BadInputError):
    builders.ensure_built("folder", None, str(tmp_path / "d"), str(tmp_path / "m"))
  parent = tmp_path / "d" / "folder"
  # A build killed mid-way (SIGKILL, a lost machine) leaves its temporary folder behind.
  (parent / "incomplete.K1LL3D_1.0.0").mkdir(parents=True)
  (parent / "incomplete.K1LL3D_1.0.0" / "folder-train.array_record-00000-of-00001").write_bytes(b"half")
  fakes.write_image(str(tmp_path / "m" / "faces/006.jpg"), 6)
  b = builders.ensure_built("folder", None, str(tmp_path / "d"), str(tmp_path / "m"))
  assert b.is_prepared() and not any(p.name.startswith("incomplete.") for p in parent.iterdir())


# ---------------------------------------------- checkpoint selection never sees the reported split

def _dataset_config(name, arg=None):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _records(b, split):
  """(filename, subject) of every record of a split expression ("a+b")."""
  src = b.as_data_source(split)
  names = [src[i]["filename"].decode() for i in range(len(src))]
  subject = lambda n: os.path.basename(n).split("_")[0] if b.name == "morph" else n.split("/")[1] if b.name == "adience" else n
  return {(n, subject(n)) for n in names}


@pytest.mark.parametrize("name,arg,fixture", [
    ("chalearn15", None, fakes.chalearn15), ("chalearn16", None, fakes.chalearn16),
    ("morph", None, fakes.morph_lists), ("morph", None, fakes.morph_metadata),
    ("adience", "fold0", fakes.adience), ("adience", "fold3", fakes.adience)])
def test_every_config_selects_checkpoints_apart_from_the_reported_split(tmp_path, name, arg, fixture):
  c = _dataset_config(name, arg)
  fixture(str(tmp_path / "m"))
  b = builders.ensure_built(c.dataset.name, c.dataset.config or None, str(tmp_path / "d"), str(tmp_path / "m"),
                            on_error=c.dataset.on_error)
  select, report, train = (_records(b, c.dataset[k]) for k in ("eval_split", "test_split", "train_split"))
  assert select and report and train
  assert c.dataset.eval_split != c.dataset.test_split
  for a, b_ in ((select, report), (select, train)):
    assert not {n for n, _ in a} & {n for n, _ in b_}
    if name in ("morph", "adience"):  # subject-exclusive
      assert not {s for _, s in a} & {s for _, s in b_}
  # full_train: the paper's training set, no selection; evaluate.py then uses the last checkpoint.
  full = _dataset_config(name, "full_train" if arg is None else f"{arg},full_train")
  assert full.dataset.eval_split == "" and _records(b, full.dataset.train_split) == train | select
  assert full.dataset.test_split == c.dataset.test_split


@pytest.mark.parametrize("config", ["default", "coral2019"])
def test_utkface_configs_select_on_validation_apart_from_test_and_its_duplicates(config):
  c = _dataset_config("utkface", config if config != "default" else None)
  assert (c.dataset.config, c.dataset.eval_split, c.dataset.test_split) == (config, "validation", "test")
  table = utkface.split_table()
  coral_test = utkface.coral_test_groups(table)
  groups = {}
  for row in table.values():
    groups.setdefault(utkface._split_of(row, config, coral_test), set()).add(row["group"])
  assert groups["validation"] and not groups["validation"] & groups["test"]
  assert not groups["validation"] & groups["train"]
