"""ONNX export and ONNX Runtime: the same function as model.jaxexport, checked when written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import fakes

pytest.importorskip("onnxruntime", reason="pip install 'agejax[onnx]'")
pytest.importorskip("jax2onnx", reason="pip install 'agejax[onnx-export]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  from configs import default
  d = tmp_path_factory.mktemp("onnx")
  fakes.built_folder(d, n=24, size=48)
  c = default.get_config("smoke,multitask")
  c.dataset.name, c.dataset.data_dir = "folder", str(d / "data")
  faces = np.stack([np.asarray(__import__("PIL.Image").Image.open(__import__("io").BytesIO(
      fakes.jpeg_bytes(i, size=32))).convert("RGB")) for i in range(6)])
  return fakes.smoke_exported(c, str(d / "export"), onnx=True, check_faces=faces) + (faces,)


def test_onnx_model_gives_the_jax_models_answers(exported):
  from agejax import export
  _, _, path, faces = exported
  meta = json.load(open(os.path.join(path, "model.json")))
  o = meta["onnx"]
  assert o["file"] == "model.onnx" and o["checked_faces"] == 6 and o["max_abs_difference"]["age"] <= 0.01
  assert o["inputs"]["dtype"] == "uint8" and set(o["outputs"]) == {"age", "std", "probs", "gender_probs", "race_probs"}
  jax_model = export.load(path, runtime="jax")
  onnx_model = export.load(path, runtime="onnx")
  assert (jax_model.runtime, onnx_model.runtime, export.load(path).runtime) == ("jax", "onnx", "onnx")
  rng = np.random.RandomState(0)
  for n in (1, 7):  # the batch is dynamic
    x = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    a, b = jax_model.predict(x), onnx_model.predict(x)
    assert set(a) == set(b)
    np.testing.assert_allclose(b["age"], a["age"], atol=0.01)
    np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-4)
    np.testing.assert_allclose(b["gender_probs"], a["gender_probs"], atol=1e-4)


def test_weights_file_rebuilds_the_network(exported):
  """weights.msgpack (no pickle) holds the variables: the network built from it answers as the export."""
  import jax
  from flax import serialization
  from agejax import export, objectives, preprocessing, train_lib
  trainer, state, path, faces = exported
  with open(os.path.join(path, "weights.msgpack"), "rb") as f:
    variables = serialization.msgpack_restore(f.read())
  want = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(k))
  model = train_lib.make_model(trainer.config, ops="plain")
  out = objectives.predict_images(trainer.objective, lambda x: model.apply(variables, x, train=False),
                                  preprocessing.normalize(faces), trainer.grid, flip=True)
  np.testing.assert_allclose(np.asarray(out["age"]), export.load(path, "jax").predict(faces)["age"], atol=1e-4)


def test_an_onnx_model_that_disagrees_is_not_written(exported, tmp_path, monkeypatch):
  import jax.numpy as jnp
  from agejax import onnx_export
  calls = {"n": 0}

  def predict(images):  # jax's answer and ONNX's differ: the check compares the runner to a shifted one
    x = images.astype(jnp.float32).mean(axis=(1, 2, 3))
    return {"age": x, "std": x}
  real_run = onnx_export.OnnxRunner.run
  monkeypatch.setattr(onnx_export.OnnxRunner, "run", lambda self, f: {k: v + 1.0 for k, v in real_run(self, f).items()})
  with pytest.raises(ValueError, match="differ from the JAX function's by up to 1.0"):
    onnx_export.write(predict, 8, str(tmp_path), np.zeros((2, 8, 8, 3), np.uint8))
  assert not os.listdir(tmp_path)


def test_predict_takes_a_runtime(exported, tmp_path):
  _, _, path, faces = exported
  from PIL import Image
  Image.fromarray(faces[0]).save(tmp_path / "chip.png")
  outs = {}
  for rt in ("jax", "onnx"):
    p = subprocess.run([sys.executable, "predict.py", "--model", path, "--aligned", "--json", "--runtime", rt,
                        str(tmp_path / "chip.png")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    outs[rt] = json.loads(p.stdout.strip().splitlines()[-1])["faces"][0]["age"]
  assert abs(outs["jax"] - outs["onnx"]) <= 0.01


def test_onnx_graph_holds_the_network_once_per_view(exported):
  """model.onnx runs the network once for the faces and once mirrored: every convolution's weight
  feeds two Conv nodes (a graph traced once per output held it once per output and view)."""
  import collections
  import onnx
  _, _, path, _ = exported
  graph = onnx.load(os.path.join(path, "model.onnx")).graph
  producer = {o: n for n in graph.node for o in n.output}
  uses = collections.Counter()
  for node in graph.node:
    if node.op_type == "Conv":
      w = node.input[1]
      while w in producer and producer[w].op_type in ("Cast", "Transpose", "Identity", "Reshape"):
        w = producer[w].input[0]
      uses[w] += 1
  assert uses and set(uses.values()) == {2}, uses


def test_int8_model_is_kept_within_the_tolerance_and_chosen_by_auto(exported, tmp_path, monkeypatch):
  """onnx_export.quantize writes model.int8.onnx with int8 weights where its MAE stays within the
  tolerance of model.onnx's (recorded), runtime auto then runs it; where it moves more, no file."""
  import shutil
  import onnx
  from agejax import export, onnx_export
  _, _, path, faces = exported
  d = str(tmp_path / "m")
  shutil.copytree(path, d)
  ages = np.linspace(5, 60, len(faces)).astype(np.float32)
  monkeypatch.setattr(onnx_export, "INT8_MAE_TOLERANCE", 100.0)  # a 3-step network: int8 may move it a lot
  monkeypatch.setattr(onnx_export, "INT8_STD_TOLERANCE", 100.0)
  rec = onnx_export.quantize(d, faces, faces, ages, "static")
  assert rec["kept"] and rec["file"] == onnx_export.INT8_FILE and rec["calibration_faces"] == len(faces)
  want = export.load(d, runtime="onnx").predict(faces, calibrated=False)["age"]
  assert rec["mae"]["float32"] == pytest.approx(np.mean(np.abs(want - ages)), abs=1e-3)
  graph = onnx.load(os.path.join(d, onnx_export.INT8_FILE)).graph
  assert any(n.op_type == "DequantizeLinear" for n in graph.node)
  assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)  # weights stored as int8
  model = export.load(d)
  assert model.runtime == "onnx-int8"
  with monkeypatch.context() as m:  # no ONNX Runtime: auto falls back to XLA
    m.setattr(onnx_export, "available", lambda convert=False: False)
    assert export.load(d).runtime == "jax"
  got = model.predict(faces, calibrated=False)["age"]
  assert rec["mae"]["int8"] == pytest.approx(np.mean(np.abs(got - ages)), abs=1e-3)
  assert rec["quantised_ops"] == ["Conv"] and not any(n.op_type == "QLinearSoftmax" for n in graph.node)
  monkeypatch.setattr(onnx_export, "INT8_STD_TOLERANCE", -1.0)  # spreads must not move: refused on them alone
  rec = onnx_export.quantize(d, faces, faces, ages, "static")
  assert not rec["kept"] and rec["std_mean_abs_change"] >= 0 and not os.path.exists(os.path.join(d, onnx_export.INT8_FILE))
  monkeypatch.setattr(onnx_export, "INT8_STD_TOLERANCE", 100.0)
  monkeypatch.setattr(onnx_export, "INT8_MAE_TOLERANCE", -1.0)  # nothing is within a negative tolerance
  rec = onnx_export.quantize(d, faces, faces, ages, "dynamic")
  assert not rec["kept"] and rec["file"] is None and not os.path.exists(os.path.join(d, onnx_export.INT8_FILE))
  assert export.load(d).runtime == "onnx"
  with pytest.raises(FileNotFoundError, match="model.int8.onnx"):
    export.load(d, runtime="onnx-int8")


def test_a_new_export_leaves_no_earlier_onnx_files(exported, tmp_path):
  """Exporting into a folder that holds an earlier model's ONNX files removes them (auto would run them)."""
  import shutil
  from agejax import export, onnx_export
  trainer, state, path, _ = exported
  d = str(tmp_path / "m")
  shutil.copytree(path, d)
  shutil.copy(os.path.join(d, "model.onnx"), os.path.join(d, onnx_export.INT8_FILE))
  export.export_state(trainer, state, d, onnx=False)
  assert not os.path.exists(os.path.join(d, "model.onnx")) and not os.path.exists(os.path.join(d, onnx_export.INT8_FILE))
  assert export.load(d).runtime == "jax"


def test_float32_weights_replaces_bfloat16_casts_exactly(tmp_path):
  """A bfloat16 weight cast to float32 becomes that float32 weight: same outputs, no Cast left."""
  import onnx
  import onnxruntime as ort
  from onnx import TensorProto, helper, numpy_helper
  import ml_dtypes
  from agejax import onnx_export
  w = np.random.RandomState(0).normal(size=(3, 4)).astype(ml_dtypes.bfloat16)
  init = helper.make_tensor("w16", TensorProto.BFLOAT16, (3, 4), w.view(np.uint16).tobytes(), raw=True)
  graph = helper.make_graph([helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
                             helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3))],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 4))], [init])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
  want = run(model)
  assert onnx_export.float32_weights(model) == 1
  assert [n.op_type for n in model.graph.node] == ["MatMul"]
  assert [(i.name, i.data_type) for i in model.graph.initializer] == [("w", TensorProto.FLOAT)]
  np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w.astype(np.float32))
  np.testing.assert_array_equal(run(model), want)


def test_onnx_runtime_path_imports_no_jax(exported, tmp_path):
  """Loading and running an ONNX export, up to predict's records (ages, stds, intervals), needs no
  JAX: a service starts in ONNX Runtime's time, not JAX's."""
  import shutil
  _, _, src, faces = exported
  path = str(tmp_path / "calibrated")
  shutil.copytree(src, path)
  meta = json.load(open(os.path.join(path, "model.json")))
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump({**meta, "calibration": {"temperature": 1.3}}, f)  # as the bundled model ships
  np.save(tmp_path / "faces.npy", faces)
  code = (f"import sys, numpy as np; from agejax import export, predict_lib; m = export.load({path!r}, 'onnx'); "
          f"r = predict_lib.predict_faces(m, list(np.load({str(tmp_path / 'faces.npy')!r}))); "
          "print(m.runtime, len(r), all(r_['interval90'][0] <= r_['interval90'][1] for r_ in r), 'jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["onnx", str(len(faces)), "True", "False"]


def test_onnx_model_is_validated_against_model_json(exported, tmp_path):
  import shutil
  from agejax import export
  _, _, path, _ = exported
  meta = json.load(open(os.path.join(path, "model.json")))
  for name, change, message in [("size", dict(image_size=48), r"model\.onnx: takes images of shape \(32, 32, 3\)"),
                                ("grid", dict(label_grid=meta["label_grid"][:-3]), r"model\.onnx: the network gives")]:
    d = tmp_path / name
    shutil.copytree(path, d)
    (d / "model.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(export.ExportError, match=message):
      export.load(str(d), "onnx")
  d = tmp_path / "damaged"
  shutil.copytree(path, d)
  blob = (d / "model.onnx").read_bytes()
  (d / "model.onnx").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(export.ExportError, match=r"damaged/model\.onnx: not a model ONNX Runtime can load"):
    export.load(str(d), "onnx")
  (d / "model.jaxexport").unlink()  # ONNX alone needs no jax.export artifact; the jax runtime does
  shutil.copy(os.path.join(path, "model.onnx"), d / "model.onnx")
  assert export.load(str(d), "onnx").predict(np.zeros((1, 32, 32, 3), np.uint8))["age"].shape == (1,)
  with pytest.raises(FileNotFoundError, match="no model.jaxexport"):
    export.load(str(d), "jax")
