"""The exported SavedModel: signatures, parity with Keras + eval preprocessing, requests, atomicity."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import alexnet_tf
from alexnet_tf import preprocessing, serving
from tests.helpers import (ROOT, assert_one_line_error, encode, jpeg_bomb, require, run_measured,
                           smooth_image)

CONFIG = preprocessing.PreprocessConfig(image_size=32, resize_size=36)
CLASSES = ["cat", "dog", "emu"]


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    net = alexnet_tf.AlexNet(3, "cifar", (32, 32, 3), init="keras")
    # Give it non-trivial weights: a few SGD steps on random data.
    net.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(0, 50, (16, 32, 32, 3)).astype(np.float32)
    net.fit(x, np.arange(16) % 3, epochs=2, verbose=0)
    return net


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("export") / "alexnet")
    path = serving.export_saved_model(model, base, CLASSES, CONFIG)
    return path, tf.saved_model.load(path)


def jpegs(n=3):
    return [encode(smooth_image(40 + 7 * i, 50 + 3 * i, seed=i), "jpeg") for i in range(n)]


def keras_reference(model, encoded_images, view=preprocessing.eval_image):
    """Keras model on the evaluation preprocessing, decoded independently with decode_jpeg."""
    images = [tf.cast(tf.io.decode_jpeg(b, channels=3), tf.float32) for b in encoded_images]
    batch = tf.stack([view(image, CONFIG) for image in images])
    return tf.nn.softmax(model(batch, training=False)).numpy()


def test_first_version_is_1_and_next_is_2(exported, model):
    path, _ = exported
    assert os.path.basename(path) == "1"
    assert serving.next_version(os.path.dirname(path)) == 2


@pytest.mark.onednn
def test_serving_default_matches_keras_on_real_jpeg_bytes(exported, model):
    _, loaded = exported
    data = jpegs()
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(data))
    expected = keras_reference(model, data)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, rtol=1e-4, atol=1e-6)
    top = np.argsort(-expected, axis=1)
    np.testing.assert_array_equal(out["class_ids"].numpy(), top)
    assert out["classes"].numpy()[0].tolist() == [CLASSES[i].encode() for i in top[0]]
    np.testing.assert_allclose(out["scores"].numpy(), np.take_along_axis(expected, top, 1), rtol=1e-4)


def test_saved_model_holds_standard_ops_only(exported, model):
    from tensorflow.core.protobuf import saved_model_pb2

    lrn_layers = [layer for layer in model.layers
                  if isinstance(layer, alexnet_tf.LocalResponseNormalization)]
    # On this CPU-only machine the layers train and predict through XLA-fused functions...
    assert lrn_layers and all(layer._fused_forward is not None for layer in lrn_layers)
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(exported[0], "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    functions = proto.meta_graphs[0].graph_def.library.function
    ops = {node.op for function in functions for node in function.node_def}
    # ...but the export holds TensorFlow's LRN op, which TF Serving runs anywhere, and plain
    # MatMul for the dense layers (no SparseMatMul: it has no GPU kernel).
    assert "LRN" in ops and "MatMul" in ops and "SparseMatMul" not in ops
    assert not [f.signature.name for f in functions if "_XlaMustCompile" in f.attr]


def test_the_export_decodes_on_the_cpu_and_leaves_the_model_to_the_server(exported):
    # TensorFlow has no GPU kernel for PNG: a server with a GPU must still decode on its CPU,
    # and place the network itself where it likes (on its GPU).
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(exported[0], "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    nodes = [node for function in proto.meta_graphs[0].graph_def.library.function
             for node in function.node_def]
    decodes = [node for node in nodes if node.op in ("DecodeImage", "DecodeJpeg", "DecodePng")]
    convolutions = [node for node in nodes if node.op == "Conv2D"]
    assert decodes and convolutions
    assert all(node.device.endswith("CPU:0") for node in decodes)
    assert not [node.device for node in convolutions if node.device]


def test_export_holds_each_weight_once(exported, model):
    variables = os.path.join(exported[0], "variables")
    stored = sum(os.path.getsize(os.path.join(variables, f)) for f in os.listdir(variables))
    weight_bytes = sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights)
    assert weight_bytes <= stored <= 1.1 * weight_bytes


@pytest.mark.onednn
def test_predict_images_matches_keras_on_decoded_pixels(exported, model):
    _, loaded = exported
    encoded = jpegs(1)[0]
    images = tf.cast(tf.io.decode_jpeg(encoded)[None], tf.float32)
    out = loaded.signatures["predict_images"](images=images)
    np.testing.assert_allclose(out["probabilities"].numpy(), keras_reference(model, [encoded]),
                               rtol=1e-4, atol=1e-6)


def test_non_image_bytes_raise_invalid_argument(exported):
    _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))


def test_other_formats_and_oversized_images_are_refused_by_their_header(exported, hostile_images):
    _, loaded = exported
    serve = loaded.signatures["serving_default"]
    from PIL import Image

    gif = io.BytesIO()
    Image.fromarray(smooth_image(20, 20)).save(gif, format="GIF")
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG or PNG image"):
        serve(image_bytes=tf.constant([gif.getvalue()]))
    with open(hostile_images["png_bomb"], "rb") as f:
        png_bomb = f.read()
    for bomb in (png_bomb, jpeg_bomb(20000, 20000)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=(
                "image of 400000000 pixels is over the limit of 40000000 pixels")):
            serve(image_bytes=tf.constant([jpegs(1)[0], bomb]))


def test_the_pixel_budget_is_the_exports_setting(model, tmp_path):
    budget = 40 * 50
    path = serving.export_saved_model(model, str(tmp_path / "alexnet"), CLASSES,
                                      dataclasses.replace(CONFIG, max_pixels=budget))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    at_limit = encode(smooth_image(40, 50), "jpeg")
    assert serve(image_bytes=tf.constant([at_limit]))["probabilities"].shape == (1, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="2050 pixels is over the limit of 2000"):
        serve(image_bytes=tf.constant([encode(smooth_image(41, 50), "png")]))


def serve_measured(export_dir, image):
    """tests/serve_files.py on one file in a fresh process: (status, stdout, stderr, peak MB)."""
    return run_measured([sys.executable, os.path.join(ROOT, "tests", "serve_files.py"),
                         export_dir, image], env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.slow
def test_bombs_are_refused_before_decoding_and_a_12_megapixel_photo_is_served(
        exported, model, hostile_images):
    path, _ = exported
    status, _, stderr, baseline = serve_measured(path, hostile_images["small"])
    assert status == 0, stderr[-2000:]
    for bomb in ("png_bomb", "jpeg_bomb"):
        status, _, stderr, peak = serve_measured(path, hostile_images[bomb])
        assert status == 3 and "over the limit of 40000000 pixels" in stderr, stderr[-2000:]
        # Decoding the PNG would take 1.2 GB (its RGB pixels) and the float32 copy 4.8 GB.
        assert peak - baseline < 100, (bomb, peak, baseline)
    status, stdout, stderr, _ = serve_measured(path, hostile_images["photo"])
    assert status == 0, stderr[-2000:]
    with open(hostile_images["photo"], "rb") as f:
        expected = keras_reference(model, [f.read()])
    np.testing.assert_allclose(json.loads(stdout)["probabilities"], expected, rtol=1e-4,
                               atol=1e-6)


def test_wrong_dtype_or_rank_is_rejected_by_the_signature(exported):
    _, loaded = exported
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded.signatures["predict_images"](images=tf.zeros([1, 8, 8, 3], tf.int32))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded.signatures["predict_images"](images=tf.zeros([8, 8, 3]))


@pytest.mark.slow
def test_saved_model_cli_lists_both_signatures(exported):
    path, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--all", "--dir", path], capture_output=True, text=True,
                           check=True).stdout
    serving_part = shown.split("signature_def['serving_default']")[1]
    assert "inputs['image_bytes']" in serving_part and "DT_STRING" in serving_part
    images_part = shown.split("signature_def['predict_images']")[1].split("signature_def[")[0]
    assert "inputs['images']" in images_part and "DT_FLOAT" in images_part
    assert "(-1, -1, -1, 3)" in images_part
    for output in ("probabilities", "classes", "class_ids", "scores"):
        assert f"outputs['{output}']" in serving_part


def test_predict_request_proto_matches_the_signature(exported, model):
    predict_pb2 = require("tensorflow_serving.apis.predict_pb2")
    path, loaded = exported
    data = jpegs(2)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "alexnet"
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(data, dtype=tf.string))
    # Round trip through the wire format, as TF Serving receives it.
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    signature = loaded.signatures[received.model_spec.signature_name]
    assert set(received.inputs) == set(signature.structured_input_signature[1])
    inputs = {k: tf.make_ndarray(v) for k, v in received.inputs.items()}
    out = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    np.testing.assert_allclose(out["probabilities"].numpy(), keras_reference(model, data), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ten_crop_export_averages_the_ten_views(model, tmp_path):
    path = serving.export_saved_model(model, str(tmp_path / "m"), CLASSES, CONFIG, ten_crop=True)
    loaded = tf.saved_model.load(path)
    data = jpegs(2)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(data))["probabilities"]
    images = [tf.cast(tf.io.decode_jpeg(b), tf.float32) for b in data]
    expected = [tf.reduce_mean(tf.nn.softmax(model(preprocessing.ten_crop(x, CONFIG))), 0) for x in images]
    np.testing.assert_allclose(out.numpy(), np.stack(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_existing_version_is_not_overwritten(model, tmp_path):
    base = str(tmp_path / "m")
    serving.export_saved_model(model, base, CLASSES, CONFIG, version=3)
    with pytest.raises(serving.ExportError, match="already exists"):
        serving.export_saved_model(model, base, CLASSES, CONFIG, version=3)
    serving.export_saved_model(model, base, CLASSES, CONFIG, version=3, overwrite=True)
    assert serving.next_version(base) == 4


def test_a_claimed_version_is_skipped_or_refused(model, tmp_path):
    # An export in progress holds .claim-<N>: the next export takes N + 1, and asking for N
    # explicitly is a one-line error; no claim is left behind.
    base = tmp_path / "m"
    base.mkdir()
    (base / ".claim-1").touch()
    assert os.path.basename(serving.export_saved_model(model, str(base), CLASSES, CONFIG)) == "2"
    with pytest.raises(serving.ExportError, match="being written by another export"):
        serving.export_saved_model(model, str(base), CLASSES, CONFIG, version=1)
    assert sorted(os.listdir(base)) == [".claim-1", "2"]


@pytest.mark.slow
def test_concurrent_exports_get_distinct_complete_versions(tiny_run, tmp_path):
    base = tmp_path / "exports" / "alexnet"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={tiny_run}",
           f"--export_dir={base}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path) for _ in range(4)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    printed = sorted(out.splitlines()[0] for out, _ in outputs)
    assert printed == [f"exported {base / str(v)}" for v in (1, 2, 3, 4)]
    assert sorted(os.listdir(base)) == ["1", "2", "3", "4"]  # no claims or temporaries left
    png = tf.io.encode_png(smooth_image(28, 28, channels=1)).numpy()
    for version in ("1", "2", "3", "4"):
        out = tf.saved_model.load(str(base / version)).signatures["serving_default"](
            image_bytes=tf.constant([png]))
        assert out["probabilities"].shape == (1, 10)


@pytest.mark.slow
def test_export_os_errors_are_one_line(tiny_run, tmp_path, full_disk):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={tiny_run}"]
    result = subprocess.run(cmd + ["--export_dir=/proc/alexnet_tf/exports"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert_one_line_error(result, "export.py", "/proc/alexnet_tf")
    result = subprocess.run(cmd + [f"--export_dir={full_disk / 'alexnet'}"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert_one_line_error(result, "export.py")
    assert os.listdir(full_disk / "alexnet") == []  # no version, temporary or claim left
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"),
                             "--flagfile=/no/such/export.cfg"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert_one_line_error(result, "export.py", "/no/such/export.cfg")


@pytest.mark.slow
def test_a_read_only_run_exports_and_a_read_only_export_dir_is_one_line(read_only_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={read_only_run}"]
    result = subprocess.run(cmd + [f"--export_dir={tmp_path / 'alexnet'}"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]  # export only reads the run
    assert os.listdir(tmp_path / "alexnet") == ["1"]
    result = subprocess.run(cmd + [f"--export_dir={read_only_run / 'exports'}"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert_one_line_error(result, "export.py", "Read-only file system")


@pytest.mark.slow
def test_interrupted_export_leaves_no_visible_version(model, tmp_path, monkeypatch):
    base = tmp_path / "m"
    written = []

    def die_before_rename(src, dst):
        written.append(os.listdir(src))  # the SavedModel was complete in the hidden directory
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(os, "rename", die_before_rename)
    with pytest.raises(KeyboardInterrupt):
        serving.export_saved_model(model, str(base), CLASSES, CONFIG)
    assert "saved_model.pb" in written[0]
    assert os.listdir(base) == []  # no version, and the partial directory is gone


@pytest.mark.slow
def test_export_cli_on_a_trained_run(tiny_run, tmp_path):
    workdir = tiny_run
    base = tmp_path / "exports" / "alexnet"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), f"--workdir={workdir}", f"--export_dir={base}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.listdir(base) == ["1"]
    again = subprocess.run(cmd + ["--version=1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].startswith("export.py: error:")
    assert "Traceback" not in again.stderr
    loaded = tf.saved_model.load(str(base / "1"))
    png = tf.io.encode_png(smooth_image(28, 28, channels=1)).numpy()
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([png]))
    assert out["probabilities"].shape == (1, 10)
    # The labels are the run's class names, in the dataset's order.
    with open(os.path.join(workdir, "dataset.json")) as f:
        class_names = json.load(f)["class_names"]
    assert [c.decode() for c in out["classes"].numpy()[0]] == [
        class_names[i] for i in out["class_ids"].numpy()[0]]
    with open(base / "1" / "assets.extra" / "class_names.txt") as f:
        assert f.read().splitlines() == class_names
    # --max_pixels below the 28 x 28 images the run was trained on.
    small = subprocess.run(cmd + ["--max_pixels=700"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert small.returncode == 0, small.stderr
    with pytest.raises(tf.errors.InvalidArgumentError, match="784 pixels is over the limit of 700"):
        tf.saved_model.load(str(base / "2")).signatures["serving_default"](
            image_bytes=tf.constant([png]))
